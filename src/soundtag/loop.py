"""The training loop of one fold: a small loop over a training state, extended
by hooks (best weights, early stopping, the metrics log, checkpoints, printing).

A hook sees the state at the start, after every batch and after every epoch;
whatever it must remember across a resume goes into `state.progress`, which
the checkpoint saves. Randomness is derived from (seed, fold, epoch, rank), so
a resumed fold goes on exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import augment
from .config import TrainConfig
from .distributed import Context
from .errors import SoundtagError
from .loader import ClipSet, eval_batches, train_batches
from .run import Run
from .task import Task, weighted_mean


class TrainingDiverged(SoundtagError):
    """The loss became NaN or infinite."""


@dataclass
class EpochRecord:
    """What one epoch produced."""

    epoch: int
    train_loss: float
    val_loss: float
    figure: float
    scores: np.ndarray
    lr: float
    clips_per_s: float
    seconds: float
    improved: bool = False


@dataclass
class FoldState:
    """Everything a fold's training changes; `progress` is saved with the checkpoint."""

    fold: int
    model: torch.nn.Module
    optimizer: Any
    schedule: Any
    steps: int
    progress: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "best": -math.inf,
                                                              "best_epoch": -1, "bad": 0})
    stop: bool = False

    @property
    def epoch(self) -> int:
        """Epochs finished."""
        return self.progress["epoch"]


class Hook:
    """Does nothing; subclasses override what they need."""

    def start(self, state: FoldState) -> None: ...

    def batch_end(self, state: FoldState, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> None: ...

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None: ...

    def end(self, state: FoldState) -> None:
        """After the last epoch (also when a resumed fold had nothing left to train)."""


class Resume(Hook):
    """Restores the fold's last checkpoint, if any (the main process trims the metrics log)."""

    def __init__(self, run: Run, main: bool = True):
        self.run, self.main = run, main

    def start(self, state: FoldState) -> None:
        saved = self.run.load_checkpoint(state.fold)
        if saved is None:
            return
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.schedule.load_state_dict(saved["schedule"])
        state.progress = saved["progress"]
        if self.main:
            self.run.forget_epochs_after(state.fold, state.epoch)


class BestWeights(Hook):
    """Keeps the weights of the epoch with the best selection figure."""

    def __init__(self, run: Run, main: bool):
        self.run, self.main = run, main

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None:
        p = state.progress
        record.improved = record.figure > p["best"]
        if record.improved:
            p.update(best=record.figure, best_epoch=record.epoch, bad=0)
            if self.main:
                self.run.save_weights(state.fold, state.model)
        else:
            p["bad"] += 1


class EarlyStopping(Hook):
    """Stops after `patience` epochs without a better figure, but never before
    epoch `start_epoch` (while the learning rate is still high, a small
    validation set's figure swings too much to stop on)."""

    def __init__(self, patience: int, start_epoch: int = 0):
        self.patience, self.start_epoch = patience, start_epoch

    def start(self, state: FoldState) -> None:
        self.epoch_end(state, None)

    def epoch_end(self, state: FoldState, record: EpochRecord | None) -> None:
        state.stop = state.progress["bad"] >= self.patience and state.epoch >= self.start_epoch


class MetricsLog(Hook):
    """One row an epoch in the fold's metrics.csv."""

    def __init__(self, run: Run):
        self.run = run

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None:
        self.run.log_epoch(state.fold, {
            "epoch": str(record.epoch), "train_loss": f"{record.train_loss:.5f}",
            "val_loss": f"{record.val_loss:.5f}", self.run.metric: f"{record.figure:.5f}",
            "lr": f"{record.lr:.3g}", "clips_per_s": f"{record.clips_per_s:.1f}",
            "seconds": f"{record.seconds:.2f}"})


class Checkpoint(Hook):
    """Saves model, optimiser, schedule and progress after every epoch (one atomic file)."""

    def __init__(self, run: Run):
        self.run = run

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None:
        self.run.save_checkpoint(state.fold, {
            "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "schedule": state.schedule.state_dict(), "progress": state.progress})


class Printer(Hook):
    """A line an epoch: losses and the validation figure, `*` when it improved."""

    def __init__(self, metric: str, epochs: int):
        self.metric, self.epochs = metric, epochs

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None:
        tqdm.write(f"fold {state.fold} epoch {record.epoch}/{self.epochs}: loss {record.train_loss:.4f}, "
                   f"val loss {record.val_loss:.4f}, {self.metric} {record.figure:.4f}"
                   f"{' *' if record.improved else ''}")


def fit(state: FoldState, train_set: ClipSet, val_set: ClipSet, config: TrainConfig, task: Task,
        ctx: Context, hooks: list[Hook], progress: bool) -> None:
    """Train the fold until the last epoch or until a hook stops it."""
    for hook in hooks:
        hook.start(state)
    net = ctx.wrap(state.model)
    transforms = augment.build(config.augment)
    while state.epoch < config.epochs and not state.stop:
        record = run_epoch(state, net, train_set, val_set, config, task, transforms, ctx, hooks, progress)
        state.progress["epoch"] = record.epoch
        for hook in hooks:
            hook.epoch_end(state, record)
        ctx.barrier()
    for hook in hooks:
        hook.end(state)


def run_epoch(state: FoldState, net: torch.nn.Module, train_set: ClipSet, val_set: ClipSet,
              config: TrainConfig, task: Task, transforms, ctx: Context, hooks: list[Hook],
              progress: bool) -> EpochRecord:
    """One pass over the training clips, then the held-out figures."""
    start, epoch = time.perf_counter(), state.epoch
    rng = np.random.default_rng([config.seed, state.fold, epoch])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)) + ctx.rank)
    torch.manual_seed(int(rng.integers(2**62)) + ctx.rank)
    desc = f"fold {state.fold} epoch {epoch + 1}/{config.epochs}"
    train_loss, rate = train_epoch(state, net, train_set, config, task, transforms, rng, gen, ctx, hooks,
                                   desc, progress and ctx.main)
    ctx.sync_buffers(state.model)
    val_loss, figure, scores = evaluate(state.model, val_set, config, task, ctx.device)
    return EpochRecord(epoch + 1, train_loss, val_loss, figure, scores,
                       state.optimizer.param_groups[0]["lr"], rate, time.perf_counter() - start)


def evaluate(model: torch.nn.Module, clips: ClipSet, config: TrainConfig, task: Task,
             device: torch.device) -> tuple[float, float, np.ndarray]:
    """A model's (unweighted) loss, task figure and scores on whole clips."""
    logits = clip_logits(model, clips, config.batch_size, config.bf16, device, memory_format(config))
    scores = task.activate(logits)
    return (task.loss(torch.from_numpy(logits), torch.from_numpy(clips.targets)).item(),
            task.score(clips.targets, scores), scores)


def train_epoch(state: FoldState, net: torch.nn.Module, clips: ClipSet, config: TrainConfig, task: Task,
                transforms, rng: np.random.Generator, gen: torch.Generator, ctx: Context, hooks: list[Hook],
                desc: str, progress: bool) -> tuple[float, float]:
    """`state.steps` batches over the training clips; returns the mean loss and clips/s."""
    net.train()
    memory = memory_format(config)
    bar = tqdm(total=state.steps * config.batch_size, unit="clip", desc=desc, leave=False,
               disable=not progress, dynamic_ncols=True)
    total, start = 0.0, time.perf_counter()
    for x, y, w, idx in train_batches(clips, config.batch_size, config.crop, rng, ctx.rank, ctx.world,
                                      config.epoch_clips, config.batch_shares):
        x, y, w = x.to(ctx.device), y.to(ctx.device), w.to(ctx.device)
        x, y = transforms(x, y, gen)
        x = x.contiguous(memory_format=memory)
        with autocast(config.bf16, ctx.device):
            logits, _, *extra = net(x)
        loss = batch_loss(task, config, logits, extra[0] if extra else [], y, w,
                          clips.origins[idx] if config.origin_loss else None)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.schedule.step()
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"fold {state.fold} epoch {state.epoch + 1}: the loss became {value}; "
                                   f"training stopped, the checkpoint of epoch {state.epoch} is kept "
                                   "(try a lower learning rate, or --bf16 off)")
        for hook in hooks:
            hook.batch_end(state, x, logits, loss)
        total += value
        bar.update(len(x))
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{state.schedule.get_last_lr()[0]:.2e}")
    bar.close()
    return total / state.steps, state.steps * config.batch_size * ctx.world / (time.perf_counter() - start)


def batch_loss(task: Task, config: TrainConfig, logits: torch.Tensor,
               extra_heads: list[tuple[float, torch.Tensor]], y: torch.Tensor, w: torch.Tensor,
               origins: np.ndarray | None = None) -> torch.Tensor:
    """The task loss of the logits, plus each extra head's task loss times its
    weight; with `origin_loss`, the clips of each origin it names (`origins`:
    the batch's) take that origin's loss."""
    loss = weighted_loss(task, config, logits, y, w, origins)
    for weight, head in extra_heads:
        loss = loss + weight * weighted_loss(task, config, head, y, w, origins)
    return loss


def weighted_loss(task: Task, config: TrainConfig, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                  origins: np.ndarray | None) -> torch.Tensor:
    """The weighted mean over the batch of each clip's loss: the config's, or its origin's."""
    if not config.origin_loss:
        return task.loss(logits.float(), y, w, config.label_smoothing, config.loss, config.loss_params)
    per_clip = task.clip_losses(logits.float(), y, config.label_smoothing, config.loss, config.loss_params)
    for origin, spec in config.origin_loss.items():
        mine = torch.from_numpy(origins == origin).to(per_clip.device)
        if mine.any():
            other = task.clip_losses(logits.float(), y, config.label_smoothing, spec["name"], spec.get("params"))
            per_clip = torch.where(mine, other, per_clip)
    return weighted_mean(per_clip, w)


def memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 runs natively on `device`: on a CPU only with AVX512-BF16
    or AMX; without them torch emulates it, tens of times slower than float32."""
    return device.type != "cpu" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(bf16: bool, device: torch.device):
    """bfloat16 autocast where asked for and native (float32 otherwise)."""
    if bf16 and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def clip_logits(model: torch.nn.Module, clips: ClipSet, batch_size: int = 32, bf16: bool = False,
                device: torch.device = torch.device("cpu"),
                memory: torch.memory_format = torch.contiguous_format) -> np.ndarray:
    """Logits [clips, classes] of whole clips, in the order of `clips` (validation)."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(clips), model.head.out_features), np.float32)
    for idx, x in eval_batches(clips.spec, clips.lengths, batch_size, max_frames=clips.store.config.max_frames):
        with autocast(bf16, device):
            logits, _ = model(x.to(device).contiguous(memory_format=memory))
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out
