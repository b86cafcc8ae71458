"""The per-clip feature store on the bundled demo clips and generated audio: values,
lookups by file identity, resuming after kill -9, two writers at once, corruption,
odd file names and broken files."""

from __future__ import annotations

import json
import logging
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

from helpers import DEMO, error_line, write_wav
from soundtag import audio, config, datasets, features, store
from soundtag.cli import main
from soundtag.features import FeatureConfig

CONFIG = FeatureConfig()
FAST = config.resolve("fast").features
DEMO_CLIPS = sorted((DEMO / "audio_train").glob("*.ogg"))

# `soundtag features` in a child process, slowed per clip so that it can be killed part-way
# and so that two of them overlap.
SLOW_FEATURES = """
import sys, time
from soundtag import cli, features
compute = features.compute
def slow(wave, config):
    time.sleep(0.1)
    return compute(wave, config)
features.compute = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def demo_files(n: int, start: int = 0) -> list[Path]:
    return DEMO_CLIPS[start : start + n]


def copies(files: list[Path], folder: Path) -> list[Path]:
    """Private copies of `files` (tests that change files change these)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / f.name)) for f in files]


def class_folders(root: Path, n: int) -> Path:
    """A folder-per-class dataset of `n` demo clips."""
    for i, clip in enumerate(demo_files(n)):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, root / f"class{i % 2}" / clip.name)
    return root


def index_lines(folder: Path) -> list[bytes]:
    """index.tsv's complete lines."""
    return (folder / store.INDEX).read_bytes().split(b"\n")[:-1]


def count_computed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the file of every clip `store` computes (in-process, workers=1)."""
    computed: list[str] = []
    compute_one = store._compute_one

    def counting(job):
        computed.append(job[1])
        return compute_one(job)

    monkeypatch.setattr(store, "_compute_one", counting)
    return computed


def values(result: store.FeatureStore) -> list[np.ndarray | None]:
    return [np.array(result[i]) if result.ok[i] else None for i in range(len(result))]


def assert_same_clips(a: store.FeatureStore, b: store.FeatureStore) -> None:
    assert a.files == b.files and a.errors == b.errors
    np.testing.assert_array_equal(a.frames, b.frames)
    for x, y in zip(values(a), values(b)):
        assert (x is None and y is None) or np.array_equal(x, y)


def extract(files, cache, cfg: FeatureConfig = CONFIG, **options) -> store.FeatureStore:
    return store.extract(files, cfg, cache, **{"workers": 1, "progress": False, **options})


# ---------------------------------------------------------------- values and layout


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_features_match_direct_compute_on_trimmed_clips(cache_dir, dtype):
    files = demo_files(4)
    result = extract(files, cache_dir, dtype=dtype)
    assert len(result) == len(files) and result.ok.all() and result.files == [str(f) for f in files]
    assert result.folder == cache_dir / f"{CONFIG.key()}-{dtype}"
    saved = json.loads((result.folder / store.CONFIG).read_text())
    assert FeatureConfig.from_dict(saved["features"]) == CONFIG and saved["dtype"] == dtype
    for i, path in enumerate(files):
        wave = audio.load(path, CONFIG.sample_rate, CONFIG.trim_db)
        expected = features.compute(wave, CONFIG)
        got = result[i]
        assert got.dtype == np.dtype(dtype) and not got.flags.writeable
        assert got.shape == (CONFIG.n_mels, CONFIG.frames(len(wave))) == (CONFIG.n_mels, result.frames[i])
        np.testing.assert_array_equal(got, expected.astype(dtype))
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-3, atol=1e-2)


def test_parallel_extraction_equals_serial(tmp_path):
    files = demo_files(24)
    serial = extract(files, tmp_path / "serial")
    parallel = extract(files, tmp_path / "parallel", workers=2)
    assert_same_clips(serial, parallel)
    assert (serial.folder / store.DATA).read_bytes() == (parallel.folder / store.DATA).read_bytes()


def test_clip_features_decode_once_per_rate_and_match_each_config_alone(monkeypatch):
    path = str(demo_files(1)[0])
    configs = [CONFIG, FeatureConfig(n_mels=32), FeatureConfig(sample_rate=16000, n_fft=512, hop_length=256)]
    loads = []
    load = audio.load
    monkeypatch.setattr(audio, "load", lambda *args: loads.append(args) or load(*args))
    specs, error = store.clip_features(path, configs)
    assert error == "" and len(loads) == 2  # 44.1 kHz once for two configs, 16 kHz once
    for spec, cfg in zip(specs, configs):
        wave = load(path, cfg.sample_rate, cfg.trim_db)
        np.testing.assert_array_equal(spec, features.compute(wave, cfg))


def test_clip_features_of_an_unreadable_file_give_the_reason(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    specs, reason = store.clip_features(str(tmp_path / "notes.wav"), [CONFIG])
    assert specs is None and reason.startswith("not readable as audio")


def test_unknown_dtype_is_rejected(cache_dir):
    with pytest.raises(ValueError, match="unknown feature dtype 'int8'"):
        store.extract(demo_files(1), CONFIG, cache_dir, dtype="int8", progress=False)


def test_progress_bar_counts_stored_clips_and_stays_away_on_a_hit(cache_dir, capsys):
    files = demo_files(4)
    extract(files[:3], cache_dir)
    extract(files, cache_dir, progress=True)
    assert "4/4" in capsys.readouterr().err
    extract(files, cache_dir, progress=True)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- lookups by file identity


def test_a_rerun_a_subset_and_a_reordered_list_compute_nothing(cache_dir, monkeypatch):
    files = demo_files(8)
    first = extract(files, cache_dir)
    expected = dict(zip(first.files, values(first)))
    sizes = {name: (first.folder / name).stat().st_size for name in (store.DATA, store.INDEX)}
    monkeypatch.setattr(store, "_compute_one", pytest.fail)
    for asked in (files, files[::2], files[::-1], [files[5], files[1], files[5]]):
        again = extract(asked, cache_dir)
        assert again.folder == first.folder and again.files == [str(f) for f in asked]
        for i, f in enumerate(again.files):
            np.testing.assert_array_equal(again[i], expected[f])
    assert sizes == {name: (first.folder / name).stat().st_size for name in sizes}


def test_a_folder_grown_by_one_file_computes_only_that_file(tmp_path, cache_dir, monkeypatch):
    folder = tmp_path / "clips"
    copies(demo_files(6), folder)
    extract(sorted(folder.iterdir()), cache_dir)
    new = copies(demo_files(1, start=6), folder)[0]
    computed = count_computed(monkeypatch)
    grown = extract(sorted(folder.iterdir()), cache_dir)
    assert computed == [str(new)] and grown.ok.all() and len(grown) == 7
    expected = features.compute(audio.load(new), CONFIG).astype(np.float16)
    np.testing.assert_array_equal(grown[grown.files.index(str(new))], expected)


def test_a_rewritten_file_is_recomputed_even_with_its_old_size_and_mtime(tmp_path, cache_dir, monkeypatch):
    rate = CONFIG.sample_rate
    t = np.arange(rate) / rate
    path = write_wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * t), rate)
    before = extract([path], cache_dir)[0].copy()
    stamp = path.stat().st_mtime_ns
    write_wav(path, 0.5 * np.sin(2 * np.pi * 3000 * t), rate)  # same length, so the same size
    os.utime(path, ns=(stamp, stamp))
    computed = count_computed(monkeypatch)
    after = extract([path], cache_dir)[0]
    assert computed == [str(path)] and not np.array_equal(after, before)
    np.testing.assert_array_equal(after, features.compute(audio.load(path), CONFIG).astype(np.float16))

    write_wav(path, 0.5 * np.sin(2 * np.pi * 440 * t[: rate // 2]), rate)  # new size and mtime
    assert extract([path], cache_dir).frames[0] == CONFIG.frames(len(audio.load(path)))
    assert computed == [str(path)] * 2


def test_each_front_end_and_dtype_has_its_own_store(cache_dir):
    files = demo_files(2)
    folders = {extract(files, cache_dir, cfg, dtype=dtype).folder
               for cfg in (CONFIG, FeatureConfig(n_mels=32)) for dtype in store.DTYPES}
    assert folders == {cache_dir / f"{cfg.key()}-{dtype}" for cfg in (CONFIG, FeatureConfig(n_mels=32))
                       for dtype in store.DTYPES}


def test_file_identity_covers_path_size_mtime_and_content(tmp_path):
    a, b = copies(demo_files(1), tmp_path / "a")[0], copies(demo_files(1), tmp_path / "b")[0]
    key = store.file_key(str(a))
    assert key == store.file_key(str(a)) and key != store.file_key(str(b))
    stamp = a.stat().st_mtime_ns
    os.utime(a, ns=(stamp + 1, stamp + 1))
    assert store.file_key(str(a)) != key
    os.utime(a, ns=(stamp, stamp))
    data = bytearray(a.read_bytes())
    data[-1] ^= 1
    a.write_bytes(bytes(data))
    os.utime(a, ns=(stamp, stamp))
    assert store.file_key(str(a)) != key


def test_a_non_utf8_file_name_is_extracted(tmp_path, cache_dir):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.wav"
    wave = np.sin(np.arange(CONFIG.sample_rate) / 10).astype(np.float32)
    sf.write(raw, wave, CONFIG.sample_rate, subtype="FLOAT")
    result = extract([os.fsdecode(raw)], cache_dir)
    expected = features.compute(audio.load(write_wav(tmp_path / "cafe.wav", wave, CONFIG.sample_rate)), CONFIG)
    np.testing.assert_array_equal(result[0], expected.astype(np.float16))


# ---------------------------------------------------------------- resuming and two writers


def _wait_for_lines(folder: Path, child: subprocess.Popen, lines: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, "extraction ended before it could be killed"
        if (folder / store.INDEX).is_file() and len(index_lines(folder)) >= lines:
            return
        time.sleep(0.01)
    child.kill()
    pytest.fail(f"no {lines} indexed clips in {folder} after {timeout} s")


def features_command(data: Path, cache: Path) -> list[str]:
    return [sys.executable, "-c", SLOW_FEATURES, "-q", "features", str(data), "--cache-dir", str(cache),
            "--workers", "1"]


def test_kill_9_mid_extraction_then_a_rerun_equals_an_uninterrupted_extraction(tmp_path, monkeypatch):
    data = class_folders(tmp_path / "data", 24)
    files = datasets.read(data).files
    cache = tmp_path / "killed"
    folder = store.store_folder(FAST, "float16", cache)
    child = subprocess.Popen(features_command(data, cache))
    _wait_for_lines(folder, child, lines=5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = len(index_lines(folder))
    assert 5 <= finished < len(files)

    computed = count_computed(monkeypatch)
    resumed = extract(files, cache, FAST)
    assert len(computed) == len(files) - finished and len(index_lines(folder)) == len(files)
    monkeypatch.undo()
    assert_same_clips(resumed, extract(files, tmp_path / "fresh", FAST))


def test_two_processes_extracting_at_once_both_succeed_and_agree(tmp_path, monkeypatch):
    data = class_folders(tmp_path / "data", 16)
    files = datasets.read(data).files
    cache = tmp_path / "shared"
    children = [subprocess.Popen(features_command(data, cache), stderr=subprocess.PIPE) for _ in range(2)]
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()
    folder = store.store_folder(FAST, "float16", cache)
    assert len(index_lines(folder)) == len(files)  # the second waited and found every clip done
    monkeypatch.setattr(store, "_compute_one", pytest.fail)
    both = extract(files, cache, FAST)
    monkeypatch.undo()
    assert_same_clips(both, extract(files, tmp_path / "alone", FAST))


def completed(cache_dir: Path, n: int = 5) -> tuple[list[Path], store.FeatureStore, list[np.ndarray]]:
    """A store holding `n` demo clips: (files, store, their features)."""
    files = demo_files(n)
    result = extract(files, cache_dir)
    return files, result, values(result)


def test_a_torn_last_line_and_stray_data_are_ignored(cache_dir, monkeypatch):
    files, result, expected = completed(cache_dir)
    index, data = result.folder / store.INDEX, result.folder / store.DATA
    size = data.stat().st_size
    lines = index_lines(result.folder)
    # A kill while the last line was written: its fields are there but its check and
    # newline are not; data.bin holds that clip and a half-written one after it.
    index.write_bytes(b"".join(line + b"\n" for line in lines[:-1]) + lines[-1][:-9])
    with open(data, "ab") as f:
        f.write(b"\x01" * 1000)

    computed = count_computed(monkeypatch)
    resumed = extract(files, cache_dir)
    assert computed == [str(files[-1])] and data.stat().st_size == size
    for i, values_i in enumerate(expected):
        np.testing.assert_array_equal(resumed[i], values_i)
    assert extract(files, cache_dir).ok.all() and computed == [str(files[-1])]


def test_a_garbled_index_line_is_ignored_and_its_clip_recomputed(cache_dir, monkeypatch):
    files, result, expected = completed(cache_dir)
    lines = index_lines(result.folder)
    fields = lines[2].split(b"\t")
    fields[3] = b"%d" % (int(fields[3]) - 1)  # one frame fewer: the line's check no longer matches
    bad = [b"\0" * len(lines[2]), b"\t".join(fields)]
    (result.folder / store.INDEX).write_bytes(b"".join(line + b"\n" for line in [*lines[:2], *bad, *lines[3:]]))

    computed = count_computed(monkeypatch)
    resumed = extract(files, cache_dir)
    assert computed == [str(files[2])]
    for i, values_i in enumerate(expected):
        np.testing.assert_array_equal(resumed[i], values_i)


# ---------------------------------------------------------------- integrity


def test_a_corrupted_byte_is_detected_and_the_clip_recomputed(cache_dir, monkeypatch, caplog):
    files, result, expected = completed(cache_dir)
    offset = int(index_lines(result.folder)[3].split(b"\t")[1]) + 17
    with open(result.folder / store.DATA, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))

    computed = count_computed(monkeypatch)
    with caplog.at_level(logging.WARNING, "soundtag.store"):
        repaired = extract(files, cache_dir)
    assert computed == [str(files[3])]
    assert any(str(files[3]) in r.message and "checksum" in r.message for r in caplog.records)
    for i, values_i in enumerate(expected):
        np.testing.assert_array_equal(repaired[i], values_i)
    caplog.clear()
    extract(files, cache_dir)
    assert computed == [str(files[3])] and not caplog.records


def test_a_data_file_shorter_than_its_index_is_not_trusted(cache_dir, monkeypatch, caplog):
    files, result, expected = completed(cache_dir)
    data = result.folder / store.DATA
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 10)

    computed = count_computed(monkeypatch)
    with caplog.at_level(logging.WARNING, "soundtag.store"):
        repaired = extract(files, cache_dir)
    assert computed == [str(files[-1])]
    assert any("past the end" in r.message for r in caplog.records)
    for i, values_i in enumerate(expected):
        np.testing.assert_array_equal(repaired[i], values_i)


# ---------------------------------------------------------------- broken files


def test_broken_files_are_skipped_with_reasons(tmp_path, cache_dir):
    good = demo_files(3)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all\n" * 10)
    nan, rate = sf.read(good[1], dtype="float32")
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, rate, subtype="FLOAT")
    broken = {tmp_path / "missing.wav": "file not found", tmp_path / "empty.wav": "empty file (0 bytes)",
              tmp_path / "text.wav": "not readable as audio", tmp_path / "nan.wav": "NaN or infinite",
              tmp_path: "is a directory"}
    files = [good[0], *broken, good[1], good[2]]

    result = extract(files, cache_dir)
    assert sorted(result.errors) == [1, 2, 3, 4, 5]
    failures = result.failures()
    assert list(failures) == [str(p) for p in broken]
    for path, reason in broken.items():
        assert reason in failures[str(path)]
        with pytest.raises(KeyError, match=path.name):
            result[files.index(path)]
    assert result.ok.tolist() == [True, False, False, False, False, False, True, True]
    for i in (0, 6, 7):
        assert result[i].shape[0] == CONFIG.n_mels and result[i].shape[1] > 1
    assert result.frames[[1, 2, 3, 4, 5]].tolist() == [0] * 5


def test_unreadable_files_are_recorded_and_retried_only_once_changed(tmp_path, cache_dir, monkeypatch):
    text = tmp_path / "text.wav"
    text.write_text("not audio at all\n")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    files = [demo_files(1)[0], text, empty]
    first = extract(files, cache_dir)
    assert sorted(first.errors) == [1, 2]

    computed = count_computed(monkeypatch)
    again = extract(files, cache_dir)
    assert computed == [] and again.errors == first.errors
    shutil.copy(demo_files(1, start=1)[0], text)
    fixed = extract(files, cache_dir)
    assert computed == [str(text)] and sorted(fixed.errors) == [2] and fixed.frames[1] > 0


def test_all_clips_broken_gives_an_empty_store(tmp_path, cache_dir):
    result = extract([tmp_path / "gone.wav"], cache_dir)
    assert len(result) == 1 and not result.ok.any() and result.data.shape == (0, CONFIG.n_mels)


# ---------------------------------------------------------------- the features command


def test_features_without_options_fills_the_fast_presets_store(tmp_path, cache_dir, monkeypatch, capsys):
    data = class_folders(tmp_path / "data", 6)
    assert main(["features", str(data), "--cache-dir", str(cache_dir), "--workers", "1"]) == 0
    assert f"cache: {store.store_folder(FAST, 'float16', cache_dir)}" in capsys.readouterr().out
    monkeypatch.setattr(store, "_compute_one", pytest.fail)
    assert extract(datasets.read(data).files, cache_dir, FAST).ok.all()


def test_feature_options_override_the_chosen_preset(tmp_path, cache_dir):
    data = class_folders(tmp_path / "data", 2)
    args = ["features", str(data), "--cache-dir", str(cache_dir), "--workers", "1", "--preset", "kaggle2018",
            "--n-mels", "32", "--no-trim", "--dtype", "float32"]
    assert main(args) == 0
    expected = config.resolve("kaggle2018").features
    expected = FeatureConfig(**{**expected.to_dict(), "n_mels": 32, "trim_db": None})
    assert [p.name for p in cache_dir.iterdir()] == [f"{expected.key()}-float32"]


def test_no_trim_with_a_trim_threshold_is_an_error(tmp_path, cache_dir, capsys):
    data = class_folders(tmp_path / "data", 2)
    assert main(["features", str(data), "--cache-dir", str(cache_dir), "--no-trim", "--trim-db", "50"]) == 2
    assert "--no-trim and --trim-db" in error_line(capsys)


# ---------------------------------------------------------------- where the store lives


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


def test_extract_without_cache_dir_uses_soundtag_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path))
    result = store.extract(demo_files(1), CONFIG, workers=1, progress=False)
    assert result.folder.parent == tmp_path
