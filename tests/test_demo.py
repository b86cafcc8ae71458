"""`soundtag demo` on the bundled demo set: trains the fast preset for one epoch,
evaluates it on the held-out split and tags a few clips. Run once for the module."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from helpers import DEMO, PNG_MAGIC

from soundtag import demo
from soundtag.cli import main
from soundtag.config import TrainConfig
from soundtag.errors import DataError
from soundtag.predict import Tagger
from soundtag.run import Run


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, private_cache):
    """(figures, output folder, what it printed) of one demo run (about 5 s on 2 cores;
    timing targets belong in bench/, not here)."""
    out = tmp_path_factory.mktemp("demo") / "demo-run"
    printed = io.StringIO()
    # the demo trains on up to 2 torch threads; one is as fast for this small network and
    # far faster on a busy machine (see helpers.TINY)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(TrainConfig, "num_threads", lambda self: 1)
        result = demo.run_demo(out, epochs=1)
    return result, out, printed.getvalue()


def test_the_demo_uses_the_bundled_set():
    assert demo.BUNDLED.resolve() == DEMO.resolve()


def test_the_demo_returns_test_figures(demo_run):
    result = demo_run[0]
    assert result["split"] == "test" and result["clips"] == 92 and result["skipped"] == {}
    for key in ("map@3", "lwlrap", "accuracy"):
        assert 0 <= result[key] <= 1
    assert len(result["per_class"]) == 23


def test_the_demo_prints_its_steps_and_the_run_path(demo_run):
    result, out, printed = demo_run
    lines = printed.splitlines()
    assert lines[0].startswith("demo set: 276 training and 92 test clips, 23 classes")
    assert f"run: {out / 'run'}" in lines
    assert f"evaluation plots: {out / 'evaluation'}" in lines
    assert f"test split: 92 clips, MAP@3 {result['map@3']:.3f}" in printed
    tagged = lines[lines.index("tags of a few held-out clips:") + 1:][:5]
    assert len(tagged) == 5 and all(line.startswith("  dt") and "(true: " in line for line in tagged)


def test_the_demo_writes_a_usable_run(demo_run):
    folder = demo_run[1] / "run"
    for name in ("config.yaml", "run.json", "clips.csv", "summary.json", "summary.md", "thresholds.json",
                 "fold0/model.safetensors", "fold0/metrics.csv"):
        assert (folder / name).is_file(), name
    assert (folder / "curves.png").read_bytes()[:8] == PNG_MAGIC
    run = Run.open(folder)
    assert run.config.epochs == 1 and run.config.model.name == "cnn6" and not run.multilabel
    assert run.trained_folds() == [0]
    scores, errors = Tagger.load([folder]).tag_files([DEMO / "audio_test" / "dt000002.ogg"], workers=1,
                                                     progress=False)
    assert errors == {} and abs(float(scores.sum()) - 1) < 1e-4


def test_the_demo_writes_evaluation_plots(demo_run):
    result, out, _ = demo_run
    evaluation = out / "evaluation"
    assert json.loads((evaluation / "metrics.json").read_text()) == json.loads(json.dumps(result))
    for name in ("per_class_ap.png", "confusion.png"):
        assert (evaluation / name).read_bytes()[:8] == PNG_MAGIC


def test_the_demo_without_data_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="demo data not found"):
        demo.run_demo(tmp_path / "out", data=tmp_path / "nowhere", epochs=1)
    assert not (tmp_path / "out").exists()


def test_the_demo_command_reports_missing_data(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
