"""`soundtag demo`: the whole path on the bundled demo set — train the fast
preset, evaluate on the held-out split, tag a few held-out clips."""

from __future__ import annotations

import time
from pathlib import Path

from . import datasets, outputs
from .config import resolve
from .errors import DataError
from .evaluation import evaluate
from .predict import Tagger
from .train import summary_table, train

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "demo"


def run_demo(out: str | Path = "demo-run", data: str | Path | None = None,
             cache_dir: str | Path | None = None, epochs: int | None = None) -> dict:
    """Run the demo, print what happens, and return the test figures."""
    data = Path(data) if data else BUNDLED
    if not (data / "train.csv").is_file():
        raise DataError(f"{data}: demo data not found; pass --data with a dataset in the FSDKaggle2018 layout")
    out = Path(out)
    start = time.perf_counter()
    dataset = datasets.read(data)
    train_part = dataset.subset("train")
    print(f"demo set: {len(train_part)} training and {len(dataset) - len(train_part)} test clips, "
          f"{len(dataset.classes)} classes ({data})")
    config = resolve("fast", overrides={"epochs": epochs} if epochs else None)
    run = train(dataset, config, out / "run", force=True, cache_dir=cache_dir)
    print(summary_table(run.summary()))
    tagger = Tagger.load([run.folder])
    result = evaluate(tagger, dataset, "test", out / "evaluation", cache_dir)
    print(f"\ntest split: {result['clips']} clips, MAP@3 {result['map@3']:.3f}, "
          f"accuracy {result['accuracy']:.3f}, lwlrap {result['lwlrap']:.3f}")
    test = dataset.subset("test")
    picks = list(range(0, len(test), max(1, len(test) // 5)))[:5]
    scores, errors = tagger.tag_files([test.files[i] for i in picks], workers=1, progress=False)
    print("\ntags of a few held-out clips:")
    for j, (i, best) in enumerate(zip(picks, outputs.top_k(scores, tagger.classes, 3))):
        tags = errors.get(j) or ", ".join(f"{label} {score:.2f}" for label, score in best)
        print(f"  {test.names[i]} (true: {', '.join(test.labels(i))}): {tags}")
    print(f"\nrun: {run.folder}\ntraining curves: {run.curves_path}\n"
          f"evaluation plots: {out / 'evaluation'}\ndone in {time.perf_counter() - start:.0f} s")
    return result
