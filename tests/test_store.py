"""The feature cache on real clips: values, cache hits, resuming after kill -9, broken files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundtag import audio, features, store
from soundtag.features import FeatureConfig

CONFIG = FeatureConfig()

# Extraction in a child process, slowed per clip so that it can be killed part-way.
SLOW_EXTRACT = """
import sys, time
from soundtag import features, store
compute = features.compute
def slow(wave, config):
    time.sleep(0.05)
    return compute(wave, config)
features.compute = slow
store.extract(sys.argv[2:], features.FeatureConfig(), sys.argv[1], workers=1, progress=False)
"""


def corpus_clips(corpus: Path, n: int) -> list[Path]:
    return sorted((corpus / "audio_train").glob("*.wav"))[:n]


def clip_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.wav"))


def finished_lines(folder: Path) -> list[str]:
    """progress.tsv's complete lines."""
    return (folder / "progress.tsv").read_text().split("\n")[:-1]


def assert_same_store(a: store.FeatureStore, b: store.FeatureStore) -> None:
    assert a.files == b.files and a.errors == b.errors
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def count_computed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the position of every clip `store` computes (in-process, workers=1)."""
    computed: list[int] = []
    compute_one = store._compute_one

    def counting(job):
        computed.append(job[0])
        return compute_one(job)

    monkeypatch.setattr(store, "_compute_one", counting)
    return computed


# ---------------------------------------------------------------- values and cache hits


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_features_match_direct_compute_on_trimmed_clips(real_clips, cache_dir, dtype):
    files = clip_paths(real_clips)
    features_store = store.extract(files, CONFIG, cache_dir, workers=1, dtype=dtype, progress=False)
    assert len(features_store) == len(files) and features_store.ok.all()
    assert features_store.folder.parent == cache_dir and (features_store.folder / "index.json").is_file()
    for i, path in enumerate(files):
        wave = audio.load(path, CONFIG.sample_rate, CONFIG.trim_db)
        expected = features.compute(wave, CONFIG)
        got = features_store[i]
        assert got.dtype == np.dtype(dtype)
        assert got.shape == (CONFIG.n_mels, CONFIG.frames(len(wave)))
        np.testing.assert_array_equal(got, expected.astype(dtype))
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-3, atol=1e-2)


def test_parallel_extraction_equals_serial(dev_corpus, tmp_path):
    files = corpus_clips(dev_corpus, 24)
    serial = store.extract(files, CONFIG, tmp_path / "serial", workers=1, progress=False)
    parallel = store.extract(files, CONFIG, tmp_path / "parallel", workers=2, progress=False)
    assert_same_store(serial, parallel)


def test_clip_features_decode_once_per_rate_and_match_each_config_alone(real_clips, monkeypatch):
    path = str(clip_paths(real_clips)[0])
    configs = [CONFIG, FeatureConfig(n_mels=32), FeatureConfig(sample_rate=16000, n_fft=512, hop_length=256)]
    loads = []
    load = audio.load
    monkeypatch.setattr(audio, "load", lambda *args: loads.append(args) or load(*args))
    specs, error = store.clip_features(path, configs)
    assert error == "" and len(loads) == 2  # 44.1 kHz once for two configs, 16 kHz once
    for spec, config in zip(specs, configs):
        wave = load(path, config.sample_rate, config.trim_db)
        np.testing.assert_array_equal(spec, features.compute(wave, config))


def test_clip_features_of_an_unreadable_file_give_the_reason(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    specs, reason = store.clip_features(str(tmp_path / "notes.wav"), [CONFIG])
    assert specs is None and reason.startswith("not readable as audio")


def test_second_call_reads_the_cache_without_computing(real_clips, cache_dir, monkeypatch):
    files = clip_paths(real_clips)
    first = store.extract(files, CONFIG, cache_dir, workers=1, progress=False)
    stamps = {name: (first.folder / name).stat().st_mtime_ns for name in ("data.bin", "progress.tsv")}
    monkeypatch.setattr(store, "_compute_one", pytest.fail)
    second = store.extract(files, CONFIG, cache_dir, workers=1, progress=False)
    assert second.folder == first.folder
    assert stamps == {name: (first.folder / name).stat().st_mtime_ns for name in stamps}
    assert_same_store(first, second)


def test_changed_file_or_options_get_a_new_cache(real_clips, tmp_path, cache_dir):
    files = [shutil.copy(p, tmp_path / p.name) for p in clip_paths(real_clips)[:2]]
    first = store.extract(files, CONFIG, cache_dir, workers=1, progress=False)
    assert store.extract(files, CONFIG, cache_dir, workers=1, dtype="float32", progress=False).folder \
        != first.folder
    assert store.extract(files, FeatureConfig(n_mels=32), cache_dir, workers=1, progress=False).folder \
        != first.folder
    os.utime(files[0], ns=(0, 0))
    assert store.extract(files, CONFIG, cache_dir, workers=1, progress=False).folder != first.folder


def test_unknown_dtype_is_rejected(real_clips, cache_dir):
    with pytest.raises(ValueError, match="unknown feature dtype 'int8'"):
        store.extract(clip_paths(real_clips), CONFIG, cache_dir, dtype="int8", progress=False)


# ---------------------------------------------------------------- resuming


def test_resume_after_kill_computes_only_unfinished_clips(dev_corpus, tmp_path, monkeypatch):
    files = corpus_clips(dev_corpus, 60)
    cache = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, str(cache), *map(str, files)])
    folder = _wait_for_progress(cache, child, lines=10)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (folder / "index.json").exists()
    finished = {int(line.split("\t")[0]) for line in finished_lines(folder)}
    assert 10 <= len(finished) < len(files)

    computed = count_computed(monkeypatch)
    resumed = store.extract(files, CONFIG, cache, workers=1, progress=False)
    assert resumed.folder == folder
    assert sorted(computed) == sorted(set(range(len(files))) - finished)
    monkeypatch.undo()
    assert_same_store(resumed, store.extract(files, CONFIG, tmp_path / "fresh", workers=1, progress=False))


def _wait_for_progress(cache: Path, child: subprocess.Popen, lines: int, timeout: float = 60.0) -> Path:
    """The cache folder once its progress.tsv holds `lines` finished clips."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, "extraction ended before it could be killed"
        for log in cache.glob("*/progress.tsv"):
            if len(finished_lines(log.parent)) >= lines:
                return log.parent
        time.sleep(0.01)
    child.kill()
    pytest.fail(f"no {lines} finished clips in {cache} after {timeout} s")


def reopened_cache(real_clips: Path, cache_dir: Path) -> tuple[list[Path], list[np.ndarray], Path, list[str]]:
    """A complete cache made incomplete again: (files, their features, folder, progress lines)."""
    files = clip_paths(real_clips)
    complete = store.extract(files, CONFIG, cache_dir, workers=1, progress=False)
    expected = [np.array(complete[i]) for i in range(len(files))]
    (complete.folder / "index.json").unlink()
    return files, expected, complete.folder, finished_lines(complete.folder)


def test_torn_last_line_and_stray_data_are_dropped_on_resume(real_clips, cache_dir, monkeypatch):
    files, expected, folder, lines = reopened_cache(real_clips, cache_dir)
    # A kill while line 4 was written: its fields are all there but its newline is not;
    # data.bin still holds every clip's features past the last finished one.
    (folder / "progress.tsv").write_text("".join(line + "\n" for line in lines[:3]) + lines[3])

    computed = count_computed(monkeypatch)
    resumed = store.extract(files, CONFIG, cache_dir, workers=1, progress=False)
    assert computed == list(range(3, len(files)))
    assert len(finished_lines(folder)) == len(files)
    for i, values in enumerate(expected):
        np.testing.assert_array_equal(resumed[i], values)


def test_garbled_progress_line_is_redone(real_clips, cache_dir, monkeypatch):
    """A complete but garbled line (zero bytes after a power loss) and all after it are redone."""
    files, expected, folder, lines = reopened_cache(real_clips, cache_dir)
    garbled = "\0" * len(lines[2])
    (folder / "progress.tsv").write_text("".join(line + "\n" for line in [*lines[:2], garbled, *lines[3:]]))

    computed = count_computed(monkeypatch)
    resumed = store.extract(files, CONFIG, cache_dir, workers=1, progress=False)
    assert computed == list(range(2, len(files)))
    for i, values in enumerate(expected):
        np.testing.assert_array_equal(resumed[i], values)


# ---------------------------------------------------------------- broken files


def test_broken_files_are_skipped_with_reasons(real_clips, tmp_path, cache_dir):
    good = clip_paths(real_clips)[:3]
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all\n" * 10)
    nan = sf.read(good[1], dtype="float32")[0]
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, CONFIG.sample_rate, subtype="FLOAT")
    broken = {tmp_path / "missing.wav": "file not found", tmp_path / "empty.wav": "empty file (0 bytes)",
              tmp_path / "text.wav": "not readable as audio", tmp_path / "nan.wav": "NaN or infinite"}
    files = [good[0], *broken, good[1], good[2]]

    result = store.extract(files, CONFIG, cache_dir, workers=1, progress=False)
    assert sorted(result.errors) == [1, 2, 3, 4]
    failures = result.failures()
    assert list(failures) == [str(p) for p in broken]
    for path, reason in broken.items():
        assert reason in failures[str(path)]
        with pytest.raises(KeyError, match=path.name):
            result[files.index(path)]
    assert result.ok.tolist() == [True, False, False, False, False, True, True]
    for i in (0, 5, 6):
        assert result[i].shape[0] == CONFIG.n_mels and result[i].shape[1] > 1
    assert result.frames[[1, 2, 3, 4]].tolist() == [0, 0, 0, 0]


def test_all_clips_broken_gives_an_empty_store(tmp_path, cache_dir):
    result = store.extract([tmp_path / "gone.wav"], CONFIG, cache_dir, workers=1, progress=False)
    assert len(result) == 1 and not result.ok.any() and result.data.shape == (0, CONFIG.n_mels)


# ---------------------------------------------------------------- where the cache lives


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.cache_root(tmp_path / "given") == tmp_path / "given"
    assert store.cache_root() == tmp_path / "env"
    monkeypatch.delenv("SOUNDTAG_CACHE")
    assert store.cache_root() == tmp_path / "xdg" / "soundtag"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert store.cache_root() == tmp_path / "home" / ".cache" / "soundtag"


def test_extract_without_cache_dir_uses_soundtag_cache(real_clips, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path))
    result = store.extract(clip_paths(real_clips)[:1], CONFIG, workers=1, progress=False)
    assert result.folder.parent == tmp_path
