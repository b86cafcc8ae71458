"""int8 ONNX (`soundtag export --int8`, `--backend onnx-int8`): the quantised
networks written beside the float ones, and their scores near the float ones."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import copy_run, held_out, shared_run

from soundtag.cli import main
from soundtag.predict import Tagger
from soundtag.run import Run, RunError

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_int8_export_sits_beside_the_float_one_and_scores_like_it(tmp_path_factory, tmp_path, capsys):
    run = copy_run(shared_run(tmp_path_factory, "cnn6"), tmp_path / "run")
    with pytest.raises(RunError, match="no int8 ONNX export; run `soundtag export"):
        Tagger.load([run], backend="onnx-int8")
    assert main(["export", str(run), "--format", "onnx", "--int8"]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == ["fold0.onnx", "int8-fold0.onnx"]
    assert Run.open(run).onnx_paths() == [run / "onnx" / "fold0.onnx"]
    files = held_out().files[:40]
    float_scores, _ = Tagger.load([run], backend="onnx", threads=1).tag_files(files, progress=False)
    int8_scores, errors = Tagger.load([run], backend="onnx-int8", threads=1).tag_files(files, progress=False)
    assert not errors
    assert np.abs(int8_scores - float_scores).mean() < 0.02
    assert (int8_scores.argmax(1) == float_scores.argmax(1)).mean() >= 0.8
    assert not np.array_equal(int8_scores, float_scores)
    graph = onnx.load(str(run / "onnx" / "int8-fold0.onnx")).graph
    quantised = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert not any(name.startswith("bn0.") for name in quantised)  # the input's batch norm stays float
