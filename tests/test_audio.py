"""audio.load on real clips in several containers, rates and sample formats, and on bad files."""

from __future__ import annotations

import re

from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import soxr

from soundtag import audio, features

RATE = 44100
PCM16_STEP = 2.0 ** -15


def read(path: Path) -> np.ndarray:
    """The clip as written: mono float32 at 44.1 kHz."""
    x, rate = sf.read(path, dtype="float32")
    assert rate == RATE and x.ndim == 1
    return x


def clips(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.wav"))


def peak_hz(wave: np.ndarray, rate: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave)))) * rate / len(wave)


# ---------------------------------------------------------------- containers and formats


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16")])
def test_lossless_containers_decode_exactly(real_clips, tmp_path, fmt, subtype):
    for clip in clips(real_clips):
        x = read(clip)
        path = tmp_path / f"{clip.stem}.{fmt.lower()}"
        sf.write(path, x, RATE, format=fmt, subtype=subtype)
        np.testing.assert_array_equal(audio.load(path, trim_db=None), x)


def test_ogg_vorbis_keeps_content_within_codec_tolerance(real_clips, tmp_path):
    config = features.FeatureConfig(trim_db=None)
    for clip in clips(real_clips):
        x = read(clip)
        path = tmp_path / f"{clip.stem}.ogg"
        sf.write(path, x, RATE, format="OGG", subtype="VORBIS")
        y = audio.load(path, trim_db=None)
        assert len(y) == len(x)
        a, b = features.compute(x, config), features.compute(y, config)
        bands_a, bands_b = (10 ** (a / 10)).sum(axis=1), (10 ** (b / 10)).sum(axis=1)
        assert np.corrcoef(bands_a, bands_b)[0, 1] > 0.99  # same spectral envelope
        assert abs(10 * np.log10(bands_a.sum() / bands_b.sum())) < 0.5  # same energy, dB
        loud = a > a.max() - 40
        assert np.abs(a - b)[loud].mean() < 1.5  # dB, over the loud time-frequency cells


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_sample_formats_decode_to_the_same_float32(real_clips, tmp_path, subtype):
    """The clips are 16-bit, so every wider format holds them exactly."""
    x = read(clips(real_clips)[1])
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, RATE, subtype=subtype)
    y = audio.load(path, trim_db=None)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)


def test_int16_full_scale_maps_to_unit_range(tmp_path):
    path = tmp_path / "int16.wav"
    sf.write(path, np.array([0, 16384, -32768, 32767], np.int16), RATE, subtype="PCM_16")
    np.testing.assert_allclose(audio.load(path, trim_db=None), [0, 0.5, -1, 1 - PCM16_STEP])


def test_stereo_is_mixed_to_the_mean_of_the_channels(real_clips, tmp_path):
    left, right = read(clips(real_clips)[1]), read(clips(real_clips)[2])
    n = min(len(left), len(right))
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left[:n], right[:n]], axis=1), RATE, subtype="FLOAT")
    np.testing.assert_allclose(audio.load(path, trim_db=None), (left[:n] + right[:n]) / 2, atol=1e-7)


@pytest.mark.parametrize("rate", [22050, 48000])
def test_resampling_to_44100_keeps_length_and_spectral_peak(real_clips, tmp_path, rate):
    peaks_checked = 0
    for clip in clips(real_clips):
        x = read(clip)
        source = soxr.resample(x, RATE, rate, quality="VHQ").astype(np.float32)
        path = tmp_path / f"{clip.stem}-{rate}.wav"
        sf.write(path, source, rate, subtype="FLOAT")
        y = audio.load(path, RATE, trim_db=None)
        assert abs(len(y) - len(source) * RATE / rate) <= 1
        if peak_hz(x, RATE) < 0.45 * min(rate, RATE):  # the peak survives the lower rate
            assert abs(peak_hz(y, RATE) - peak_hz(x, RATE)) <= 2 * RATE / len(x)
            peaks_checked += 1
    assert peaks_checked >= len(clips(real_clips)) // 2


def test_load_resamples_to_a_lower_target_rate(real_clips):
    clip = clips(real_clips)[1]
    y = audio.load(clip, 22050, trim_db=None)
    assert abs(len(y) - len(read(clip)) / 2) <= 1


# ---------------------------------------------------------------- trimming


def test_trim_equals_librosa_on_real_clips_padded_with_silence(real_clips, tmp_path):
    rng = np.random.default_rng(0)
    for clip in clips(real_clips):
        x = read(clip)
        before, after = rng.integers(2000, 40000, size=2)
        padded = np.concatenate([np.zeros(before, np.float32), x, np.zeros(after, np.float32)])
        path = tmp_path / clip.name
        sf.write(path, padded, RATE, subtype="FLOAT")
        expected, _ = librosa.effects.trim(padded, top_db=60)
        trimmed = audio.load(path, trim_db=60.0)
        assert len(trimmed) < len(padded)
        np.testing.assert_array_equal(trimmed, expected)
        np.testing.assert_array_equal(audio.trim(padded, 60.0), expected)
        # a frame that is not a whole number of hops takes the general path
        expected, _ = librosa.effects.trim(padded, top_db=40, frame_length=1000, hop_length=300)
        np.testing.assert_array_equal(audio.trim(padded, 40.0, frame=1000, hop=300), expected)


def test_trim_db_none_keeps_the_silence(real_clips, tmp_path):
    x = read(clips(real_clips)[1])
    padded = np.concatenate([np.zeros(10000, np.float32), x, np.zeros(10000, np.float32)])
    path = tmp_path / "padded.wav"
    sf.write(path, padded, RATE, subtype="FLOAT")
    np.testing.assert_array_equal(audio.load(path, trim_db=None), padded)


def test_all_silent_clip_is_kept_whole():
    silence = np.zeros(RATE, np.float32)
    assert len(audio.trim(silence, 60.0)) == RATE


# ---------------------------------------------------------------- bad files


def _bad_file(kind: str, folder: Path, clip: Path) -> Path:
    """Write a broken file of `kind` into `folder` and return its path."""
    path = folder / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "header-only":
        path.write_bytes(clip.read_bytes()[:44])
    elif kind == "text":
        path.write_text("fname,label\nthis is not audio\n" * 20)
    elif kind in ("nan", "inf"):
        x = read(clip)
        x[len(x) // 2] = np.nan if kind == "nan" else np.inf
        sf.write(path, x, RATE, subtype="FLOAT")
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": never written


@pytest.mark.parametrize("kind,reason", [
    ("missing", "file not found"),
    ("empty", "empty file"),
    ("header-only", "truncated"),
    ("text", "not readable as audio"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
    ("directory", "is a directory"),
])
def test_bad_files_raise_audio_error_naming_file_and_reason(real_clips, tmp_path, kind, reason):
    path = _bad_file(kind, tmp_path, clips(real_clips)[1])
    with pytest.raises(audio.AudioError) as caught:
        audio.load(path)
    assert path.name in str(caught.value)
    assert reason in caught.value.reason
    assert caught.value.path == str(path)


def test_truncated_wav_is_reported_with_both_sizes(real_clips, tmp_path):
    """A WAV cut short (header kept) is an error saying what the header promised."""
    clip = clips(real_clips)[2]
    raw = clip.read_bytes()
    path = tmp_path / "truncated.wav"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(audio.AudioError, match=r"truncated.wav: truncated: the header promises (\d+) bytes") as caught:
        audio.load(path)
    promised, held = map(int, re.findall(r"\d+", caught.value.reason))
    assert promised == len(raw) - 44 and held < promised


def test_info_reads_the_header_and_names_bad_files(real_clips, tmp_path):
    clip = clips(real_clips)[1]
    i = audio.info(clip)
    assert (i.sample_rate, i.channels, i.subtype) == (RATE, 1, "PCM_16")
    assert i.duration == pytest.approx(len(read(clip)) / RATE)
    with pytest.raises(audio.AudioError, match="text.wav.*not readable as audio"):
        audio.info(_bad_file("text", tmp_path, clip))
