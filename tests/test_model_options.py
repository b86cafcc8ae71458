"""The options of the model families: activations, delta channels, XResNet's depths,
self-attention and MaxBlurPool, the VGG variants, the auxiliary-head CNN and the
loss of its extra heads, which front end each model takes, and the dropout they share."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soundtag.config import TrainConfig, resolve
from soundtag.errors import ConfigError
from soundtag.loop import batch_loss
from soundtag.models import MODELS, check_features, create_model, is_classifier, model_names
from soundtag.models.common import Deltas, Dropout
from soundtag.models.xresnet import MaxBlurPool, ResBlock, SelfAttention
from soundtag.task import Task

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The networks' own options: the summary model has no network, and the fused one takes
# its backbone's options in `backbone_params`.
NETWORKS = [n for n in model_names() if n not in ("summary", "fused")]
SPECTROGRAM_MODELS = [n for n in NETWORKS if getattr(MODELS.get(n), "INPUT", "spectrogram") != "waveform"]
TINY = {"width": 0.125}


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", NETWORKS)
def test_every_family_takes_mish_in_place_of_its_activation(name):
    rows = 1 if name == "wavecnn" else 64
    plain = create_model(name, 3, n_mels=rows, **TINY)
    mish = create_model(name, 3, n_mels=rows, act="mish", **TINY)
    default = nn.ReLU6 if name == "mobilenetv2" else nn.ReLU
    adapter = 1 if name == "mobilenetv2" else 0  # MobileNetV2's 1→3 adapter keeps its ReLU
    assert count(plain, nn.Mish) == 0 and count(plain, default) > 0
    assert count(mish, nn.Mish) == count(plain, default) and count(mish, nn.ReLU) + count(mish, nn.ReLU6) == adapter
    with pytest.raises(ConfigError, match="act: unknown activation 'gelu2'; valid activations: .*mish"):
        create_model(name, 3, n_mels=rows, act="gelu2")


def test_deltas_are_the_regression_deltas_librosa_computes():
    x = np.random.default_rng(0).normal(size=(1, 1, 5, 40)).astype(np.float32)
    out = Deltas(2)(torch.from_numpy(x)).numpy()
    first = librosa.feature.delta(x[0, 0], width=5, order=1, mode="nearest")
    second = librosa.feature.delta(first, width=5, order=1, mode="nearest")
    assert out.shape == (1, 3, 5, 40)
    np.testing.assert_array_equal(out[0, 0], x[0, 0])
    np.testing.assert_allclose(out[0, 1], first, atol=1e-5)
    np.testing.assert_allclose(out[0, 2], second, atol=1e-5)
    one = Deltas(2)(torch.ones(1, 1, 3, 1))  # a single frame: every delta is zero
    assert torch.allclose(one[:, 1:], torch.zeros(1, 2, 3, 1), atol=1e-7)


@pytest.mark.parametrize("name", SPECTROGRAM_MODELS)
def test_delta_channels_feed_the_first_convolution(name):
    model = create_model(name, 3, deltas=2, **TINY).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3
    assert not any("deltas" in k for k in model.state_dict())  # nothing new to save: weights stay compatible
    with torch.no_grad():
        logits, _ = model(torch.randn(2, 1, 64, 1) * 20 - 40)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    with pytest.raises(ConfigError, match="deltas must be one of 0, 1, 2"):
        create_model(name, 3, deltas=3)


@pytest.mark.parametrize("depth, blocks, expansion", [(18, 8, 1), (34, 16, 1), (50, 16, 4)])
def test_xresnet_depths(depth, blocks, expansion):
    model = create_model("xresnet", 3, depth=depth, **TINY)
    res = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert len(res) == blocks
    assert len(res[0].body) == (2 if expansion == 1 else 3)
    assert model.head.in_features == 64 * expansion  # 512 × width
    stem = list(model.features)[:3]
    assert [s[0].stride for s in stem] == [(2, 2), (1, 1), (1, 1)] and stem[0][0].kernel_size == (3, 3)
    down = [b for b in res if len(b.shortcut) and isinstance(b.shortcut[0], nn.AvgPool2d)]  # ResNet-D: pool, then 1×1 conv
    assert len(down) == 3 and all(isinstance(b.shortcut[1][0], nn.Conv2d) for b in down)
    assert all(not b.body[-1][1].weight.detach().any() for b in res)  # each block starts as the identity
    with pytest.raises(ConfigError, match="depth must be one of 18, 34, 50"):
        create_model("xresnet", 3, depth=101)


def test_self_attention_goes_after_the_chosen_stages_and_starts_as_the_identity():
    model = create_model("xresnet", 3, attention=[2, 4], **TINY)
    layers = list(model.features)
    at = [i for i, m in enumerate(layers) if isinstance(m, SelfAttention)]
    assert len(at) == 2 and isinstance(layers[at[0] - 1], ResBlock) and at[1] == len(layers) - 1
    assert layers[at[0]].value.in_channels == 16 and layers[at[1]].value.in_channels == 64  # stages 2 and 4
    attention = SelfAttention(16)
    x = torch.randn(2, 16, 5, 7)
    assert torch.equal(attention(x), x)
    with torch.no_grad():
        attention.gamma.fill_(1.0)
        q, k, v = (layer(x).flatten(2) for layer in (attention.query, attention.key, attention.value))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k), dim=-1)  # position i attends to j
        expected = x + torch.einsum("bcj,bij->bci", v, weights).view_as(x)
        np.testing.assert_allclose(attention(x).numpy(), expected.numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="attention lists stages .1 to 4."):
        create_model("xresnet", 3, attention=[5])


def test_max_blur_pool_is_a_max_then_a_binomial_blur_at_stride_two():
    pool = MaxBlurPool(1)
    x = torch.randn(1, 1, 6, 9)
    peak = F.max_pool2d(x, 3, 1, 1)
    padded = F.pad(peak, (1, 1, 1, 1), mode="replicate")[0, 0]
    taps = torch.tensor([1.0, 2.0, 1.0])
    blur = taps[:, None] * taps[None] / 16
    expected = torch.stack([torch.stack([(padded[i:i + 3, j:j + 3] * blur).sum() for j in range(0, 9, 2)])
                            for i in range(0, 6, 2)])
    np.testing.assert_allclose(pool(x)[0, 0].numpy(), expected.numpy(), atol=1e-6)
    assert pool(torch.ones(1, 1, 1, 1)).shape == (1, 1, 1, 1)
    assert torch.allclose(pool(torch.full((1, 1, 5, 4), 3.0)), torch.full((1, 1, 3, 2), 3.0))
    model = create_model("xresnet", 3, pool="maxblur", **TINY)
    assert count(model, MaxBlurPool) == 1 and count(model, nn.MaxPool2d) == 0
    with pytest.raises(ConfigError, match="pool must be max or maxblur"):
        create_model("xresnet", 3, pool="avg")


def test_vgg16_with_batch_norm_and_the_ntu_variants_are_vgg_parameters():
    vgg16 = create_model("vgg", 3, convs=[2, 2, 3, 3, 3], pool="max", **TINY)
    assert count(vgg16, nn.Conv2d) == 13 and count(vgg16, nn.BatchNorm2d) == 13 + 1  # + the mel norm
    assert count(vgg16, nn.MaxPool2d) == 4 and count(vgg16, nn.AvgPool2d) == 0
    assert [m.out_channels for m in vgg16.modules() if isinstance(m, nn.Conv2d)][-1] == 64  # 512 × width, capped
    ntu = create_model("vgg", 3, act="leaky_relu", dense_act="selu", dense_layers=2, **TINY)
    assert count(ntu, nn.LeakyReLU) == 8 and count(ntu, nn.SELU) == 2 and count(ntu, nn.ReLU) == 0
    assert [m.in_features for m in ntu.neck if isinstance(m, nn.Linear)] == [128, 64]
    default = create_model("vgg", 3)
    assert count(default, nn.Conv2d) == 8 and count(default, nn.AvgPool2d) == 3 and count(default, nn.ReLU) == 9
    for bad, match in (({"convs": []}, "convs must list"), ({"pool": "blur"}, "pool must be one of avg, max"),
                       ({"dense_layers": 0}, "dense_layers must be")):
        with pytest.raises(ConfigError, match=match):
            create_model("vgg", 3, **bad)


def test_auxcnn_has_extra_heads_only_in_training():
    model = create_model("auxcnn", 4, aux_weights=[0.1, 0.2, 0.4], **TINY)
    x = torch.randn(3, 1, 64, 20) * 20 - 40
    logits, embedding, extra = model.train()(x)
    assert logits.shape == (3, 4) and embedding.shape == (3, 64)
    assert [w for w, _ in extra] == [0.1, 0.2, 0.4] and all(aux.shape == (3, 4) for _, aux in extra)
    assert len(model.eval()(x)) == 2
    assert count(model, nn.Conv2d) == 8 + 4 * 3  # 4 blocks of 2 convs, and CBAM's 3 convs in each
    assert all(is_classifier(k) for k in model.state_dict() if k.startswith(("head.", "aux_heads.")))
    with pytest.raises(ConfigError, match="aux_weights needs 3 loss weights"):
        create_model("auxcnn", 4, aux_weights=[1.0, 0.5])


def test_extra_heads_add_their_weighted_task_losses():
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(5, 3, generator=gen) > 0.5).float()
    w = torch.tensor([1.0, 0.5, 0.5, 2.0, 1.0])
    main, aux1, aux2 = (torch.randn(5, 3, generator=gen) for _ in range(3))
    config = TrainConfig(label_smoothing=0.1)

    def bce(z: torch.Tensor) -> torch.Tensor:  # by hand: smoothed targets, mean over classes, weighted clips
        t = y * 0.9 + 0.05
        per_clip = -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z))).mean(1)
        return (per_clip * w).sum() / w.sum()

    got = batch_loss(Task(True), config, main, [(0.4, aux1), (0.2, aux2)], y, w)
    assert got.item() == pytest.approx((bce(main) + 0.4 * bce(aux1) + 0.2 * bce(aux2)).item(), rel=1e-5)
    plain = batch_loss(Task(True), config, main, [], y, w)
    assert torch.equal(plain, Task(True).loss(main, y, w, 0.1))  # no extra heads: the task loss itself


def test_each_model_takes_only_its_own_front_end():
    check_features("cnn6", "mfcc")
    check_features("wavecnn", "waveform")
    with pytest.raises(ConfigError, match="model 'wavecnn' takes the waveform, not features of kind 'logmel'"):
        check_features("wavecnn", "logmel")
    with pytest.raises(ConfigError, match="model 'xresnet' takes the spectrogram, not features of kind 'waveform'"):
        check_features("xresnet", "waveform")
    with pytest.raises(ConfigError, match="takes the waveform"):
        resolve("fast", overrides={"model": {"name": "wavecnn", "params": {}}})
    with pytest.raises(ConfigError, match="'wavecnn' takes the waveform .one feature row., not 64 rows"):
        create_model("wavecnn", 3, n_mels=64)


def dropout_input(memory: torch.memory_format = torch.contiguous_format, dense: bool = True) -> torch.Tensor:
    """Activations in [1, 2): a dropped one is the only zero; every other channel when not dense."""
    torch.manual_seed(0)
    x = (torch.rand(16, 16 if dense else 32, 64, 40) + 1).contiguous(memory_format=memory)
    return (x if dense else x[:, ::2]).requires_grad_()


@pytest.mark.parametrize("p", [0.25, 0.2])
@pytest.mark.parametrize("memory", [torch.contiguous_format, torch.channels_last])
def test_dropout_drops_its_share_scales_the_rest_and_keeps_the_layout(memory, p):
    x = dropout_input(memory)
    out = Dropout(p).train()(x)
    kept = out != 0
    share = round(p * 256) / 256  # the rate in steps of 1/256 (0.2 → 51/256)
    assert abs(1 - kept.float().mean().item() - share) < 5 * (share * (1 - share) / x.numel()) ** 0.5
    torch.testing.assert_close(out[kept], x[kept] / (1 - share))
    assert out.is_contiguous(memory_format=memory)
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept / (1 - share))
    again = Dropout(p).train()(x) != 0
    assert (again != kept).float().mean() > 0.2  # a fresh mask every call


def test_dropout_falls_back_to_torch_on_inputs_not_dense_and_in_place():
    x = dropout_input(dense=False)
    out = Dropout(0.25).train()(x)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    y = x.detach().clone()
    Dropout(0.25, inplace=True).train()(y)
    assert 0.2 < (y == 0).float().mean() < 0.3


def test_dropout_follows_torch_seed_and_is_the_identity_when_evaluating():
    x = torch.randn(4, 3, 8, 8)
    drop = Dropout(0.5).train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_uses_the_cpu_fast_dropout(name):
    dropouts = [m for m in create_model(name, 5, **TINY).modules() if isinstance(m, nn.Dropout)]
    assert all(isinstance(m, Dropout) for m in dropouts)
