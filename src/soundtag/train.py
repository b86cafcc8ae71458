"""Training runs: `train()` starts one from a dataset or a clip table,
`resume()` continues one from its saved clip table and checkpoints. Every
fold goes through the one loop in `loop.py`."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import copies, corrections, metrics, plots
from .averaging import AVERAGES
from .clips import ClipTable, noisy_policy, weigh_origins
from .config import TrainConfig
from .datasets import Dataset
from .distributed import Context, setup
from .loader import ClipSet, check_shares, epoch_size, steps_per_epoch
from .loop import (BestWeights, Checkpoint, EarlyStopping, EpochRecord, FoldState, Hook, MetricsLog, Printer, Resume,
                   clip_logits, evaluate, fit, memory_format, native_bf16)
from .models import init_target, is_classifier
from .optim import build_optimizer, build_schedule, schedule_hooks
from .run import Run, RunError
from .scorer import RunScorer, torch_network
from .splits import assign_folds, fold_ids, inner_split
from .store import FeatureStore, extract

log = logging.getLogger("soundtag")


def training_table(data: Dataset | ClipTable, config: TrainConfig) -> tuple[ClipTable, dict]:
    """The clips a config trains on: a dataset's training split (or a given
    table) under the config's noisy-clip policy and label corrections; and, for
    run.json, what the corrections changed."""
    table = data if isinstance(data, ClipTable) else ClipTable.from_dataset(data.subset("train"))
    factors = config.origin_weights  # its noisy entry is noisy_weight's
    table = noisy_policy(table, config.noisy, factors.get("noisy", config.noisy_weight))
    table = weigh_origins(table, {o: f for o, f in factors.items() if o != "noisy"})
    if not config.corrections:
        return table, {}
    table, applied = corrections.apply(table, config.corrections)
    return table, {"corrections": dataclasses.asdict(applied)}


def train(data: Dataset | ClipTable, config: TrainConfig, out: str | Path, *, force: bool = False,
          init: str | Path | None = None, cache_dir: str | Path | None = None, progress: bool = True,
          hooks: Sequence[Hook] = ()) -> Run:
    """Train every fold the config asks for; `hooks` join the loop's own."""
    config.validate()
    ctx = setup()
    table, changed = training_table(data, config)
    if init:  # fail early on a run that does not fit
        load_init(config.create_model(len(table.classes)), Path(init), 0, table.classes)
    store, rows, failures = _features(table, config, cache_dir, ctx, progress)
    table = table.select(rows)
    table.fold = assign_folds(table, config.folds, config.seed)
    _folds_to_train(config, table.fold)
    if config.copies:  # made once the folds are drawn, so that each copy follows its source
        table = copies.add(table, copies.variants(config.copies))
        store, rows, lost = _features(table, config, cache_dir, ctx, progress)
        table, failures = table.select(rows), {**failures, **lost}
    check_shares(table.origin, config.batch_shares, "the training set")
    if ctx.main:
        source = {**(data.source if isinstance(data, Dataset) else {}), **changed}
        run = Run.create(out, config, table.classes, table.multilabel, source, force, init=init)
        run.write_clips(table)
        if failures:
            log.warning(f"{len(failures)} unreadable clip(s) skipped; the list: {run.write_skipped(failures)}")
    ctx.barrier()
    return _train_run(Run.open(out), table, store, rows, ctx, progress, hooks)


def resume(folder: str | Path, cache_dir: str | Path | None = None, progress: bool = True,
           hooks: Sequence[Hook] = ()) -> Run:
    """Continue an interrupted run from the last epoch each fold finished."""
    run = Run.open(folder)
    ctx = setup()
    table = run.read_clips()
    store, rows, failures = _features(table, run.config, cache_dir, ctx, progress)
    if failures:
        first = next(iter(failures.items()))
        raise RunError(f"{folder}: {len(failures)} training clip(s) of the run are gone or no longer "
                       f"readable (first: {first[0]}: {first[1]})")
    return _train_run(run, table, store, rows, ctx, progress, hooks)


def _features(table: ClipTable, config: TrainConfig, cache_dir, ctx: Context,
              progress: bool) -> tuple[FeatureStore, np.ndarray, dict[str, str]]:
    """The cached features (computed by the main process), the rows of the
    clips that have them, and the unreadable ones with their reasons."""
    variants = copies.transforms(table)
    store = (extract(table.files, config.features, cache_dir, progress=progress, variants=variants)
             if ctx.main else None)
    ctx.barrier()
    if store is None:  # other ranks open what the main process wrote
        store = extract(table.files, config.features, cache_dir, progress=False, variants=variants)
    return store, np.flatnonzero(store.ok), store.failures()


def _folds_to_train(config: TrainConfig, folds: np.ndarray) -> list[int]:
    wanted = config.train_folds if config.train_folds is not None else fold_ids(folds)
    unknown = sorted(set(wanted) - set(fold_ids(folds)))
    if unknown:
        raise RunError(f"fold(s) {unknown} do not exist; folds: {fold_ids(folds)}")
    return wanted


def _train_run(run: Run, table: ClipTable, store: FeatureStore, rows: np.ndarray, ctx: Context,
               progress: bool, hooks: Sequence[Hook]) -> Run:
    config = run.config
    torch.set_num_threads(config.num_threads())
    if config.bf16 and not native_bf16(ctx.device) and ctx.main:
        log.warning("bf16 is asked for, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
                    "training in float32, which is many times faster here")
    for k in _folds_to_train(config, table.fold):
        train, select, held = fold_clips(table, k, config)
        sets = [ClipSet(store, rows[m], table.targets[m], w, table.origin[m])
                for m, w in ((train, table.weight[train]), (select, np.ones(int(select.sum()), np.float32)),
                             (held, np.ones(int(held.sum()), np.float32)))]
        check_shares(sets[0].origins, config.batch_shares, f"fold {k}")
        if run.init and ctx.main:
            _warn_init_overlap(run.init_folder, table, k)
        _train_fold(run, k, *sets, ctx, progress, list(hooks))
    if ctx.main:
        _summarise(run, table)
    ctx.barrier()
    return run


def fold_clips(table: ClipTable, k: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of fold k's training, selection and held-out clips; selection and
    held-out clips are never augmentation copies, and no copy of one trains."""
    train, held = table.training(k), table.validation(k)
    select = (inner_split(table, train, config.inner_fraction, config.seed + k)
              if config.selection == "inner" else held)
    return train & ~select & ~table.copies_of(select), select, held


def _train_fold(run: Run, k: int, train_set: ClipSet, select_set: ClipSet, held_set: ClipSet, ctx: Context,
                progress: bool, extra: list[Hook]) -> None:
    """Train fold k on `train_set`, pick its epoch on `select_set` (or keep the
    last with `selection: last`, `select_set` then only monitored; or, with
    `average`, keep the average of the weights, validated on `select_set`), and
    score the held-out fold once with the weights kept."""
    config = run.config
    torch.manual_seed(config.seed + k)
    model = run.new_model()
    if run.init:
        load_init(model, run.init_folder, k, run.classes)
    memory = memory_format(config)
    if hasattr(model, "fit"):  # fitted in closed form (the summary model), not trained
        _fit_fold(run, k, model, train_set, select_set, ctx, progress, memory)
        _score_held_out(run, k, model, held_set, ctx, memory)
        return
    if hasattr(model, "prepare"):  # parts fitted on the training clips first (the fused model's PCA)
        model.prepare(train_set)
    model.to(ctx.device, memory_format=memory)
    optimizer = build_optimizer(model.parameters(), config.optim)
    steps = steps_per_epoch(epoch_size(train_set, config.epoch_clips), config.batch_size, ctx.world)
    schedule = build_schedule(optimizer, config.optim, steps * config.epochs)
    state = FoldState(k, model, optimizer, schedule, steps)
    hooks: list[Hook] = [Resume(run, ctx.main), *schedule_hooks(schedule)]
    if config.selection == "inner" and config.average is None:
        hooks += [BestWeights(run, ctx.main),
                  EarlyStopping(config.patience, round(config.early_stop_from * config.epochs))]
    if config.average is not None:
        hooks.append(AVERAGES.get(config.average.kind)(config, run.task, train_set, select_set, ctx))
    if ctx.main:
        hooks += [MetricsLog(run), Checkpoint(run)] + ([Printer(run.metric, config.epochs)] if progress else [])
    fit(state, train_set, select_set, config, run.task, ctx, hooks + extra, progress)
    if ctx.main and (config.selection == "last" or config.average is not None):
        run.save_weights(k, model)
    _score_held_out(run, k, model, held_set, ctx, memory)


def _fit_fold(run: Run, k: int, model: torch.nn.Module, train_set: ClipSet, select_set: ClipSet, ctx: Context,
              progress: bool, memory: torch.memory_format) -> None:
    """Fit a closed-form model on fold k's whole training clips and save it;
    metrics.csv gets one row (epoch 1): the loss on the training clips, the
    loss and figure on `select_set`. The loop's hooks have no epochs to see."""
    start = time.perf_counter()
    model.fit(train_set, run.multilabel)
    seconds = time.perf_counter() - start
    model.to(ctx.device, memory_format=memory)
    train_loss, _, _ = evaluate(model, train_set, run.config, run.task, ctx.device)
    val_loss, figure, scores = evaluate(model, select_set, run.config, run.task, ctx.device)
    record = EpochRecord(1, train_loss, val_loss, figure, scores, 0.0, len(train_set) / max(seconds, 1e-9), seconds,
                         improved=True)
    if ctx.main:
        state = FoldState(k, model, None, None, 0)
        for hook in [MetricsLog(run)] + ([Printer(run.metric, 1)] if progress else []):
            hook.epoch_end(state, record)
        run.save_weights(k, model)


def _score_held_out(run: Run, k: int, model: torch.nn.Module, held_set: ClipSet, ctx: Context,
                    memory: torch.memory_format) -> None:
    """Every rank takes the weights kept; the main process scores the held-out fold with them."""
    ctx.barrier()
    model.load_state_dict(run.weights(k))
    if ctx.main:
        run.save_fold_scores(k, _held_out_scores(run, model, held_set, ctx, memory))
    ctx.barrier()


def _held_out_scores(run: Run, model: torch.nn.Module, held_set: ClipSet, ctx: Context,
                     memory: torch.memory_format) -> np.ndarray:
    """Scores of the held-out clips as the run predicts: whole clips, or the views its `tta` names."""
    views = run.config.tta
    if views.mode == "full":
        return run.task.activate(clip_logits(model, held_set, run.config.batch_size, run.config.bf16, ctx.device,
                                             memory))
    scorer = RunScorer(run, [torch_network(model.eval(), ctx.device)], views, threads=run.config.num_threads())
    return scorer.score([{run.config.features: held_set.spec(i)} for i in range(len(held_set))])[0]


def load_init(model: torch.nn.Module, folder: Path, k: int, classes: list[str]) -> None:
    """Start from another run's weights; its head is dropped when the classes differ,
    and a plain run of a wrapper's backbone family (a fused model's) starts its backbone."""
    source = Run.open(folder)
    trained = source.trained_folds()
    if not trained:
        raise RunError(f"--init {folder}: the run has no trained fold")
    weights = source.weights(init_fold(trained, k))
    if source.classes != classes:
        weights = {n: t for n, t in weights.items() if not is_classifier(n)}
    target, weights = init_target(model, weights)
    mismatch = RunError(f"--init {folder}: its model ({source.config.model.name} "
                        f"{source.config.model.params}) does not match this config's")
    try:
        missing, unexpected = target.load_state_dict(weights, strict=False)
    except RuntimeError:  # same names, other shapes
        raise mismatch from None
    if unexpected or any(not is_classifier(n) for n in missing):
        raise mismatch


def init_fold(trained: list[int], k: int) -> int:
    """The fold of an --init run whose weights start fold k: its own, else the first trained."""
    return k if k in trained else trained[0]


def init_overlap(folder: Path, table: ClipTable, k: int) -> int:
    """How many of fold k's held-out clips trained the --init weights that start fold k."""
    source = Run.open(folder)
    seen = source.read_clips()
    mask = seen.training(init_fold(source.trained_folds(), k))
    trained_on = {f for f, m in zip(seen.files, mask) if m}
    return sum(table.files[i] in trained_on for i in np.flatnonzero(table.validation(k)))


def _warn_init_overlap(folder: Path, table: ClipTable, k: int) -> None:
    overlap = init_overlap(folder, table, k)
    if overlap:
        log.warning(f"fold {k}: {overlap} of its held-out clips trained the --init weights ({folder}); its "
                    "held-out figure is optimistic (give --init a run with the same folds, e.g. of the same "
                    f"seed and data, trained on fold {k})")


def _summarise(run: Run, table: ClipTable) -> None:
    """Out-of-fold scores, summary, thresholds and the training curves."""
    rows, scores, per_fold = [], [], {}
    for k in run.trained_folds():
        held = np.flatnonzero(table.validation(k))
        fold_scores = run.fold_scores(k)
        rows.append(held)
        scores.append(fold_scores)
        per_fold[k] = _fold_summary(run, k, table.targets[held], fold_scores)
    held = np.concatenate(rows)
    oof = np.concatenate(scores)
    run.write_oof(pd.DataFrame({"fname": [table.names[i] for i in held], "fold": table.fold[held],
                                "labels": [",".join(table.labels(i)) for i in held]}), oof)
    overall = metrics.evaluate(table.targets[held], oof, run.classes, run.multilabel)
    summary = {"metric": run.metric, "folds": per_fold,
               "oof": {k: v for k, v in overall.items() if k != "per_class"}, "oof_clips": int(len(held))}
    if "corrections" in run.data:
        summary["corrections"] = run.data["corrections"]
    run.write_summary(summary, summary_table(summary))
    run.write_thresholds(metrics.tune_thresholds(table.targets[held], oof))
    plots.training_curves(run)


def _fold_summary(run: Run, k: int, truth: np.ndarray, scores: np.ndarray) -> dict:
    """The epoch kept (and its selection figures), then the held-out fold's figures."""
    history = run.history(k)
    picked = run.config.selection == "inner" and run.config.average is None
    kept = history.loc[history[run.metric].idxmax() if picked else history.index[-1]]
    return {"best_epoch": int(kept.epoch), "epochs": int(history.epoch.max()),
            f"selection_{run.metric}": float(kept[run.metric]), "selection_loss": float(kept.val_loss),
            "map@3": metrics.map_at_k(truth, scores, 3),
            "lwlrap": metrics.lwlrap(truth, scores), "seconds": float(history.seconds.sum())}


def summary_table(summary: dict) -> str:
    """The run's summary as a Markdown table: one row a fold, then out-of-fold."""
    lines = ["| fold | epoch kept | epochs | selection loss | held-out lwlrap | held-out map@3 | minutes |",
             "|---|---|---|---|---|---|---|"]
    for k, f in summary["folds"].items():
        lines.append(f"| {k} | {f['best_epoch']} | {f['epochs']} | {f['selection_loss']:.4f} | {f['lwlrap']:.4f} | "
                     f"{f['map@3']:.4f} | {f['seconds'] / 60:.1f} |")
    o = summary["oof"]
    lines.append(f"| out-of-fold ({summary['oof_clips']} clips) | | | {o['lwlrap']:.4f} | {o['map@3']:.4f} | | |")
    if "corrections" in summary:
        lines.append("\n" + corrections.Applied(**summary["corrections"]).line())
    return "\n".join(lines)
