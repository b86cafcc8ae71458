"""Service benchmark: 200 requests of 5-s clips from 16 concurrent clients
against `soundtag serve` on loopback, while a probe times /healthz every 50 ms.
Throughput, p50/p99 latency, errors and /healthz latency under load; bounded
in requests and in time (`--limit` seconds).

    python bench/serve.py [--run RUN] [--requests 200] [--clients 16] [--limit 300] [--out FILE]

Without --run, a fast-preset run is trained for one epoch on the bundled demo
set and exported to ONNX (speed does not depend on how well it is trained).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from corpus import dev_corpus_path  # this folder is on the path when a benchmark runs

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
HOST = "127.0.0.1"  # loopback only


def trained_run(work: Path) -> Path:
    from soundtag import config, datasets, train
    from soundtag.export import export
    run = train.train(datasets.read(DEMO), config.resolve("fast", overrides={"epochs": 1}), work / "run",
                      force=True, cache_dir=work / "cache", progress=False)
    export(run.folder)
    return run.folder


def five_second_clips(corpus: Path, n: int = 20) -> list[bytes]:
    """WAV bytes of 5-s recordings joined from corpus clips."""
    files = sorted((corpus / "audio_train").glob("*.wav"))
    clips, parts, total = [], [], 0
    for f in files:
        data, rate = sf.read(f, dtype="float32")
        parts.append(data if data.ndim == 1 else data.mean(1))
        total += len(parts[-1])
        if total >= 5 * rate:
            path = Path(tempfile.mktemp(suffix=".wav"))
            sf.write(path, np.concatenate(parts)[: 5 * rate], rate, subtype="PCM_16")
            clips.append(path.read_bytes())
            path.unlink()
            parts, total = [], 0
            if len(clips) == n:
                break
    return clips


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(base: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    sys.exit("the server did not start")


def load(base: str, clips: list[bytes], requests: int, clients: int, limit: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    health: list[float] = []
    done = threading.Event()
    deadline = time.monotonic() + limit

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=10) as c:
            while not done.is_set() and time.monotonic() < deadline:
                start = time.perf_counter()
                c.get("/healthz")
                health.append(time.perf_counter() - start)
                time.sleep(0.05)

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            for i in range(k, requests, clients):
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    code = str(c.post("/v1/tag", content=clips[i % len(clips)]).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                latencies.append(time.perf_counter() - start)
                statuses[code] = statuses.get(code, 0) + 1

    watcher = threading.Thread(target=probe)
    watcher.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    ms = sorted(1000 * x for x in latencies)
    return {"requests": len(ms), "seconds": wall, "requests_per_s": len(ms) / wall,
            "x_realtime": 5 * len(ms) / wall, "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "statuses": statuses,
            "errors": sum(v for k, v in statuses.items() if k != "200"),
            "healthz_p50_ms": 1000 * statistics.median(health), "healthz_max_ms": 1000 * max(health),
            "healthz_probes": len(health)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--limit", type=float, default=300.0, help="seconds the load may take at most")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = p.parse_args()
    clips = five_second_clips(dev_corpus_path())
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or trained_run(Path(tmp))
        figures = {}
        for batch in (16, 1):
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "soundtag.cli", "serve", str(run), "--host", HOST,
                                       "--port", str(port), "--max-batch", str(batch)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                base = f"http://{HOST}:{port}"
                wait_ready(base)
                load(base, clips, 2 * args.clients, args.clients, 60)  # warm-up
                figures[f"max-batch {batch}"] = load(base, clips, args.requests, args.clients, args.limit)
            finally:
                server.terminate()
                server.wait(30)
    print(f"\n{args.requests} requests of 5-s clips from {args.clients} clients on loopback\n")
    print("| batching | req/s | × realtime | p50 ms | p99 ms | errors | /healthz p50 / max ms | targets |")
    print("|---|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        print(f"| {name} | {f['requests_per_s']:.1f} | {f['x_realtime']:.0f} | {f['p50_ms']:.0f} | "
              f"{f['p99_ms']:.0f} | {f['errors']} | {f['healthz_p50_ms']:.1f} / {f['healthz_max_ms']:.1f} | "
              "0 errors, p99 ≤ 500, /healthz ≤ 50 |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
