"""Export a run's networks for other runtimes (ONNX). The STFT/mel front end
stays outside the graph: the run's config describes it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .registry import Registry
from .run import Run

FORMATS: Registry[Callable[[Run, int], list[Path]]] = Registry("export format")


def export(folder: str | Path, fmt: str = "onnx", opset: int = 17) -> list[Path]:
    """Export every trained fold of the run in `folder` to format `fmt`; the files written."""
    writer = FORMATS.get(fmt)
    return writer(Run.open(folder), opset)


@FORMATS.register("onnx")
def _onnx(run: Run, opset: int) -> list[Path]:
    """`RUN/onnx/fold<k>.onnx`: input `logmel` [batch, 1, n_features, frames],
    outputs `logits` and `embedding`; batch and frames are dynamic."""
    sample = torch.zeros(2, 1, run.config.features.n_features, 200)
    paths = []
    for k in run.trained_folds():
        path = run.onnx_path(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(run.load_model(k), (sample,), str(path), dynamo=False, opset_version=opset,
                              input_names=["logmel"], output_names=["logits", "embedding"],
                              dynamic_axes={"logmel": {0: "batch", 3: "frames"}, "logits": {0: "batch"},
                                            "embedding": {0: "batch"}})
        paths.append(path)
    return paths
