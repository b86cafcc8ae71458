"""Second-level stacking over several runs' out-of-fold scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import DEMO, train_tiny

from soundtag import cli
from soundtag.errors import SoundtagError
from soundtag.predict import Tagger
from soundtag.run import RunError
from soundtag.stack import Stacker, fit_stack, oof_table

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
    assert info["runs"] == [str(r) for r in two_runs]
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
