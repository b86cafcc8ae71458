"""Summary statistics, their PCA projection, the classical `summary` model (the
`baseline` preset) and the `fused` CNN: values on generated signals, batch against
clip, the variance PCA keeps, fitting on the fold's training clips only, saving,
scoring, ONNX, and two-stage training (`--init` of a plain run into the fused
model's backbone)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import DEMO, MULTI, TINY, copy_run, held_out, shared_run, spec_of, warm_cache
from safetensors.torch import load_file

from soundtag import config, datasets, features, models, train
from soundtag.cli import main
from soundtag.config import merge
from soundtag.errors import ConfigError
from soundtag.export import export
from soundtag.features import FeatureConfig
from soundtag.run import Run, RunError
from soundtag.scorer import load_scorer
from soundtag.store import extract
from soundtag.summary import Projection, SummaryStatistics, clip_statistics

pytestmark = [pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),  # ONNX constant folding of the delta layer
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

RATE = 22050
FRONT = FeatureConfig(sample_rate=RATE, n_fft=1024, hop_length=256, trim_db=None)
BASELINE = {"threads": 1, "features": TINY["features"]}  # the demo front end other tests cache
FUSED = {"name": "fused", "params": {"backbone": "cnn6", "backbone_params": {"width": 0.125, "dropout": 0.2}}}


def logmel(wave: np.ndarray, cfg: FeatureConfig = FRONT) -> torch.Tensor:
    return torch.from_numpy(features.compute(wave.astype(np.float32), cfg))[None, None]


def tone(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * RATE)) / RATE)


def noise(seconds: float = 1.0, amplitude: float = 0.3, seed: int = 0) -> np.ndarray:
    return amplitude * np.random.default_rng(seed).uniform(-1, 1, int(seconds * RATE))


@pytest.fixture(scope="module")
def stats() -> SummaryStatistics:
    return SummaryStatistics(FRONT)


def values(stats: SummaryStatistics, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        return dict(zip(stats.names(), stats(x)[0].tolist()))


# ------------------------------------------------------------------ statistics


def test_the_vector_has_a_name_for_each_value_and_is_finite_down_to_one_frame(stats):
    assert stats.dims == len(stats.names()) == len(set(stats.names())) == 2 * 64 + 3 * 20 + 2 * 11
    for frames in (1, 2, 50):
        out = stats(logmel(noise())[..., :frames])
        assert out.shape == (1, stats.dims) and torch.isfinite(out).all()


@pytest.mark.parametrize("freq", [440.0, 1000.0, 4000.0])
def test_a_pure_tone_has_its_frequency_as_centroid_and_roll_off(stats, freq):
    v = values(stats, logmel(tone(freq)))
    assert v["centroid_mean"] == pytest.approx(freq, rel=0.1)
    assert v["rolloff_mean"] == pytest.approx(freq, rel=0.15)
    assert v["centroid_std"] < 0.05 * freq  # steady
    white = values(stats, logmel(noise()))
    assert v["bandwidth_mean"] < 0.2 * white["bandwidth_mean"]
    assert v["flatness_mean"] < 0.01 < 0.3 < white["flatness_mean"]
    assert min(v[f"contrast{i}_mean"] for i in range(6)) < 20 < 60 < max(v[f"contrast{i}_mean"] for i in range(6))


def test_a_higher_tone_has_a_higher_centroid_and_white_noise_sits_high(stats):
    low, high, white = (values(stats, logmel(w))["centroid_mean"] for w in (tone(500), tone(2000), noise()))
    assert low < high < white and white > 3000


def test_loudness_moves_the_energy_and_band_levels_but_not_the_spectral_shape(stats):
    loud, quiet = values(stats, logmel(noise())), values(stats, logmel(0.1 * noise()))
    assert loud["rms_db_mean"] - quiet["rms_db_mean"] == pytest.approx(20, abs=0.05)
    assert loud["band10_mean"] - quiet["band10_mean"] == pytest.approx(20, abs=0.05)
    for name in ("centroid_mean", "bandwidth_mean", "rolloff_mean", "flatness_mean", "contrast3_mean",
                 "band10_std", "mfcc3_delta"):
        assert loud[name] == pytest.approx(quiet[name], rel=1e-3, abs=1e-3), name


def test_a_steady_tone_has_deltas_only_at_its_ends_and_a_pulsing_one_throughout(stats):
    steady = values(stats, logmel(tone(1000, 3.0)))
    gate = (np.arange(3 * RATE) // 2205) % 2  # on and off every 0.1 s
    pulsing = values(stats, logmel(tone(1000, 3.0) * gate + 1e-4 * noise(3.0)))
    assert pulsing["mfcc0_delta"] > 20 * steady["mfcc0_delta"]
    assert pulsing["rms_db_std"] > 20 > 1 > steady["rms_db_std"]


def test_a_batch_gives_what_each_clip_gives_alone(stats):
    clips = [logmel(noise(0.5, seed=s) * (s + 1) / 4)[0, 0] for s in range(3)] + [logmel(tone(800, 0.5))[0, 0]]
    with torch.no_grad():
        batch = stats(torch.stack(clips)[:, None])
        alone = torch.cat([stats(c[None, None]) for c in clips])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-4)


def test_whole_clip_statistics_of_mixed_lengths_equal_one_clip_at_a_time(stats):
    specs = [logmel(noise(s, seed=i))[0, 0].numpy() for i, s in enumerate((0.3, 0.5, 0.3, 0.9, 0.5, 0.3))]
    lengths = np.array([s.shape[1] for s in specs])
    grouped = clip_statistics(stats, specs.__getitem__, lengths, batch_size=2)
    with torch.no_grad():
        alone = np.concatenate([stats(torch.from_numpy(s)[None, None]).numpy() for s in specs])
    np.testing.assert_allclose(grouped, alone, rtol=1e-5, atol=1e-4)


def test_the_centres_follow_the_front_end():
    narrow = SummaryStatistics(FeatureConfig(sample_rate=RATE, n_fft=1024, hop_length=256, fmax=4000.0))
    assert float(narrow.centres.max()) < 4000 < float(SummaryStatistics(FRONT).centres.max())


# ------------------------------------------------------------------ PCA


def correlated(n: int = 400, dims: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)) @ rng.normal(size=(4, dims)) + 0.3 * rng.normal(size=(n, dims)) + 5


@pytest.mark.parametrize("share", [0.5, 0.8, 0.97])
def test_pca_keeps_the_fewest_components_that_explain_the_asked_share(share):
    data = correlated()
    projection = Projection(data.shape[1])
    projection.fit(data, share)
    k = projection.kept
    standard = (data - data.mean(0)) / data.std(0)
    directions = projection.components[:k].double().numpy()
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    spread = (standard @ directions.T).var(0) / standard.var(0).sum()
    assert 0 < k < data.shape[1]
    assert spread.sum() >= share > spread[:-1].sum()
    with torch.no_grad():
        z = projection(torch.from_numpy(data).float()).double().numpy()
    assert np.allclose(z[:, k:], 0) and z[:, :k].var(0, ddof=1).mean() == pytest.approx(1, rel=1e-4)
    assert np.allclose(z.mean(0), 0, atol=1e-4)


def test_pca_of_all_the_variance_keeps_every_component():
    data = correlated()
    projection = Projection(data.shape[1])
    projection.fit(data, 1.0)
    assert projection.kept == data.shape[1]


@pytest.mark.parametrize("params, words", [
    ({"pca_variance": 0}, "pca_variance"), ({"pca_variance": 1.5}, "pca_variance"),
    ({"pca_variance": "most"}, "pca_variance"), ({"C": 0}, "C (inverse regularisation)"),
    ({"n_mfcc": 65}, "n_mfcc"),
])
def test_bad_parameters_are_config_errors(params, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config.resolve("baseline", overrides={"model": {"params": params}})


@pytest.mark.parametrize("backbone", ["summary", "fused", "wavecnn"])
def test_a_fused_backbone_must_be_a_spectrogram_network(backbone):
    with pytest.raises(ConfigError, match=f"fused parameter backbone must be a spectrogram network, not '{backbone}'"):
        config.resolve("fast", overrides={"model": {"name": "fused", "params": {"backbone": backbone}}})


@pytest.mark.parametrize("name", ["summary", "fused"])
def test_the_statistics_need_log_mel_features(name):
    with pytest.raises(ConfigError, match="log-mel features, not features of kind 'mfcc'"):
        config.resolve("baseline", overrides={"model": {"name": name}, "features": {"kind": "mfcc"}})


# ------------------------------------------------------------------ the classical model


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Run:
    """The baseline preset on the demo set: all five folds."""
    cfg = config.resolve("baseline", overrides=BASELINE)
    warm_cache(datasets.read(DEMO).subset("train").files, cfg.features)
    return train.train(datasets.read(DEMO), cfg, tmp_path_factory.mktemp("baseline") / "run", progress=False)


def test_the_baseline_fits_every_fold_and_beats_chance_out_of_fold(baseline):
    assert baseline.trained_folds() == [0, 1, 2, 3, 4]
    summary = baseline.summary()
    chance = sum(1 / r for r in (1, 2, 3)) / len(baseline.classes)
    assert summary["oof_clips"] == len(baseline.read_clips().names)
    assert summary["oof"]["map@3"] > max(0.5, 5 * chance)
    for k in baseline.trained_folds():
        history = baseline.history(k)
        assert history.epoch.tolist() == [1] and history.train_loss[0] < history.val_loss[0]
        assert summary["folds"][str(k)]["best_epoch"] == 1


def test_the_baseline_is_saved_as_tensors_and_scores_new_clips_through_the_scorer(baseline):
    weights = load_file(str(baseline.folder / "fold0" / "model.safetensors"))
    assert set(weights) == {"summary.projection.mean", "summary.projection.scale", "summary.projection.components",
                            "head.weight", "head.bias"}
    model = baseline.load_model(0)
    assert 0 < model.summary.projection.kept < model.summary.dims
    test = held_out(DEMO)
    scorer = load_scorer(baseline.folder, threads=1)
    specs = [spec_of(f, baseline.config.features) for f in test.files]
    scores, embeddings = scorer.score([{baseline.config.features: s} for s in specs])
    assert scores.shape == (len(test.files), len(baseline.classes)) and embeddings.shape[1] == model.summary.dims
    truth = datasets.read(DEMO).subset("test")
    truth = truth.select(truth.labelled).targets
    top = scores.argmax(1) == truth.argmax(1)
    assert top.mean() > 0.4  # 23 classes


def test_evaluate_works_on_a_baseline_run(baseline, tmp_path, capsys):
    assert main(["evaluate", str(baseline.folder), str(DEMO), "--out", str(tmp_path), "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("test: 92 clips, lwlrap ")
    assert (tmp_path / "metrics.json").is_file()


def cached_statistics(run: Run) -> np.ndarray:
    """Whole-clip statistics of a run's clips from the feature cache, as training computes them."""
    cached = extract(run.read_clips().files, run.config.features, progress=False)
    return clip_statistics(SummaryStatistics(run.config.features), cached.__getitem__, cached.frames)


def test_the_projection_is_fitted_on_each_folds_training_clips_only(baseline):
    table = baseline.read_clips()
    stats = cached_statistics(baseline)
    means = []
    for k in (0, 1):
        trained = table.training(k)
        mean = load_file(str(baseline.folder / f"fold{k}" / "model.safetensors"))["summary.projection.mean"]
        np.testing.assert_allclose(mean.numpy(), stats[trained].mean(0), rtol=1e-3, atol=1e-3)
        assert not np.allclose(mean.numpy(), stats.mean(0), rtol=1e-3, atol=1e-3)
        means.append(mean)
    assert not torch.equal(*means)


def test_the_baseline_exports_to_onnx_and_matches_torch(baseline, tmp_path):
    run = copy_run(baseline.folder, tmp_path / "run")
    path = export(run)[0]
    model = Run.open(run).load_model(0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for f, frames in zip(held_out(DEMO).files[:3], (1, 37, 200)):
        x = spec_of(f, baseline.config.features)[None, None, :, :frames].astype(np.float32)
        logits, embedding = session.run(["logits", "embedding"], {"logmel": x})
        with torch.no_grad():
            ref_logits, ref_embedding = model(torch.from_numpy(x))
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(embedding, ref_embedding.numpy(), rtol=1e-3, atol=1e-3)


def test_resuming_a_baseline_run_fits_the_same_weights_again(baseline, tmp_path):
    run = copy_run(baseline.folder, tmp_path / "run")
    (run / "fold3" / "model.safetensors").unlink()
    train.resume(run, progress=False)
    for k in baseline.trained_folds():
        again = load_file(str(run / f"fold{k}" / "model.safetensors"))
        assert all(torch.equal(t, again[n]) for n, t in baseline.weights(k).items()), k


def test_a_multi_label_baseline_fits_one_model_a_class(tmp_path):
    cfg = config.resolve("baseline", overrides={**BASELINE, "folds": 4, "train_folds": [0]})
    warm_cache(datasets.read(MULTI).subset("train").files, cfg.features)
    run = train.train(datasets.read(MULTI), cfg, tmp_path / "run", progress=False)
    assert run.multilabel
    oof = run.summary()["oof"]
    assert oof["lwlrap"] > 3 * (1 / len(run.classes)) and oof["lwlrap"] > 0.3


# ------------------------------------------------------------------ the fused model


def test_the_fused_model_joins_the_backbone_embedding_and_the_statistics():
    model = models.create_model("fused", 5, FRONT, n_mels=64, backbone="cnn6", backbone_params={"width": 0.125})
    x = logmel(noise())
    model.eval()
    logits, embedding = model(x.repeat(3, 1, 1, 1))
    assert logits.shape == (3, 5) and embedding.shape == (3, 64 + model.summary.dims)
    assert model.head.in_features == embedding.shape[1]
    assert not any(n.startswith("backbone.head.") for n in model.state_dict())
    aux = models.create_model("fused", 5, FRONT, n_mels=64, backbone="auxcnn", backbone_params={"width": 0.125})
    logits, embedding, heads = aux.train()(x.repeat(2, 1, 1, 1))
    assert logits.shape == (2, 5) and [w for w, _ in heads] == [0.1, 0.2, 0.4]
    assert all(h.shape == (2, 5) for _, h in heads)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Run:
    return Run.open(shared_run(tmp_path_factory, "cnn6"))


def fused_config(**changes) -> config.TrainConfig:
    return config.resolve("fast", overrides=merge(TINY, {"model": FUSED, **changes}))


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory) -> Run:
    """A fused run started from the plain cnn6 run, trained with a negligible learning rate."""
    cfg = fused_config(epochs=1, epoch_clips=32, optim={"lr": 1e-12}, bf16=True)
    out = tmp_path_factory.mktemp("fused") / "run"
    return train.train(datasets.read(DEMO), cfg, out, init=stage1.folder, progress=False)


def test_init_from_a_plain_run_loads_its_weights_into_the_backbone(stage1):
    model = fused_config().create_model(len(stage1.classes))
    fresh_head = model.head.weight.detach().clone()
    train.load_init(model, stage1.folder, 0, stage1.classes)
    source = stage1.weights(0)
    state = model.state_dict()
    for name, tensor in source.items():
        if not name.startswith("head."):
            assert torch.equal(state[f"backbone.{name}"], tensor), name
    assert torch.equal(model.head.weight, fresh_head)


def test_a_two_stage_run_trains_its_backbone_from_the_first_stage(stage1, stage2):
    trained = stage2.weights(0)
    source = stage1.weights(0)
    for name, _ in stage2.new_model().backbone.named_parameters():
        torch.testing.assert_close(trained[f"backbone.{name}"], source[name], atol=1e-8, rtol=0)
    assert stage2.init_folder.resolve() == stage1.folder.resolve()
    assert 0 < stage2.load_model(0).summary.projection.kept < stage2.load_model(0).summary.dims


def test_the_fused_projection_is_fitted_on_the_fold_training_clips(stage2):
    table = stage2.read_clips()
    train_mask, select, _ = train.fold_clips(table, 0, stage2.config)
    stats = cached_statistics(stage2)
    mean = stage2.weights(0)["summary.projection.mean"].numpy()
    np.testing.assert_allclose(mean, stats[train_mask].mean(0), rtol=1e-3, atol=1e-3)
    assert not np.allclose(mean, stats[train_mask | select].mean(0), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model", [
    {"name": "fused", "params": {"backbone": "cnn6", "backbone_params": {"width": 0.25}}},
    {"name": "fused", "params": {"backbone": "cnn10", "backbone_params": {"width": 0.125}}},
])
def test_init_from_a_run_whose_network_differs_from_the_backbone_is_refused(stage1, model):
    target = config.resolve("fast", overrides=merge(TINY, {"model": model})).create_model(len(stage1.classes))
    with pytest.raises(RunError, match="does not match this config's"):
        train.load_init(target, stage1.folder, 0, stage1.classes)


def test_a_plain_model_cannot_start_from_a_fused_run(stage2):
    plain = config.resolve("fast", overrides=TINY).create_model(len(stage2.classes))
    with pytest.raises(RunError, match="does not match this config's"):
        train.load_init(plain, stage2.folder, 0, stage2.classes)


def test_a_fused_run_starts_another_fused_run_over_other_classes(stage2):
    target = fused_config().create_model(3)
    train.load_init(target, stage2.folder, 0, ["a", "b", "c"])
    source, state = stage2.weights(0), target.state_dict()
    assert state["head.weight"].shape[0] == 3
    for name, tensor in source.items():
        if name.startswith("backbone."):
            assert torch.equal(state[name], tensor), name


def test_the_fused_model_exports_to_onnx_and_matches_torch(stage2, tmp_path):
    run = copy_run(stage2.folder, tmp_path / "run")
    path = export(run)[0]
    model = Run.open(run).load_model(0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for f, frames in zip(held_out(DEMO).files[:3], (1, 37, 200)):
        x = spec_of(f, stage2.config.features)[None, None, :, :frames].astype(np.float32)
        logits, embedding = session.run(["logits", "embedding"], {"logmel": x})
        with torch.no_grad():
            ref_logits, ref_embedding = model(torch.from_numpy(x))
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(embedding, ref_embedding.numpy(), rtol=1e-3, atol=1e-3)


def test_the_fused_preset_is_the_fast_preset_around_the_fast_network():
    """So that a `fast` run initialises a `fused` run's backbone (the README's two commands)."""
    fast, fused = config.resolve("fast"), config.resolve("fused")
    assert fused.model.params["backbone"] == fast.model.name
    assert fused.model.params["backbone_params"] == fast.model.params
    assert {**fused.to_dict(), "model": None} == {**fast.to_dict(), "model": None}


def test_int8_export_keeps_the_statistics_in_float(baseline, tmp_path):
    """Quantised, the statistics lose the clip: the top class then agreed with float on about a quarter of clips."""
    run = copy_run(baseline.folder, tmp_path / "run")
    export(run, int8=True)
    float_net, int8_net = (ort.InferenceSession(str(p[0]), providers=["CPUExecutionProvider"])
                           for p in (Run.open(run).onnx_paths(), Run.open(run).onnx_int8_paths()))
    agree = []
    for f in held_out(DEMO).files[:20]:
        x = spec_of(f, baseline.config.features)[None, None].astype(np.float32)
        agree.append(float_net.run(["logits"], {"logmel": x})[0].argmax() ==
                     int8_net.run(["logits"], {"logmel": x})[0].argmax())
    assert np.mean(agree) >= 0.85
