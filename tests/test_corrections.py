"""Label corrections: the review list ordered by how much out-of-fold scores
disagree with the given labels, the corrections file it writes, and training on
an edited file (labels changed and counted, in the log, clips.csv and the summary)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import DEMO, copy_run, error_line, shared_run, train_tiny

from soundtag import datasets
from soundtag.cli import main
from soundtag.clips import ClipTable
from soundtag.corrections import apply, disagreement, review
from soundtag.errors import DataError
from soundtag.run import Run

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CLASSES = ["bark", "bell", "drum"]


def toy(multilabel: bool = False) -> datasets.Dataset:
    labels = [["bark"], ["bell"], ["drum"], ["bark"], ["bell"]]
    if multilabel:
        labels[1] = ["bell", "drum"]
    rows = [{"file": Path(f"/audio/c{i}.wav"), "name": f"c{i}.wav", "labels": l, "split": "train"}
            for i, l in enumerate(labels)]
    return datasets.base.build(Path("/audio"), "csv", rows, CLASSES, multilabel)


def test_the_review_lists_the_clips_worst_first():
    data = toy(multilabel=True)
    names = ["c0.wav", "c1.wav", "c2.wav", "c3.wav", "c4.wav", "elsewhere.wav"]
    scores = np.array([[0.9, 0.1, 0.0],   # bark: agrees (0.1)
                       [0.5, 0.6, 0.2],   # bell,drum: 1 - (0.6 + 0.2) / 2 = 0.6
                       [0.7, 0.2, 0.05],  # drum: 0.95
                       [0.3, 0.9, 0.1],   # bark: 0.7
                       [0.0, 0.8, 0.3],   # bell: 0.2
                       [1.0, 1.0, 1.0]], np.float32)
    frame = review(scores, names, data, CLASSES, top=4)
    assert frame.fname.tolist() == ["c2.wav", "c3.wav", "c1.wav", "c4.wav"]
    np.testing.assert_allclose(frame.disagreement, [0.95, 0.7, 0.6, 0.2], atol=1e-4)
    assert frame.old_labels.tolist() == frame.new_labels.tolist() == ["drum", "bark", "bell,drum", "bell"]
    assert frame.predicted[0] == "bark:0.70 bell:0.20 drum:0.05"
    assert list(frame.columns[:3]) == ["fname", "old_labels", "new_labels"]
    targets = np.array([[1, 0, 0], [0, 1, 1]], np.float32)
    np.testing.assert_allclose(disagreement(targets, scores[:2]), [0.1, 0.6], atol=1e-6)
    with pytest.raises(DataError, match="none of the run's 1 out-of-fold clips"):
        review(scores[-1:], names[-1:], data, CLASSES, top=4)


def write(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    pd.DataFrame(rows, columns=["fname", "old_labels", "new_labels"]).assign(note="ignored").to_csv(path, index=False)
    return path


def test_a_corrections_file_is_applied_and_counted(tmp_path, caplog):
    table = ClipTable.from_dataset(toy())
    path = write(tmp_path / "fix.csv", [("c0.wav", "bark", "bell"), ("c2.wav", "drum", "drum"),
                                        ("c3.wav", "bark", " drum "), ("gone.wav", "bark", "bell")])
    with caplog.at_level(logging.WARNING, "soundtag"):
        fixed, applied = apply(table, path)
    assert [fixed.labels(i) for i in range(5)] == [["bell"], ["bell"], ["drum"], ["drum"], ["bell"]]
    assert (applied.clips_changed, applied.labels_added, applied.labels_removed, applied.unmatched) == (2, 2, 2, 1)
    assert [fixed.labels(i) for i in range(5)] != [table.labels(i) for i in range(5)]  # the table itself is kept
    assert caplog.messages == [f"label corrections {path}: labels of 2 clip(s) changed (2 added, 2 removed); "
                               "1 row(s) name no training clip"]
    multi = ClipTable.from_dataset(toy(multilabel=True))
    _, applied = apply(multi, write(tmp_path / "multi.csv", [("c1.wav", "bell,drum", "bell"),
                                                             ("c4.wav", "bell", "bark,bell,drum")]))
    assert (applied.clips_changed, applied.labels_added, applied.labels_removed) == (2, 2, 1)


@pytest.mark.parametrize("rows, message", [
    ([("c0.wav", "bark", "cat")], "line 2: label.s. 'cat' not among the classes"),
    ([("c0.wav", "bark", "bark"), ("c1.wav", "bell", "bark,bell")], "line 3: 2 labels for 'c1.wav', but the set is "
                                                                    "single-label"),
    ([("c0.wav", "bark", "")], "line 2: no new label for 'c0.wav'"),
    ([("c0.wav", "bark", "bell"), ("c0.wav", "bark", "drum")], "line 3: 'c0.wav' is corrected twice"),
])
def test_a_wrong_corrections_file_names_its_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        apply(ClipTable.from_dataset(toy()), write(tmp_path / "bad.csv", rows))
    (tmp_path / "cols.csv").write_text("fname,labels\nc0.wav,bark\n")
    with pytest.raises(DataError, match="lacks column.s. old_labels, new_labels"):
        apply(ClipTable.from_dataset(toy()), tmp_path / "cols.csv")


def test_review_then_train_on_the_edited_corrections(tmp_path_factory, tmp_path, capsys, caplog):
    run = copy_run(shared_run(tmp_path_factory, "cnn6"), tmp_path / "run")
    out = tmp_path / "corrections.csv"
    assert main(["review", str(run), str(DEMO), "--out", str(out), "--top", "5"]) == 0
    printed = capsys.readouterr().out
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    oof, scores = Run.open(run).read_oof()
    data = datasets.read(DEMO)
    worst = review(scores, oof.fname.tolist(), data, Run.open(run).classes, top=5)
    assert frame.fname.tolist() == worst.fname.tolist() and len(frame) == 5
    assert np.all(np.diff(frame.disagreement.astype(float)) <= 0) and frame.fname[0] in printed
    assert main(["review", str(run), str(DEMO), "--out", str(out)]) == 2  # an edited file is kept
    assert "already exists" in error_line(capsys)

    first = frame.fname[0]
    other = next(c for c in Run.open(run).classes if c != frame.old_labels[0])
    frame.loc[0, "new_labels"] = other
    frame.to_csv(out, index=False)
    with caplog.at_level(logging.WARNING, "soundtag"):
        trained = train_tiny(tmp_path / "fixed", corrections=str(out), epochs=1, epoch_clips=32,
                             model={"name": "auxcnn", "params": {"width": 0.125}},
                             optim={"schedule": "plateau", "schedule_params": {"patience": 0}})
    assert any("labels of 1 clip(s) changed (1 added, 1 removed)" in m for m in caplog.messages)
    summary = json.loads((trained.folder / "summary.json").read_text())
    assert summary["corrections"] == {"file": str(out), "clips_changed": 1, "labels_added": 1,
                                      "labels_removed": 1, "unmatched": 0}
    assert "labels of 1 clip(s) changed" in (trained.folder / "summary.md").read_text()
    clips = pd.read_csv(trained.folder / "clips.csv", dtype=str)
    assert clips.set_index("fname").labels[first] == other
    saved = trained.load_checkpoint(0)["schedule"]
    assert saved["scale"] in (1.0, 0.5) and saved["best"] is not None  # the plateau schedule saw the epoch

