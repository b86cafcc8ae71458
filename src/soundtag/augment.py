"""Augmentations for training audio taggers on log-mel spectrograms (and waveforms).

Two layers:

* per-clip crop/pad in numpy (:func:`crop_or_pad`, :func:`crop_length`), used
  when batching clips of different lengths;
* batch transforms in torch, applied to ``x: [batch, 1, n_mels, frames]``
  (log-mel dB; a waveform is one row of samples) and ``y: [batch, n_classes]``
  float targets; :func:`check_kind` refuses those meaningless on a front end. Every transform
  takes a probability ``p``: each clip of the batch is transformed
  independently with probability ``p`` (also for the mixers, whose unchosen
  clips are left as they are). All randomness comes from the
  ``torch.Generator`` passed to ``__call__``; inputs are never modified in
  place.

Build a pipeline from plain specs with :func:`build`::

    augment = build([{"name": "mixup", "p": 0.5, "alpha": 0.4},
                     {"name": "specaugment", "p": 1.0, "time_masks": 2}])
    x, y = augment(x, y, gen)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

PAD_MODES = ("wrap", "constant")


# --------------------------------------------------------------------------
# Per-clip crop / pad (numpy)
# --------------------------------------------------------------------------


def crop_or_pad(
    spec: np.ndarray,
    length: int,
    rng: np.random.Generator,
    pad_mode: str = "wrap",
    random_offset: bool = True,
) -> np.ndarray:
    """Crop or pad ``spec [n_mels, frames]`` to ``length`` frames (float32).

    Longer clips are cropped at a random offset (centred if not
    ``random_offset``). Shorter clips are placed at a random offset (at the
    start if not ``random_offset``) and padded by repeating the clip
    (``"wrap"``) or with its minimum value (``"constant"``, silence in dB).
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"unknown pad_mode {pad_mode!r}; valid modes: {list(PAD_MODES)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    spec = np.asarray(spec, dtype=np.float32)
    frames = spec.shape[-1]
    if frames == 0:
        raise ValueError("cannot crop or pad an empty clip")
    if frames >= length:
        start = int(rng.integers(frames - length + 1)) if random_offset else (frames - length) // 2
        return spec[..., start : start + length].copy()
    offset = int(rng.integers(length - frames + 1)) if random_offset else 0
    if pad_mode == "wrap":
        return spec[..., (np.arange(length) - offset) % frames]
    out = np.full(spec.shape[:-1] + (length,), spec.min(), dtype=np.float32)
    out[..., offset : offset + frames] = spec
    return out


def crop_length(
    lengths: np.ndarray, low_pct: float, high_pct: float, rng: np.random.Generator
) -> int:
    """Draw a crop length uniformly between two percentiles of ``lengths`` (>= 8 frames)."""
    if not 0 <= low_pct <= high_pct <= 100:
        raise ValueError(f"need 0 <= low_pct <= high_pct <= 100, got {low_pct}, {high_pct}")
    low, high = np.percentile(lengths, [low_pct, high_pct])
    return max(8, int(rng.integers(round(low), round(high), endpoint=True)))


# --------------------------------------------------------------------------
# Random helpers: draw on the generator's device, move to the data's device.
# --------------------------------------------------------------------------


def _rand(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform [0, 1) float64 samples."""
    return torch.rand(shape, generator=gen, device=gen.device, dtype=torch.float64).to(device)


def _uniform(
    gen: torch.Generator, low: float, high: float, shape: tuple[int, ...], device: torch.device
) -> Tensor:
    """Uniform [low, high) float64 samples."""
    return low + (high - low) * _rand(gen, shape, device)


def _randint(
    gen: torch.Generator,
    low: Tensor | int,
    high: Tensor | int,
    shape: tuple[int, ...],
    device: torch.device,
) -> Tensor:
    """Integers uniform in ``[low, high]`` (inclusive, elementwise bounds)."""
    high = torch.as_tensor(high, device=device)
    draw = low + (_rand(gen, shape, device) * (high - low + 1)).floor().long()
    return torch.minimum(draw, high)


def _beta(gen: torch.Generator, alpha: float, n: int, device: torch.device) -> Tensor:
    """``n`` samples of Beta(alpha, alpha), seeded from ``gen``."""
    seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    samples = np.random.default_rng(seed).beta(alpha, alpha, size=n)
    return torch.from_numpy(samples).to(device)


def _width(width: int | float, size: int) -> int:
    """Resolve a band width given in frames (int) or as a fraction of ``size`` (float)."""
    frames = width if isinstance(width, int) else round(width * size)
    return min(max(frames, 1), size)


def _span_mask(start: Tensor, extent: Tensor, size: int) -> Tensor:
    """``[*start.shape, size]`` bool: ``start <= i < start + extent`` elementwise."""
    pos = torch.arange(size, device=start.device)
    return (pos >= start[..., None]) & (pos < (start + extent)[..., None])


def _band_mask(
    gen: torch.Generator, batch: int, size: int, count: int, max_width: int, device: torch.device
) -> Tensor:
    """``[batch, size]`` bool: union of ``count`` bands of width 1..max_width per clip."""
    width = _randint(gen, 1, max_width, (batch, count), device)
    start = _randint(gen, 0, size - width, (batch, count), device)
    return _span_mask(start, width, size).any(dim=1)


def _stripe_mask(
    gen: torch.Generator,
    x: Tensor,
    time_count: int,
    time_width: int | float,
    freq_count: int,
    freq_width: int | float,
) -> Tensor:
    """``[batch, 1, n_mels, frames]`` bool: union of random time stripes and frequency bands."""
    n, _, n_mels, frames = x.shape
    time = _band_mask(gen, n, frames, time_count, _width(time_width, frames), x.device)
    freq = _band_mask(gen, n, n_mels, freq_count, _width(freq_width, n_mels), x.device)
    return time[:, None, None, :] | freq[:, None, :, None]


def _clip_stat(x: Tensor, stat: str) -> Tensor:
    """Per-clip ``"mean"``/``"min"``/``"zero"`` of ``x``, shaped ``[batch, 1, 1, 1]``."""
    if stat == "mean":
        return x.mean(dim=(1, 2, 3), keepdim=True)
    if stat == "min":
        return x.amin(dim=(1, 2, 3), keepdim=True)
    return x.new_zeros(x.shape[0], 1, 1, 1)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(choices)}")


def _check_range(name: str, pair: Sequence[float], low: float, high: float = math.inf) -> None:
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi <= {high}, got {pair}")


# --------------------------------------------------------------------------
# Batch transforms (torch)
# --------------------------------------------------------------------------


class Augmentation:
    """Base class: validates inputs, skips work at ``p == 0``, delegates to ``_apply``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"expected x [batch, 1, n_mels, frames] and y [batch, n_classes], "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.p == 0 or x.shape[0] == 0:
            return x, y
        return self._apply(x, y, gen)

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _chosen(self, gen: torch.Generator, x: Tensor) -> Tensor:
        """``[batch]`` bool: which clips this call transforms."""
        return _rand(gen, (x.shape[0],), x.device) < self.p

    def fits(self, kind: str) -> bool:
        """Whether this transform means anything on features of `kind` (logmel, mfcc, waveform)."""
        return True


AUGMENTATIONS: Registry[type[Augmentation]] = Registry("augmentation")


@AUGMENTATIONS.register("mixup")
class Mixup(Augmentation):
    """Mixup: ``x = λ x + (1-λ) x[perm]``, same for ``y``; λ ~ Beta(alpha, alpha) per clip.

    ``p`` is the fraction of clips mixed (the others keep λ = 1).
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.4) -> None:
        super().__init__(p)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        lam = torch.where(self._chosen(gen, x), _beta(gen, self.alpha, n, x.device), 1.0)
        perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
        lx = lam.to(x.dtype).view(n, 1, 1, 1)
        ly = lam.to(y.dtype).view(n, 1)
        return lx * x + (1 - lx) * x[perm], ly * y + (1 - ly) * y[perm]


@AUGMENTATIONS.register("specaugment")
class SpecAugment(Augmentation):
    """SpecAugment masking: full-height time stripes and full-width frequency bands.

    Each mask has a width of 1..``*_width`` (frames/bins as int, or a fraction
    of the axis as float); masked cells are set to the clip's ``fill``
    (``"mean"``, ``"min"`` or ``"zero"``). ``p`` is the fraction of clips
    masked. Targets are unchanged.
    """

    FILLS = ("mean", "min", "zero")

    def __init__(
        self,
        p: float = 0.5,
        time_masks: int = 2,
        time_width: int | float = 0.1,
        freq_masks: int = 2,
        freq_width: int | float = 0.1,
        fill: str = "mean",
    ) -> None:
        super().__init__(p)
        if min(time_masks, freq_masks) < 0 or min(time_width, freq_width) <= 0:
            raise ValueError("mask counts must be >= 0 and widths > 0")
        _check_choice("fill", fill, self.FILLS)
        self.time_masks, self.time_width = time_masks, time_width
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.fill = fill

    def fits(self, kind: str) -> bool:
        return kind != "waveform" or self.freq_masks == 0  # a band of the one row masks the whole clip

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        chosen = self._chosen(gen, x).view(-1, 1, 1, 1)
        mask = chosen & _stripe_mask(
            gen, x, self.time_masks, self.time_width, self.freq_masks, self.freq_width
        )
        return torch.where(mask, _clip_stat(x, self.fill), x), y


@AUGMENTATIONS.register("specmix")
class SpecMix(Augmentation):
    """SpecMix: paste random time and frequency bands of another clip of the batch.

    Band widths are 1..``*_width`` (int frames/bins or float fraction of the
    axis). Targets become ``(1 - a) y + a y[perm]`` with ``a`` the fraction of
    cells replaced. ``p`` is the fraction of clips mixed.
    """

    def __init__(
        self,
        p: float = 0.5,
        time_bands: int = 2,
        time_width: int | float = 0.1,
        freq_bands: int = 2,
        freq_width: int | float = 0.1,
    ) -> None:
        super().__init__(p)
        if min(time_bands, freq_bands) < 0 or min(time_width, freq_width) <= 0:
            raise ValueError("band counts must be >= 0 and widths > 0")
        self.time_bands, self.time_width = time_bands, time_width
        self.freq_bands, self.freq_width = freq_bands, freq_width

    def fits(self, kind: str) -> bool:
        return kind != "waveform" or self.freq_bands == 0

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        chosen = self._chosen(gen, x).view(-1, 1, 1, 1)
        mask = chosen & _stripe_mask(
            gen, x, self.time_bands, self.time_width, self.freq_bands, self.freq_width
        )
        perm = torch.randperm(x.shape[0], generator=gen, device=gen.device).to(x.device)
        area = mask.to(y.dtype).mean(dim=(1, 2, 3))[:, None]
        return torch.where(mask, x[perm], x), (1 - area) * y + area * y[perm]


@AUGMENTATIONS.register("erasing")
class RandomErasing(Augmentation):
    """Random erasing of one rectangle per clip, filled with the clip mean or noise.

    The rectangle covers a fraction ``area`` (range) of the clip with
    ``aspect`` = time extent / frequency extent drawn log-uniformly from its
    range. ``fill="noise"`` draws Gaussian noise with the clip's mean and std.
    ``p`` is the fraction of clips erased. Targets are unchanged.
    """

    FILLS = ("mean", "noise")

    def __init__(
        self,
        p: float = 0.5,
        area: Sequence[float] = (0.02, 0.25),
        aspect: Sequence[float] = (0.3, 3.3),
        fill: str = "mean",
    ) -> None:
        super().__init__(p)
        _check_range("area", area, 0.0, 1.0)
        _check_range("aspect", aspect, 1e-6)
        _check_choice("fill", fill, self.FILLS)
        self.area, self.aspect, self.fill = area, aspect, fill

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, n_mels, frames = x.shape
        chosen = self._chosen(gen, x)
        cells = _uniform(gen, *self.area, (n,), x.device) * n_mels * frames
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        aspect = _uniform(gen, log_lo, log_hi, (n,), x.device).exp()
        width = (cells * aspect).sqrt().round().long().clamp(1, frames)
        height = (cells / aspect).sqrt().round().long().clamp(1, n_mels)
        left = _randint(gen, 0, frames - width, (n,), x.device)
        top = _randint(gen, 0, n_mels - height, (n,), x.device)
        rows, cols = _span_mask(top, height, n_mels), _span_mask(left, width, frames)
        mask = (rows[:, :, None] & cols[:, None, :])[:, None] & chosen.view(n, 1, 1, 1)
        return torch.where(mask, self._fill(x, gen), x), y

    def _fill(self, x: Tensor, gen: torch.Generator) -> Tensor:
        mean = _clip_stat(x, "mean")
        if self.fill == "mean":
            return mean
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device, x.dtype)
        return mean + x.std(dim=(1, 2, 3), keepdim=True) * noise


@AUGMENTATIONS.register("timeshift")
class TimeShift(Augmentation):
    """Circular shift along time by up to ``max_fraction`` of the clip length, either way.

    ``p`` is the fraction of clips shifted. Targets are unchanged.
    """

    def __init__(self, p: float = 0.5, max_fraction: float = 0.5) -> None:
        super().__init__(p)
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, _, frames = x.shape
        limit = int(self.max_fraction * frames)
        shift = _randint(gen, -limit, limit, (n,), x.device) * self._chosen(gen, x)
        index = (torch.arange(frames, device=x.device) - shift[:, None]) % frames
        return x.gather(-1, index[:, None, None, :].expand_as(x)), y


@AUGMENTATIONS.register("zoom")
class Zoom(Augmentation):
    """Random resized crop: stretch a random sub-rectangle back to the full size.

    The crop keeps a fraction ``scale`` (range) of the frames, and also of the
    mel bins when ``freq``; sizes are whole frames/bins. Resizing is bilinear
    (``align_corners=False``), matching ``F.interpolate`` of the crop, done for
    the whole batch at once with ``F.grid_sample``. ``p`` is the fraction of
    clips zoomed. Targets are unchanged.
    """

    def __init__(
        self, p: float = 0.5, scale: Sequence[float] = (0.8, 1.0), freq: bool = False
    ) -> None:
        super().__init__(p)
        _check_range("scale", scale, 1e-6, 1.0)
        self.scale, self.freq = scale, freq

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, n_mels, frames = x.shape
        chosen = self._chosen(gen, x)
        grid_t = self._axis_grid(gen, n, frames, True, x.device)
        grid_f = self._axis_grid(gen, n, n_mels, self.freq, x.device)
        return torch.where(chosen.view(n, 1, 1, 1), _resample(x, grid_t, grid_f), x), y

    def _axis_grid(
        self, gen: torch.Generator, n: int, size: int, crop: bool, device: torch.device
    ) -> Tensor:
        """``[n, size]`` normalised sample positions of a random crop along one axis."""
        pos = torch.arange(size, device=device, dtype=torch.float64)
        if not crop:
            return ((2 * pos + 1) / size - 1).expand(n, size)
        extent = (_uniform(gen, *self.scale, (n,), device) * size).round().clamp(1, size)
        start = _randint(gen, 0, size - extent.long(), (n,), device)
        return _crop_grid(size, extent, start)


def _crop_grid(size: int, extent: Tensor, start: Tensor) -> Tensor:
    """``[n, size]`` normalised positions sampling ``extent`` cells from ``start``
    onto ``size`` cells (bilinear, ``align_corners=False``, edges clamped)."""
    pos = torch.arange(size, device=extent.device, dtype=torch.float64)
    src = ((pos + 0.5) * extent[:, None] / size - 0.5).clamp(min=0)
    src = torch.minimum(src, extent[:, None] - 1) + start[:, None]
    return (2 * src + 1) / size - 1


def _resample(x: Tensor, grid_t: Tensor, grid_f: Tensor) -> Tensor:
    """``x`` sampled bilinearly at time positions ``grid_t [n, frames]`` × mel positions ``grid_f [n, n_mels]``."""
    grid_t, grid_f = torch.broadcast_tensors(grid_t[:, None, :], grid_f[:, :, None])
    grid = torch.stack((grid_t, grid_f), dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", align_corners=False)


@AUGMENTATIONS.register("randomresizedcrop")
class RandomResizedCrop(Augmentation):
    """torchvision's RandomResizedCrop on spectrograms: a random rectangle covering a
    fraction ``area`` (range) of the clip, its aspect (fraction of the frames over
    fraction of the mel bins) drawn log-uniformly from ``aspect``, each side clamped
    to the clip, stretched back to the full size (bilinear, as ``zoom``). ``p`` is
    the fraction of clips cropped. Targets are unchanged.
    """

    def __init__(
        self, p: float = 0.5, area: Sequence[float] = (0.5, 1.0), aspect: Sequence[float] = (3 / 4, 4 / 3)
    ) -> None:
        super().__init__(p)
        _check_range("area", area, 1e-6, 1.0)
        _check_range("aspect", aspect, 1e-6)
        self.area, self.aspect = area, aspect

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, n_mels, frames = x.shape
        chosen = self._chosen(gen, x)
        area = _uniform(gen, *self.area, (n,), x.device)
        aspect = _uniform(gen, math.log(self.aspect[0]), math.log(self.aspect[1]), (n,), x.device).exp()
        width = ((area * aspect).sqrt() * frames).round().clamp(1, frames)
        height = ((area / aspect).sqrt() * n_mels).round().clamp(1, n_mels)
        left = _randint(gen, 0, frames - width.long(), (n,), x.device)
        top = _randint(gen, 0, n_mels - height.long(), (n,), x.device)
        cropped = _resample(x, _crop_grid(frames, width, left), _crop_grid(n_mels, height, top))
        return torch.where(chosen.view(n, 1, 1, 1), cropped, x), y


@AUGMENTATIONS.register("sigmoidconcat")
class SigmoidConcat(Augmentation):
    """Concatenation in time of two clips of the batch (the FSDKaggle2019 winner's):
    each chosen clip up to a join, another clip after it, cross-faded by a
    sigmoid of time constant ``fade`` (a fraction of the frames). The join lies at
    a fraction ``join`` (range) of the crop. Targets: the union of both clips'
    labels (meant for multi-label sets). ``p`` is the fraction of clips joined.
    """

    def __init__(self, p: float = 0.5, join: Sequence[float] = (0.25, 0.75), fade: float = 0.02) -> None:
        super().__init__(p)
        _check_range("join", join, 0.0, 1.0)
        if not fade > 0:
            raise ValueError(f"fade must be > 0, got {fade}")
        self.join, self.fade = join, fade

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, frames = x.shape[0], x.shape[-1]
        chosen = self._chosen(gen, x)
        at = _uniform(gen, *self.join, (n,), x.device) * frames
        perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
        t = torch.arange(frames, device=x.device, dtype=torch.float64) + 0.5
        other = torch.sigmoid((t - at[:, None]) / (self.fade * frames)).to(x.dtype)[:, None, None, :]
        joined = (1 - other) * x + other * x[perm]
        union = torch.maximum(y, y[perm])
        return (torch.where(chosen.view(n, 1, 1, 1), joined, x),
                torch.where(chosen.view(n, 1), union, y))


@AUGMENTATIONS.register("additivemix")
class AdditiveMix(Augmentation):
    """Additive mixing (the FSDKaggle2019 winner's): another clip of the batch is
    added at a share α ~ U(0, ``max_alpha``) per clip, the sounds' powers mixing as
    ``(1 - α) P + α P[perm]`` on log-mel dB input (``db: false`` mixes the values
    themselves, for waveforms). Targets ``(1 - α) y + α y[perm]``. ``p`` is the
    fraction of clips mixed.
    """

    def __init__(self, p: float = 0.5, max_alpha: float = 0.5, db: bool = True) -> None:
        super().__init__(p)
        if not 0 < max_alpha <= 1:
            raise ValueError(f"max_alpha must be in (0, 1], got {max_alpha}")
        self.max_alpha, self.db = max_alpha, db

    def fits(self, kind: str) -> bool:
        return kind == "logmel" or not self.db

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        chosen = self._chosen(gen, x)
        alpha = _uniform(gen, 0.0, self.max_alpha, (n,), x.device) * chosen
        perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
        a = alpha.to(x.dtype).view(n, 1, 1, 1)
        if self.db:
            per_db = math.log(10) / 10
            mixed = torch.logaddexp(torch.log1p(-a) + per_db * x, torch.log(a) + per_db * x[perm]) / per_db
        else:
            mixed = (1 - a) * x + a * x[perm]
        ay = alpha.to(y.dtype).view(n, 1)
        return torch.where(chosen.view(n, 1, 1, 1), mixed, x), (1 - ay) * y + ay * y[perm]


@AUGMENTATIONS.register("gain")
class Gain(Augmentation):
    """Add a random offset in ``[-max_db, max_db]`` dB to each clip.

    ``p`` is the fraction of clips changed. Targets are unchanged.
    """

    def __init__(self, p: float = 0.5, max_db: float = 6.0) -> None:
        super().__init__(p)
        if max_db < 0:
            raise ValueError(f"max_db must be >= 0, got {max_db}")
        self.max_db = max_db

    def fits(self, kind: str) -> bool:
        return kind != "waveform"  # an offset in dB

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        offset = _uniform(gen, -self.max_db, self.max_db, (n,), x.device) * self._chosen(gen, x)
        return x + offset.to(x.dtype).view(n, 1, 1, 1), y


@AUGMENTATIONS.register("filter")
class Filter(Augmentation):
    """A random equaliser (FilterAugment): each chosen clip gets a gain curve
    over its mel bins, linear between ``bands + 1`` points (the first and last
    bins and ``bands - 1`` random positions between) whose gains are drawn in
    ``[-max_db, max_db]`` dB, as a different microphone, room or instrument
    body would colour the sound. ``bands`` is drawn per batch in
    ``[min_bands, max_bands]``; ``p`` is the fraction of clips changed. Targets
    are unchanged.
    """

    def __init__(self, p: float = 0.5, max_db: float = 6.0, min_bands: int = 2, max_bands: int = 5) -> None:
        super().__init__(p)
        if max_db < 0 or not 1 <= min_bands <= max_bands:
            raise ValueError(f"need max_db >= 0 and 1 <= min_bands <= max_bands, got {max_db}, "
                             f"{min_bands}, {max_bands}")
        self.max_db, self.min_bands, self.max_bands = max_db, min_bands, max_bands

    def fits(self, kind: str) -> bool:
        return kind == "logmel"  # gains in dB over mel bins

    def _apply(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, n_mels = x.shape[0], x.shape[2]
        bands = int(_randint(gen, self.min_bands, self.max_bands, (1,), x.device))
        inner = _uniform(gen, 0, n_mels - 1, (n, bands - 1), x.device).sort(dim=1).values
        points = torch.cat([inner.new_zeros(n, 1), inner, inner.new_full((n, 1), n_mels - 1)], dim=1)
        gains = _uniform(gen, -self.max_db, self.max_db, (n, bands + 1), x.device) * self._chosen(gen, x)[:, None]
        bins = torch.arange(n_mels, device=x.device, dtype=points.dtype).expand(n, n_mels).contiguous()
        right = torch.searchsorted(points, bins, right=True).clamp(1, bands)
        x0, x1 = points.gather(1, right - 1), points.gather(1, right)
        g0, g1 = gains.gather(1, right - 1), gains.gather(1, right)
        curve = g0 + (g1 - g0) * ((bins - x0) / (x1 - x0).clamp_min(1e-9))
        return x + curve.to(x.dtype).view(n, 1, n_mels, 1), y


class Compose:
    """Apply batch transforms in order."""

    def __init__(self, transforms: Sequence[Augmentation]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        for transform in self.transforms:
            x, y = transform(x, y, gen)
        return x, y


def build(specs: Sequence[dict]) -> Compose:
    """Build a :class:`Compose` from specs like ``{"name": "mixup", "p": 0.5, "alpha": 0.4}``."""
    return Compose([_build_one(spec) for spec in specs])


def check_kind(specs: Sequence[dict], kind: str) -> None:
    """Fail on an augmentation that means nothing on features of `kind` (e.g. a gain in dB on the waveform)."""
    for spec in specs:
        if not _build_one(spec).fits(kind):
            raise ValueError(f"augmentation {spec.get('name')!r} with these parameters does not apply to features "
                             f"of kind {kind!r} (gains and power mixes in dB need log-mels; on the waveform's one "
                             "row a frequency band masks the whole clip: give it 0 bands)")


def _build_one(spec: dict) -> Augmentation:
    params = dict(spec)
    name = params.pop("name", None)
    cls = AUGMENTATIONS.get(name)
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {name!r}; accepted: {accepted}")
    return cls(**params)
