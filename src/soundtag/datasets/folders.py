"""Folder per class: `root/<class>/<file>`; an optional `root/test/<class>/`
holds a test split (so no class can be called "test")."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import Dataset, build

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".opus"}


def detect(root: Path) -> bool:
    return root.is_dir() and any(_class_dirs(root))


def read(root: Path) -> Dataset:
    rows = _rows(root, "train")
    if (root / "test").is_dir():
        rows += _rows(root / "test", "test")
    if not rows:
        raise DataError(f"{root}: no audio files in class folders (expected root/<class>/<file>)")
    classes = sorted({r["labels"][0] for r in rows if r["split"] == "train"})
    unknown = sorted({r["labels"][0] for r in rows} - set(classes))
    if unknown:
        raise DataError(f"{root / 'test' / unknown[0]}: class {unknown[0]!r} has no training folder")
    return build(root, "folders", rows, classes, multilabel=False)


def _class_dirs(root: Path) -> list[Path]:
    return [d for d in sorted(root.iterdir()) if d.is_dir() and d.name != "test"
            and any(f.suffix.lower() in AUDIO_SUFFIXES for f in d.iterdir())]


def _rows(root: Path, split: str) -> list[dict]:
    return [{"file": f, "name": f"{d.name}/{f.name}", "labels": [d.name], "split": split}
            for d in _class_dirs(root) for f in sorted(d.iterdir())
            if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES]
