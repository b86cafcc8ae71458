"""Tagging benchmark: end-to-end throughput (decode + features + network) with
torch and ONNX Runtime on 1 and 2 cores (the process pinned to them, the tagger
on as many threads; on 2 cores also shared between two worker processes, the
default for a job this size), and the latency of one 10-s clip. Each
throughput figure is the median of three passes over the folder.

    python bench/predict.py [--corpus DIR] [--model mobilenetv2] [--width 1.0] [--out FILE]

The network is a briefly trained run on the bundled demo set (speed does not depend
on how well it is trained) on the default front end (64 mels, hop 512: twice the
frames of the fast preset's), exported to ONNX; the clips are the dev corpus's
single-label training folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
from corpus import dev_corpus_path  # this folder is on the path when a benchmark runs

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def trained_run(model: str, width: float, work: Path) -> Path:
    from soundtag import config, datasets, train
    from soundtag.export import export
    from soundtag.features import FeatureConfig
    overrides = {"epochs": 1, "model": {"name": model, "params": {"width": width}},
                 "features": FeatureConfig().to_dict()}  # the default front end, not the fast preset's
    run = train.train(datasets.read(DEMO), config.resolve("fast", overrides=overrides), work / "run",
                      force=True, cache_dir=work / "cache", progress=False)
    export(run.folder)
    return run.folder


@contextlib.contextmanager
def cores(n: int) -> Iterator[None]:
    """The calling thread, and so every thread the tagger starts, pinned to `n` cores."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def throughput(run: Path, files: list[Path], seconds_of_audio: float) -> dict:
    from soundtag.predict import Tagger
    out = {}
    for backend in ("torch", "onnx"):
        for n, processes in ((1, 1), (2, 1), (2, 2)):
            with cores(n), Tagger.load([run], backend=backend, threads=n, processes=processes) as tagger:
                tagger.tag_files(files[:128], progress=False)  # warm-up; starts the worker processes
                walls = []
                for _ in range(3):
                    start = time.perf_counter()
                    scores, errors = tagger.tag_files(files, progress=False)
                    walls.append(time.perf_counter() - start)
            wall = statistics.median(walls)
            out[f"{backend} {n}t {processes}p"] = {"x_realtime": seconds_of_audio / wall,
                                                   "files_per_s": len(files) / wall, "seconds": wall,
                                                   "errors": len(errors)}
            print(f"  {backend} {n} core(s), {processes} process(es): {seconds_of_audio / wall:.0f}× realtime",
                  file=sys.stderr)
    return out


def latency(run: Path, clip: Path) -> dict:
    """Median wall time of tagging one 10-s file (decode + features + network)."""
    from soundtag.predict import Tagger
    out = {}
    for backend in ("torch", "onnx"):
        for n in (1, 2):
            with cores(n):
                tagger = Tagger.load([run], backend=backend, threads=n)
                times = []
                for _ in range(25):
                    start = time.perf_counter()
                    tagger.tag_files([clip], progress=False)
                    times.append(time.perf_counter() - start)
            out[f"{backend} {n}t"] = {"median_ms": 1000 * statistics.median(times[5:]),
                                      "min_ms": 1000 * min(times[5:])}
    return out


def ten_second_clip(files: list[Path], path: Path) -> Path:
    """A 10-s recording made by joining corpus clips."""
    parts, total = [], 0
    for f in files:
        data, rate = sf.read(f, dtype="float32")
        parts.append(data)
        total += len(data)
        if total >= 10 * rate:
            break
    sf.write(path, np.concatenate(parts)[: 10 * rate], rate)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--model", default="mobilenetv2")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict.json")
    args = p.parse_args()
    corpus = args.corpus or dev_corpus_path()
    files = sorted((corpus / "audio_train").glob("*.wav"))
    audio_seconds = sum(sf.info(f).duration for f in files)
    for f in files:  # warm the page cache
        f.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = trained_run(args.model, args.width, work)
        figures = {"model": args.model, "width": args.width, "files": len(files), "audio_seconds": audio_seconds,
                   "throughput": throughput(run, files, audio_seconds),
                   "latency_10s": latency(run, ten_second_clip(files, work / "ten.wav"))}
    print(f"\nTagging {len(files)} files ({audio_seconds / 60:.1f} min of audio), {args.model} width {args.width}\n")
    print("| backend | cores | processes | × realtime | files/s | 10-s clip median ms | targets |")
    print("|---|---|---|---|---|---|---|")
    for key, t in figures["throughput"].items():
        backend, threads, processes = key.split()
        print(f"| {backend} | {threads[:-1]} | {processes[:-1]} | {t['x_realtime']:.0f} | {t['files_per_s']:.0f} | "
              f"{figures['latency_10s'][f'{backend} {threads}']['median_ms']:.1f} | "
              "≥ 1000× (onnx, 2 cores); ≤ 30 ms |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
