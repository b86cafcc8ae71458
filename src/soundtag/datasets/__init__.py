"""Dataset readers: one module per layout, looked up by name or detected."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..errors import DataError
from ..registry import Registry
from . import folders, generic_csv, kaggle2018, kaggle2019
from .base import Dataset

# Registration order is detection order.
READERS: Registry[ModuleType] = Registry("layout")
READERS.add("kaggle2018", kaggle2018)
READERS.add("kaggle2019", kaggle2019)
READERS.add("csv", generic_csv)
READERS.add("folders", folders)

__all__ = ["Dataset", "READERS", "detect", "read"]


def detect(path: str | Path) -> str:
    """The name of the first layout that recognises `path`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    for name in READERS:
        if READERS.get(name).detect(path):
            return name
    raise DataError(f"{path}: not a known dataset layout ({', '.join(READERS)}); "
                    "pass --layout, or a CSV file with --file-column/--label-column")


def read(path: str | Path, layout: str | None = None, **options) -> Dataset:
    """Read a dataset; `layout` overrides detection, `options` go to the CSV reader."""
    path = Path(path).expanduser().resolve()
    layout = layout or detect(path)
    reader = READERS.get(layout)
    options = {k: v for k, v in options.items() if v is not None}
    if "audio_dir" in options:  # kept absolute in the run, so a resume from elsewhere finds it
        options["audio_dir"] = Path(options["audio_dir"]).expanduser().resolve()
    if options and layout != "csv":
        raise DataError(f"options {', '.join(options)} apply to the csv layout only, not {layout}")
    dataset = reader.read(path, **options)
    dataset.source = {"path": str(path), "layout": layout,
                      "options": {k: str(v) for k, v in options.items()}}
    return dataset
