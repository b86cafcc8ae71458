"""int8 ONNX against float ONNX and torch in one run: tagging throughput on 2
cores over the dev corpus (median of three passes, as bench/predict.py
measures it), in one process on two threads and shared between two worker
processes (the default for a job this size), and the dev test figure (MAP@3)
of each.

    python bench/int8.py [--run RUN] [--model mobilenetv2] [--width 1.0] [--out FILE]

Without --run, the network is bench/predict.py's: a briefly trained run on the
bundled demo set, so its test figure says how far int8 moves the scores, not
how good the model is; give a trained --run for a figure that means more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import soundfile as sf
from corpus import dev_corpus_path  # this folder is on the path when a benchmark runs
from predict import cores, trained_run

BACKENDS = ("torch", "onnx", "onnx-int8")
PROCESSES = {"1 (2 threads)": 1, "2": 2}


def measure(run: Path, backend: str, processes: int, files: list[Path], seconds: float, test) -> dict:
    from soundtag import metrics
    from soundtag.predict import Tagger
    with cores(2), Tagger.load([run], backend=backend, threads=2, processes=processes) as tagger:
        tagger.tag_files(files[:128], progress=False)  # warm-up; starts the worker processes
        walls = []
        for _ in range(3):
            start = time.perf_counter()
            tagger.tag_files(files, progress=False)
            walls.append(time.perf_counter() - start)
        scores, _ = tagger.tag_files(test.files, progress=False)
    wall = statistics.median(walls)
    return {"x_realtime": seconds / wall, "files_per_s": len(files) / wall,
            "test_map@3": float(metrics.map_at_k(test.targets, scores, 3))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--model", default="mobilenetv2")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8.json")
    args = p.parse_args()
    from soundtag import datasets
    from soundtag.export import export
    corpus = args.corpus or dev_corpus_path()
    files = sorted((corpus / "audio_train").glob("*.wav"))
    seconds = sum(sf.info(f).duration for f in files)
    test = datasets.read(corpus).subset("test")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or trained_run(args.model, args.width, Path(tmp))
        export(run, int8=True)
        figures = {f"{b}, {name}": measure(run, b, n, files, seconds, test)
                   for b in BACKENDS for name, n in PROCESSES.items()}
    print(f"\n{len(files)} files ({seconds / 60:.1f} min of audio), 2 cores\n")
    print("| backend | processes | × realtime | files/s | dev test MAP@3 | target |\n|---|---|---|---|---|---|")
    for key, f in figures.items():
        backend, processes = key.split(", ")
        print(f"| {backend} | {processes} | {f['x_realtime']:.0f} | {f['files_per_s']:.0f} | "
              f"{f['test_map@3']:.4f} | {'≥ 1500×' if backend == 'onnx-int8' else ''} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "width": args.width, "files": len(files),
                                    "audio_seconds": seconds, "backends": figures}, indent=1))
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
