"""Summary statistics of a clip's log-mel and their standardised PCA projection:
the features of the classical `summary` model and of the `fused` CNN's second branch.

Everything is computed in torch from the log-mel the networks already see
([B, 1, n_mels, frames], dB), so it runs inside a network, on training crops
and test-time views alike, and exports to ONNX with it. Spectral shape
(centroid, bandwidth, roll-off, flatness, contrast) and frame energy come from
the mel power spectrum, each band standing at its centre frequency.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import librosa
import numpy as np
import scipy.fft
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from .errors import ConfigError, DataError
from .features import FeatureConfig
from .models.common import Deltas

N_MFCC = 20
CONTRAST_BANDS = 6  # contiguous mel sub-bands of the spectral contrast
ROLLOFF = 0.85  # the roll-off frequency holds this share of a frame's power below it
DB = math.log(10) / 10  # power = exp(DB * dB)
FRAME_FEATURES = ("centroid", "bandwidth", "rolloff", "flatness", "rms_db",
                  *(f"contrast{i}" for i in range(CONTRAST_BANDS)))


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation over the last axis."""
    mean = x.mean(-1)
    return mean, (x - mean.unsqueeze(-1)).square().mean(-1).sqrt()


class SummaryStatistics(nn.Module):
    """Log-mel dB [B, 1, n_mels, frames] → a fixed vector per clip [B, dims]:
    per-band mean and std; MFCC (DCT-II of the log-mel) means and stds; the mean
    absolute delta of each MFCC (±2-frame regression); and the mean and std over
    frames of the spectral centroid, bandwidth and 85% roll-off (Hz), the
    flatness (geometric over arithmetic mean power), the RMS energy (dB) and
    the contrast of 6 contiguous sub-bands (its loudest band's level minus its
    quietest's, dB). `names()` labels the values."""

    def __init__(self, features: FeatureConfig, n_mfcc: int = N_MFCC) -> None:
        super().__init__()
        n = features.n_mels
        if n < CONTRAST_BANDS:
            raise ConfigError(f"summary statistics need at least {CONTRAST_BANDS} mel bands, not n_mels {n}")
        if not (isinstance(n_mfcc, int) and 1 <= n_mfcc <= n):
            raise ConfigError(f"model parameter n_mfcc must be a whole number from 1 to n_mels ({n}), "
                              f"not {n_mfcc!r}")
        centres = librosa.mel_frequencies(n + 2, fmin=features.fmin,
                                          fmax=features.fmax or features.sample_rate / 2)[1:-1]
        dct = scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)[:n_mfcc]
        # derived from the front end, which the run saves: not part of the weights
        self.register_buffer("centres", torch.from_numpy(centres.astype(np.float32)), persistent=False)
        self.register_buffer("dct", torch.from_numpy(dct.astype(np.float32)), persistent=False)
        self.deltas = Deltas(1)
        # the sub-bands side by side, the narrower ones padded with a repeat of their first band
        bands = np.array_split(np.arange(n), CONTRAST_BANDS)
        width = max(len(b) for b in bands)
        index = np.array([np.pad(b, (0, width - len(b)), constant_values=b[0]) for b in bands])
        self.register_buffer("band_index", torch.from_numpy(index), persistent=False)
        self.n_mels, self.n_mfcc = n, n_mfcc

    @property
    def dims(self) -> int:
        return 2 * self.n_mels + 3 * self.n_mfcc + 2 * len(FRAME_FEATURES)

    def names(self) -> list[str]:
        """What each value of the vector is, in order."""
        per_band = [f"band{i}_{s}" for s in ("mean", "std") for i in range(self.n_mels)]
        mfcc = [f"mfcc{i}_{s}" for s in ("mean", "std", "delta") for i in range(self.n_mfcc)]
        frames = [f"{f}_{s}" for s in ("mean", "std") for f in FRAME_FEATURES]
        return per_band + mfcc + frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().squeeze(1)  # [B, n_mels, T]
        band_mean, band_std = _mean_std(x)
        mfcc = self.dct @ x
        mfcc_mean, mfcc_std = _mean_std(mfcc)
        delta = self.deltas(mfcc.unsqueeze(1))[:, 1].abs().mean(-1)
        frame_mean, frame_std = _mean_std(torch.stack(self.frame_features(x), dim=1))
        return torch.cat([band_mean, band_std, mfcc_mean, mfcc_std, delta, frame_mean, frame_std], dim=1)

    def frame_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The FRAME_FEATURES of every frame of log-mel x [B, n_mels, T], each [B, T]."""
        level = DB * x
        share = torch.softmax(level, dim=1)  # each band's share of the frame's power
        f = self.centres.view(1, -1, 1)
        centroid = (share * f).sum(1)
        bandwidth = (share * (f - centroid.unsqueeze(1)).square()).sum(1).sqrt()
        below = (torch.cumsum(share, dim=1) < ROLLOFF).sum(1).clamp(max=self.n_mels - 1)
        rolloff = self.centres[below]
        log_power = torch.logsumexp(level, dim=1) - math.log(self.n_mels)  # log of the mean band power
        flatness = torch.exp(level.mean(1) - log_power)
        bands = x[:, self.band_index]  # [B, sub-bands, bands, T]
        contrast = bands.amax(2) - bands.amin(2)
        return [centroid, bandwidth, rolloff, flatness, log_power / DB, *contrast.unbind(1)]


@torch.inference_mode()
def clip_statistics(stats: SummaryStatistics, spec: Callable[[int], np.ndarray], lengths: np.ndarray,
                    batch_size: int = 64) -> np.ndarray:
    """The statistics [clips, dims] (float64) of whole clips: `spec(i)` is clip i's
    features [n_mels, lengths[i]]. Clips of one length are computed together,
    which gives what one at a time would."""
    lengths = np.asarray(lengths)
    out = np.zeros((len(lengths), stats.dims))
    order = np.argsort(lengths, kind="stable")
    for same in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1):
        for start in range(0, len(same), batch_size):
            idx = same[start:start + batch_size]
            x = np.stack([np.asarray(spec(int(i)), np.float32) for i in idx])
            out[idx] = stats(torch.from_numpy(x)[:, None]).double().numpy()
    return out


class Projection(nn.Module):
    """Standardisation, then PCA keeping a share of the variance: [B, dims] →
    [B, dims], the kept components' scores first and zeros after them, so that
    the shapes, and the weights file, never depend on how many are kept. The
    scores share one scale, which makes their variances average 1 on the clips
    fitted on. They are not whitened: the quieter components stay small, which
    logistic regression prefers (dev corpus, 5-fold MAP@3 0.915, whitened 0.881)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dims))
        self.register_buffer("scale", torch.ones(dims))
        self.register_buffer("components", torch.zeros(dims, dims))

    @property
    def kept(self) -> int:
        """Components kept (the nonzero rows)."""
        return int(self.components.abs().sum(1).gt(0).sum())

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return ((s - self.mean) / self.scale) @ self.components.T

    def fit(self, stats: np.ndarray, variance: float) -> None:
        """Fit on the rows of `stats` [clips, dims]: keep the fewest components
        that explain `variance` (0 < variance ≤ 1) of the standardised variance."""
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler
        if len(stats) < 2:
            raise DataError(f"summary statistics need at least 2 training clips to standardise, not {len(stats)}")
        with sklearn_threads():
            scaler = StandardScaler().fit(stats)
            pca = PCA(n_components=variance if variance < 1 else None, svd_solver="full").fit(scaler.transform(stats))
        components = np.zeros(self.components.shape)
        components[: pca.n_components_] = pca.components_ / np.sqrt(max(pca.explained_variance_.mean(), 1e-12))
        # PCA centres the standardised clips again (by ~0): folded into the mean
        self.mean.copy_(torch.from_numpy(scaler.mean_ + scaler.scale_ * pca.mean_))
        self.scale.copy_(torch.from_numpy(scaler.scale_))
        self.components.copy_(torch.from_numpy(components))


def sklearn_threads() -> threadpool_limits:
    """scikit-learn's BLAS and OpenMP threads limited to torch's: small fits
    run many times slower with threads spinning on a busy machine."""
    return threadpool_limits(torch.get_num_threads())


def check_variance(variance: float) -> float:
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance <= 1:
        raise ConfigError(f"model parameter pca_variance must be a share of the variance, "
                          f"0 < pca_variance ≤ 1, not {variance!r}")
    return float(variance)


class SummaryBranch(nn.Module):
    """Log-mel [B, 1, n_mels, frames] → statistics → standardised PCA scores [B, dims]."""

    def __init__(self, features: FeatureConfig, variance: float = 0.97, n_mfcc: int = N_MFCC) -> None:
        super().__init__()
        self.variance = check_variance(variance)
        self.stats = SummaryStatistics(features, n_mfcc)
        self.projection = Projection(self.stats.dims)

    @property
    def dims(self) -> int:
        return self.stats.dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # float32 whatever precision the network runs in
            return self.projection(self.stats(x))

    def fit(self, spec: Callable[[int], np.ndarray], lengths: np.ndarray) -> np.ndarray:
        """Fit the projection on whole clips (see `clip_statistics`); their projections [clips, dims]."""
        stats = clip_statistics(self.stats, spec, lengths)
        self.projection.fit(stats, self.variance)
        with torch.inference_mode():
            return self.projection(torch.from_numpy(stats).float()).numpy()
