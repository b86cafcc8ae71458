"""A run folder: the unit of reproducibility.

    RUN/config.yaml            resolved training config (features included)
    RUN/run.json               classes, data source, package version
    RUN/folds.csv              fold of every training clip (-1: never held out)
    RUN/fold<k>/model.safetensors   best weights of fold k
    RUN/fold<k>/metrics.csv    one row an epoch
    RUN/fold<k>/checkpoint.*   last finished epoch, for --resume
    RUN/fold<k>/oof.npy        held-out scores of the best epoch
    RUN/oof.csv, summary.json, summary.md, curves.png
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .checkpoint import atomic_write
from .config import TrainConfig
from .errors import SoundtagError


class RunError(SoundtagError):
    """A run folder that is missing, incomplete or inconsistent."""


@dataclass
class Run:
    folder: Path
    config: TrainConfig
    classes: list[str]
    multilabel: bool
    data: dict[str, Any]
    init: str | None = None

    @classmethod
    def create(cls, folder: str | Path, config: TrainConfig, classes: list[str], multilabel: bool,
               data: dict[str, Any], force: bool = False, init: str | None = None) -> Run:
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            if not force:
                raise RunError(f"{folder} already exists; pass --force to overwrite it or --resume to continue it")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run = cls(folder, config, list(classes), multilabel, data, init)
        (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        info = {"version": __version__, "classes": run.classes, "multilabel": multilabel, "data": data,
                "init": init}
        (folder / "run.json").write_text(json.dumps(info, indent=1))
        return run

    @classmethod
    def open(cls, folder: str | Path) -> Run:
        folder = Path(folder)
        if not (folder / "run.json").is_file() or not (folder / "config.yaml").is_file():
            raise RunError(f"{folder}: not a run folder (config.yaml and run.json missing)")
        info = json.loads((folder / "run.json").read_text())
        config = TrainConfig.from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
        return cls(folder, config, info["classes"], info["multilabel"], info["data"], info.get("init"))

    @property
    def metric(self) -> str:
        """The validation figure that picks the best epoch."""
        return "lwlrap" if self.multilabel else "map@3"

    def fold_dir(self, k: int) -> Path:
        return self.folder / f"fold{k}"

    def trained_folds(self) -> list[int]:
        """Folds with saved weights."""
        return sorted(int(p.parent.name[4:]) for p in self.folder.glob("fold*/model.safetensors"))

    def new_model(self) -> torch.nn.Module:
        return self.config.create_model(len(self.classes))

    def save_weights(self, k: int, model: torch.nn.Module) -> None:
        self.fold_dir(k).mkdir(exist_ok=True)
        tensors = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
        atomic_write(self.fold_dir(k) / "model.safetensors", lambda p: save_file(tensors, p))

    def load_model(self, k: int) -> torch.nn.Module:
        """Fold k's best network, in eval mode; checks the weights fit the class list."""
        path = self.fold_dir(k) / "model.safetensors"
        if not path.is_file():
            raise RunError(f"{self.folder}: fold {k} has no weights ({path.name} missing); "
                           f"trained folds: {self.trained_folds() or 'none'}")
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise RunError(f"{path}: unreadable weights ({e})") from None
        model = self.new_model()
        head = weights.get("head.weight")
        if head is not None and head.shape[0] != len(self.classes):
            raise RunError(f"{path}: weights are for {head.shape[0]} classes but run.json lists "
                           f"{len(self.classes)}")
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise RunError(f"{path}: weights do not fit model {self.config.model.name}: "
                           f"{str(e).splitlines()[0]}") from None
        return model.eval()

    def load_models(self) -> list[torch.nn.Module]:
        folds = self.trained_folds()
        if not folds:
            raise RunError(f"{self.folder}: no trained fold (no fold*/model.safetensors)")
        return [self.load_model(k) for k in folds]

    def write_folds(self, names: list[str], folds: np.ndarray) -> None:
        pd.DataFrame({"fname": names, "fold": folds}).to_csv(self.folder / "folds.csv", index=False)

    def read_folds(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "folds.csv", dtype={"fname": str})

    def thresholds(self) -> np.ndarray:
        """Per-class thresholds tuned on the out-of-fold scores."""
        path = self.folder / "thresholds.json"
        if not path.is_file():
            raise RunError(f"{self.folder}: no thresholds.json (the run has not finished training)")
        saved = json.loads(path.read_text())
        return np.array([saved[c] for c in self.classes])
