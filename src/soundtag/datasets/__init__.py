"""Dataset readers: one module per layout, looked up by name or detected."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..errors import DataError
from . import folders, generic_csv, kaggle2018, kaggle2019
from .base import Dataset

READERS: dict[str, ModuleType] = {
    "kaggle2018": kaggle2018,
    "kaggle2019": kaggle2019,
    "csv": generic_csv,
    "folders": folders,
}

__all__ = ["Dataset", "READERS", "detect", "read"]


def detect(path: str | Path) -> str:
    """The name of the first layout that recognises `path`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    for name, reader in READERS.items():
        if reader.detect(path):
            return name
    raise DataError(f"{path}: not a known dataset layout ({', '.join(READERS)}); "
                    "pass --layout, or a CSV file with --file-column/--label-column")


def read(path: str | Path, layout: str | None = None, **options) -> Dataset:
    """Read a dataset; `layout` overrides detection, `options` go to the CSV reader."""
    path = Path(path).expanduser().resolve()
    layout = layout or detect(path)
    if layout not in READERS:
        raise DataError(f"unknown layout {layout!r}; valid layouts: {', '.join(READERS)}")
    options = {k: v for k, v in options.items() if v is not None}
    if "audio_dir" in options:  # kept absolute in the run, so a resume from elsewhere finds it
        options["audio_dir"] = Path(options["audio_dir"]).expanduser().resolve()
    if options and layout != "csv":
        raise DataError(f"options {', '.join(options)} apply to the csv layout only, not {layout}")
    dataset = READERS[layout].read(path, **options)
    dataset.source = {"path": str(path), "layout": layout,
                      "options": {k: str(v) for k, v in options.items()}}
    return dataset
