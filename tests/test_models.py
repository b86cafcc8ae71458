"""Tests for the model registry and every registered model family."""

from __future__ import annotations

import copy
import inspect
import json

import numpy as np
import pytest
import torch

from soundtag.errors import ConfigError
from soundtag.models import MODELS, create_model, folded, model_names

pytestmark = pytest.mark.usefixtures("single_torch_thread")

NAMES = model_names()
SMALL = {"width": 0.25}
PARAMS = {"fused": {"backbone_params": SMALL}, "summary": {}}  # families without a width of their own
NUM_CLASSES = 7
FRAMES = (1, 2, 8, 37, 173, 500)  # a waveform model reads these as samples, and 20000 more


def waveform_model(name: str) -> bool:
    return getattr(MODELS.get(name), "INPUT", "spectrogram") == "waveform"


def logmel(batch: int, n_mels: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Random input in the log-mel dB range (-100..+40), or samples in [-1, 1] for one row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, n_mels, frames, generator=gen)
    return x * 2 - 1 if n_mels == 1 else x * 140 - 100


def rows(name: str, n_mels: int = 64) -> int:
    """Feature rows of a model's input: the mel bands, or 1 for the waveform."""
    return 1 if waveform_model(name) else n_mels


def small_params(name: str) -> dict:
    return PARAMS.get(name, SMALL)


def small_model(name: str, n_mels: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, NUM_CLASSES, n_mels=rows(name, n_mels), **small_params(name))


def calibrated(model: torch.nn.Module, n_mels: int = 64) -> torch.nn.Module:
    """Let BatchNorm statistics see some data, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(logmel(4, n_mels, 64 if n_mels > 1 else 4096, seed))
    return model.eval()


def test_registry_lists_all_families() -> None:
    assert set(NAMES) >= {"vgg", "cnn6", "cnn10", "mobilenetv2", "resnet", "xresnet", "auxcnn",
                          "wavecnn"}  # found without a list
    assert NAMES == sorted(NAMES)


@pytest.fixture
def scratch_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models registered by the test are gone after it."""
    monkeypatch.setattr(MODELS, "_entries", {name: MODELS.get(name) for name in MODELS})


def test_a_newly_registered_model_is_built_by_name(scratch_models) -> None:
    @MODELS.register("linear")
    class Linear(torch.nn.Module):
        def __init__(self, num_classes: int, n_mels: int = 64, bias: bool = True) -> None:
            super().__init__()
            self.head = torch.nn.Linear(n_mels, num_classes, bias=bias)

    model = create_model("linear", 4, n_mels=32, bias=False)
    assert isinstance(model, Linear) and model.head.weight.shape == (4, 32) and model.head.bias is None
    assert "linear" in model_names()
    with pytest.raises(ValueError, match="model 'linear' got unknown parameter.s.: width; accepted: n_mels, bias"):
        create_model("linear", 4, width=2)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_params_are_plain(name: str) -> None:
    params = inspect.signature(MODELS.get(name)).parameters
    assert list(params)[:2] == ["num_classes", "n_mels"]
    defaults = {k: p.default for k, p in params.items() if k != "num_classes"}
    json.dumps(defaults)  # JSON-serialisable config


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError) as err:
        create_model("nope", 3)
    assert str(err.value) == f"unknown model 'nope'; valid models: {', '.join(NAMES)}"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_param(name: str) -> None:
    with pytest.raises(ValueError, match="colour") as err:
        create_model(name, 3, colour="red")
    assert "n_mels" in str(err.value) and all(p in str(err.value) for p in small_params(name))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_mels", [64, 128])
def test_shapes_and_finite(name: str, n_mels: int) -> None:
    model = small_model(name, n_mels).eval()
    with torch.no_grad():
        for frames in FRAMES + ((20000,) if waveform_model(name) else ()):
            logits, emb = model(logmel(2, rows(name, n_mels), frames))
            assert logits.shape == (2, NUM_CLASSES)
            assert emb.ndim == 2 and emb.shape[0] == 2
            assert model.head.in_features == emb.shape[1]
            assert torch.isfinite(logits).all() and torch.isfinite(emb).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow(name: str) -> None:
    model = small_model(name).train()
    if hasattr(model, "fit"):
        pytest.skip("fitted in closed form, not trained (tests/test_summary.py)")
    logits, _, *extra = model(logmel(2, rows(name), 37))
    (logits.sum() + sum(w * aux.sum() for w, aux in (extra[0] if extra else []))).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.head.weight.grad.abs().sum() > 0
    first_conv = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name: str) -> None:
    model = calibrated(small_model(name), rows(name))
    x = logmel(3, rows(name), 61)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_bf16_autocast(name: str) -> None:
    model = calibrated(small_model(name), rows(name)).to(memory_format=torch.channels_last)
    x = logmel(2, rows(name), 45).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, _ = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, emb = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits.float()).all() and torch.isfinite(emb.float()).all()
    assert torch.allclose(logits.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy exporter
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the mel axis is fixed in an export
@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_dynamic_frames(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = calibrated(small_model(name), rows(name))
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model, (logmel(1, rows(name), 100),), str(path), dynamo=False,
        input_names=["logmel"], output_names=["logits", "embedding"],
        dynamic_axes={"logmel": {0: "batch", 3: "frames"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for frames in (37, 9, 1) + ((3000,) if waveform_model(name) else ()):
        x = logmel(3, rows(name), frames, seed=5)
        with torch.no_grad():
            expected = model(x)
        got = session.run(None, {"logmel": x.numpy()})
        for out, ref in zip(got, expected):
            np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deltas", [0, 2])
def test_folding_mobilenet_keeps_its_outputs_and_drops_the_adapter_projection(deltas: int) -> None:
    torch.manual_seed(0)
    model = calibrated(create_model("mobilenetv2", NUM_CLASSES, width=0.5, deltas=deltas))
    fold = folded(copy.deepcopy(model))
    convs = [m for m in fold.features[:3] if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3)]  # the 1×1 projection is gone
    x = logmel(3, 64, 41, seed=2)
    with torch.no_grad():
        # the stem's output (3 layers, 5 once folded): an untrained network's later
        # batch norms would hide a wrong fold in the logits
        inputs = model.deltas(model.bn0(x))
        torch.testing.assert_close(fold.features[:5](inputs), model.features[:3](inputs), rtol=1e-4, atol=1e-5)
        for a, b in zip(fold(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(folded(copy.deepcopy(fold))(x)[1], fold(x)[1])
        # the new layers take the network's dtype
        torch.testing.assert_close(folded(copy.deepcopy(model).double())(x.double())[1], model(x)[1].double(),
                                   rtol=1e-4, atol=1e-6)
    assert not fold.training


def test_folding_leaves_a_network_without_folds_as_it_was() -> None:
    model = calibrated(small_model("cnn6"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    folded(model)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
