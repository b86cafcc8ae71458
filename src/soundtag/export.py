"""Export a run's networks for other runtimes (ONNX, optionally also quantised
to int8). The STFT/mel front end stays outside the graph: the run's config
describes it."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .models import folded
from .registry import Registry
from .run import Run, RunError
from .store import clip_features

FORMATS: Registry[Callable[[Run, int], list[Path]]] = Registry("export format")
CALIBRATION_CLIPS = 64  # training clips whose activations set the int8 ranges
CALIBRATION_FRAMES = 512  # longer calibration clips are cut to this many frames
# Nodes that stay float: the summary statistics (soundtag.summary), which lose the clip as int8,
# and the input's per-mel batch norm (a 1-D scale that per-channel int8 cannot take; nothing to gain).
FLOAT_NODES = ("/summary/", "/bn0/")


def export(folder: str | Path, fmt: str = "onnx", opset: int = 17, int8: bool = False) -> list[Path]:
    """Export every trained fold of the run in `folder` to format `fmt`; with
    `int8` (ONNX only), also its int8 quantisation. The files written."""
    writer = FORMATS.get(fmt)
    if int8 and fmt != "onnx":
        raise RunError(f"--int8 quantises ONNX networks; it does not apply to format {fmt!r}")
    run = Run.open(folder)
    paths = writer(run, opset)
    return paths + quantize(run) if int8 else paths


def quantize(run: Run) -> list[Path]:
    """`RUN/onnx/int8-fold<k>.onnx`: each float export statically quantised
    (7-bit int8 weights per channel, which AVX2 multiplies without saturating;
    uint8 activations; QDQ), its activation ranges
    calibrated on up to CALIBRATION_CLIPS of the run's training clips; a
    summary-statistics branch and the input's batch norm stay float (FLOAT_NODES)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, inputs: list[np.ndarray]):
            self.inputs = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.inputs, None)
            return None if x is None else {"logmel": x}

    inputs = list(calibration_inputs(run))
    paths = []
    for k in run.trained_folds():
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(run.onnx_path(k)), str(prepared), skip_symbolic_shape=True)
            nodes = onnx.load(str(prepared)).graph.node
            keep = [n.name for n in nodes if any(part in n.name for part in FLOAT_NODES)]
            quantize_static(str(prepared), str(run.onnx_int8_path(k)), Reader(inputs),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                            weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, nodes_to_exclude=keep)
        paths.append(run.onnx_int8_path(k))
    return paths


def calibration_inputs(run: Run) -> Iterator[np.ndarray]:
    """Network inputs [1, 1, n_features, frames] of training clips spread over the clip table."""
    files = run.read_clips().files
    picked = [files[i] for i in np.linspace(0, len(files) - 1, min(len(files), CALIBRATION_CLIPS)).astype(int)]
    found = 0
    for path in picked:
        specs, _ = clip_features(path, [run.config.features])
        if specs is not None:
            found += 1
            yield specs[0][None, None, :, :CALIBRATION_FRAMES].astype(np.float32)
    if not found:
        raise RunError(f"{run.folder}: none of the training clips in clips.csv can be read; int8 calibration "
                       "needs some of them")


@FORMATS.register("onnx")
def _onnx(run: Run, opset: int) -> list[Path]:
    """`RUN/onnx/fold<k>.onnx`: input `logmel` [batch, 1, n_features, frames],
    outputs `logits` and `embedding`; batch and frames are dynamic. The
    networks are folded for inference (`models.folded`)."""
    sample = torch.zeros(2, 1, run.config.features.n_features, 200)
    paths = []
    for k in run.trained_folds():
        path = run.onnx_path(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(folded(run.load_model(k)), (sample,), str(path), dynamo=False, opset_version=opset,
                              input_names=["logmel"], output_names=["logits", "embedding"],
                              dynamic_axes={"logmel": {0: "batch", 3: "frames"}, "logits": {0: "batch"},
                                            "embedding": {0: "batch"}})
        paths.append(path)
    return paths
