"""The tagging service behind the HTTP routes: uploads written to a private
folder, decoded and turned into features on worker threads, scored through the
micro-batcher, and every limit that answers with a status of its own."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from .. import audio
from ..errors import SoundtagError
from ..library import Library
from ..library.engine import backend_for, model_id
from ..predict import Tagger
from ..scorer import Clip
from ..timeline import timeline_of
from .batcher import MicroBatcher
from .limits import FORMATS, sniff

SPECTROGRAM_COLUMNS = 600  # frames are averaged down to at most this many columns
CHUNK = 1 << 16


class ApiError(Exception):
    """An answer other than 200, with its message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Settings:
    """The service's limits and batching."""

    max_upload_bytes: int = 50 * 2**20
    max_duration: float = 600.0
    timeout: float = 30.0
    max_concurrency: int = 64
    api_key: str | None = None
    max_batch: int = 16
    max_wait: float = 0.005
    long: float = 30.0
    window: float = 2.0
    hop: float = 1.0
    threads: int = 0


@dataclass
class Decoded:
    duration: float
    clip: Clip
    whole: Clip


class Service:
    """One tagger, its batcher and threads, an optional library."""

    def __init__(self, tagger: Tagger, model: str, settings: Settings, library: Library | None = None):
        self.tagger, self.model, self.settings, self.library = tagger, model, settings, library
        threads = settings.threads or len(os.sched_getaffinity(0))
        self.decoding = ThreadPoolExecutor(threads, "soundtag-decode")
        self.scoring = ThreadPoolExecutor(1, "soundtag-score")
        self.batcher = MicroBatcher(tagger.score_each, settings.max_batch, settings.max_wait, self.scoring)
        self.uploads = Path(tempfile.mkdtemp(prefix="soundtag-uploads-"))  # mode 0700: this process's only
        self.in_flight = 0
        self.thresholds = _thresholds(tagger)

    @classmethod
    def load(cls, run: str | Path, settings: Settings, backend: str = "auto", db: str | Path | None = None) -> Service:
        backend = backend_for([run], backend)
        tagger = Tagger.load([run], backend=backend, threads=settings.threads)
        return cls(tagger, model_id([run], backend), settings, Library(db) if db else None)

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.decoding.shutdown(wait=False, cancel_futures=True)
        self.scoring.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.uploads, ignore_errors=True)
        if self.library is not None:
            self.library.close()

    # --- one request ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A place among the requests in progress, or 503 when they are all taken."""
        if self.in_flight >= self.settings.max_concurrency:
            raise ApiError(503, f"the server is busy ({self.in_flight} requests in progress); retry shortly",
                           {"Retry-After": "1"})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def upload(self, request: Request) -> AsyncIterator[tuple[Path, str]]:
        """The request's audio in a private file (removed afterwards) and the client's
        name for it (a label only, never a path); 408 when the upload is too slow."""
        fd, tmp = tempfile.mkstemp(dir=self.uploads)
        path = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    name = await asyncio.wait_for(_receive(request, out), self.settings.timeout)
                except asyncio.TimeoutError:
                    raise ApiError(408, f"the upload did not arrive within {self.settings.timeout:g} s") from None
            path = _named_by_content(path)
            yield path, name
        finally:
            path.unlink(missing_ok=True)

    async def tag(self, request: Request, top: int, spectrogram: bool) -> dict:
        async with self.slot(), self.upload(request) as (path, name):
            try:
                return await asyncio.wait_for(self._tag(path, name, top, spectrogram), self.settings.timeout)
            except asyncio.TimeoutError:
                raise ApiError(504, f"tagging took longer than {self.settings.timeout:g} s") from None

    async def embed(self, request: Request) -> np.ndarray:
        async with self.slot(), self.upload(request) as (path, _):
            try:
                decoded = await self.decode(path, whole=False)
                return (await asyncio.wait_for(self.batcher.score(decoded.clip), self.settings.timeout))[1]
            except asyncio.TimeoutError:
                raise ApiError(504, f"embedding took longer than {self.settings.timeout:g} s") from None

    async def decode(self, path: Path, whole: bool) -> Decoded:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decoding, self._decode, path, whole)

    async def _tag(self, path: Path, name: str, top: int, spectrogram: bool) -> dict:
        decoded = await self.decode(path, whole=spectrogram)
        long = decoded.duration > self.settings.long
        if long and not decoded.whole:
            decoded = await self.decode(path, whole=True)
        scores, _ = await self.batcher.score(decoded.clip)
        result = {"file": name, "duration": round(decoded.duration, 4), "model": self.model,
                  "labels": self.labels(scores, top), "segments": []}
        if long:
            result["segments"] = await self._segments(decoded.whole, top)
        if spectrogram:
            result["spectrogram"] = spectrogram_of(next(iter(decoded.whole.values())), decoded.duration)
        return result

    async def _segments(self, whole: Clip, top: int) -> list[dict]:
        s = self.settings
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(self.scoring, lambda: timeline_of(whole, self.tagger.score_clips,
                                                                            self.tagger.classes, s.window, s.hop))
        return [{"start": round(float(a), 3), "end": round(float(a + line.window), 3),
                 "labels": self.labels(row, top)} for a, row in zip(line.starts, line.scores)]

    def labels(self, scores: np.ndarray, top: int) -> list[dict]:
        best = np.argsort(-scores, kind="stable")[:top]
        return [{"label": self.tagger.classes[j], "score": round(float(scores[j]), 6)} for j in best]

    def _decode(self, path: Path, whole: bool) -> Decoded:
        """Decode an upload on a worker thread; 415 for what is not audio, 413 when too long."""
        limit = self.settings.max_duration
        try:
            if audio.info(path).duration > limit:
                raise ApiError(413, f"audio longer than the limit of {limit:g} s")
            duration, clip, untrimmed = self.tagger.decode(path, whole)
        except audio.AudioError as e:
            raise ApiError(415, f"not decodable audio: {e.reason}") from None
        if duration > limit:
            raise ApiError(413, f"audio longer than the limit of {limit:g} s")
        return Decoded(duration, clip, untrimmed)


async def _receive(request: Request, out) -> str:
    """Write the body (raw, or the multipart field `file`) to `out`; the client's file name."""
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=8) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "a multipart upload needs its audio in the field 'file'")
                while chunk := await upload.read(CHUNK):
                    out.write(chunk)
                return os.path.basename(upload.filename or "") or "upload"
        async for chunk in request.stream():
            out.write(chunk)
        return "upload"
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart upload ({e.message})") from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the upload was complete") from None


def _named_by_content(path: Path) -> Path:
    """The upload renamed with the suffix of the format its first bytes show: 400
    when empty, 415 when they are no audio format."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ApiError(400, "empty upload: send the audio as the request body or the multipart field 'file'")
    suffix = sniff(head)
    if suffix is None:
        raise ApiError(415, f"not audio: the content is none of {FORMATS}")
    return path.rename(path.with_suffix(suffix))


def spectrogram_of(spec: np.ndarray, duration: float) -> dict:
    """A log-mel spectrogram as bytes for a page to draw: [mels, columns] uint8,
    low bands first, 80 dB below the peak mapped to 0, base64."""
    columns = min(spec.shape[1], SPECTROGRAM_COLUMNS)
    edges = np.linspace(0, spec.shape[1], columns + 1).astype(int)
    pooled = np.add.reduceat(spec, edges[:-1], axis=1) / np.diff(edges)
    scaled = np.clip((pooled - pooled.max() + 80) / 80 * 255, 0, 255).astype(np.uint8)
    return {"mels": spec.shape[0], "columns": columns, "seconds": round(duration, 4),
            "data": base64.b64encode(scaled.tobytes()).decode()}


def _thresholds(tagger: Tagger) -> list[float] | None:
    try:
        return [float(t) for t in tagger.thresholds()]
    except SoundtagError:
        return None
