"""The torch front end against librosa on real clips, and FeatureConfig's checks and key."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import librosa
import numpy as np
import pytest

from soundtag import audio, features
from soundtag.errors import ConfigError
from soundtag.features import FeatureConfig

CONFIGS = {
    "default": FeatureConfig(),
    "128mels-fft2048-hop256": FeatureConfig(n_mels=128, n_fft=2048, hop_length=256),
    "fft2048-fmax8k": FeatureConfig(n_mels=64, n_fft=2048, hop_length=512, fmax=8000.0),
    "128mels-hop256-fmin50-fmax16k": FeatureConfig(n_mels=128, hop_length=256, fmin=50.0, fmax=16000.0),
    "22050Hz-hop256": FeatureConfig(sample_rate=22050, n_mels=64, n_fft=1024, hop_length=256),
    "win512-hamming": FeatureConfig(n_fft=1024, win_length=512, window="hamming"),
}
# float32 STFT rounding: exact to 1e-3 dB within 60 dB of a clip's peak, a few 1e-3 dB
# in the quietest cells just above the top_db floor.
TOLERANCE_DB, FLOOR_TOLERANCE_DB, NEAR_PEAK_DB = 1e-3, 5e-3, 60.0


def librosa_db(wave: np.ndarray, c: FeatureConfig) -> np.ndarray:
    power = librosa.feature.melspectrogram(
        y=wave, sr=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
        window=c.window, center=True, pad_mode="constant", power=2.0, n_mels=c.n_mels,
        fmin=c.fmin, fmax=c.fmax)
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=c.top_db)


def waves(folder: Path, config: FeatureConfig) -> list[np.ndarray]:
    return [audio.load(f, config.sample_rate, config.trim_db) for f in sorted(folder.glob("*.wav"))]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_logmel_equals_librosa(real_clips, config):
    for wave in waves(real_clips, config):
        got, expected = features.compute(wave, config), librosa_db(wave, config)
        assert got.dtype == np.float32
        assert got.shape == expected.shape == (config.n_mels, config.frames(len(wave)))
        near_peak = expected >= expected.max() - NEAR_PEAK_DB
        assert np.abs(got - expected)[near_peak].max() <= TOLERANCE_DB
        assert np.abs(got - expected).max() <= FLOOR_TOLERANCE_DB


@pytest.mark.parametrize("n_mfcc,n_mels", [(40, 64), (20, 128)])
def test_mfcc_equals_librosa_mfcc_of_the_log_mel(real_clips, n_mfcc, n_mels):
    config = FeatureConfig(kind="mfcc", n_mfcc=n_mfcc, n_mels=n_mels)
    logmel = replace(config, kind="logmel")
    for wave in waves(real_clips, config):
        expected = librosa.feature.mfcc(S=librosa_db(wave, logmel), n_mfcc=n_mfcc)
        got = features.compute(wave, config)
        assert got.shape == expected.shape == (n_mfcc, config.frames(len(wave)))
        np.testing.assert_allclose(got, expected, rtol=0, atol=5e-3)


def test_without_top_db_nothing_is_clipped(real_clips):
    config = FeatureConfig(top_db=None)
    wave = waves(real_clips, config)[2]
    np.testing.assert_allclose(features.compute(wave, config), librosa_db(wave, config), atol=5e-3)


def test_front_end_is_shared_per_config():
    assert features.front_end(FeatureConfig()) is features.front_end(FeatureConfig())


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("options,message", [
    ({"kind": "spectrogram"}, "unknown feature kind 'spectrogram'"),
    ({"window": "no-such-window"}, "unknown window 'no-such-window'"),
    ({"win_length": 2048, "n_fft": 1024}, "win_length must be between 1 and n_fft (1024), not 2048"),
    ({"hop_length": 0}, "must be positive"),
    ({"n_mels": -1}, "must be positive"),
    ({"kind": "mfcc", "n_mfcc": 80, "n_mels": 64}, "n_mfcc must be between 1 and n_mels (64)"),
    ({"win_length": -5}, None), ({"fmin": 5000.0, "fmax": 1000.0}, None), ({"fmax": 30000.0}, None),
    ({"top_db": -10.0}, None),
])
def test_invalid_configs_are_rejected_with_a_reason(options, message):
    with pytest.raises(ConfigError) as caught:
        FeatureConfig(**options)
    assert message is None or message in str(caught.value)


def test_key_is_stable_and_survives_a_json_round_trip():
    config = FeatureConfig(n_mels=128, fmax=8000.0)
    again = FeatureConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.key() == config.key()
    assert len(config.key()) == 16 and int(config.key(), 16) >= 0


@pytest.mark.parametrize("change", [
    {"sample_rate": 22050}, {"n_fft": 2048}, {"hop_length": 256}, {"win_length": 512},
    {"window": "hamming"}, {"n_mels": 128}, {"fmin": 0.0}, {"fmax": 8000.0}, {"top_db": None},
    {"kind": "mfcc"}, {"n_mfcc": 20}, {"trim_db": None},
])
def test_key_differs_for_every_changed_option(change):
    assert FeatureConfig(**change).key() != FeatureConfig().key()


def test_from_dict_rejects_unknown_keys_and_lists_the_valid_ones():
    with pytest.raises(ConfigError) as caught:
        FeatureConfig.from_dict({"n_mels": 64, "nmels": 128, "hop": 1})
    message = str(caught.value)
    assert "hop, nmels" in message and "n_mels" in message and "hop_length" in message


def test_frames_and_seconds():
    config = FeatureConfig(hop_length=512, sample_rate=44100)
    assert config.frames(0) == 1 and config.frames(511) == 1 and config.frames(512) == 2
    assert config.seconds(config.frames(44100 * 2) - 1) == pytest.approx(2.0, abs=512 / 44100)
    assert FeatureConfig(kind="mfcc", n_mfcc=13).n_features == 13 and FeatureConfig().n_features == 64
