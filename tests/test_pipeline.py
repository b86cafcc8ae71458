"""The staged warm-up pipeline: per-clip lwlrap, the selectors on constructed
scores, its settings, and one tiny pipeline on the bundled multi-label demo
set (curated + noisy): its stages, clips, report and ensemble, then resuming
it after a stage is removed or left unfinished."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import label_ranking_average_precision_score

from helpers import MULTI, PNG_MAGIC, RECIPE_TINY, error_line, warm_cache
from soundtag import cli, config, datasets, metrics, pipeline, predict
from soundtag.clips import ClipTable
from soundtag.errors import ConfigError
from soundtag.library.engine import backend_for, model_id
from soundtag.pipeline import PipelineConfig, above, agreement, cap_per_class, select_noisy, strict
from soundtag.run import Run
from soundtag.scorer import load_scorer

SETTINGS = {"threshold": 0.3, "per_class": 3, "weights": [1.0, 2.0, 1.0]}


def test_lwlrap_per_clip_is_each_clips_label_ranking_precision():
    truth = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.2], [0.8, 0.1, 0.5], [0.3, 0.2, 0.1], [0.2, 0.3, 0.1]])
    got = metrics.lwlrap_per_clip(truth, scores)
    # clip 0: its label on top; clip 1: labels at ranks 2 (1 of 2 above) and 3 (2 of 3); clip 2: ranks 1 and 3
    np.testing.assert_allclose(got[:3], [1.0, (1 / 2 + 2 / 3) / 2, (1 + 2 / 3) / 2])
    assert np.isnan(got[3])
    for i in range(3):
        assert got[i] == pytest.approx(label_ranking_average_precision_score(truth[i:i + 1], scores[i:i + 1]))


def test_selectors_on_constructed_scores():
    lwlraps = np.array([[1.0, 0.25, 0.5, 1.0, np.nan],
                        [1.0, 1.0, 0.5, 0.5, 1.0]])
    np.testing.assert_allclose(agreement(lwlraps)[:4], [1.0, 0.5, 0.5, np.sqrt(0.5)])
    assert np.isnan(agreement(lwlraps)[4])
    assert above(agreement(lwlraps), 0.5).tolist() == [True, True, True, True, False]
    assert above(agreement(lwlraps), 0.6).tolist() == [True, False, False, True, False]
    assert strict(lwlraps).tolist() == [True, False, False, False, False]


def test_cap_per_class_takes_the_best_while_every_class_of_a_clip_has_room():
    targets = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 0], [0, 1]], np.float32)
    score = np.array([0.9, 0.8, 0.7, 0.6, 1.0, 0.6])
    eligible = np.ones(6, bool)
    # best first: clip 4 has no class; clips 0 and 1 fill A; clip 2 (A and B) finds A full; clips 3, 5 take B
    assert cap_per_class(targets, score, eligible, 2).tolist() == [True, True, False, True, False, True]
    assert cap_per_class(targets, score, eligible, 1).tolist() == [True, False, False, True, False, False]
    assert cap_per_class(targets, score, eligible, 3).tolist() == [True, True, True, True, False, True]
    assert not cap_per_class(targets, score, ~eligible, 5).any()
    # clips 3 and 5 tie: the earlier first
    assert cap_per_class(targets, score, np.array([0, 0, 0, 1, 0, 1], bool), 1).tolist() == [0, 0, 0, 1, 0, 0]


def test_select_noisy_applies_stage_3_or_stage_4_rule_then_the_cap():
    targets = np.eye(2, dtype=np.float32)[[0, 0, 0, 1]]
    lwlraps = np.array([[1.0, 1.0, 0.5, 0.5], [1.0, 0.5, 0.5, 1.0]])
    assert select_noisy(lwlraps, targets, 0.5, 10).tolist() == [True, True, True, True]
    assert select_noisy(lwlraps, targets, 0.6, 10).tolist() == [True, True, False, True]
    assert select_noisy(lwlraps, targets, 0.5, 1).tolist() == [True, False, False, True]
    assert select_noisy(lwlraps, targets, None, 10).tolist() == [True, False, False, False]


def test_selected_clips_train_in_the_folds_that_chose_them(tmp_path: Path):
    noisy = ClipTable(["a", "b"], True, ["/n/0.wav", "/n/1.wav", "/n/2.wav"], ["0.wav", "1.wav", "2.wav"],
                      np.array([[1, 0], [0, 1], [1, 1]], np.float32), np.full(3, -1), np.ones(3, np.float32),
                      np.full(3, "noisy", "<U10"))
    fit = pd.DataFrame({"fold": [0, 0, 0, 1, 1, 1], "row": [0, 1, 2] * 2, "fname": noisy.names * 2,
                        "lwlrap_stage1": [1.0, 1.0, np.nan, 1.0, 0.2, 1.0],  # clip 2 unreadable for fold 0
                        "lwlrap_stage2": [1.0, 0.5, 1.0, 0.5, 0.2, 1.0]})
    fit = pipeline.cached_frame(tmp_path / "fit.csv", lambda: fit)  # through the file, NaN and all
    picked = pipeline.selected_clips(noisy, fit, 0.6, 10)
    assert picked.names == ["0.wav", "1.wav", "2.wav"] and picked.train_folds == [(0, 1), (0,), (1,)]
    assert set(picked.origin) == {"selected"} and (picked.fold == -1).all()
    strictly = pipeline.selected_clips(noisy, fit, None, 10)
    assert strictly.names == ["0.wav", "2.wav"] and strictly.train_folds == [(0,), (1,)]


def test_settings_are_checked_before_anything_trains(tmp_path: Path):
    base = config.resolve("fast", overrides=RECIPE_TINY)
    for bad, message in [({"threshold": 1.5}, "threshold"), ({"weights": [1, 1]}, "weights"),
                         ({"mean": "median"}, "mean"), ({"stages": {"stage5": {}}}, "stage5"),
                         ({"stages": {"stage2": {"folds": 3}}}, "set by the pipeline"),
                         ({"stages": {"stage3": {"epochs": 0}}}, "stages.stage3"),
                         ({"stages": {"stage1": {"modle": "vgg"}}}, "modle")]:
        with pytest.raises(ConfigError, match=message):
            PipelineConfig(**{**SETTINGS, **bad}).validate(base)
    path = tmp_path / "pipeline.yaml"
    path.write_text("threshold: high\n")
    with pytest.raises(ConfigError, match="pipeline.yaml.*threshold"):
        pipeline.load_settings(PipelineConfig, path)
    stage3 = PipelineConfig(stages={"stage3": {"epochs": 7}}).stage_config(base, "stage3")
    assert (stage3.epochs, stage3.folds, stage3.train_folds) == (7, "own", [0])


def test_a_recipe_saved_before_an_option_existed_still_resumes_and_other_settings_do_not(tmp_path: Path):
    data, base = datasets.read(MULTI), config.resolve("fast", overrides=RECIPE_TINY)
    folder = pipeline.open_recipe(tmp_path / "recipe", "pipeline", PipelineConfig(), base, data)
    saved = yaml.safe_load((folder / "recipe.yaml").read_text())
    del saved["train"]["tta"], saved["settings"]["mean"]  # as a version without those options wrote it
    (folder / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert pipeline.open_recipe(folder, "pipeline", PipelineConfig(), base, data) == folder
    with pytest.raises(pipeline.RunError, match="other settings"):
        pipeline.open_recipe(folder, "pipeline", PipelineConfig(per_class=50), base, data)


def test_a_mistake_in_the_settings_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = tmp_path / "pipeline.yaml"
    path.write_text("per_class: 0\n")
    assert cli.main(["pipeline", str(MULTI), "--out", str(tmp_path / "p"), "--config", str(path)]) == 2
    assert "per_class" in error_line(capsys)
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny pipeline's settings and training config."""
    folder = tmp_path_factory.mktemp("pipeline-config")
    (folder / "pipeline.yaml").write_text(yaml.safe_dump({**SETTINGS, "stages": {"stage4": {"seed": 4}}}))
    (folder / "train.yaml").write_text(yaml.safe_dump(RECIPE_TINY))
    return folder / "pipeline.yaml", folder / "train.yaml"


def run_cli(out: Path, files: tuple[Path, Path], *extra: str) -> int:
    return cli.main(["pipeline", str(MULTI), "--out", str(out), "--config", str(files[0]),
                     "--train-config", str(files[1]), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, files: tuple[Path, Path]) -> Path:
    """A tiny pipeline, trained once through the command line (read-only)."""
    warm_cache(datasets.read(MULTI).files, config.resolve("fast", files[1]).features)
    out = tmp_path_factory.mktemp("pipeline") / "pipe"
    assert run_cli(out, files) == 0
    return out


def test_pipeline_stages_train_on_their_clips(trained: Path):
    table = pd.read_csv(trained / "clips.csv", keep_default_na=False)
    curated, noisy = table[table.origin == "curated"], table[table.origin == "noisy"]
    assert len(noisy) == 80 and (noisy.fold == -1).all() and {0, 1} <= set(curated.fold) <= {-1, 0, 1}
    runs = {name: Run.open(trained / name) for name in pipeline.STAGES}
    stage1 = runs["stage1"].read_clips()
    trains_0 = stage1.training(0)
    assert set(stage1.origin[trains_0]) == {"noisy"} and trains_0.sum() == 80
    held = pd.read_csv(trained / "stage1" / "oof.csv")  # stage 1 is validated on curated clips of fold 0
    assert set(held.fname) == set(curated.fname[curated.fold == 0])
    for name in ("stage2", "stage3", "stage4"):
        assert set(pd.read_csv(trained / name / "oof.csv").fname) == set(held.fname)
    assert [runs[n].init_folder.resolve() for n in ("stage2", "stage3", "stage4")] == \
        [(trained / n).resolve() for n in ("stage1", "stage2", "stage3")]
    assert set(runs["stage2"].read_clips().origin) == {"curated"}

    fit = pd.read_csv(trained / pipeline.SELECTION)
    assert set(fit.fold) == {0} and len(fit) == 80
    noisy_targets = stage1.targets[stage1.origin == "noisy"]
    lwlraps = fit[["lwlrap_stage1", "lwlrap_stage2"]].to_numpy().T
    for name, threshold in (("stage3", SETTINGS["threshold"]), ("stage4", None)):
        clips = runs[name].read_clips()
        selected = clips.origin == "selected"
        expected = fit.fname[select_noisy(lwlraps, noisy_targets, threshold, SETTINGS["per_class"])]
        assert sorted(np.array(clips.names)[selected]) == sorted(expected)
        assert all(f == (0,) for f, s in zip(clips.train_folds, selected) if s)
        assert (clips.fold[selected] == -1).all()
        assert clips.targets[selected].sum(0).max() <= SETTINGS["per_class"]
    assert runs["stage3"].read_clips().origin.tolist().count("selected") > 0
    assert runs["stage4"].config.seed == 4 and runs["stage3"].config.seed == 0


def test_pipeline_report_and_ensemble_that_predicts(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    report = (trained / "report.md").read_text()
    for name in pipeline.STAGES:
        summary = Run.open(trained / name).summary()
        assert f"| {name} |" in report and f"{summary['oof']['lwlrap']:.4f}" in report
    assert "| Violin_or_fiddle |" in report and "stage3 selected fold 0" in report
    assert (trained / "report.png").read_bytes()[:8] == PNG_MAGIC

    clips = datasets.read(MULTI).subset("test").files[:4]
    scores, errors = predict.Tagger.load([trained]).tag_files(clips, progress=False)
    members = [predict.Tagger(load_scorer(trained / n)).tag_files(clips, progress=False)[0]
               for n in ("stage2", "stage3", "stage4")]
    assert not errors
    np.testing.assert_allclose(scores, (members[0] + 2 * members[1] + members[2]) / 4, rtol=1e-5)
    out = tmp_path / "tags.csv"
    assert cli.main(["predict", str(trained), str(MULTI / "test"), "--out", str(out), "--threads", "1"]) == 0
    assert len(pd.read_csv(out)) == 40

    # a library or service of the folder: torch (no ONNX export), named by its stages' weights too
    assert backend_for([trained], "auto") == "torch"
    moved = shutil.copytree(trained, tmp_path / "moved")
    assert model_id([moved], "torch") == model_id([trained], "torch").replace("pipe:", "moved:")
    shutil.copy(moved / "stage2" / "fold0" / "model.safetensors", moved / "stage3" / "fold0" / "model.safetensors")
    assert model_id([moved], "torch") != model_id([trained], "torch").replace("pipe:", "moved:")


def test_pipeline_resumes_at_its_unfinished_stage(trained: Path, files: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture):
    out = shutil.copytree(trained, tmp_path / "pipe")

    def stamps() -> dict[str, int]:
        return {n: (out / n / "fold0" / "model.safetensors").stat().st_mtime_ns for n in pipeline.STAGES}

    before = stamps()
    (out / "stage3" / "summary.json").unlink()  # interrupted after its last epoch
    assert run_cli(out, files) == 0
    after = stamps()
    # stage 3 resumed from its checkpoint (no epoch left to train); stage 4, built on it, trained afresh
    assert [after[n] == before[n] for n in pipeline.STAGES] == [True, True, True, False]
    assert (out / "stage3" / "summary.json").is_file() and "| stage4 |" in capsys.readouterr().out

    other = files[0].with_name("other.yaml")
    other.write_text(yaml.safe_dump({**SETTINGS, "threshold": 0.9}))
    assert run_cli(out, (other, files[1])) == 2
    assert "other settings" in error_line(capsys)
