"""A run folder: the unit of reproducibility. Every file in it is read and
written here, and nowhere else.

    RUN/config.yaml                 resolved training config (features included)
    RUN/run.json                    classes, task, data source, --init run, package version
    RUN/clips.csv                   the clip table trained on (fold, weight, origin of each clip)
    RUN/skipped.csv                 clips skipped as unreadable, with the reason
    RUN/fold<k>/model.safetensors   best weights of fold k, with a checksum of the tensors
    RUN/fold<k>/metrics.csv         one row an epoch
    RUN/fold<k>/checkpoint.safetensors   last finished epoch, for --resume (one atomic file)
    RUN/fold<k>/oof.npy             held-out scores with the weights kept (float32)
    RUN/oof.npy, oof.csv            out-of-fold scores of every held-out clip (float32; text for people)
    RUN/thresholds.json, summary.json, summary.md, curves.png
    RUN/onnx/fold<k>.onnx           exported networks
    RUN/onnx/int8-fold<k>.onnx      the same quantised to int8 (export --int8)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__, checkpoint
from .checkpoint import atomic_write
from .clips import ClipTable
from .config import TrainConfig
from .errors import SoundtagError
from .task import Task


class RunError(SoundtagError):
    """A run folder that is missing, incomplete or inconsistent."""


def stored_path(target: str | Path, base: Path) -> dict[str, str]:
    """A path kept both absolute and relative to `base`, so that folders moved together still find it."""
    target = Path(target).resolve()
    return {"path": str(target), "relative": os.path.relpath(target, base.resolve())}


def found_path(stored: dict[str, str] | str, base: Path) -> Path:
    """The path `stored_path` kept: relative to `base` where that exists, else absolute."""
    if isinstance(stored, str):
        return Path(stored)
    relative = base / stored["relative"]
    return relative if relative.exists() else Path(stored["path"])


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Run:
    folder: Path
    config: TrainConfig
    classes: list[str]
    multilabel: bool
    data: dict[str, Any]
    init: dict[str, str] | None = None

    @classmethod
    def create(cls, folder: str | Path, config: TrainConfig, classes: list[str], multilabel: bool,
               data: dict[str, Any], force: bool = False, init: str | Path | None = None) -> Run:
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            if not force:
                raise RunError(f"{folder} already exists; pass --force to overwrite it or --resume to continue it")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run = cls(folder, config, list(classes), multilabel, data, stored_path(init, folder) if init else None)
        (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        info = {"version": __version__, "classes": run.classes, "multilabel": multilabel, "data": data,
                "init": run.init}
        (folder / "run.json").write_text(json.dumps(info, indent=1))
        return run

    @classmethod
    def open(cls, folder: str | Path) -> Run:
        folder = Path(folder)
        if not (folder / "run.json").is_file() or not (folder / "config.yaml").is_file():
            raise RunError(f"{folder}: not a run folder (config.yaml and run.json missing)")
        info = _read_json(folder / "run.json")
        if not isinstance(info, dict) or not isinstance(info.get("classes"), list) or "multilabel" not in info:
            raise RunError(f"{folder / 'run.json'}: incomplete (needs classes and multilabel); "
                           "the run folder is damaged, train it again")
        try:
            config = TrainConfig.from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
            config.validate()
        except yaml.YAMLError as e:
            raise RunError(f"{folder / 'config.yaml'}: not valid YAML ({' '.join(str(e).split())})") from None
        except SoundtagError as e:
            raise RunError(f"{folder / 'config.yaml'}: {e}") from None
        return cls(folder, config, info["classes"], bool(info["multilabel"]), info.get("data", {}),
                   info.get("init"))

    @property
    def task(self) -> Task:
        return Task(self.multilabel)

    @property
    def metric(self) -> str:
        return self.task.metric

    @property
    def init_folder(self) -> Path | None:
        """The run this one started from (--init), found even when both moved together."""
        return found_path(self.init, self.folder) if self.init else None

    def _fold(self, k: int) -> Path:
        folder = self.folder / f"fold{k}"
        folder.mkdir(exist_ok=True)
        return folder

    def trained_folds(self) -> list[int]:
        """Folds with saved weights."""
        return sorted(int(p.parent.name[4:]) for p in self.folder.glob("fold*/model.safetensors"))

    # --- weights -----------------------------------------------------------------
    def new_model(self) -> torch.nn.Module:
        return self.config.create_model(len(self.classes))

    def save_weights(self, k: int, model: torch.nn.Module) -> None:
        tensors = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
        meta = {"sha256": tensors_digest(tensors)}
        atomic_write(self._fold(k) / "model.safetensors", lambda p: save_file(tensors, p, metadata=meta))

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        """Fold k's best weights, checked against their checksum and for NaN/inf."""
        path = self.folder / f"fold{k}" / "model.safetensors"
        if not path.is_file():
            raise RunError(f"{self.folder}: fold {k} has no weights ({path.name} missing); "
                           f"trained folds: {self.trained_folds() or 'none'}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise RunError(f"{path}: unreadable weights ({e})") from None
        if "sha256" in meta and meta["sha256"] != tensors_digest(tensors):
            raise RunError(f"{path}: the weights do not match their checksum (the file is damaged); "
                           "train the fold again")
        bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise RunError(f"{path}: weights hold NaN or inf (in {bad[0]}): a diverged or damaged run; "
                           "train it again")
        return tensors

    def load_model(self, k: int) -> torch.nn.Module:
        """Fold k's best network, in eval mode; checks the weights fit the class list."""
        weights = self.weights(k)
        path = self.folder / f"fold{k}" / "model.safetensors"
        head = weights.get("head.weight")
        if head is not None and head.shape[0] != len(self.classes):
            raise RunError(f"{path}: weights are for {head.shape[0]} classes but run.json lists "
                           f"{len(self.classes)}")
        model = self.new_model()
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

    # --- training state ----------------------------------------------------------
    def save_checkpoint(self, k: int, state: Any) -> None:
        checkpoint.save(self._fold(k) / "checkpoint.safetensors", state)

    def load_checkpoint(self, k: int) -> Any | None:
        """Fold k's last finished epoch, or None when it has not started."""
        path = self.folder / f"fold{k}" / "checkpoint.safetensors"
        return checkpoint.load(path) if path.is_file() else None

    def log_epoch(self, k: int, row: dict[str, str]) -> None:
        """Append one epoch's figures to fold k's metrics.csv (a new file at epoch 1)."""
        path = self._fold(k) / "metrics.csv"
        if row["epoch"] == "1" or not path.exists():
            path.write_text(",".join(row) + "\n")
        with open(path, "a") as f:
            f.write(",".join(row.values()) + "\n")

    def history(self, k: int) -> pd.DataFrame:
        return pd.read_csv(self.folder / f"fold{k}" / "metrics.csv")

    def forget_epochs_after(self, k: int, epoch: int) -> None:
        """Drop metrics rows of epochs the checkpoint does not hold (a kill between the two)."""
        path = self.folder / f"fold{k}" / "metrics.csv"
        if path.exists():
            history = pd.read_csv(path, dtype=str)
            history[history.epoch.astype(int) <= epoch].to_csv(path, index=False)

    def save_fold_scores(self, k: int, scores: np.ndarray) -> None:
        """Held-out scores of fold k with the weights it kept."""
        atomic_write(self._fold(k) / "oof.npy", lambda p: _save_npy(p, scores))

    def fold_scores(self, k: int) -> np.ndarray:
        return np.load(self.folder / f"fold{k}" / "oof.npy", allow_pickle=False)

    # --- clips ---------------------------------------------------------------------
    def write_clips(self, table: ClipTable) -> None:
        table.save(self.folder / "clips.csv")

    def read_clips(self) -> ClipTable:
        path = self.folder / "clips.csv"
        if not path.is_file():
            raise RunError(f"{self.folder}: no clips.csv (the run was made by an older soundtag or is damaged)")
        return ClipTable.load(path, self.classes, self.multilabel)

    def write_skipped(self, failures: dict[str, str]) -> Path:
        path = self.folder / "skipped.csv"
        pd.DataFrame({"file": list(failures), "reason": list(failures.values())}).to_csv(path, index=False)
        return path

    # --- results -------------------------------------------------------------------
    def write_oof(self, table: pd.DataFrame, scores: np.ndarray) -> None:
        """Out-of-fold scores: float32 for the stacker, a CSV (fname, fold, labels, scores) for people."""
        atomic_write(self.folder / "oof.npy", lambda p: _save_npy(p, scores))
        text = table.copy()
        for j, c in enumerate(self.classes):
            text[c] = scores[:, j]
        text.to_csv(self.folder / "oof.csv", index=False, float_format="%.5f")

    def read_oof(self) -> tuple[pd.DataFrame, np.ndarray]:
        """(fname, fold, labels) of the out-of-fold clips and their float32 scores."""
        if not (self.folder / "oof.npy").is_file() or not (self.folder / "oof.csv").is_file():
            raise RunError(f"{self.folder}: no out-of-fold scores (training has not finished)")
        table = pd.read_csv(self.folder / "oof.csv", dtype={"fname": str}, usecols=["fname", "fold", "labels"])
        return table, np.load(self.folder / "oof.npy", allow_pickle=False)

    def write_summary(self, summary: dict, markdown: str) -> None:
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.folder / "summary.md").write_text(markdown + "\n")

    def summary(self) -> dict:
        path = self.folder / "summary.json"
        if not path.is_file():
            raise RunError(f"{self.folder}: no summary.json (training has not finished)")
        return _read_json(path)

    def write_thresholds(self, thresholds: np.ndarray) -> None:
        (self.folder / "thresholds.json").write_text(
            json.dumps(dict(zip(self.classes, np.asarray(thresholds).tolist())), indent=1))

    def thresholds(self) -> np.ndarray:
        """Per-class thresholds tuned on the out-of-fold scores."""
        path = self.folder / "thresholds.json"
        if not path.is_file():
            raise RunError(f"{self.folder}: no thresholds.json (the run has not finished training)")
        saved = _read_json(path)
        return np.array([saved[c] for c in self.classes])

    @property
    def curves_path(self) -> Path:
        return self.folder / "curves.png"

    def onnx_path(self, k: int) -> Path:
        (self.folder / "onnx").mkdir(exist_ok=True)
        return self.folder / "onnx" / f"fold{k}.onnx"

    def onnx_paths(self) -> list[Path]:
        return sorted(self.folder.glob("onnx/fold*.onnx"))

    def onnx_int8_path(self, k: int) -> Path:
        """Fold k's network quantised to int8, beside the float export."""
        return self.onnx_path(k).with_name(f"int8-fold{k}.onnx")

    def onnx_int8_paths(self) -> list[Path]:
        return sorted(self.folder.glob("onnx/int8-fold*.onnx"))

    def eval_dir(self, split: str) -> Path:
        return eval_folder(self.folder, split)


def eval_folder(folder: str | Path, split: str) -> Path:
    """Where `soundtag evaluate` writes by default: inside the run (or stack) folder."""
    return Path(folder) / f"eval-{split}"


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
        np.save(f, np.asarray(array, np.float32))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None
