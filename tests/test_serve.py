"""The HTTP service (`soundtag serve`) on a real uvicorn server on loopback:
the API contract, every limit and bad upload with its status and JSON error
(the server serving on afterwards), the micro-batcher, and the web page in
headless Chromium."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
from fastapi.testclient import TestClient
from library_setup import TEST_CLIP, demo_folder, exported_run, long_recording

from soundtag.library import Library
from soundtag.predict import Tagger
from soundtag.server import Service, Settings, create_app
from soundtag.server.batcher import MicroBatcher

pytestmark = pytest.mark.usefixtures("single_torch_thread")
KEY = "test-key"
AUTH = {"X-API-Key": KEY}
SETTINGS = Settings(max_upload_bytes=2_000_000, max_duration=20.0, timeout=3.0, max_concurrency=3, api_key=KEY,
                    max_batch=8, max_wait=0.01, long=5.0, window=2.0, hop=1.0, threads=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return exported_run(tmp_path_factory)


@pytest.fixture(scope="module")
def tagger(run) -> Tagger:
    return Tagger.load([run], backend="onnx", threads=1)


@pytest.fixture(scope="module")
def library(run, tmp_path_factory) -> Path:
    folder = demo_folder(tmp_path_factory.mktemp("served-lib") / "sounds")
    (folder / "notes.wav").write_text("not audio\n")
    Library.index(folder.parent / "lib.sqlite", [run], folder, progress=False)
    return folder.parent / "lib.sqlite"


@pytest.fixture(scope="module")
def server(run, library):
    """(base URL, service) of a server on a free loopback port, for the module."""
    service = Service.load(run, SETTINGS, "auto", library)
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = instance.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", service
    instance.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c
    assert healthy(server[0]), "the server stopped answering"


def healthy(base: str) -> bool:
    """The server answers /healthz with no request left in progress."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = httpx.get(f"{base}/healthz", timeout=5).json()
        if state["status"] == "ok" and state["in_flight"] == 0:
            return True
        time.sleep(0.05)
    return False


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and words in body["error"], body


# --- the contract ------------------------------------------------------------------------------------
def test_tag_returns_the_taggers_scores_for_an_upload_and_a_raw_body(client, tagger):
    expected = tagger.tag(TEST_CLIP)
    top = [label for label, _ in expected.top(3)]
    for kwargs in ({"files": {"file": (TEST_CLIP.name, TEST_CLIP.read_bytes(), "audio/ogg")}},
                   {"content": TEST_CLIP.read_bytes()}):
        body = client.post("/v1/tag?top=3", headers=AUTH, **kwargs).json()
        assert [x["label"] for x in body["labels"]] == top
        assert [x["score"] for x in body["labels"]] == pytest.approx([s for _, s in expected.top(3)], abs=1e-5)
        assert body["duration"] == pytest.approx(expected.duration, abs=1e-3) and body["segments"] == []
    assert body["file"] == "upload"
    assert sum(x["score"] for x in client.post(f"/v1/tag?top={len(tagger.classes)}", headers=AUTH,
                                               content=TEST_CLIP.read_bytes()).json()["labels"]) == pytest.approx(1, abs=1e-4)


def test_long_audio_gets_segments_and_the_spectrogram_is_there_when_asked(client, tagger, tmp_path):
    path = long_recording(tmp_path / "long.wav", 8.0)
    body = client.post("/v1/tag?top=2&spectrogram=true", headers=AUTH,
                       files={"file": ("long.wav", path.read_bytes())}).json()
    line = tagger.timeline(path, 2.0, 1.0)
    assert [(s["start"], s["end"]) for s in body["segments"]] == [
        (pytest.approx(a, abs=1e-3), pytest.approx(a + line.window, abs=1e-3)) for a in line.starts]
    best = [tagger.classes[j] for j in np.argsort(-line.scores[3])[:2]]
    assert [x["label"] for x in body["segments"][3]["labels"]] == best
    spec = body["spectrogram"]
    assert spec["mels"] == 64 and 100 < spec["columns"] <= 600 and len(spec["data"]) > 4 * spec["columns"]


def test_labels_healthz_and_docs(client, tagger, run):
    labels = client.get("/v1/labels", headers=AUTH).json()
    assert [x["label"] for x in labels["labels"]] == tagger.classes and labels["activation"] == "softmax"
    assert [x["threshold"] for x in labels["labels"]] == pytest.approx(list(tagger.thresholds()))
    assert client.get("/healthz").json()["model"].startswith("run:onnx:")
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/tag", "/v1/labels", "/v1/search", "/v1/similar", "/healthz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/tag"]["post"]["requestBody"]["content"]


def test_the_library_is_searched_browsed_and_played_by_id_only(client, library):
    with Library(library) as lib:
        label = lib.labels()[0]
        expected = [h.id for h in lib.search(label, 0.0, 5)]
        similar = [h.id for h in lib.similar(expected[0], 3)]
    found = client.get("/v1/search", params={"label": label, "limit": 5}, headers=AUTH).json()
    assert [x["id"] for x in found["items"]] == expected and found["items"][0]["tags"]
    assert [x["id"] for x in client.get(f"/v1/similar?id={expected[0]}&k=3", headers=AUTH).json()["items"]] == similar
    upload = client.post("/v1/similar?k=2", headers=AUTH, content=TEST_CLIP.read_bytes()).json()
    assert len(upload["items"]) == 2
    page = client.get("/v1/library?limit=100&q=notes", headers=AUTH).json()
    assert page["total"] == 1 and "not readable" in page["items"][0]["error"]
    audio = client.get(f"/v1/library/{expected[0]}/audio", headers=AUTH)
    assert audio.status_code == 200 and audio.content[:4] == b"OggS"
    refused(client.get(f"/v1/library/{page['items'][0]['id']}/audio", headers=AUTH), 404, "no playable audio")
    refused(client.get("/v1/library/99999/audio", headers=AUTH), 404, "no file with id 99999")
    refused(client.get("/v1/library/..%2F..%2Fetc%2Fpasswd/audio", headers=AUTH), 404, "Not Found")
    refused(client.get("/v1/library/etc-passwd/audio", headers=AUTH), 422, "file_id")
    refused(client.get("/v1/search?label=Bagpipes", headers=AUTH), 400, "unknown label")


# --- limits and bad uploads ------------------------------------------------------------------------
def test_bad_uploads_each_get_their_status_and_a_json_error(client):
    truncated = wav_bytes(2.0)[:3000]
    truncated = truncated[:40] + (100_000).to_bytes(4, "little") + truncated[44:]
    cases = [
        (b"", 400, "empty upload"),
        (b"hello, this is plain text and no audio" * 10, 415, "not audio"),
        (b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunkjunk", 415, "not decodable audio"),
        (truncated, 415, "truncated"),
        (wav_bytes(25.0), 413, "longer than the limit of 20 s"),
    ]
    for body, status, words in cases:
        refused(client.post("/v1/tag", headers=AUTH, content=body), status, words)
    refused(client.post("/v1/tag", headers=AUTH, files={"other": ("a.wav", wav_bytes(1.0))}), 400, "field 'file'")


def test_the_upload_limit_holds_whether_or_not_the_size_is_declared(client):
    big = b"RIFF" + bytes(2_500_000)
    refused(client.post("/v1/tag", headers=AUTH, content=big), 413, "larger than the limit")

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        for _ in range(50):
            yield bytes(100_000)
    refused(client.post("/v1/tag", headers=AUTH, content=chunks()), 413, "larger than the limit")


def test_a_wrong_or_missing_api_key_is_refused(client):
    refused(client.post("/v1/tag", content=TEST_CLIP.read_bytes()), 401, "API key")
    refused(client.get("/v1/labels", headers={"X-API-Key": "wrong"}), 401, "API key")
    assert client.get("/v1/labels", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/healthz").status_code == 200


def raw_request(base: str, length: int, sent: bytes) -> socket.socket:
    """A connection that declares `length` body bytes and sends only `sent`."""
    host, port = base.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(f"POST /v1/tag HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {KEY}\r\nContent-Type: audio/wav\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return conn


def whole_response(conn: socket.socket) -> str:
    """What the server sends on a raw connection, headers and body (which may come in parts)."""
    data = conn.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length and (more := conn.recv(4096)):
        body += more
    return (head + b"\r\n\r\n" + body).decode()


def test_a_slow_client_gets_408_and_a_full_server_503(server, client):
    base, service = server
    slow = [raw_request(base, 100_000, wav_bytes(1.0)[:1000]) for _ in range(SETTINGS.max_concurrency)]
    try:
        deadline = time.monotonic() + 30  # every slow upload admitted, even on a busy machine
        while service.in_flight < SETTINGS.max_concurrency and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = client.post("/v1/tag", headers=AUTH, content=TEST_CLIP.read_bytes())
        refused(busy, 503, "busy")
        assert busy.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200  # the server answers while full
        answer = whole_response(slow[0])  # after the timeout
        assert answer.startswith("HTTP/1.1 408") and '"status":408' in answer and "did not arrive" in answer
    finally:
        for conn in slow:
            conn.close()


def test_a_client_that_disconnects_mid_upload_leaves_the_server_serving(server, client):
    base, service = server
    for _ in range(3):
        raw_request(base, 200_000, TEST_CLIP.read_bytes()[:2000]).close()
    assert healthy(base)
    assert client.post("/v1/tag", headers=AUTH, content=TEST_CLIP.read_bytes()).status_code == 200


def test_a_request_past_its_time_gets_504_and_the_server_serves_on(tagger):
    service = Service(tagger, "slow", Settings(timeout=0.5, max_batch=1, threads=1))

    def slow_score(clips):
        time.sleep(1.5)
        return tagger.score_each(clips)
    service.batcher.score_fn = slow_score
    with TestClient(create_app(service)) as client:
        refused(client.post("/v1/tag", content=TEST_CLIP.read_bytes()), 504, "longer than 0.5 s")
        assert client.get("/healthz").json()["in_flight"] == 0


def test_concurrent_requests_are_scored_together_with_the_scores_of_each_alone(tagger):
    clips = [tagger.decode(TEST_CLIP, whole=False)[1]] * 3 + [tagger.decode(long_clip_path(), whole=False)[1]]
    alone = [tagger.score_each([c]) for c in clips]
    calls = []

    def score(batch):
        calls.append(len(batch))
        return tagger.score_each(batch)

    async def together(max_batch: int):
        from concurrent.futures import ThreadPoolExecutor
        batcher = MicroBatcher(score, max_batch, 0.05, ThreadPoolExecutor(1))
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.score(c) for c in clips))
        finally:
            await batcher.stop()

    for max_batch, expected_calls in ((8, [4]), (1, [1, 1, 1, 1])):
        calls.clear()
        results = asyncio.run(together(max_batch))
        assert calls == expected_calls
        for (s, e), (s1, e1) in zip(results, alone):
            assert np.allclose(s, s1[0], atol=1e-6) and np.allclose(e, e1[0], atol=1e-6)


def long_clip_path() -> Path:
    from helpers import DEMO
    return DEMO / "audio_train" / "d000013.ogg"


# --- the page ------------------------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no Chromium at /usr/bin/chromium (scripts/setup.sh installs Debian's when run as root)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def test_the_page_tags_a_dropped_clip_and_plays_library_results(server, browser, tagger, tmp_path):
    base, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(f"localStorage.setItem('soundtag-key', '{KEY}')")
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.wait_for_selector("#lib-items li")
    page.set_input_files("#files", [str(TEST_CLIP), str(long_recording(tmp_path / "long.wav", 8.0))])
    page.wait_for_function("document.querySelectorAll('.result[data-state=done]').length == 2", timeout=30_000)
    card = page.locator(".result", has_text=TEST_CLIP.name)
    shown = [(r.get_attribute("data-label"), float(r.get_attribute("data-score")))
             for r in card.locator(".tag").all()]
    expected = tagger.tag(TEST_CLIP).top(5)
    assert [label for label, _ in shown] == [label for label, _ in expected]
    assert [s for _, s in shown] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert card.locator(".tag .label").first.inner_text() == expected[0][0]
    assert page.locator(".result", has_text="long.wav").locator(".timeline").is_visible()
    drawn = page.evaluate("""() => { const c = document.querySelector('.spectrogram');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lit = 0; for (let i = 0; i < d.length; i += 4) lit += d[i] > 0; return [c.width, lit]; }""")
    assert drawn[0] > 10 and drawn[1] > 100
    first = page.locator("#lib-items li").first
    first.get_by_role("button", name="▶ play").click()
    page.wait_for_function("document.querySelector('#player').dataset.playing == "
                           f"'{first.get_attribute('data-id')}'")
    first.get_by_role("button", name="similar").click()
    page.wait_for_function("document.querySelector('#lib-status').textContent.startsWith('sounds like')")
    assert page.locator("#lib-items li").count() == 9  # every other tagged clip
    assert not errors
    page.close()
