"""Quality benchmark: the classical baseline, `fast`, `quality` and each recipe
on the same splits, in one run, each scored once on a test split that chose
nothing (no epoch, threshold or clip selection looked at it).

    python bench/quality.py [--corpus DIR] [--sets full small multi sources] [--entries NAME ...]
                            [--work DIR] [--out FILE]

Sets, all from the dev corpus:
  full   the single-label set: train split → test split (MAP@3)
  small  the same, its training split cut to 24 clips a class (seed 0), a small-data
         regime like a user's own collection (MAP@3)
  multi  the multi-label set: curated (+ noisy) training clips → test split (lwlrap)
  sources  (only when named) the single-label training split alone, in four folds that
         keep each source (soundfont key region, sample file, recording) in one, as the
         test split does (bench/groups.py): the out-of-fold MAP@3 of `quality` and of the
         settings it was chosen over, a figure for choosing that never sees the test split

Figures go to a JSON file (written after every entry) and a Markdown table; an
entry already in that file is not measured again, so a rerun trains only what is
missing (delete the file, or give another --out, to measure everything anew).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from corpus import dev_corpus_path  # this folder is on the path when a benchmark runs

SMALL_PER_CLASS = 24
# What each training entry adds to its preset (fast unless the entry names another).
AVERAGE = {"average": {"kind": "swa", "start": 0.75}}
COPIES = {"copies": [{"pitch": -2}, {"pitch": 2}, {"stretch": 0.9}]}
NOISY_AWARE = {"origin_weights": {"noisy": 0.5}, "batch_shares": {"curated": 0.5, "noisy": 0.5},
               "origin_loss": {"noisy": {"name": "bootstrap_soft", "params": {"beta": 0.7}}}}


def train_entry(preset: str, **overrides) -> Callable:
    def make(data, out: Path, cache: Path) -> Path:
        from soundtag import config, train
        train.train(data, config.resolve(preset, overrides=overrides), out, force=True, cache_dir=cache,
                    progress=False)
        return out
    return make


def fused_entry(data, out: Path, cache: Path) -> Path:
    """Two stages: the fast preset's network, then the fused model initialised from it."""
    from soundtag import config, train
    base = config.resolve("fast")
    first = out.with_name(out.name + "-mel")
    if not (first / "summary.json").is_file():
        train.train(data, base, first, force=True, cache_dir=cache, progress=False)
    fused = {"model": {"name": "fused", "params": {"backbone": base.model.name, "backbone_params": base.model.params}}}
    train.train(data, config.resolve("fast", overrides=fused), out, force=True, cache_dir=cache, progress=False,
                init=first)
    return out


def recipe_entry(kind: str, **settings) -> Callable:
    def make(data, out: Path, cache: Path) -> Path:
        from soundtag import config, pipeline, semi
        base = config.resolve("fast")
        run, make_settings = {"pipeline": (pipeline.run_pipeline, pipeline.PipelineConfig),
                              "pseudo": (semi.run_pseudo, semi.PseudoConfig),
                              "spread": (semi.run_spread, semi.SpreadConfig)}[kind]
        run(data, make_settings(**settings), base, out, force=True, cache_dir=cache, progress=False)
        return out
    return make


SINGLE = {"baseline": train_entry("baseline"), "fast": train_entry("fast"), "quality": train_entry("quality"),
          "fast + weight averaging": train_entry("fast", **AVERAGE), "fast + copies": train_entry("fast", **COPIES),
          "fast + PCA summary branch": fused_entry, "fast + pseudo-labels": recipe_entry("pseudo"),
          "fast + label spreading": recipe_entry("spread")}
MULTI = {"baseline (curated)": train_entry("baseline", noisy="exclude"),
         "curated only": train_entry("fast", noisy="exclude"), "naive curated + noisy": train_entry("fast"),
         "noisy-aware loss and batches": train_entry("fast", **NOISY_AWARE),
         "warm-up pipeline": recipe_entry("pipeline"), "quality": train_entry("quality")}
OWN_FOLDS = {"folds": "own", "train_folds": None}


def filter_entry(data, out: Path, cache: Path) -> Path:
    """`quality` with a random equaliser after its own augmentations, on the dataset's folds."""
    from soundtag import config
    augment = [*config.resolve("quality").augment, {"name": "filter", "p": 0.5, "max_db": 6.0}]
    return train_entry("quality", augment=augment, **OWN_FOLDS)(data, out, cache)


SOURCES = {"quality": train_entry("quality", **OWN_FOLDS),
           "quality, ±2-semitone copies only": train_entry("quality", copies=[{"pitch": -2}, {"pitch": 2}],
                                                            **OWN_FOLDS),
           "quality + filter augmentation": filter_entry}
SETS = {"full": SINGLE, "small": SINGLE, "multi": MULTI, "sources": SOURCES}


def small_data(data, per_class: int, seed: int = 0):
    """`data` with its training split cut to `per_class` clips a class (its test split whole)."""
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(data.split == "train")
    keep = [rng.permutation(train[data.targets[train, c] > 0])[:per_class] for c in range(len(data.classes))]
    return data.select(np.sort(np.concatenate([*keep, np.flatnonzero(data.split != "train")])))


def dataset(name: str, corpus: Path):
    from soundtag import datasets
    if name == "multi":
        return datasets.read(corpus / "multilabel")
    data = datasets.read(corpus)
    if name == "sources":
        from groups import source_folds
        train = data.subset("train")
        return replace(train, fold=source_folds(corpus, train.names, train.targets.argmax(1)))
    return small_data(data, SMALL_PER_CLASS) if name == "small" else data


def score_entry(folder: Path, test, cache: Path) -> dict:
    from soundtag import metrics
    from soundtag.predict import Tagger
    scores, _ = Tagger.load([folder]).tag_dataset(test, cache, progress=False)
    return {"map@3": metrics.map_at_k(test.targets, scores, 3), "lwlrap": metrics.lwlrap(test.targets, scores)}


def out_of_fold(folder: Path) -> dict:
    oof = json.loads((folder / "summary.json").read_text())["oof"]
    return {"map@3": oof["map@3"], "lwlrap": oof["lwlrap"]}


def measure(set_name: str, entries: list[str], corpus: Path, work: Path, results: dict, out: Path) -> None:
    data = dataset(set_name, corpus)
    test = data if set_name == "sources" else data.subset("test")  # sources: each clip is held out once
    for entry in entries:
        done = results.setdefault(set_name, {}).get(entry)
        if done:
            continue
        folder = work / set_name / entry.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
        start = time.perf_counter()
        SETS[set_name][entry](data, folder, work / "cache")
        scores = out_of_fold(folder) if set_name == "sources" else score_entry(folder, test, work / "cache")
        figures = {"train_minutes": (time.perf_counter() - start) / 60, **scores,
                   "train_clips": int((data.split == "train").sum()), "test_clips": len(test)}
        results[set_name][entry] = figures
        out.write_text(json.dumps(results, indent=1))  # what is measured is kept if a later entry fails
        print(f"  {set_name}: {entry}: {figures}", file=sys.stderr)


def table(results: dict) -> str:
    lines = ["| set | entry | train split clips | test MAP@3 | test lwlrap | train min |", "|---|---|---|---|---|---|"]
    for set_name, entries in results.items():
        shown = "sources (out of fold)" if set_name == "sources" else set_name
        for entry, f in entries.items():
            lines.append(f"| {shown} | {entry} | {f['train_clips']} | {f['map@3']:.4f} | {f['lwlrap']:.4f} | "
                         f"{f['train_minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--sets", nargs="+", default=["full", "small", "multi"], choices=list(SETS))
    p.add_argument("--entries", nargs="+", help="only these entries (names as in the table)")
    p.add_argument("--work", type=Path, default=Path("/tmp/soundtag-bench-quality"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = p.parse_args()
    corpus = args.corpus or dev_corpus_path()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for set_name in args.sets:
        unknown = sorted(set(args.entries or []) - set().union(*(SETS[s] for s in args.sets)))
        if unknown:
            p.error(f"unknown entries {unknown}")
        entries = [e for e in SETS[set_name] if not args.entries or e in args.entries]
        measure(set_name, entries, corpus, args.work, results, args.out)
    print("\n" + table(results))
    print("\nTargets: small: quality ≥ baseline + 0.08 and ≥ fast + 0.04 MAP@3; multi: the best noisy recipe ≥ naive "
          "+ 0.02 and ≥ curated only + 0.05 lwlrap; full: quality ≥ 0.975 MAP@3.")
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
