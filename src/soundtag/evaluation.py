"""`soundtag evaluate`: score a labelled split with a tagger, with plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import metrics, plots
from .datasets import Dataset
from .errors import DataError
from .predict import Tagger
from .task import Task


def truth_for(dataset: Dataset, classes: list[str]) -> np.ndarray:
    """The dataset's targets in the tagger's class order."""
    unknown = sorted(set(dataset.classes) - set(classes))
    if unknown and dataset.targets[:, [dataset.classes.index(c) for c in unknown]].any():
        raise DataError(f"{dataset.root}: class(es) {', '.join(unknown[:5])} are not among the "
                        f"{len(classes)} classes the run was trained on")
    truth = np.zeros((len(dataset), len(classes)), np.float32)
    for j, c in enumerate(classes):
        if c in dataset.classes:
            truth[:, j] = dataset.targets[:, dataset.classes.index(c)]
    return truth


def evaluate(tagger: Tagger, dataset: Dataset, split: str = "test", out: str | Path | None = None,
             cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Figures (overall and per class) on the labelled clips of `split`;
    writes `metrics.json` and plots into `out` when given."""
    part = dataset.subset(split)
    part = part.select(part.labelled)
    if not len(part):
        raise DataError(f"{dataset.root}: the {split} split has no labelled clips")
    truth = truth_for(part, tagger.classes)
    scores, errors = tagger.tag_dataset(part, cache_dir, progress)
    ok = np.array([i not in errors for i in range(len(part))])
    result = metrics.evaluate(truth[ok], scores[ok], tagger.classes, tagger.multilabel)
    result.update(split=split, clips=int(ok.sum()),
                  skipped={str(part.files[i]): reason for i, reason in errors.items()})
    if out is not None:
        _write(Path(out), result, truth[ok], scores[ok], tagger)
    return result


def _write(out: Path, result: dict, truth: np.ndarray, scores: np.ndarray, tagger: Tagger) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    key = Task(tagger.multilabel).per_class_figure
    values = {c: v[key] for c, v in result["per_class"].items() if v[key] is not None}
    plots.per_class_bars(values, key, out / f"per_class_{key}.png")
    if not tagger.multilabel:
        plots.confusion(truth.argmax(1), scores.argmax(1), tagger.classes, out / "confusion.png")
