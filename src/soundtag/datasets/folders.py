"""Folder per class: `root/<class>/<file>`; an optional `root/test/<class>/`
holds a test split (so no class can be called "test")."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from ..errors import DataError
from .base import Dataset, build

log = logging.getLogger("soundtag")

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
    """Every entry named like audio, files or not: a folder, a broken link or a
    symlink loop called `x.wav` is then skipped with its reason, not silently.
    A pipe, socket or device is left out with a warning (reading it could block)."""
    return [{"file": f, "name": f"{d.name}/{f.name}", "labels": [d.name], "split": split}
            for d in _class_dirs(root) for f in sorted(d.iterdir())
            if f.suffix.lower() in AUDIO_SUFFIXES and not _special(f)]


def _special(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:  # missing or looping: listed, and reported as unreadable
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return False
    log.warning("%s: not a regular file (a pipe, socket or device); left out", path)
    return True
