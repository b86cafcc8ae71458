"""Clip tables: the clips a run trains on, one row a clip.

A row holds the clip's file and name, its labels, the fold it is held out in
(-1: never held out), its loss weight, its origin (curated, unverified, noisy,
pseudo, selected) and the folds it trains in (empty: every fold where it is
not held out), so that a stage of a pipeline can give each fold its own
training clips. An augmentation copy (copies.py) is a row with its source's
file, origin and weight and the variant it was remade as; it is never held out,
and never trains a fold where its source is held out or picks the epoch.
A run saves its table as `clips.csv`; `--resume` reads it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .datasets import Dataset
from .errors import DataError

ORIGINS = ("curated", "unverified", "noisy", "pseudo", "selected")
HELD_OUT = ("curated", "unverified")  # origins whose labels are trusted for validation
NOISY_POLICIES = ("include", "exclude", "only")
COLUMNS = ["fname", "file", "labels", "fold", "weight", "origin", "train_folds"]


@dataclass
class ClipTable:
    classes: list[str]
    multilabel: bool
    files: list[str]
    names: list[str]
    targets: np.ndarray
    fold: np.ndarray
    weight: np.ndarray
    origin: np.ndarray
    train_folds: list[tuple[int, ...]] = field(default_factory=list)
    variant: list[str] = field(default_factory=list)  # a copy's variant key (copies.py); "": the clip as recorded

    def __post_init__(self) -> None:
        n = len(self.files)
        if not self.train_folds:
            self.train_folds = [()] * n
        if not self.variant:
            self.variant = [""] * n
        for name in ("names", "targets", "fold", "weight", "origin", "train_folds", "variant"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ClipTable.{name} has {len(getattr(self, name))} rows, files has {n}")
        unknown = sorted(set(self.origin.tolist()) - set(ORIGINS))
        if unknown:
            raise DataError(f"unknown clip origin(s) {', '.join(unknown)}; valid: {', '.join(ORIGINS)}")

    def __len__(self) -> int:
        return len(self.files)

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> ClipTable:
        """Every clip of a dataset (use `dataset.subset("train")` first), weight 1,
        held out in the dataset's own fold (or -1), origin from its flags."""
        origin = np.where(dataset.noisy, "noisy", np.where(dataset.verified, "curated", "unverified"))
        return cls(list(dataset.classes), dataset.multilabel, [str(f) for f in dataset.files],
                   list(dataset.names), dataset.targets.astype(np.float32), dataset.fold.astype(np.int64),
                   np.ones(len(dataset), np.float32), origin.astype("<U10"))

    def select(self, mask: np.ndarray | Sequence[int]) -> ClipTable:
        """The rows picked by a boolean mask or an index array."""
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, dtype=np.int64)
        return replace(self, files=[self.files[i] for i in idx], names=[self.names[i] for i in idx],
                       targets=self.targets[idx], fold=self.fold[idx], weight=self.weight[idx],
                       origin=self.origin[idx], train_folds=[self.train_folds[i] for i in idx],
                       variant=[self.variant[i] for i in idx])

    def join(self, other: ClipTable) -> ClipTable:
        """This table's rows followed by `other`'s (same classes)."""
        if other.classes != self.classes:
            raise DataError("clip tables over different class lists cannot be joined")
        return replace(self, files=self.files + other.files, names=self.names + other.names,
                       targets=np.concatenate([self.targets, other.targets]),
                       fold=np.concatenate([self.fold, other.fold]),
                       weight=np.concatenate([self.weight, other.weight]),
                       origin=np.concatenate([self.origin, other.origin]),
                       train_folds=self.train_folds + other.train_folds, variant=self.variant + other.variant)

    @property
    def held_out_candidates(self) -> np.ndarray:
        """Clips whose labels may score a fold (never a copy)."""
        return np.isin(self.origin, HELD_OUT) & ~self.is_copy

    def training(self, k: int) -> np.ndarray:
        """Mask of the clips fold k trains on (never a copy of a clip it holds out)."""
        allowed = np.array([not only or k in only for only in self.train_folds], bool)
        return (self.fold != k) & allowed & ~self.copies_of(self.validation(k))

    def validation(self, k: int) -> np.ndarray:
        """Mask of the clips held out in fold k (never a copy)."""
        return (self.fold == k) & ~self.is_copy

    @property
    def is_copy(self) -> np.ndarray:
        """Mask of the augmentation copies."""
        return np.array([bool(v) for v in self.variant], bool)

    def copies_of(self, mask: np.ndarray) -> np.ndarray:
        """Mask of the augmentation copies of the clips in `mask`: the copies of their files."""
        copies = self.is_copy
        sources = {self.files[i] for i in np.flatnonzero(mask & ~copies)}
        return copies & np.array([f in sources for f in self.files], bool)

    def labels(self, i: int) -> list[str]:
        return [self.classes[j] for j in np.flatnonzero(self.targets[i])]

    def save(self, path: str | Path) -> None:
        pd.DataFrame({
            "fname": self.names, "file": self.files,
            "labels": [",".join(self.labels(i)) for i in range(len(self))],
            "fold": self.fold, "weight": self.weight, "origin": self.origin,
            "train_folds": [" ".join(map(str, only)) for only in self.train_folds],
            **({"variant": self.variant} if any(self.variant) else {}),  # only tables with copies have one
        }).to_csv(path, index=False, float_format="%.9g")

    @classmethod
    def load(cls, path: str | Path, classes: list[str], multilabel: bool) -> ClipTable:
        """A table saved by `save`, over the run's class list."""
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: unreadable clip table ({e})") from None
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: clip table lacks column(s) {', '.join(missing)}")
        column = {c: j for j, c in enumerate(classes)}
        targets = np.zeros((len(frame), len(classes)), np.float32)
        for i, labels in enumerate(frame["labels"]):
            for label in filter(None, labels.split(",")):
                if label not in column:
                    raise DataError(f"{path}: row {i + 2} has label {label!r}, not among the run's classes")
                targets[i, column[label]] = 1.0
        try:
            return cls(classes, multilabel, frame["file"].tolist(), frame["fname"].tolist(), targets,
                       frame["fold"].astype(np.int64).to_numpy(), frame["weight"].astype(np.float32).to_numpy(),
                       frame["origin"].to_numpy().astype("<U10"),
                       [tuple(int(k) for k in s.split()) for s in frame["train_folds"]],
                       frame["variant"].tolist() if "variant" in frame.columns else [])
        except ValueError as e:
            raise DataError(f"{path}: bad value in the clip table ({e})") from None


def noisy_policy(table: ClipTable, policy: str, weight: float) -> ClipTable:
    """The one place that decides what happens to noisy clips: trained on with
    loss weight `weight` (include), dropped (exclude), or the only clips (only:
    stage 1 of a warm-up pipeline)."""
    noisy = table.origin == "noisy"
    if policy == "exclude":
        return table.select(~noisy)
    if policy == "only":
        if not noisy.any():
            raise DataError("noisy: only was asked for, but the dataset has no noisy clips")
        return table.select(noisy)
    return replace(table, weight=np.where(noisy, np.float32(weight), table.weight).astype(np.float32))


def weigh_origins(table: ClipTable, factors: dict[str, float]) -> ClipTable:
    """Each clip's loss weight times its origin's factor (1 for origins not named)."""
    weight = table.weight.astype(np.float32)
    for origin, factor in factors.items():
        weight[table.origin == origin] *= np.float32(factor)
    return replace(table, weight=weight)
