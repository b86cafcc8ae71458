"""Data-parallel training with two CPU processes (torchrun, gloo) on a tiny real-audio set."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import DEMO
from soundtag import __version__, checkpoint, datasets
from soundtag.run import Run

CLASSES = ["Acoustic_guitar", "Applause", "Bass_drum", "Cello"]
CONFIG = {"model": {"name": "cnn6", "params": {"width": 0.125}}, "epochs": 2, "batch_size": 8, "threads": 1}
TIMEOUT = 180

# Runs `soundtag train` in each torchrun process and saves what each rank ends with: its
# network (all tensors, buffers included) and the validation logits it computed each epoch.
RANKS_SCRIPT = '''
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from safetensors.torch import save_file

from soundtag import cli, distributed, loop


def main() -> int:
    networks, logits = [], []
    wrap, clip_logits = distributed.Context.wrap, loop.clip_logits

    def keep_network(self, model):
        networks.append(model)
        return wrap(self, model)

    def keep_logits(*args, **kwargs):
        out = clip_logits(*args, **kwargs)
        logits.append(out)
        return out

    distributed.Context.wrap = keep_network
    loop.clip_logits = keep_logits
    dump = Path(sys.argv[1])
    code = cli.main(sys.argv[2:])
    rank = dist.get_rank()
    state = networks[-1].state_dict()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(dump / f"rank{rank}.safetensors"))
    epochs = logits[:-1] if rank == 0 else logits  # rank 0 also scores the held-out fold once at the end
    np.save(dump / f"logits{rank}.npy", np.stack(epochs), allow_pickle=False)
    return code


if __name__ == "__main__":  # the feature cache's forkserver workers import this file again
    sys.exit(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: list[str], args: list[str], cache: Path, log: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node=2 TARGET ARGS` on gloo, one thread a process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOUNDTAG_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    with open(log, "w") as sink:
        done = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes × 10 real clips in the FSDKaggle2018 layout."""
    root = tmp_path_factory.mktemp("tiny-ddp")
    table = pd.read_csv(DEMO / "train.csv")
    rows = table[table.label.isin(CLASSES)].groupby("label").head(10)
    (root / "audio_train").mkdir()
    for name in rows.fname:
        shutil.copy(DEMO / "audio_train" / name, root / "audio_train" / name)
    rows.to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def ranks(tiny, config_file, private_cache, tmp_path_factory) -> tuple[Path, Path]:
    """A two-process run through a wrapper that saves each rank's network and logits."""
    folder = tmp_path_factory.mktemp("ranks")
    script = folder / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    dump = folder / "dump"
    dump.mkdir()
    out = folder / "run"
    done = torchrun([str(script), str(dump)], ["train", str(tiny), "--out", str(out), "--config", str(config_file)],
                    private_cache, folder / "log.txt")
    assert done.returncode == 0, (folder / "log.txt").read_text()[-3000:]
    return out, dump


def test_cli_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "soundtag.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"soundtag {__version__}"


def test_two_processes_train_one_complete_run(tiny, config_file, private_cache, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    done = torchrun(["-m", "soundtag.cli"], ["train", str(tiny), "--out", str(out), "--config", str(config_file)],
                    private_cache, log)
    printed = log.read_text()
    assert done.returncode == 0, printed[-3000:]
    assert "| fold | epoch kept |" in printed and "Traceback" not in printed

    for name in ("config.yaml", "run.json", "clips.csv", "oof.csv", "oof.npy", "summary.json", "summary.md",
                 "thresholds.json", "curves.png", "fold0/model.safetensors", "fold0/metrics.csv",
                 "fold0/checkpoint.safetensors", "fold0/oof.npy"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "fold0").iterdir()) == \
        ["checkpoint.safetensors", "metrics.csv", "model.safetensors", "oof.npy"]
    assert not list(out.rglob("*.tmp")) and not (out / "skipped.csv").exists()
    # Written once, by rank 0: one metrics row an epoch, one clips row a clip.
    history = pd.read_csv(out / "fold0" / "metrics.csv")
    assert list(history.epoch) == [1, 2]
    assert np.isfinite(history[["train_loss", "val_loss", "map@3"]].to_numpy()).all()
    assert (out / "fold0" / "metrics.csv").read_text().count("epoch,") == 1
    assert (out / "clips.csv").read_text().count("fname,") == 1
    saved = pd.read_csv(out / "clips.csv")
    assert len(saved) == 40 and saved.fname.is_unique

    run = Run.open(out)
    assert run.config.epochs == 2 and run.config.threads == 1 and run.classes == CLASSES
    model = run.load_model(0)
    assert model.head.out_features == 4
    data = datasets.read(tiny).subset("train")
    clips = run.read_clips()
    assert clips.names == data.names and list(saved.fname) == data.names
    assert clips.validation(0).sum() == 8 and clips.training(0).sum() == 32
    with torch.inference_mode():
        logits, _ = model(torch.randn(2, 1, 64, 100))
    assert torch.isfinite(logits).all()


def test_the_ranks_end_with_the_same_weights_and_rank0_saves_them(ranks):
    out, dump = ranks
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    last = checkpoint.load(out / "fold0" / "checkpoint.safetensors")
    assert last["progress"]["epoch"] == 2
    # Every rank ends with the weights the run kept, which rank 0 saved.
    kept = Run.open(out).weights(0)
    assert sorted(last["model"]) == sorted(rank0) == sorted(kept)
    assert all(torch.equal(kept[n], rank0[n]) for n in rank0)
    parameters = {n for n, _ in Run.open(out).new_model().named_parameters()}
    different = [n for n in parameters if not torch.equal(rank0[n], rank1[n])]
    assert not different, f"gradients were not averaged: {different[:3]}"
    assert list(pd.read_csv(out / "fold0" / "metrics.csv").epoch) == [1, 2]


def test_the_ranks_validate_the_same_network(ranks):
    """Regression: each rank validated with its own BatchNorm statistics, so the ranks' figures and
    early-stopping counters could drift apart (and a rank stopping early deadlocks the other)."""
    _, dump = ranks
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    different = [n for n in rank0 if not torch.equal(rank0[n], rank1[n])]
    assert not different, f"buffers differ between ranks: {different[:3]}"
    logits0, logits1 = np.load(dump / "logits0.npy"), np.load(dump / "logits1.npy")
    assert logits0.shape == logits1.shape and logits0.shape[0] == 2 and logits0.shape[2] == 4  # epochs, clips, classes
    assert np.array_equal(logits0, logits1)
