"""`soundtag inspect` and `soundtag features` on small real datasets, and the CLI's handling of
user errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import PNG_MAGIC, error_line
from soundtag.cli import COMMANDS, main

BROKEN = "broken.wav"


def small_2018(real_clips: Path, root: Path) -> Path:
    """A 2018-layout dataset of real clips, one of its training files not audio at all."""
    clips = sorted(real_clips.glob("*.wav"))
    (root / "audio_train").mkdir(parents=True)
    (root / "audio_test").mkdir()
    train = [(c.name, "Tonal" if i % 2 else "Noisy") for i, c in enumerate(clips[:4])]
    for name, _ in train:
        shutil.copy(real_clips / name, root / "audio_train" / name)
    (root / "audio_train" / BROKEN).write_text("this is a text file\n")
    shutil.copy(clips[4], root / "audio_test" / "t1.wav")
    rows = [f"{name},{label},1" for name, label in train] + [f"{BROKEN},Noisy,0"]
    (root / "train.csv").write_text("\n".join(["fname,label,manually_verified", *rows]) + "\n")
    (root / "test.csv").write_text("fname,label,usage\nt1.wav,Tonal,Public\n")
    return root


def small_2019(real_clips: Path, root: Path) -> Path:
    clips = sorted(real_clips.glob("*.wav"))
    (root / "train_curated").mkdir(parents=True)
    labels = ['"Bell,Keys"', "Bell", '"Keys,Pipe"', '"Bell,Keys,Pipe"']
    for clip in clips[:4]:
        shutil.copy(clip, root / "train_curated" / clip.name)
    rows = [f"{c.name},{label}" for c, label in zip(clips, labels)]
    (root / "train_curated.csv").write_text("\n".join(["fname,labels", *rows]) + "\n")
    return root


# ---------------------------------------------------------------- inspect


def test_inspect_writes_markdown_report_plots_and_unreadable_files(real_clips, tmp_path, capsys):
    data = small_2018(real_clips, tmp_path / "data")
    out = tmp_path / "report"
    assert main(["inspect", str(data), "--out", str(out), "--workers", "1"]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "- layout: kaggle2018" in text and "- clips: 6 (train 5, test 1)" in text
    assert "- unreadable files: 1" in text
    assert "| Noisy | 3 | 0 |" in text and "| Tonal | 2 | 1 |" in text
    assert f"| {data.resolve() / 'audio_train' / BROKEN} | not readable as audio" in text
    for plot in ("durations.png", "class_counts.png"):
        assert f"]({plot})" in text
        assert (out / plot).read_bytes().startswith(PNG_MAGIC)


def test_inspect_html_report_beside_the_data_and_cooccurrence(real_clips, tmp_path):
    data = small_2019(real_clips, tmp_path / "multi")
    assert main(["inspect", str(data), "--format", "html", "--workers", "1"]) == 0
    out = tmp_path / "multi-report"
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    assert "<h1>Dataset report: multi</h1>" in page and "<table>" in page
    assert '<img src="cooccurrence.png"' in page and "multi-label" in page
    assert "<h2>Unreadable files</h2>" in page and "<p>None.</p>" in page
    for plot in ("durations.png", "class_counts.png", "cooccurrence.png"):
        assert (out / plot).read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- features


def test_features_prints_summary_with_skipped_count(real_clips, tmp_path, cache_dir, capsys):
    data = small_2018(real_clips, tmp_path / "data")
    args = ["features", str(data), "--cache-dir", str(cache_dir), "--workers", "1", "--n-mels", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 clips (" in out and "1 skipped; cache: " + str(cache_dir) in out
    assert f"skipped {data.resolve() / 'audio_train' / BROKEN}: not readable as audio" in out
    assert main(args) == 0  # a cache hit says the same
    assert "1 skipped" in capsys.readouterr().out


# ---------------------------------------------------------------- user errors


def test_nonexistent_data_path(tmp_path, capsys):
    assert main(["features", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)]) == 2
    assert "nowhere: no such file or folder" in error_line(capsys)


def test_unknown_layout(real_clips, tmp_path, capsys):
    data = small_2018(real_clips, tmp_path / "data")
    assert main(["inspect", str(data), "--layout", "kaggle2020", "--out", str(tmp_path / "r")]) == 2
    assert "unknown layout 'kaggle2020'" in error_line(capsys)


def test_bad_csv(tmp_path, capsys):
    (tmp_path / "audio_train").mkdir()
    (tmp_path / "train.csv").write_text("fname,label\na.wav,Cello\na.wav,Flute\n")
    assert main(["inspect", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "train.csv line 3: duplicate fname 'a.wav'" in error_line(capsys)


def test_bad_feature_option(real_clips, tmp_path, capsys):
    data = small_2018(real_clips, tmp_path / "data")
    assert main(["features", str(data), "--kind", "chroma", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown feature kind 'chroma'" in error_line(capsys)


def test_bad_dtype_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["features", str(tmp_path), "--dtype", "int8"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'int8'" in err and "Traceback" not in err


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    assert f"usage: soundtag {command}" in capsys.readouterr().out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)
