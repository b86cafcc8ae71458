"""Export a run's networks to ONNX. The STFT/mel front end stays outside the
graph; its parameters are saved beside the networks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .errors import ConfigError
from .run import Run

FORMATS = ("onnx",)


def export(folder: str | Path, fmt: str = "onnx", opset: int = 17) -> list[Path]:
    """Write `RUN/onnx/fold<k>.onnx` for every trained fold, plus `frontend.json`
    (feature config) and `classes.json`; input `logmel` [batch, 1, n_features,
    frames], outputs `logits` and `embedding`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    run = Run.open(folder)
    out = run.folder / "onnx"
    out.mkdir(exist_ok=True)
    sample = torch.zeros(2, 1, run.config.features.n_features, 200)
    paths = []
    for k in run.trained_folds():
        path = out / f"fold{k}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(run.load_model(k), (sample,), str(path), dynamo=False, opset_version=opset,
                              input_names=["logmel"], output_names=["logits", "embedding"],
                              dynamic_axes={"logmel": {0: "batch", 3: "frames"}, "logits": {0: "batch"},
                                            "embedding": {0: "batch"}})
        paths.append(path)
    (out / "frontend.json").write_text(json.dumps(run.config.features.to_dict(), indent=1))
    (out / "classes.json").write_text(json.dumps({"classes": run.classes, "multilabel": run.multilabel}))
    return paths
