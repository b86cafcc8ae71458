import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soundtag.augment import AUGMENTATIONS, Augmentation, Compose, build, check_kind, crop_length, crop_or_pad
from soundtag.errors import ConfigError

BATCH, N_MELS, FRAMES, N_CLASSES = 8, 16, 40, 5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    x = (torch.randn(BATCH, 1, N_MELS, FRAMES, generator=g) * 10 - 40).to(dtype)
    y = F.one_hot(torch.randint(N_CLASSES, (BATCH,), generator=g), N_CLASSES).float()
    return x, y


def one(name: str, p: float = 1.0, **params):
    return build([{"name": name, "p": p, **params}]).transforms[0]


def runs(mask: torch.Tensor) -> int:
    """Number of contiguous True runs in a 1-D bool tensor."""
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8)])
    return int((padded.diff() == 1).sum())


# ---------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_shape_dtype_preserved_and_inputs_untouched(name, dtype):
    x, y = batch(dtype)
    x0, y0 = x.clone(), y.clone()
    xo, yo = one(name)(x, y, gen())
    assert xo.shape == x.shape and xo.dtype == dtype
    assert yo.shape == y.shape and yo.dtype == y.dtype
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.isfinite(xo.float()).all() and torch.isfinite(yo).all()


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_p_zero_is_identity(name):
    x, y = batch()
    xo, yo = one(name, p=0.0)(x, y, gen())
    assert torch.equal(xo, x) and torch.equal(yo, y)


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_reproducible_with_seed_and_changes_with_p_one(name):
    x, y = batch()
    aug = one(name)
    xa, ya = aug(x, y, gen(7))
    xb, yb = aug(x, y, gen(7))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, x)


def test_p_is_fraction_of_clips():
    x = torch.randn(2000, 1, 4, 8)
    y = torch.zeros(2000, 3)
    xo, _ = one("gain", p=0.3, max_db=6.0)(x, y, gen())
    changed = (xo != x).flatten(1).any(1).float().mean()
    assert 0.25 < changed < 0.35


def test_compose_applies_in_order():
    x, y = batch()
    aug = build([{"name": "gain", "p": 1.0, "max_db": 3.0}, {"name": "timeshift", "p": 1.0}])
    assert isinstance(aug, Compose) and len(aug.transforms) == 2
    g = gen(3)
    xa, ya = aug.transforms[0](x, y, g)
    xa, ya = aug.transforms[1](xa, ya, g)
    xb, yb = aug(x, y, gen(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_build_rejects_unknown_name_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        build([{"name": "reverb", "p": 0.5}])
    assert str(err.value) == f"unknown augmentation 'reverb'; valid augmentations: {', '.join(AUGMENTATIONS.names())}"


def test_a_newly_registered_augmentation_is_built_by_name(monkeypatch):
    monkeypatch.setattr(AUGMENTATIONS, "_entries", {name: AUGMENTATIONS.get(name) for name in AUGMENTATIONS})

    @AUGMENTATIONS.register("negate")
    class Negate(Augmentation):
        def _apply(self, x, y, gen):
            return -x, y

    (negate,) = build([{"name": "negate", "p": 1.0}]).transforms
    x, y = batch()
    assert isinstance(negate, Negate) and torch.equal(negate(x, y, gen())[0], -x)


def test_build_rejects_unknown_parameter_naming_accepted():
    with pytest.raises(ValueError, match="beta") as err:
        build([{"name": "mixup", "p": 0.5, "beta": 1.0}])
    assert "alpha" in str(err.value)


def test_invalid_parameter_values_rejected():
    with pytest.raises(ValueError, match="p must be"):
        one("gain", p=1.5)
    with pytest.raises(ValueError, match="fill"):
        one("specaugment", fill="noise")
    with pytest.raises(ValueError, match="area"):
        one("erasing", area=(0.5, 0.1))


# ---------------------------------------------------------------- mixup


def test_mixup_is_same_convex_combination_for_x_and_y():
    x, _ = batch()
    y = torch.eye(BATCH)  # clip i has its own class i, so y_out[i] holds the weights
    xo, yo = one("mixup", alpha=0.4)(x, y, gen(1))
    assert ((yo >= 0) & (yo <= 1)).all()
    torch.testing.assert_close(yo.sum(1), torch.ones(BATCH))
    assert ((yo > 0).sum(1) <= 2).all()
    assert ((yo > 0) & (yo < 1)).any(), "expected some clips to be mixed"
    torch.testing.assert_close(xo.flatten(1), yo @ x.flatten(1))


def test_mixup_keeps_one_hot_sums_with_repeated_classes():
    x, y = batch()
    _, yo = one("mixup", alpha=1.0)(x, y, gen(2))
    assert ((yo >= 0) & (yo <= 1)).all()
    torch.testing.assert_close(yo.sum(1), torch.ones(BATCH))


# ---------------------------------------------------------------- specaugment


def frame_ramp(n: int, frames: int) -> torch.Tensor:
    """Each frame t holds the constant value t + 1 (all > 0)."""
    ramp = torch.arange(1, frames + 1, dtype=torch.float32)
    return ramp.expand(n, 1, N_MELS, frames).clone()


def test_specaugment_masks_requested_number_of_full_height_time_stripes():
    frames = 4000
    x = frame_ramp(BATCH, frames)
    y = torch.rand(BATCH, N_CLASSES)
    aug = one("specaugment", time_masks=3, time_width=1, freq_masks=0, fill="zero")
    xo, yo = aug(x, y, gen(4))
    assert torch.equal(yo, y)
    masked = xo == 0
    for clip in masked[:, 0]:
        stripe = clip.all(dim=0)
        assert torch.equal(clip, stripe.expand_as(clip)), "masks must span all mel bins"
        assert runs(stripe) == 3 and int(stripe.sum()) == 3
    assert torch.equal(xo[~masked], x[~masked])


def test_specaugment_stripe_widths_bounded_and_fill_is_clip_mean():
    x = frame_ramp(BATCH, FRAMES) + torch.arange(BATCH).view(-1, 1, 1, 1) * 1000
    aug = one("specaugment", time_masks=1, time_width=0.25, freq_masks=0, fill="mean")
    xo, _ = aug(x, torch.zeros(BATCH, 1), gen(5))
    for i in range(BATCH):
        stripe = (xo[i, 0] != x[i, 0]).all(dim=0)
        assert runs(stripe) == 1 and 1 <= int(stripe.sum()) <= 10
        masked = xo[i, 0][:, stripe]
        torch.testing.assert_close(masked, torch.full_like(masked, x[i].mean().item()))


def test_specaugment_freq_masks_are_full_width_bands():
    x = torch.arange(1, N_MELS + 1, dtype=torch.float32).view(1, 1, -1, 1)
    x = x.expand(BATCH, 1, N_MELS, FRAMES).clone()
    aug = one("specaugment", time_masks=0, freq_masks=2, freq_width=3, fill="zero")
    xo, _ = aug(x, torch.zeros(BATCH, 1), gen(6))
    for clip in (xo == 0)[:, 0]:
        band = clip.all(dim=1)
        assert torch.equal(clip, band[:, None].expand_as(clip))
        assert 1 <= runs(band) <= 2 and 1 <= int(band.sum()) <= 6


# ---------------------------------------------------------------- specmix


def test_specmix_target_weight_equals_fraction_of_replaced_cells():
    x = torch.arange(BATCH, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, N_MELS, FRAMES)
    y = torch.eye(BATCH)
    aug = one("specmix", time_bands=2, time_width=0.2, freq_bands=2, freq_width=0.2)
    xo, yo = aug(x, y, gen(8))
    torch.testing.assert_close(yo.sum(1), torch.ones(BATCH))
    mixed = 0
    for i in range(BATCH):
        values = xo[i].unique()
        others = [int(v) for v in values if int(v) != i]
        assert len(others) <= 1, "cells come from the clip itself and one partner"
        if others:
            j = others[0]
            frac = float((xo[i] == j).float().mean())
            assert yo[i, j].item() == pytest.approx(frac)
            assert yo[i, i].item() == pytest.approx(1 - frac)
            mixed += 1
        else:
            assert torch.equal(yo[i], y[i])
    assert mixed > 0


# ---------------------------------------------------------------- erasing


@pytest.mark.parametrize("fill", ["mean", "noise"])
def test_erasing_changes_one_rectangle_only(fill):
    x, y = batch()
    aug = one("erasing", area=(0.05, 0.3), aspect=(0.5, 2.0), fill=fill)
    xo, yo = aug(x, y, gen(9))
    assert torch.equal(yo, y)
    for i in range(BATCH):
        changed = xo[i, 0] != x[i, 0]
        rows, cols = changed.any(1), changed.any(0)
        assert runs(rows) == 1 and runs(cols) == 1
        assert torch.equal(changed, rows[:, None] & cols[None, :])
        assert 0 < changed.float().mean() <= 0.6
        if fill == "mean":
            assert torch.allclose(xo[i, 0][changed], x[i].mean())


# ---------------------------------------------------------------- timeshift


def test_timeshift_is_a_roll_within_range():
    x, y = batch()
    xo, yo = one("timeshift", max_fraction=0.25)(x, y, gen(10))
    assert torch.equal(yo, y)
    limit = int(0.25 * FRAMES)
    for i in range(BATCH):
        assert torch.equal(xo[i].flatten().sort().values, x[i].flatten().sort().values)
        shifts = [s for s in range(-limit, limit + 1) if torch.equal(xo[i], x[i].roll(s, -1))]
        assert len(shifts) == 1


# ---------------------------------------------------------------- zoom


def test_zoom_matches_interpolate_of_a_time_crop():
    x, y = batch()
    xo, yo = one("zoom", scale=(0.5, 0.9))(x, y, gen(11))
    assert torch.equal(yo, y)
    def resized(clip: torch.Tensor, start: int, width: int) -> torch.Tensor:
        crop = clip[None, :, :, start : start + width]
        return F.interpolate(crop, size=(N_MELS, FRAMES), mode="bilinear", align_corners=False)[0]

    for i in range(BATCH):
        matches = [
            (start, width)
            for width in range(1, FRAMES + 1)
            for start in range(FRAMES - width + 1)
            if torch.allclose(resized(x[i], start, width), xo[i], atol=1e-4)
        ]
        assert len(matches) == 1
        assert 0.5 * FRAMES <= matches[0][1] <= 0.9 * FRAMES + 1


def test_zoom_freq_crops_both_axes_and_keeps_range():
    x, y = batch()
    xo, _ = one("zoom", scale=(0.5, 0.7), freq=True)(x, y, gen(12))
    assert xo.shape == x.shape
    for i in range(BATCH):
        assert x[i].min() - 1e-4 <= xo[i].min() and xo[i].max() <= x[i].max() + 1e-4
    # Mel bin 0 of the output is no longer mel bin 0 of the input for some clip.
    assert not torch.allclose(xo[:, :, :1], x[:, :, :1])


# ---------------------------------------------------------------- gain


def test_gain_adds_constant_per_clip_within_range():
    x, y = batch()
    xo, yo = one("gain", max_db=6.0)(x, y, gen(13))
    assert torch.equal(yo, y)
    offset = (xo - x).flatten(1)
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset), atol=1e-4, rtol=0)
    assert (offset.abs() <= 6.0 + 1e-4).all()
    assert offset[:, 0].unique().numel() == BATCH


# ---------------------------------------------------------------- filter


def filter_curves(seed: int, clips: int = 2000, **params) -> torch.Tensor:
    """[clips, mels] gain curves the filter adds to silent clips of two frames (checked to be the same in both)."""
    x, y = torch.zeros(clips, 1, 64, 2), torch.zeros(clips, N_CLASSES)
    xo, yo = one("filter", max_db=6.0, **params)(x, y, gen(seed))
    assert torch.equal(yo, y)
    torch.testing.assert_close(xo[..., 0], xo[..., 1], atol=0, rtol=0)  # the same every frame
    return xo[:, 0, :, 0].double()


def bends(curves: torch.Tensor) -> torch.Tensor:
    """Second differences that are not zero, per curve."""
    return (curves.diff(dim=1).diff(dim=1).abs() > 1e-3).sum(dim=1)


def test_filter_adds_a_piecewise_linear_gain_curve_over_mel_bins_within_range():
    curves = filter_curves(5, min_bands=3, max_bands=3)
    assert (curves.abs() <= 6.0 + 1e-4).all()
    assert (curves.diff(dim=1).abs() > 1e-6).all()  # sloped everywhere, no steps between flat parts
    # Three lines meet at two points, each bending one or two second differences.
    assert (bends(curves) >= 1).all() and (bends(curves) <= 4).all() and bends(curves).float().mean() > 2
    # Continuous: a step across a bend lies between the slopes either side (unless the two bends are
    # within two bins of each other, about 6% of the curves).
    slopes = curves.diff(dim=1)
    low, high = torch.minimum(slopes[:, :-2], slopes[:, 2:]), torch.maximum(slopes[:, :-2], slopes[:, 2:])
    continuous = ((slopes[:, 1:-1] >= low - 1e-4) & (slopes[:, 1:-1] <= high + 1e-4)).all(dim=1)
    assert continuous.float().mean() > 0.9
    # The first and last bins take gains drawn uniformly in ±6 dB (standard deviation 6/√3).
    for end in (0, -1):
        assert abs(curves[:, end].std() - 6 / 3**0.5) < 0.25 and abs(curves[:, end].mean()) < 0.25


def test_filter_draws_its_number_of_bands_per_batch():
    most = {int(bends(filter_curves(seed, clips=64, min_bands=2, max_bands=5)).max()) for seed in range(12)}
    assert min(most) <= 2 and max(most) >= 7  # two bands bend at most twice; five up to eight times


def test_filter_leaves_unchosen_clips_alone():
    x, y = batch()
    xo, _ = one("filter", p=0.5)(x, y, gen(3))
    changed = (xo != x).flatten(1).any(dim=1)
    assert 0 < changed.sum() < BATCH


# ---------------------------------------------------------------- crop_or_pad


def test_crop_or_pad_exact_length_and_float32():
    rng = np.random.default_rng(0)
    spec = np.random.default_rng(1).normal(size=(N_MELS, 30)).astype(np.float16)
    for length in (10, 30, 77):
        for mode in ("wrap", "constant"):
            for random_offset in (True, False):
                out = crop_or_pad(spec, length, rng, mode, random_offset)
                assert out.shape == (N_MELS, length) and out.dtype == np.float32


def test_crop_is_contiguous_window_and_centred_without_random_offset():
    spec = np.arange(3 * 50, dtype=np.float32).reshape(3, 50)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(20):
        out = crop_or_pad(spec, 12, rng)
        start = int(out[0, 0])
        assert np.array_equal(out, spec[:, start : start + 12])
        starts.add(start)
    assert len(starts) > 1
    assert np.array_equal(crop_or_pad(spec, 12, rng, random_offset=False), spec[:, 19:31])


def test_wrap_padding_repeats_the_clip():
    spec = np.arange(2 * 7, dtype=np.float32).reshape(2, 7)
    rng = np.random.default_rng(0)
    assert np.array_equal(crop_or_pad(spec, 20, rng, "wrap", False), np.tile(spec, 3)[:, :20])
    out = crop_or_pad(spec, 20, rng, "wrap", True)
    phase = int(out[0, 0])
    assert np.array_equal(out, np.roll(np.tile(spec, 4), -phase, axis=1)[:, :20])


def test_constant_padding_uses_clip_minimum():
    spec = np.random.default_rng(2).uniform(-80, 0, size=(4, 9)).astype(np.float32)
    rng = np.random.default_rng(0)
    out = crop_or_pad(spec, 25, rng, "constant", False)
    assert np.array_equal(out[:, :9], spec) and np.all(out[:, 9:] == spec.min())
    for _ in range(10):
        out = crop_or_pad(spec, 25, rng, "constant", True)
        start = next(t for t in range(17) if np.array_equal(out[:, t], spec[:, 0]))
        assert np.array_equal(out[:, start : start + 9], spec)
        rest = np.delete(out, np.s_[start : start + 9], axis=1)
        assert np.all(rest == spec.min())


def test_crop_or_pad_rejects_bad_mode():
    with pytest.raises(ValueError, match="wrap.*constant"):
        crop_or_pad(np.zeros((2, 3)), 5, np.random.default_rng(0), pad_mode="reflect")


def test_crop_length_between_percentiles():
    lengths = np.arange(1, 1001)
    rng = np.random.default_rng(0)
    draws = [crop_length(lengths, 10, 50, rng) for _ in range(200)]
    assert min(draws) >= 100 and max(draws) <= 501 and len(set(draws)) > 50
    assert crop_length(np.array([2, 3, 4]), 0, 100, rng) == 8


# ---------------------------------------------------------------- the FSDKaggle2019 winner's mixers


def constant_clips(n: int = 6, frames: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip i holds the value i everywhere and is labelled with class i only."""
    x = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 1, 3, frames).contiguous()
    return x, torch.eye(n)


def partners(y_out: torch.Tensor) -> list[int]:
    """For each clip of `constant_clips`, the other clip mixed in (itself if none)."""
    return [next((j for j in torch.nonzero(row).flatten().tolist() if j != i), i) for i, row in enumerate(y_out)]


def test_sigmoid_concat_joins_two_clips_with_a_sigmoid_cross_fade_and_unites_their_labels():
    frames, fade = 200, 0.05
    x, y = constant_clips(frames=frames)
    xo, yo = one("sigmoidconcat", join=(0.25, 0.75), fade=fade)(x, y, gen(3))
    mixed = 0
    for i, j in enumerate(partners(yo)):
        assert torch.equal(yo[i], torch.maximum(y[i], y[j]))  # the union of both clips' labels
        if i == j:
            continue
        mixed += 1
        share = ((xo[i, 0, 0] - i) / (j - i)).numpy()  # the partner's share of each frame
        assert share[0] < 0.01 and share[-1] > 0.99 and np.all(np.diff(share) > 0)
        inner = (share > 1e-3) & (share < 1 - 1e-3)
        logit = np.log(share[inner] / (1 - share[inner]))
        np.testing.assert_allclose(np.diff(logit), 1 / (fade * frames), rtol=1e-6)  # a sigmoid in time
        join = np.argmin(np.abs(share - 0.5))
        assert 0.25 * frames - 1 <= join <= 0.75 * frames + 1
        assert torch.equal(xo[i, 0, 0], xo[i, 0, 2])  # every mel bin alike
    assert mixed >= 3


def test_additive_mix_adds_powers_at_a_share_below_max_alpha_and_weights_the_targets():
    x, y = constant_clips()
    x = x * 10 - 60  # clip i at (10 i - 60) dB
    xo, yo = one("additivemix", max_alpha=0.5)(x, y, gen(4))
    shares = []
    for i, j in enumerate(partners(yo)):
        alpha = float(yo[i, j]) if i != j else 0.0
        shares.append(alpha)
        expected = 10 * np.log10((1 - alpha) * 10 ** (float(x[i, 0, 0, 0]) / 10)
                                 + alpha * 10 ** (float(x[j, 0, 0, 0]) / 10))
        np.testing.assert_allclose(xo[i].numpy(), expected, rtol=1e-6)  # α read back from float32 targets
        assert yo[i, i] == pytest.approx(1 - alpha) and yo[i].sum() == pytest.approx(1.0)
    assert 0 < max(shares) <= 0.5 and len(set(shares)) > 2
    linear, ylin = one("additivemix", max_alpha=0.5, db=False)(x, y, gen(4))
    assert torch.equal(ylin, yo)  # the same draws
    for i, j in enumerate(partners(ylin)):
        alpha = float(ylin[i, j]) if i != j else 0.0
        np.testing.assert_allclose(linear[i].numpy(), (1 - alpha) * x[i].numpy() + alpha * x[j].numpy(), rtol=1e-6)


def test_random_resized_crop_stretches_a_rectangle_of_the_asked_area_and_aspect():
    n_mels, frames = 64, 160
    ramp_t = torch.arange(frames, dtype=torch.float64).expand(BATCH, 1, n_mels, frames).contiguous()
    ramp_f = torch.arange(n_mels, dtype=torch.float64)[:, None].expand(BATCH, 1, n_mels, frames).contiguous()
    y = torch.zeros(BATCH, N_CLASSES)
    area, aspect = (0.3, 0.6), (0.5, 2.0)
    crop = one("randomresizedcrop", area=area, aspect=aspect)
    out_t, yo = crop(ramp_t, y, gen(5))
    out_f, _ = crop(ramp_f, y, gen(5))  # the same draws: the same rectangles
    assert torch.equal(yo, y)

    def side(profile: torch.Tensor) -> tuple[int, int]:
        """(start, extent) of the crop that a resized ramp shows (bilinear, align_corners=False)."""
        size = len(profile)
        pos = torch.arange(size, dtype=torch.float64)
        extent = round(float(profile[size // 2 + 1] - profile[size // 2]) * size)
        start = round(float(profile[size // 2] - ((size // 2 + 0.5) * extent / size - 0.5)))
        expected = ((pos + 0.5) * extent / size - 0.5).clamp(0, extent - 1) + start
        torch.testing.assert_close(profile, expected, atol=1e-6, rtol=0)
        return start, extent

    sizes = []
    for i in range(BATCH):
        (left, width), (top, height) = side(out_t[i, 0, 0]), side(out_f[i, 0, :, 0])
        assert 0 <= left <= frames - width and 0 <= top <= n_mels - height
        sizes.append((width, height))
        share = width / frames * height / n_mels
        assert area[0] - 0.03 <= share <= area[1] + 0.03
        assert aspect[0] - 0.1 <= (width / frames) / (height / n_mels) <= aspect[1] + 0.1
    assert len(set(sizes)) > 4


@pytest.mark.parametrize("spec, kind, fits", [
    ({"name": "gain"}, "waveform", False),
    ({"name": "gain"}, "mfcc", True),
    ({"name": "specaugment"}, "waveform", False),
    ({"name": "specaugment", "freq_masks": 0}, "waveform", True),
    ({"name": "specmix", "freq_bands": 0}, "waveform", True),
    ({"name": "additivemix"}, "mfcc", False),
    ({"name": "additivemix", "db": False}, "waveform", True),
    ({"name": "sigmoidconcat"}, "waveform", True),
    ({"name": "mixup"}, "waveform", True),
    ({"name": "filter"}, "mfcc", False),
    ({"name": "filter"}, "logmel", True),
])
def test_augmentations_meaningless_on_a_front_end_are_refused(spec, kind, fits):
    if fits:
        check_kind([spec], kind)
    else:
        with pytest.raises(ValueError, match=f"augmentation '{spec['name']}' .* kind '{kind}'"):
            check_kind([spec], kind)
