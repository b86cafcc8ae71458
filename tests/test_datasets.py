"""Dataset readers on the bundled demo set, on ESC-50 / UrbanSound8K / folder layouts built from
real clips, and on broken label files."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import DEMO, MULTI
from soundtag import datasets
from soundtag.errors import ConfigError, DataError

N_CLASSES = 23


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def place(real_clips: Path, folder: Path, names: list[str]) -> None:
    """Copy real clips into `folder` under `names` (cycling through the clips)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = sorted(real_clips.glob("*.wav"))
    for i, name in enumerate(names):
        shutil.copy(clips[i % len(clips)], folder / name)


def kaggle2018(root: Path, train: str, test: str | None = None) -> Path:
    """A 2018-layout folder with the given CSV texts (the readers never open the audio)."""
    (root / "audio_train").mkdir(parents=True)
    (root / "train.csv").write_text(train)
    if test is not None:
        (root / "audio_test").mkdir()
        (root / "test.csv").write_text(test)
    return root


def read_error(path: Path, **options) -> str:
    with pytest.raises(DataError) as caught:
        datasets.read(path, **options)
    return str(caught.value)


def table_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "soundtag" and r.levelno == logging.WARNING]


# ---------------------------------------------------------------- the demo set


def test_demo_2018_layout(caplog):
    train, test = csv_rows(DEMO / "train.csv"), csv_rows(DEMO / "test.csv")
    data = datasets.read(DEMO)
    assert data.layout == "kaggle2018" and not data.multilabel and table_warnings(caplog) == []
    assert len(data.classes) == N_CLASSES and data.classes == sorted(data.classes)
    assert len(data.subset("train")) == len(train) and len(data.subset("test")) == len(test)
    assert data.names == [r["fname"] for r in train + test]
    assert [data.labels(i) for i in range(len(data))] == [[r["label"]] for r in train + test]
    assert data.verified[: len(train)].tolist() == [r["manually_verified"] == "1" for r in train]
    assert data.labelled.all() and not data.noisy.any() and (data.fold == -1).all()
    assert (data.targets.sum(axis=1) == 1).all()
    assert all(f.is_file() for f in data.files)


def test_demo_2019_layout():
    parts = {name: csv_rows(MULTI / f"{name}.csv") for name in ("train_curated", "train_noisy", "test")}
    data = datasets.read(MULTI)
    assert data.layout == "kaggle2019" and data.multilabel
    assert len(data.classes) == N_CLASSES
    sizes = {name: len(rows) for name, rows in parts.items()}
    assert {name: len(data.subset(part)) for name, part in
            (("train_curated", "curated"), ("train_noisy", "noisy"), ("test", "test"))} == sizes
    assert data.noisy.tolist() == [False] * sizes["train_curated"] + [True] * sizes["train_noisy"] \
        + [False] * sizes["test"]
    assert (data.verified == ~data.noisy).all()
    rows = [r for name in parts for r in parts[name]]
    for i, row in enumerate(rows):
        expected = np.isin(data.classes, row["labels"].split(",")).astype(np.float32)
        np.testing.assert_array_equal(data.targets[i], expected)
    assert data.targets.sum(axis=1).max() > 1
    assert all(f.is_file() for f in data.files)


def test_layouts_are_detected(real_clips, tmp_path):
    assert datasets.detect(DEMO) == "kaggle2018"
    assert datasets.detect(MULTI) == "kaggle2019"
    assert datasets.detect(DEMO / "train.csv") == "csv"
    place(real_clips, tmp_path / "esc" / "audio", ["a.wav"])
    (tmp_path / "esc" / "meta").mkdir()
    (tmp_path / "esc" / "meta" / "esc50.csv").write_text("filename,category\na.wav,dog\n")
    assert datasets.detect(tmp_path / "esc") == "csv"
    place(real_clips, tmp_path / "classes" / "dog", ["a.wav"])
    assert datasets.detect(tmp_path / "classes") == "folders"


def test_undetectable_paths_are_errors(tmp_path):
    assert "nowhere: no such file or folder" in read_error(tmp_path / "nowhere")
    assert "not a known dataset layout" in read_error(tmp_path)


def test_layout_option_overrides_detection(real_clips, tmp_path):
    place(real_clips, tmp_path / "dog", ["d1.wav", "d2.wav"])
    place(real_clips, tmp_path / "cat", ["c1.wav"])
    (tmp_path / "labels.csv").write_text("file,label\ndog/d1.wav,dog\n")
    assert datasets.read(tmp_path).layout == "csv"
    data = datasets.read(tmp_path, layout="folders")
    assert data.layout == "folders" and data.classes == ["cat", "dog"] and len(data) == 3
    with pytest.raises(ConfigError, match="unknown layout 'kaggle2020'; valid layouts: csv, folders, kaggle2018, "):
        datasets.read(tmp_path, layout="kaggle2020")
    assert "apply to the csv layout only" in read_error(tmp_path, layout="folders", file_column="file")


# ---------------------------------------------------------------- generic CSV layouts


def test_esc50_style_csv_with_own_folds(real_clips, tmp_path):
    names = [f"{fold}-{100 + i}-A-{i % 2}.wav" for i, fold in enumerate([1, 1, 2, 3, 4, 5, 5, 2])]
    categories = ["dog", "rain"]
    place(real_clips, tmp_path / "audio", names)
    (tmp_path / "meta").mkdir()
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    lines += [f"{n},{n[0]},{i % 2},{categories[i % 2]},True,{100 + i},A" for i, n in enumerate(names)]
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")

    data = datasets.read(tmp_path)
    assert data.layout == "csv" and data.classes == categories and not data.multilabel
    assert data.fold.tolist() == [1, 1, 2, 3, 4, 5, 5, 2]
    assert data.files == [tmp_path / "audio" / n for n in names]
    assert [data.labels(i)[0] for i in range(len(data))] == [categories[i % 2] for i in range(len(names))]
    assert (data.split == "train").all() and data.labelled.all()


def test_urbansound8k_style_csv_with_fold_folders(real_clips, tmp_path):
    header = "slice_file_name,fsID,start,end,salience,fold,classID,class"
    rows = [("100-0-0-1.wav", 1, 3, "air_conditioner"), ("100-0-0-2.wav", 1, 3, "air_conditioner"),
            ("200-3-0-0.wav", 2, 3, "dog_bark"), ("300-3-1-0.wav", 2, 3, "dog_bark"),
            ("400-6-0-0.wav", 10, 6, "gun_shot")]
    for name, fold, _, _ in rows:
        place(real_clips, tmp_path / "audio" / f"fold{fold}", [name])
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "UrbanSound8K.csv").write_text("\n".join(
        [header] + [f"{n},{n.split('-')[0]},0.0,4.0,1,{fold},{cid},{c}" for n, fold, cid, c in rows]) + "\n")

    data = datasets.read(tmp_path)
    assert data.layout == "csv" and data.classes == ["air_conditioner", "dog_bark", "gun_shot"]
    assert data.fold.tolist() == [1, 1, 2, 2, 10]
    assert data.files == [tmp_path / "audio" / f"fold{fold}" / n for n, fold, _, _ in rows]


def test_column_mapping_options(real_clips, tmp_path):
    place(real_clips, tmp_path / "sounds", ["a.wav", "b.wav", "c.wav"])
    table = tmp_path / "lists" / "clips.csv"
    table.parent.mkdir()
    table.write_text('clip,tags,part,cv\na.wav,"dog,bark",training,1\nb.wav,rain,eval,2\nc.wav,dog,train,1\n')
    options = dict(file_column="clip", label_column="tags", split_column="part", fold_column="cv")

    assert "none of its files were found" in read_error(table, **options)
    data = datasets.read(table, audio_dir=tmp_path / "sounds", **options)
    assert data.multilabel and data.classes == ["bark", "dog", "rain"]
    assert data.split.tolist() == ["train", "test", "train"] and data.fold.tolist() == [1, 2, 1]
    assert data.labels(0) == ["bark", "dog"]

    assert data.source["options"]["audio_dir"] == str(tmp_path / "sounds")  # absolute: a resume may run elsewhere

    message = read_error(table, file_column="path", audio_dir=tmp_path / "sounds")
    assert "clips.csv" in message and "missing column(s) path" in message
    message = read_error(table, audio_dir=tmp_path / "sounds")
    assert "clips.csv" in message and "no file column" in message and "clip, tags, part, cv" in message


def test_csv_with_bad_fold_or_split_names_the_line(real_clips, tmp_path):
    place(real_clips, tmp_path, ["a.wav"])
    (tmp_path / "labels.csv").write_text("file,label,fold,split\na.wav,dog,one,train\n")
    assert "labels.csv line 2: fold 'one' is not a whole number" in read_error(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label,fold,split\na.wav,dog,1,validation\n")
    assert "labels.csv line 2: split 'validation' is neither train nor test" in read_error(tmp_path)


# ---------------------------------------------------------------- folder per class


def test_folder_per_class_with_test_subfolder(real_clips, tmp_path):
    place(real_clips, tmp_path / "dog", ["d1.wav", "d2.wav"])
    place(real_clips, tmp_path / "cat", ["c1.flac", "c2.wav", "c3.wav"])
    place(real_clips, tmp_path / "test" / "dog", ["t1.wav"])
    place(real_clips, tmp_path / "test" / "cat", ["t2.wav"])
    (tmp_path / "cat" / "notes.txt").write_text("not a clip")

    data = datasets.read(tmp_path)
    assert data.layout == "folders" and data.classes == ["cat", "dog"]
    assert data.names == ["cat/c1.flac", "cat/c2.wav", "cat/c3.wav", "dog/d1.wav", "dog/d2.wav",
                          "cat/t2.wav", "dog/t1.wav"]
    assert data.split.tolist() == ["train"] * 5 + ["test"] * 2
    assert data.class_counts() == {"cat": 4, "dog": 3}


def test_folder_test_class_without_training_folder_is_an_error(real_clips, tmp_path):
    place(real_clips, tmp_path / "dog", ["d1.wav"])
    place(real_clips, tmp_path / "test" / "owl", ["t1.wav"])
    assert "class 'owl' has no training folder" in read_error(tmp_path)


# ---------------------------------------------------------------- broken label files


@pytest.mark.parametrize("train, test, expected", [
    pytest.param("fname,manually_verified\na.wav,1\n", None, ["{csv}", "missing column(s) label"],
                 id="missing column"),
    pytest.param("fname,label\na.wav,Cello\nb.wav,Flute\na.wav,Oboe\n", None,
                 ["train.csv line 4: duplicate fname 'a.wav' (first on line 2)"], id="duplicate file"),
    pytest.param("fname,label\na.wav,Cello\nb.wav,Flute\n", "fname,label\nt1.wav,Cello\nt2.wav,Kazoo\n",
                 ["test.csv line 3: label 'Kazoo' is not one of the 2 classes"], id="test label outside vocabulary"),
    pytest.param("fname,label,manually_verified\na.wav,Cello,1\nb.wav,Flute,1,extra\n", None,
                 ["train.csv line 3: 4 fields, the header has 3"], id="wrong field count"),
    pytest.param("", None, ["{csv}: empty file, expected a header line"], id="empty"),
    pytest.param("fname,label\na.wav,Cello\nb.wav,\n", None, ["train.csv line 3: no label"], id="missing label"),
    pytest.param("fname,label,manually_verified\n", None, ["{csv}: no rows after the header line"],
                 id="header only"),
])
def test_broken_label_files_name_the_file_and_line(tmp_path, train, test, expected):
    root = kaggle2018(tmp_path, train, test)
    message = read_error(root)
    for part in expected:
        assert part.format(csv=root / "train.csv") in message


def test_byte_order_mark_warns_and_still_reads(tmp_path, caplog):
    root = tmp_path / "bom"
    kaggle2018(root, "")
    (root / "train.csv").write_bytes(b"\xef\xbb\xbffname,label\na.wav,Cello\n")
    data = datasets.read(root)
    assert data.names == ["a.wav"] and data.classes == ["Cello"]
    assert table_warnings(caplog) == [f"{root / 'train.csv'}: starts with a byte-order mark (ignored)"]


def test_stray_whitespace_warns_with_line_and_is_stripped(tmp_path, caplog):
    root = kaggle2018(tmp_path, "fname,label\na.wav,Cello\nb.wav , Flute\n")
    data = datasets.read(root)
    assert data.names == ["a.wav", "b.wav"] and data.classes == ["Cello", "Flute"]
    assert any("train.csv line 3: stray whitespace around 'Flute'" in w for w in table_warnings(caplog))
