"""ONNX export (`soundtag.export`) and the ONNX Runtime backend: the files written,
ONNX Runtime against torch on real clips of lengths other than the export
length, fold ensembles on both backends, and the errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from helpers import copy_run, held_out, shared_run, spec_of
from safetensors.torch import load_file, save_file

from soundtag.cli import main
from soundtag.errors import ConfigError
from soundtag.export import export
from soundtag.predict import TTA, Tagger
from soundtag.task import Task
from soundtag.run import Run, RunError


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def one_thread() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


@pytest.fixture(scope="module", params=["cnn6", "mobilenet"])
def exported(request, tmp_path_factory, private_cache):
    """A copy of a tiny run, exported to ONNX; (run folder, paths export returned)."""
    run = copy_run(shared_run(tmp_path_factory, request.param), tmp_path_factory.mktemp("export") / "run")
    return run, export(run)


@pytest.fixture(scope="module")
def clips() -> list:
    return held_out().files[:10]


@pytest.fixture(scope="module")
def real_specs(exported, clips) -> list[np.ndarray]:
    """Features of real clips at their own lengths (none of them 200 frames)."""
    cfg = Run.open(exported[0]).config.features
    specs = [spec_of(f, cfg) for f in clips]
    assert len({s.shape[1] for s in specs}) >= 5 and all(s.shape[1] != 200 for s in specs)
    return specs


def test_export_writes_one_network_per_fold_and_nothing_else(exported):
    run_dir, paths = exported
    assert paths == [run_dir / "onnx" / "fold0.onnx"]
    assert paths[0].stat().st_size > 10_000
    assert sorted((run_dir / "onnx").iterdir()) == paths


def test_the_graph_takes_any_batch_and_length(exported):
    session = ort.InferenceSession(str(exported[1][0]), one_thread(), providers=["CPUExecutionProvider"])
    (logmel,) = session.get_inputs()
    assert logmel.name == "logmel"
    assert isinstance(logmel.shape[0], str) and logmel.shape[1:3] == [1, 64] and isinstance(logmel.shape[3], str)
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]


def test_an_exported_mobilenet_has_its_adapter_projection_folded_away(exported):
    run_dir, paths = exported
    if Run.open(run_dir).config.model.name != "mobilenetv2":
        pytest.skip("only MobileNetV2 has a part that folds")
    graph = onnx.load(str(paths[0])).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    kernels = [shapes[n.input[1]] for n in graph.node if n.op_type == "Conv"]
    # the adapter's 10→3 projection is gone; the first 3×3 conv reads 10 channels + a constant
    assert (3, 10, 1, 1) not in kernels and any(k[1:] == (11, 3, 3) for k in kernels)


def test_onnx_runtime_matches_torch_on_real_clips_of_several_lengths(exported, real_specs):
    run_dir, paths = exported
    model = Run.open(run_dir).load_model(0)
    session = ort.InferenceSession(str(paths[0]), one_thread(), providers=["CPUExecutionProvider"])
    batches = [s[None, None] for s in real_specs]
    # a batch of several clips cut to one odd length, and one clip longer than the export length
    batches.append(np.stack([s[:, :37] for s in real_specs if s.shape[1] >= 37])[:, None])
    batches.append(np.tile(real_specs[0], (1, 4))[None, None, :, :457])
    for x in batches:
        x = np.ascontiguousarray(x, np.float32)
        logits, embedding = session.run(["logits", "embedding"], {"logmel": x})
        with torch.inference_mode():
            ref_logits, ref_embedding = model(torch.from_numpy(x))
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, err_msg=f"{x.shape}")
        np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4, err_msg=f"{x.shape}")


@pytest.mark.parametrize("tta", [TTA("full"), TTA("tiles", tile=1.0, hop=0.5),
                                 TTA("crops", lengths=(0.5, 1.0), offsets=3)], ids=["full", "tiles", "crops"])
def test_onnx_backend_scores_equal_torch_backend_scores(exported, clips, tta):
    run_dir, _ = exported
    on_torch, errors = Tagger.load([run_dir], tta=tta).tag_files(clips, workers=1, progress=False)
    on_onnx, onnx_errors = Tagger.load([run_dir], backend="onnx", tta=tta, threads=1).tag_files(clips, workers=1,
                                                                                     progress=False)
    assert errors == onnx_errors == {}
    np.testing.assert_allclose(on_onnx, on_torch, atol=1e-4)


def test_predict_command_on_the_onnx_backend(exported, clips, tmp_path):
    run_dir, _ = exported
    folder = tmp_path / "clips"
    folder.mkdir()
    for f in clips[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    tables = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.csv"
        assert main(["predict", str(run_dir), str(folder), "--backend", backend, "--format", "kaggle2019",
                     "--out", str(out), "--workers", "1", "--threads", "1"]) == 0
        tables[backend] = pd.read_csv(out)
    assert tables["onnx"].fname.tolist() == sorted(f.name for f in clips[:4])
    classes = Run.open(run_dir).classes
    np.testing.assert_allclose(tables["onnx"][classes].to_numpy(), tables["torch"][classes].to_numpy(), atol=1e-4)


def test_onnx_backend_without_an_export_is_a_run_error(tmp_path_factory, tmp_path):
    run = copy_run(shared_run(tmp_path_factory, "cnn6"), tmp_path / "run")
    with pytest.raises(RunError, match="soundtag export"):
        Tagger.load([run], backend="onnx")


def test_unknown_export_format_is_a_config_error(exported):
    with pytest.raises(ConfigError, match="unknown export format 'tflite'; valid export formats: onnx"):
        export(exported[0], "tflite")


def test_export_command_prints_the_files(tmp_path_factory, tmp_path, capsys):
    run = copy_run(shared_run(tmp_path_factory, "cnn6"), tmp_path / "run")
    assert main(["export", str(run)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [str(run / "onnx" / "fold0.onnx")]
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error:")


# ---------------------------------------------------------------- a run of two folds


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory, private_cache):
    """A copy of the tiny run whose fold 1 is fold 0 with a shifted head, exported."""
    run = copy_run(shared_run(tmp_path_factory, "cnn6"), tmp_path_factory.mktemp("two-folds") / "run")
    weights = load_file(str(run / "fold0" / "model.safetensors"))
    weights["head.bias"] = weights["head.bias"] + torch.linspace(-1.0, 1.0, len(weights["head.bias"]))
    (run / "fold1").mkdir()
    save_file(weights, str(run / "fold1" / "model.safetensors"))
    paths = export(run)
    assert [p.name for p in paths] == ["fold0.onnx", "fold1.onnx"]
    return run


def test_fold_scores_are_averaged_on_both_backends(two_folds, clips):
    run = Run.open(two_folds)
    cfg = run.config.features
    specs = [spec_of(f, cfg) for f in clips[:4]]
    per_fold = []
    for model in run.load_models():
        with torch.inference_mode():
            logits = np.concatenate([model(torch.from_numpy(s[None, None]))[0].numpy() for s in specs])
        per_fold.append(Task(False).activate(logits))
    assert np.abs(per_fold[0] - per_fold[1]).max() > 1e-2
    for backend in ("torch", "onnx"):
        scores = Tagger.load([two_folds], backend=backend, threads=1).score_clips([{cfg: s} for s in specs])
        np.testing.assert_allclose(scores, (per_fold[0] + per_fold[1]) / 2, atol=1e-4, err_msg=backend)
    geometric = Tagger.load([two_folds], mean="geometric").score_clips([{cfg: s} for s in specs])
    np.testing.assert_allclose(geometric, np.sqrt(per_fold[0] * per_fold[1]), atol=1e-5)
