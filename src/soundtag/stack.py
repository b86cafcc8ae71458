"""Stacking: a small MLP trained on several runs' out-of-fold scores (float32,
as the runs saved them) learns how to combine them. A stack folder holds
`stack.json` (its runs — kept absolute and relative, so that folders moved
together still work —, classes, layer size, figures) and `stack.safetensors`.
A stack is a scorer like a run, and can itself be an ensemble member."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.model_selection import KFold

from .errors import SoundtagError
from .features import FeatureConfig
from .run import Run, RunError, found_path, stored_path
from .scorer import Clip, RunScorer, networks, unit
from .task import Task
from .tta import TTA


class StackNet(torch.nn.Module):
    def __init__(self, inputs: int, classes: int, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                                          torch.nn.Dropout(dropout), torch.nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def is_stack(folder: str | Path) -> bool:
    return (Path(folder) / "stack.json").is_file()


def oof_table(runs: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """Stacked out-of-fold scores [clips, runs × classes] of the clips every run
    held out, their targets, the classes and whether the set is multi-label."""
    opened = [Run.open(r) for r in runs]
    classes, multilabel = opened[0].classes, opened[0].multilabel
    tables = []
    for run in opened:
        if run.classes != classes:
            raise RunError(f"{run.folder}: its classes differ from {opened[0].folder}'s")
        meta, scores = run.read_oof()
        tables.append((meta.set_index("fname"), {n: i for i, n in enumerate(meta.fname)}, scores))
    common = sorted(set.intersection(*(set(index) for _, index, _ in tables)))
    if len(common) < 20:
        raise RunError(f"only {len(common)} clips are out-of-fold in every run; stacking needs runs "
                       "trained on the same clips")
    x = np.concatenate([scores[[index[n] for n in common]] for _, index, scores in tables], axis=1)
    column = {c: j for j, c in enumerate(classes)}
    y = np.zeros((len(common), len(classes)), np.float32)
    for i, labels in enumerate(tables[0][0].loc[common, "labels"].fillna("")):
        y[i, [column[c] for c in labels.split(",") if c]] = 1
    return x.astype(np.float32), y, classes, multilabel


def fit_net(x: np.ndarray, y: np.ndarray, multilabel: bool, hidden: int = 256, epochs: int = 300,
            seed: int = 0) -> StackNet:
    """A stacker fitted on scores `x` [clips, runs × classes] and targets `y`."""
    torch.manual_seed(seed)
    task = Task(multilabel)
    net = StackNet(x.shape[1], y.shape[1], hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        loss = task.loss(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def stack_scores(net: StackNet, x: np.ndarray, multilabel: bool) -> np.ndarray:
    with torch.inference_mode():
        return Task(multilabel).activate(net(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy())


def cross_validate(x: np.ndarray, y: np.ndarray, runs: int, multilabel: bool, hidden: int = 256,
                   epochs: int = 300, seed: int = 0) -> dict:
    """The stacker's 5-fold cross-validated figure next to the plain mean of the runs."""
    task = Task(multilabel)
    held = np.zeros_like(y)
    for train, val in KFold(5, shuffle=True, random_state=seed).split(x):
        held[val] = stack_scores(fit_net(x[train], y[train], multilabel, hidden, epochs, seed), x[val], multilabel)
    mean = x.reshape(len(x), runs, y.shape[1]).mean(1)
    return {"metric": task.metric, "clips": len(x), "stack_cv": task.score(y, held),
            "mean_of_runs": task.score(y, mean)}


def fit_stack(runs: Sequence[str | Path], out: str | Path, hidden: int = 256, epochs: int = 300,
              seed: int = 0) -> dict:
    """Fit the stacker on the runs' out-of-fold scores into folder `out`; returns
    its cross-validated figure next to the plain mean of the runs."""
    runs = [Path(r).resolve() for r in runs]
    x, y, classes, multilabel = oof_table(runs)
    figures = cross_validate(x, y, len(runs), multilabel, hidden, epochs, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(fit_net(x, y, multilabel, hidden, epochs, seed).state_dict(), str(out / "stack.safetensors"))
    info = {"runs": [stored_path(r, out) for r in runs], "classes": classes, "multilabel": multilabel,
            "hidden": hidden, "figures": figures}
    (out / "stack.json").write_text(json.dumps(info, indent=1))
    return figures


class Stacker:
    """A fitted stack: maps the runs' scores [clips, runs × classes] to scores."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not is_stack(folder):
            raise SoundtagError(f"{folder}: not a stack folder (stack.json missing)")
        try:
            info = json.loads((folder / "stack.json").read_text())
            self.runs = [found_path(r, folder) for r in info["runs"]]
            self.classes, self.multilabel = info["classes"], info["multilabel"]
            self.net = StackNet(len(self.runs) * len(self.classes), len(self.classes), info["hidden"])
            self.net.load_state_dict(load_file(str(folder / "stack.safetensors")))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise SoundtagError(f"{folder}: damaged stack folder ({e})") from None
        self.net.eval()

    def __call__(self, per_run: list[np.ndarray]) -> np.ndarray:
        return stack_scores(self.net, np.concatenate(per_run, axis=1), self.multilabel)


class StackScorer:
    """A stack as a scorer: its runs score a clip, the stacker combines them."""

    def __init__(self, folder: str | Path, backend: str = "torch", tta: TTA | None = None, mean: str = "arithmetic",
                 threads: int = 0):
        self.folder, self.stacker = Path(folder), Stacker(folder)
        self.classes, self.multilabel = self.stacker.classes, self.stacker.multilabel
        self.members = []
        for path in self.stacker.runs:
            run = Run.open(path)
            if run.classes != self.classes:
                raise RunError(f"{path}: its classes differ from the stack's ({self.folder})")
            self.members.append(RunScorer(run, networks(run, backend), tta, mean, threads))

    @property
    def name(self) -> str:
        return str(self.folder)

    @property
    def feature_configs(self) -> list[FeatureConfig]:
        return list(dict.fromkeys(m.features for m in self.members))

    def thresholds(self) -> np.ndarray:
        return np.mean([m.thresholds() for m in self.members], axis=0)

    def score(self, clips: Sequence[Clip], progress: bool = False,
              exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        results = [m.score(clips, progress, exact) for m in self.members]
        return self.stacker([s for s, _ in results]), np.concatenate([unit(e) for _, e in results], axis=1)
