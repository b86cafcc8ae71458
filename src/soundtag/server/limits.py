"""What the service refuses before any audio is decoded: bodies past the upload
limit (counted while they stream in, whatever Content-Length says) and content
whose first bytes are no audio format it reads."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# (offset, bytes, second offset, second bytes, suffix): the suffix names the file
# the upload is written to, so the decoder recognises it
MAGIC = (
    (0, b"RIFF", 8, b"WAVE", ".wav"),
    (0, b"RF64", 8, b"WAVE", ".wav"),
    (0, b"fLaC", 0, b"", ".flac"),
    (0, b"OggS", 0, b"", ".ogg"),
    (0, b"ID3", 0, b"", ".mp3"),
    (0, b"FORM", 8, b"AIFF", ".aiff"),
    (0, b"FORM", 8, b"AIFC", ".aiff"),
    (0, b".snd", 0, b"", ".au"),
)
FORMATS = "WAV, FLAC, OGG (Vorbis or Opus), MP3, AIFF or AU"


def sniff(head: bytes) -> str | None:
    """The file suffix of the audio format `head` (the first bytes) starts, or None."""
    for at, magic, at2, magic2, suffix in MAGIC:
        if head[at : at + len(magic)] == magic and head[at2 : at2 + len(magic2)] == magic2:
            return suffix
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an MPEG audio frame
        return ".mp3"
    return None


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


class BodyTooLarge(Exception):
    """Raised from `receive` when a body passes the limit."""


class BodyLimit:
    """ASGI middleware: a request body past `max_bytes` gets 413 — at once when
    Content-Length says so, else as soon as the bytes received pass it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = error_body(413, f"upload larger than the limit of {self.max_bytes} bytes")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
