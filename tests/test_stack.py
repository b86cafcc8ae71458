"""Second-level stacking over several runs' out-of-fold scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import DEMO, train_tiny

from soundtag import cli
from soundtag.errors import SoundtagError
from soundtag.predict import Tagger
from soundtag.run import RunError
from soundtag.stack import Stacker, cross_validate, fit_stack, oof_table

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("stack")
    return [train_tiny(out / name, epochs=2, model={"name": name, "params": {"width": 0.25}}).folder
            for name in ("cnn6", "mobilenetv2")]


def test_oof_table_aligns_runs(two_runs):
    x, y, classes, multilabel = oof_table(two_runs)
    assert x.shape == (len(y), 2 * len(classes))
    assert not multilabel and (y.sum(1) == 1).all()
    assert np.allclose(x[:, : len(classes)].sum(1), 1, atol=1e-3)  # softmax scores of run 1


def test_fit_stack_and_predict(two_runs, tmp_path):
    figures = fit_stack(two_runs, tmp_path / "stack", epochs=50)
    assert set(figures) == {"metric", "clips", "stack_cv", "mean_of_runs"}
    assert 0 <= figures["stack_cv"] <= 1 and figures["metric"] == "map@3"
    info = json.loads((tmp_path / "stack" / "stack.json").read_text())
    assert [r["path"] for r in info["runs"]] == [str(r) for r in two_runs]
    assert not list((tmp_path / "stack").glob("*.pt")) and not list((tmp_path / "stack").glob("*.pkl"))

    files = sorted((DEMO / "audio_test").glob("*.ogg"))[:6]
    stacked = Tagger.load([tmp_path / "stack"])
    scores, errors = stacked.tag_files(files, workers=1, progress=False)
    assert not errors and scores.shape == (6, len(stacked.classes))
    assert np.allclose(scores.sum(1), 1, atol=1e-4)
    per_run = [Tagger.load([r]).tag_files(files, workers=1, progress=False)[0] for r in two_runs]
    assert np.allclose(scores, Stacker(tmp_path / "stack")(per_run), atol=1e-5)


def test_stack_cli(two_runs, tmp_path, capsys):
    assert cli.main(["stack", *map(str, two_runs), "--out", str(tmp_path / "s"), "--epochs", "20"]) == 0
    assert "out-of-fold clips" in capsys.readouterr().out


def test_stack_refuses_bad_inputs(two_runs, tmp_path):
    with pytest.raises(RunError):
        fit_stack([two_runs[0], tmp_path], tmp_path / "s")
    with pytest.raises(SoundtagError, match="not a stack folder"):
        Stacker(tmp_path)


def constructed_scores(clips: int = 400, classes: int = 6, seed: int = 0):
    """Two runs' scores: run A knows classes 0-2 and is lost on the others; run B
    knows 3-5 and confidently names the next class for 0-2. Their mean is misled
    on half the classes; a stacker can learn whom to trust."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, clips)
    y = np.eye(classes, dtype=np.float32)[label]
    a = rng.dirichlet(np.ones(classes), clips).astype(np.float32)
    b = rng.dirichlet(np.ones(classes), clips).astype(np.float32)
    low = label < classes // 2
    a[low] = 0.1 * a[low] + 0.9 * y[low]
    b[~low] = 0.1 * b[~low] + 0.9 * y[~low]
    b[low] = 0.1 * b[low] + 0.9 * np.eye(classes, dtype=np.float32)[(label[low] + 1) % classes]
    return np.concatenate([a, b], axis=1), y


def test_a_stack_beats_the_mean_of_its_members_on_constructed_scores():
    x, y = constructed_scores()
    figures = cross_validate(x, y, 2, multilabel=False, hidden=32, epochs=200)
    assert figures["mean_of_runs"] < 0.9
    assert figures["stack_cv"] >= figures["mean_of_runs"] + 0.05
    assert figures["stack_cv"] > 0.95


def test_a_stack_moved_with_its_runs_still_predicts(two_runs, tmp_path):
    place = tmp_path / "place"
    copies = [shutil.copytree(r, place / r.name) for r in two_runs]
    fit_stack(copies, place / "stack", epochs=20)
    moved = tmp_path / "moved"
    place.rename(moved)
    stacker = Stacker(moved / "stack")
    assert [p.resolve() for p in stacker.runs] == [(moved / r.name).resolve() for r in two_runs]
    files = sorted((DEMO / "audio_test").glob("*.ogg"))[:2]
    scores, errors = Tagger.load([moved / "stack"]).tag_files(files, workers=1, progress=False)
    assert not errors and np.isfinite(scores).all()


def test_a_stack_is_an_ensemble_member_with_its_weight(two_runs, tmp_path):
    fit_stack(two_runs, tmp_path / "stack", epochs=20)
    files = sorted((DEMO / "audio_test").glob("*.ogg"))[:4]
    stacked = Tagger.load([tmp_path / "stack"]).tag_files(files, workers=1, progress=False)[0]
    single = Tagger.load([two_runs[0]]).tag_files(files, workers=1, progress=False)[0]
    both = Tagger.load([tmp_path / "stack", two_runs[0]], weights=[3, 1])
    scores, embeddings, errors = both.score_files(files, workers=1, progress=False)
    np.testing.assert_allclose(scores, 0.75 * stacked + 0.25 * single, atol=1e-5)
    assert not errors and embeddings.shape[0] == 4 and np.isfinite(embeddings).all()
