"""The waveform front end and a raw-waveform model end to end: the store keeps
samples as frames, a 1-D CNN trains on them, exports to ONNX, and tags alone or
in an ensemble with a log-mel run."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import held_out, shared_run, spec_of, train_tiny

from soundtag import audio, config
from soundtag.errors import ConfigError
from soundtag.export import export
from soundtag.features import FeatureConfig, compute
from soundtag.predict import TTA, Tagger
from soundtag.run import Run
from soundtag.store import extract

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RATE = 8000
WAVE = {"features": {"kind": "waveform", "hop_length": 1, "sample_rate": RATE}, "epochs": 1,
        "model": {"name": "wavecnn", "params": {"width": 0.125}}}


def test_the_waveform_front_end_is_the_samples_one_frame_each():
    cfg = FeatureConfig(kind="waveform", hop_length=1, sample_rate=RATE)
    wave = np.random.default_rng(0).uniform(-1, 1, 1234).astype(np.float32)
    np.testing.assert_array_equal(compute(wave, cfg), wave[None])
    assert cfg.n_features == 1 and cfg.frames(1234) == 1234 and cfg.seconds(RATE) == 1.0
    assert cfg.max_frames == 48 * RATE and FeatureConfig().max_frames == 4096
    with pytest.raises(ConfigError, match=r"kind waveform are one frame a sample: set hop_length to 1 \(--hop-length 1\), not 512"):
        FeatureConfig(kind="waveform")


def test_the_stores_of_existing_front_ends_keep_their_keys():
    assert FeatureConfig().key() == "da79087715b2d415"
    assert config.resolve("fast").features.key() == "e857d8e47a567d33"
    assert config.resolve("kaggle2019").features.key() == "835568f59c7d29ad"


def test_the_store_keeps_waveforms(real_clips, cache_dir):
    cfg = FeatureConfig(kind="waveform", hop_length=1, sample_rate=RATE)
    files = sorted(real_clips.glob("*.wav"))[:3]
    store = extract(files, cfg, cache_dir, workers=1, dtype="float32", progress=False)
    for i, path in enumerate(files):
        wave = audio.load(path, RATE, cfg.trim_db)
        assert store.frames[i] == len(wave)
        np.testing.assert_array_equal(store[i], wave[None])


@pytest.fixture(scope="module")
def wave_run(tmp_path_factory) -> Run:
    return train_tiny(tmp_path_factory.mktemp("wave") / "run", **WAVE)


@pytest.fixture(scope="module")
def clips() -> list:
    return held_out().files[:6]


def test_a_waveform_model_trains_and_tags_whole_clips_and_crops(wave_run, clips):
    assert wave_run.config.features.kind == "waveform" and (wave_run.folder / "oof.npy").is_file()
    for tta in (TTA("full"), TTA("crops", lengths=(0.5, 1.0), offsets=2)):
        scores, errors = Tagger.load([wave_run.folder], tta=tta).tag_files(clips, workers=1, progress=False)
        assert errors == {} and scores.shape == (len(clips), len(wave_run.classes))
        np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)
    crops = TTA("crops", lengths=(0.5,), offsets=1)
    spec = spec_of(clips[0], wave_run.config.features)
    (view,) = crops.views(spec, RATE)
    assert view.shape == (1, 1, 1, RATE // 2)  # half a second of samples


def test_an_ensemble_mixes_a_waveform_run_and_a_log_mel_run(wave_run, clips, tmp_path_factory):
    logmel = shared_run(tmp_path_factory, "cnn6")
    members = [Tagger.load([folder]) for folder in (wave_run.folder, logmel)]
    both = Tagger.load([wave_run.folder, logmel])
    assert {c.kind for c in both.feature_configs} == {"waveform", "logmel"}
    alone = [m.score_files(clips, workers=1, progress=False) for m in members]
    scores, embeddings, errors = both.score_files(clips, workers=1, progress=False)
    assert errors == {}
    np.testing.assert_allclose(scores, (alone[0][0] + alone[1][0]) / 2, atol=1e-6)
    assert embeddings.shape[1] == alone[0][1].shape[1] + alone[1][1].shape[1]


def test_a_waveform_run_exports_with_a_dynamic_sample_axis(wave_run, clips):
    (path,) = export(wave_run.folder)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (wave,) = session.get_inputs()
    assert wave.shape[1:3] == [1, 1] and isinstance(wave.shape[3], str)
    model = wave_run.load_model(0)
    for clip in clips[:3]:
        x = spec_of(clip, wave_run.config.features)[None, None].astype(np.float32)
        logits, embedding = session.run(["logits", "embedding"], {"logmel": x})
        with torch.inference_mode():
            ref_logits, ref_embedding = model(torch.from_numpy(x))
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4)
    on_onnx, _ = Tagger.load([wave_run.folder], backend="onnx", threads=1).tag_files(clips, workers=1, progress=False)
    on_torch, _ = Tagger.load([wave_run.folder]).tag_files(clips, workers=1, progress=False)
    np.testing.assert_allclose(on_onnx, on_torch, atol=1e-4)
