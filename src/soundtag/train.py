"""One training loop for every dataset, stage and fold.

`train()` starts a run, `resume()` continues one from its last finished epoch.
Randomness is derived from (seed, fold, epoch, rank), so a resumed run goes on
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from . import augment, checkpoint, datasets, metrics, plots
from .config import TrainConfig
from .datasets import Dataset
from .distributed import Context, setup
from .loader import ClipSet, epoch_size, steps_per_epoch, train_batches
from .optim import build_optimizer, build_schedule
from .predict import activate, clip_logits
from .run import Run, RunError
from .splits import assign_folds, fold_ids
from .store import FeatureStore, extract

log = logging.getLogger("soundtag")


def train(dataset: Dataset, config: TrainConfig, out: str | Path, *, force: bool = False,
          init: str | Path | None = None, cache_dir: str | Path | None = None,
          progress: bool = True) -> Run:
    """Train every fold the config asks for on the dataset's training split."""
    config.validate()
    ctx = setup()
    data = _training_clips(dataset, config)
    if init:  # fail early on a run that does not fit
        _load_init(config.create_model(len(data.classes)), Path(init), 0, data.classes)
    store, data, rows = _features(data, config, cache_dir, ctx, progress)
    folds = assign_folds(data, config.folds, config.seed)
    _folds_to_train(config, folds)
    if ctx.main:
        run = Run.create(out, config, data.classes, data.multilabel, dataset.source, force,
                         init=str(Path(init).resolve()) if init else None)
        run.write_folds(data.names, folds)
    ctx.barrier()
    return _train_run(Run.open(out), data, store, rows, folds, ctx, progress)


def resume(folder: str | Path, cache_dir: str | Path | None = None, progress: bool = True) -> Run:
    """Continue an interrupted run from the last epoch each fold finished."""
    run = Run.open(folder)
    ctx = setup()
    source = run.data
    dataset = datasets.read(source["path"], source["layout"], **source.get("options", {}))
    # the clip list training started from, so that the feature cache is the same one
    store, data, rows = _features(_training_clips(dataset, run.config), run.config, cache_dir, ctx, progress)
    saved = run.read_folds()
    position = {n: i for i, n in enumerate(data.names)}
    missing = [n for n in saved.fname if n not in position]
    if missing:
        raise RunError(f"{folder}: {len(missing)} training clip(s) of the run are gone from "
                       f"{source['path']} or no longer readable (first: {missing[0]})")
    keep = [position[n] for n in saved.fname]
    return _train_run(run, data.select(keep), store, rows[keep], saved.fold.to_numpy(), ctx, progress)


def _training_clips(dataset: Dataset, config: TrainConfig) -> Dataset:
    data = dataset.subset("train")
    return data.select(~data.noisy) if config.noisy == "exclude" else data


def _features(data: Dataset, config: TrainConfig, cache_dir, ctx: Context,
              progress: bool) -> tuple[FeatureStore, Dataset, np.ndarray]:
    """The cached features (computed by the main process), the clips that have
    them, and their rows in the cache."""
    store = extract(data.files, config.features, cache_dir, progress=progress) if ctx.main else None
    ctx.barrier()
    if store is None:  # other ranks open what the main process wrote
        store = extract(data.files, config.features, cache_dir, progress=False)
    if store.errors and ctx.main:
        log.warning(f"{len(store.errors)} unreadable clip(s) skipped, e.g. "
                    f"{next(iter(store.failures().items()))}")
    return store, data.select(store.ok), np.flatnonzero(store.ok)


def _folds_to_train(config: TrainConfig, folds: np.ndarray) -> list[int]:
    wanted = config.train_folds if config.train_folds is not None else fold_ids(folds)
    unknown = sorted(set(wanted) - set(fold_ids(folds)))
    if unknown:
        raise RunError(f"fold(s) {unknown} do not exist; folds: {fold_ids(folds)}")
    return wanted


def _train_run(run: Run, data: Dataset, store: FeatureStore, rows: np.ndarray, folds: np.ndarray,
               ctx: Context, progress: bool) -> Run:
    config = run.config
    torch.set_num_threads(config.num_threads())
    weights = np.where(data.noisy, config.noisy_weight, 1.0).astype(np.float32)
    for k in _folds_to_train(config, folds):
        val = folds == k
        train_set = ClipSet(store, rows[~val], data.targets[~val], weights[~val])
        val_set = ClipSet(store, rows[val], data.targets[val], np.ones(int(val.sum()), np.float32))
        _train_fold(run, k, train_set, val_set, ctx, progress)
    if ctx.main:
        _summarise(run, data, folds)
    ctx.barrier()
    return run


def _train_fold(run: Run, k: int, train_set: ClipSet, val_set: ClipSet, ctx: Context, progress: bool) -> None:
    config = run.config
    torch.manual_seed(config.seed + k)
    model = run.new_model()
    if run.init:
        _load_init(model, Path(run.init), k, run.classes)
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(ctx.device, memory_format=memory)
    optimizer = build_optimizer(model.parameters(), config.optim)
    steps = steps_per_epoch(epoch_size(train_set, config.epoch_clips), config.batch_size, ctx.world)
    schedule = build_schedule(optimizer, config.optim, steps * config.epochs)
    stem = run.fold_dir(k) / "checkpoint"
    state = {"epoch": 0, "best": -np.inf, "best_epoch": -1, "bad": 0}
    if checkpoint.exists(stem):
        saved = checkpoint.load(stem)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["progress"]
        _forget_epochs_after(run.fold_dir(k) / "metrics.csv", state["epoch"])
    run.fold_dir(k).mkdir(exist_ok=True)
    net = ctx.wrap(model)
    transforms = augment.build(config.augment)
    for epoch in range(state["epoch"], config.epochs):
        if state["bad"] >= config.patience:
            break
        start = time.perf_counter()
        rng = np.random.default_rng([config.seed, k, epoch])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)) + ctx.rank)
        torch.manual_seed(int(rng.integers(2**62)) + ctx.rank)
        desc = f"fold {k} epoch {epoch + 1}/{config.epochs}"
        train_loss, rate = _train_epoch(net, train_set, config, run.multilabel, transforms, optimizer,
                                        schedule, steps, rng, gen, ctx, memory, desc, progress)
        ctx.sync_buffers(model)
        logits = clip_logits(model, val_set, config.batch_size, config.bf16, ctx.device, memory)
        val_loss = _loss(torch.from_numpy(logits), torch.from_numpy(val_set.targets), None,
                         run.multilabel, 0.0).item()
        scores = activate(logits, run.multilabel)
        figure = _metric(run, val_set.targets, scores)
        improved = figure > state["best"]
        if improved:
            state.update(best=figure, best_epoch=epoch + 1, bad=0)
        else:
            state["bad"] += 1
        state["epoch"] = epoch + 1
        if ctx.main:
            if improved:
                run.save_weights(k, model)
                np.save(run.fold_dir(k) / "oof.npy", scores)
            _log_epoch(run, k, epoch + 1, train_loss, val_loss, figure, optimizer, rate,
                       time.perf_counter() - start)
            checkpoint.save(stem, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "schedule": schedule.state_dict(), "progress": state})
            if progress:
                tqdm.write(f"{desc}: loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                           f"{run.metric} {figure:.4f}{' *' if improved else ''}")
        ctx.barrier()


def _train_epoch(net, clips: ClipSet, config: TrainConfig, multilabel: bool, transforms, optimizer,
                 schedule, steps: int, rng: np.random.Generator, gen: torch.Generator, ctx: Context, memory,
                 desc: str, progress: bool) -> tuple[float, float]:
    """One pass (`steps` batches) over the training clips; returns the mean loss and clips/s."""
    net.train()
    bar = tqdm(total=steps * config.batch_size, unit="clip", desc=desc, leave=False,
               disable=not (progress and ctx.main), dynamic_ncols=True)
    total, start = 0.0, time.perf_counter()
    for x, y, w in train_batches(clips, config.batch_size, config.crop, rng, ctx.rank, ctx.world,
                                 config.epoch_clips):
        x, y, w = x.to(ctx.device), y.to(ctx.device), w.to(ctx.device)
        x, y = transforms(x, y, gen)
        with _autocast(config.bf16, ctx.device):
            logits, _ = net(x.contiguous(memory_format=memory))
        loss = _loss(logits.float(), y, w, multilabel, config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        total += value
        bar.update(len(x))
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
    bar.close()
    return total / steps, steps * config.batch_size * ctx.world / (time.perf_counter() - start)


def _autocast(bf16: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, multilabel: bool,
          smoothing: float) -> torch.Tensor:
    """BCE with logits for multi-label sets, softmax cross-entropy otherwise;
    label smoothing and per-clip weights optional."""
    if multilabel:
        y = y * (1 - smoothing) + smoothing / 2
        per_clip = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
    else:
        y = y * (1 - smoothing) + smoothing / y.shape[1]
        per_clip = -(y * F.log_softmax(logits, dim=1)).sum(1)
    return per_clip.mean() if w is None else (per_clip * w).sum() / w.sum()


def _metric(run: Run, truth: np.ndarray, scores: np.ndarray) -> float:
    return metrics.lwlrap(truth, scores) if run.multilabel else metrics.map_at_k(truth, scores, 3)


def _forget_epochs_after(path: Path, epoch: int) -> None:
    """Drop metrics rows of epochs the checkpoint does not hold (a kill between the two)."""
    if path.exists():
        history = pd.read_csv(path)
        history[history.epoch <= epoch].to_csv(path, index=False)


def _log_epoch(run: Run, k: int, epoch: int, train_loss: float, val_loss: float, figure: float,
               optimizer, rate: float, seconds: float) -> None:
    path = run.fold_dir(k) / "metrics.csv"
    if epoch == 1 or not path.exists():
        path.write_text(f"epoch,train_loss,val_loss,{run.metric},lr,clips_per_s,seconds\n")
    lr = optimizer.param_groups[0]["lr"]
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([epoch, f"{train_loss:.5f}", f"{val_loss:.5f}", f"{figure:.5f}",
                                f"{lr:.3g}", f"{rate:.1f}", f"{seconds:.2f}"])


def _load_init(model: torch.nn.Module, folder: Path, k: int, classes: list[str]) -> None:
    """Start from another run's weights; its head is dropped when the classes differ."""
    source = Run.open(folder)
    trained = source.trained_folds()
    if not trained:
        raise RunError(f"--init {folder}: the run has no trained fold")
    weights = load_file(str(source.fold_dir(k if k in trained else trained[0]) / "model.safetensors"))
    if source.classes != classes:
        weights = {n: t for n, t in weights.items() if not n.startswith("head.")}
    mismatch = RunError(f"--init {folder}: its model ({source.config.model.name} "
                        f"{source.config.model.params}) does not match this config's")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError:  # same names, other shapes
        raise mismatch from None
    if unexpected or any(not n.startswith("head.") for n in missing):
        raise mismatch


def _summarise(run: Run, data: Dataset, folds: np.ndarray) -> None:
    """oof.csv, summary.json, summary.md and the training curves."""
    rows, scores, per_fold = [], [], {}
    for k in run.trained_folds():
        path = run.fold_dir(k) / "oof.npy"
        held = np.flatnonzero(folds == k)
        fold_scores = np.load(path, allow_pickle=False)
        rows.append(held)
        scores.append(fold_scores)
        per_fold[k] = _fold_summary(run, k, data.targets[held], fold_scores)
    held = np.concatenate(rows)
    oof = np.concatenate(scores)
    table = {"fname": [data.names[i] for i in held], "fold": folds[held],
             "labels": [",".join(data.labels(i)) for i in held]}
    table.update({c: oof[:, j] for j, c in enumerate(run.classes)})
    pd.DataFrame(table).to_csv(run.folder / "oof.csv", index=False, float_format="%.5f")
    overall = metrics.evaluate(data.targets[held], oof, run.classes, run.multilabel)
    summary = {"metric": run.metric, "folds": per_fold,
               "oof": {k: v for k, v in overall.items() if k != "per_class"}, "oof_clips": int(len(held))}
    (run.folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (run.folder / "summary.md").write_text(summary_table(summary) + "\n")
    thresholds = metrics.tune_thresholds(data.targets[held], oof)
    (run.folder / "thresholds.json").write_text(json.dumps(dict(zip(run.classes, thresholds.tolist())), indent=1))
    plots.training_curves(run)


def _fold_summary(run: Run, k: int, truth: np.ndarray, scores: np.ndarray) -> dict:
    history = pd.read_csv(run.fold_dir(k) / "metrics.csv")
    best = history.loc[history[run.metric].idxmax()]
    return {"best_epoch": int(best.epoch), "epochs": int(history.epoch.max()), run.metric: float(best[run.metric]),
            "val_loss": float(best.val_loss), "map@3": metrics.map_at_k(truth, scores, 3),
            "lwlrap": metrics.lwlrap(truth, scores), "seconds": float(history.seconds.sum())}


def summary_table(summary: dict) -> str:
    """The run's summary as a Markdown table: one row a fold, then out-of-fold."""
    lines = ["| fold | best epoch | epochs | lwlrap | map@3 | val loss | minutes |", "|---|---|---|---|---|---|---|"]
    for k, f in summary["folds"].items():
        lines.append(f"| {k} | {f['best_epoch']} | {f['epochs']} | {f['lwlrap']:.4f} | {f['map@3']:.4f} | "
                     f"{f['val_loss']:.4f} | {f['seconds'] / 60:.1f} |")
    o = summary["oof"]
    lines.append(f"| out-of-fold ({summary['oof_clips']} clips) | | | {o['lwlrap']:.4f} | {o['map@3']:.4f} | | |")
    return "\n".join(lines)
