"""Library benchmark: indexing speed on the dev corpus against `soundtag
predict` on the same files (same run, same backend), a second index of an
unchanged folder of 10,000 files, and `similar` on 1 million synthetic
embeddings, exact and approximate (with recall@10 against exact).

    python bench/library.py [--run RUN] [--files 10000] [--vectors 1000000] [--dims 256]
                            [--parts indexing unchanged similar] [--out FILE]

Without --run, a fast-preset run is trained for one epoch on the bundled demo
set and exported to ONNX. The synthetic embeddings are clustered and of low
intrinsic dimension, like a network's: 2,000 centres in a 24-dimensional space,
mapped linearly to `--dims`, rectified, with noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from corpus import dev_corpus_path  # this folder is on the path when a benchmark runs
from serve import trained_run

SEARCH_BREADTHS = (64, 128, 256, 512)  # HNSW expansion_search values measured
PARTS = ("indexing", "unchanged", "similar")


def indexing(run: Path, corpus: Path, work: Path) -> dict:
    from soundtag.library import Library
    from soundtag.predict import Tagger
    files = sorted((corpus / "audio_train").glob("*.wav"))
    folder = work / "corpus"
    folder.symlink_to(corpus / "audio_train")
    for f in files:  # warm the page cache
        f.read_bytes()
    with Tagger.load([run], backend="onnx") as tagger:
        tagger.tag_files(files[:128], progress=False)  # warm-up; starts the worker processes
        start = time.perf_counter()
        tagger.tag_files(files, progress=False)
        predict = time.perf_counter() - start
    db = work / "corpus.sqlite"
    report = Library.index(db, [run], folder, progress=False)
    again = Library.index(db, [run], folder, progress=False)
    return {"files": len(files), "predict_files_per_s": len(files) / predict,
            "index_files_per_s": report.added / report.seconds, "index_seconds": report.seconds,
            "index_vs_predict": predict / report.seconds, "reindex_seconds": again.seconds}


def unchanged_folder(run: Path, work: Path, n: int) -> dict:
    """Index n short files once, then time indexing the unchanged folder again."""
    from soundtag.library import Library
    folder = work / "many"
    for i in range(n):
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        t = np.arange(2205) / 22050
        sf.write(sub / f"{i:05d}.wav", (0.2 * np.sin(2 * np.pi * (200 + i % 500) * t)).astype(np.float32), 22050,
                 subtype="PCM_16")
    db = work / "many.sqlite"
    first = Library.index(db, [run], folder, progress=False)
    again = Library.index(db, [run], folder, progress=False)
    return {"files": n, "first_seconds": first.seconds, "second_seconds": again.seconds,
            "second_unchanged": again.unchanged}


def synthetic(n: int, dims: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, 24)).astype(np.float32)
    latent = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, 24)).astype(np.float32)
    projection = rng.normal(size=(24, dims)).astype(np.float32)
    out = np.empty((n, dims), np.float32)
    for s in range(0, n, 100_000):
        block = np.maximum(latent[s : s + 100_000] @ projection, 0)
        out[s : s + 100_000] = block + 0.05 * rng.normal(size=block.shape).astype(np.float32)
    return out


def similar(n: int, dims: int, work: Path, queries: int = 100) -> dict:
    from soundtag.library.vectors import Approximate, Vectors, build_approximate, unit_rows
    matrix = np.lib.format.open_memmap(work / "matrix.npy", "w+", np.float32, (n, dims))
    data = synthetic(n + queries, dims)
    matrix[:] = unit_rows(data[:n])
    matrix.flush()
    ids = np.arange(1, n + 1, dtype=np.int64)
    exact = Vectors(ids, np.load(work / "matrix.npy", mmap_mode="r"))
    start = time.perf_counter()
    build_approximate(ids, exact.matrix, work / "approx.usearch")
    build = time.perf_counter() - start
    approx = Approximate.load(work / "approx.usearch")
    qs = data[n:]
    exact.nearest(qs[0], 10)
    exact_ms, truths = [], []
    for q in qs:
        t = time.perf_counter()
        truths.append(set(exact.nearest(q, 10)[0]))
        exact_ms.append(1000 * (time.perf_counter() - t))
    out = {"vectors": n, "dims": dims, "exact_median_ms": statistics.median(exact_ms), "approx_build_seconds": build,
           "approx": {}}
    for breadth in SEARCH_BREADTHS:
        approx.index.expansion_search = breadth
        approx_ms, recall = [], []
        for q, truth in zip(qs, truths):
            t = time.perf_counter()
            found, _ = approx.nearest(q, 10)
            approx_ms.append(1000 * (time.perf_counter() - t))
            recall.append(len(truth & set(found)) / 10)
        out["approx"][breadth] = {"median_ms": statistics.median(approx_ms), "recall_at_10": float(np.mean(recall))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "library.json")
    args = p.parse_args()
    corpus = args.corpus or dev_corpus_path()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "indexing" in args.parts or "unchanged" in args.parts:
            run = args.run or trained_run(work)
        if "indexing" in args.parts:
            figures["indexing"] = indexing(run, corpus, work)
            print(f"indexing: {figures['indexing']}", file=sys.stderr)
        if "unchanged" in args.parts:
            figures["unchanged"] = unchanged_folder(run, work, args.files)
            print(f"unchanged: {figures['unchanged']}", file=sys.stderr)
            shutil.rmtree(work / "many")
        if "similar" in args.parts:
            figures["similar"] = similar(args.vectors, args.dims, work)
    print("\n| measure | figure | target |\n|---|---|---|")
    if "indexing" in figures:
        i = figures["indexing"]
        print(f"| indexing the dev corpus ({i['files']} files) | {i['index_files_per_s']:.0f} files/s; `predict` "
              f"{i['predict_files_per_s']:.0f} files/s ({100 * i['index_vs_predict']:.0f}%) | within 20% |")
        print(f"| re-index, unchanged dev corpus | {i['reindex_seconds']:.2f} s | |")
    if "unchanged" in figures:
        u = figures["unchanged"]
        print(f"| re-index, unchanged folder of {u['files']} files | {u['second_seconds']:.2f} s "
              f"(first index {u['first_seconds']:.0f} s) | seconds |")
    if "similar" in figures:
        s = figures["similar"]
        print(f"| similar, exact, {s['vectors']:,} × {s['dims']} | {s['exact_median_ms']:.0f} ms | ≤ 300 ms |")
        for breadth, a in s["approx"].items():
            print(f"| similar, approximate (HNSW, search breadth {breadth}; built in {s['approx_build_seconds']:.0f} s) "
                  f"| {a['median_ms']:.2f} ms, recall@10 {a['recall_at_10']:.3f} | ≤ 10 ms, ≥ 0.95 |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
