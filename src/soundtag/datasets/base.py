"""The one `Dataset` type every reader returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass
class Dataset:
    """Clips, their class vocabulary and multi-hot targets, and per-clip flags.

    `split` is "train" or "test"; `noisy` marks clips whose labels are not
    curated (FSDKaggle2019's noisy set); `verified` marks manually verified
    labels; `fold` holds the dataset's own fold (-1 where it has none);
    `labelled` is False for test clips whose labels are unknown. `source`
    says how to read the dataset again (path, layout, reader options).
    """

    root: Path
    layout: str
    files: list[Path]
    names: list[str]
    classes: list[str]
    targets: np.ndarray
    split: np.ndarray
    noisy: np.ndarray
    verified: np.ndarray
    fold: np.ndarray
    labelled: np.ndarray
    multilabel: bool
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def __post_init__(self) -> None:
        n = len(self.files)
        for name in ("names", "targets", "split", "noisy", "verified", "fold", "labelled"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Dataset.{name} has {len(getattr(self, name))} rows, files has {n}")

    def select(self, mask: np.ndarray | Sequence[int]) -> Dataset:
        """The clips picked by a boolean mask or an index array."""
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, dtype=np.int64)
        return replace(
            self, files=[self.files[i] for i in idx], names=[self.names[i] for i in idx],
            targets=self.targets[idx], split=self.split[idx], noisy=self.noisy[idx],
            verified=self.verified[idx], fold=self.fold[idx], labelled=self.labelled[idx],
        )

    def subset(self, split: str) -> Dataset:
        """The clips of one split ("train" or "test"), or of "curated"/"noisy" training clips."""
        masks = {
            "train": self.split == "train",
            "test": self.split == "test",
            "curated": (self.split == "train") & ~self.noisy,
            "noisy": (self.split == "train") & self.noisy,
            "all": np.ones(len(self), bool),
        }
        if split not in masks:
            raise DataError(f"unknown split {split!r}; valid: {', '.join(masks)}")
        return self.select(masks[split])

    def labels(self, i: int) -> list[str]:
        """Clip i's class names."""
        return [self.classes[j] for j in np.flatnonzero(self.targets[i])]

    def class_counts(self) -> dict[str, int]:
        return dict(zip(self.classes, self.targets.sum(axis=0).astype(int).tolist()))


def build(root: Path, layout: str, rows: list[dict], classes: list[str] | None = None,
          multilabel: bool = False) -> Dataset:
    """A Dataset from reader rows: dicts with `file` (Path), `name`, `labels`
    (list of class names, or None when unknown), `split`, and optional
    `noisy`, `verified`, `fold`. The vocabulary defaults to every label seen."""
    if classes is None:
        classes = sorted({label for r in rows for label in r["labels"] or ()})
    column = {c: j for j, c in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), np.float32)
    for i, r in enumerate(rows):
        for label in r["labels"] or ():
            targets[i, column[label]] = 1.0
    return Dataset(
        root=root, layout=layout,
        files=[r["file"] for r in rows], names=[r["name"] for r in rows], classes=list(classes),
        targets=targets,
        split=np.array([r["split"] for r in rows], dtype="<U5"),
        noisy=np.array([r.get("noisy", False) for r in rows], bool),
        verified=np.array([r.get("verified", not r.get("noisy", False)) for r in rows], bool),
        fold=np.array([r.get("fold", -1) for r in rows], np.int64),
        labelled=np.array([r["labels"] is not None for r in rows], bool),
        multilabel=multilabel,
    )
