"""Second-level stacking: a small MLP over the out-of-fold scores of several
runs, as in the FSDKaggle2019 winner. A stack folder holds `stack.json` (the
runs, classes, layer size) and `stack.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.model_selection import KFold

from . import metrics
from .errors import SoundtagError
from .predict import activate
from .run import Run, RunError


class StackNet(torch.nn.Module):
    def __init__(self, inputs: int, classes: int, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                                          torch.nn.Dropout(dropout), torch.nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def oof_table(runs: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """Stacked out-of-fold scores [clips, runs × classes] of the clips every run
    held out, their targets, the classes and whether the set is multi-label."""
    opened = [Run.open(r) for r in runs]
    classes, multilabel = opened[0].classes, opened[0].multilabel
    tables = []
    for run in opened:
        if run.classes != classes:
            raise RunError(f"{run.folder}: its classes differ from {opened[0].folder}'s")
        if not (run.folder / "oof.csv").is_file():
            raise RunError(f"{run.folder}: no oof.csv (training has not finished)")
        tables.append(pd.read_csv(run.folder / "oof.csv", dtype={"fname": str}).set_index("fname"))
    common = sorted(set.intersection(*(set(t.index) for t in tables)))
    if len(common) < 20:
        raise RunError(f"only {len(common)} clips are out-of-fold in every run; stacking needs runs "
                       "trained on the same clips")
    x = np.concatenate([t.loc[common, classes].to_numpy(np.float32) for t in tables], axis=1)
    column = {c: j for j, c in enumerate(classes)}
    y = np.zeros((len(common), len(classes)), np.float32)
    for i, labels in enumerate(tables[0].loc[common, "labels"].fillna("")):
        y[i, [column[c] for c in labels.split(",") if c]] = 1
    return x, y, classes, multilabel


def _fit(x: np.ndarray, y: np.ndarray, multilabel: bool, hidden: int, epochs: int, seed: int) -> StackNet:
    torch.manual_seed(seed)
    net = StackNet(x.shape[1], y.shape[1], hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        logits = net(xt)
        loss = (F.binary_cross_entropy_with_logits(logits, yt) if multilabel
                else F.cross_entropy(logits, yt.argmax(1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _predict(net: StackNet, x: np.ndarray, multilabel: bool) -> np.ndarray:
    with torch.inference_mode():
        return activate(net(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy(), multilabel)


def fit_stack(runs: list[str | Path], out: str | Path, hidden: int = 256, epochs: int = 300,
              seed: int = 0) -> dict:
    """Fit the stacker on the runs' out-of-fold scores; returns its 5-fold
    cross-validated figure next to the plain mean of the runs."""
    runs = [Path(r).resolve() for r in runs]
    x, y, classes, multilabel = oof_table(runs)
    score = metrics.lwlrap if multilabel else metrics.map_at_k
    held = np.zeros_like(y)
    for train, val in KFold(5, shuffle=True, random_state=seed).split(x):
        held[val] = _predict(_fit(x[train], y[train], multilabel, hidden, epochs, seed), x[val], multilabel)
    mean = x.reshape(len(x), len(runs), len(classes)).mean(1)
    figures = {"metric": "lwlrap" if multilabel else "map@3", "clips": len(x),
               "stack_cv": score(y, held), "mean_of_runs": score(y, mean)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = _fit(x, y, multilabel, hidden, epochs, seed)
    save_file(net.state_dict(), str(out / "stack.safetensors"))
    info = {"runs": [str(r) for r in runs], "classes": classes, "multilabel": multilabel, "hidden": hidden,
            "figures": figures}
    (out / "stack.json").write_text(json.dumps(info, indent=1))
    return figures


class Stacker:
    """A fitted stack: maps the runs' scores [clips, runs × classes] to scores."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "stack.json").is_file():
            raise SoundtagError(f"{folder}: not a stack folder (stack.json missing)")
        info = json.loads((folder / "stack.json").read_text())
        self.runs, self.classes, self.multilabel = info["runs"], info["classes"], info["multilabel"]
        self.net = StackNet(len(self.runs) * len(self.classes), len(self.classes), info["hidden"])
        self.net.load_state_dict(load_file(str(folder / "stack.safetensors")))
        self.net.eval()

    def __call__(self, per_run: list[np.ndarray]) -> np.ndarray:
        return _predict(self.net, np.concatenate(per_run, axis=1), self.multilabel)
