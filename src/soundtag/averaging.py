"""Weight averaging, a loop hook: an exponential moving average of the weights
(EMA, updated after every optimiser step) or stochastic weight averaging (SWA:
the mean of the weights at epoch ends, BatchNorm statistics then recomputed on
training batches), both `torch.optim.swa_utils.AveragedModel`s.

Once averaging has begun, an epoch's validation figures are the average's, and
after the last epoch the average becomes the fold's weights. The average lives
in `state.progress["average"]`, so that the checkpoint holds it and a resumed
fold goes on exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from .config import TrainConfig
from .distributed import Context
from .loader import ClipSet, train_batches
from .loop import EpochRecord, FoldState, Hook, evaluate, memory_format
from .registry import Registry
from .task import Task

log = logging.getLogger("soundtag")
AVERAGES: Registry[type[WeightAverage]] = Registry("average", plural="averages")


class WeightAverage(Hook):
    """An average of the fold's weights (`config.average`): checkpointed,
    validated on the selection clips, and put into the model at the end."""

    def __init__(self, config: TrainConfig, task: Task, train_set: ClipSet, val_set: ClipSet, ctx: Context):
        self.config, self.task, self.train_set, self.val_set, self.ctx = config, task, train_set, val_set, ctx
        self.averaged: AveragedModel

    def new_average(self, model: torch.nn.Module) -> AveragedModel:
        raise NotImplementedError

    @property
    def begun(self) -> bool:
        return bool(self.averaged.n_averaged > 0)

    def start(self, state: FoldState) -> None:
        self.averaged = self.new_average(state.model)
        if "average" in state.progress:
            self.averaged.load_state_dict(state.progress["average"])
        state.progress["average"] = self.averaged.state_dict()

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None:
        if self.begun:
            record.val_loss, record.figure, record.scores = evaluate(self.averaged.module, self.val_set, self.config,
                                                                     self.task, self.ctx.device)
        state.progress["average"] = self.averaged.state_dict()

    def end(self, state: FoldState) -> None:
        if self.begun:
            state.model.load_state_dict(self.averaged.module.state_dict())
        else:
            log.warning(f"fold {state.fold}: training stopped before weight averaging began; "
                        "its last weights are kept")


@AVERAGES.register("ema")
class EMA(WeightAverage):
    """From step `start` × the fold's steps, after every optimiser step,
    w̄ ← decay · w̄ + (1 − decay) · w (the first copies w); BatchNorm
    statistics are averaged alike."""

    def new_average(self, model: torch.nn.Module) -> AveragedModel:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.config.average.decay), use_buffers=True)

    def start(self, state: FoldState) -> None:
        super().start(state)
        total = state.steps * self.config.epochs
        self.first = min(int(self.config.average.start * total), total - 1)
        self.step = state.epoch * state.steps  # steps taken so far (a checkpoint ends an epoch)

    def batch_end(self, state: FoldState, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> None:
        if self.step >= self.first:
            self.averaged.update_parameters(state.model)
        self.step += 1


@AVERAGES.register("swa")
class SWA(WeightAverage):
    """The mean of the weights at the end of every epoch from epoch `start` ×
    epochs (counted from 0), BatchNorm statistics then recomputed over an
    epoch of training batches (crops, no augmentation)."""

    def new_average(self, model: torch.nn.Module) -> AveragedModel:
        return AveragedModel(model)

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None:
        epochs = self.config.epochs
        if state.epoch > min(int(self.config.average.start * epochs), epochs - 1):
            self.averaged.update_parameters(state.model)
            self.recompute_batchnorm(state)
        super().epoch_end(state, record)

    def recompute_batchnorm(self, state: FoldState) -> None:
        c, ctx = self.config, self.ctx
        rng = np.random.default_rng([c.seed, state.fold, state.epoch, 1])
        batches = train_batches(self.train_set, c.batch_size, c.crop, rng, ctx.rank, ctx.world, c.epoch_clips,
                                c.batch_shares)
        with torch.no_grad():
            update_bn((x.to(ctx.device).contiguous(memory_format=memory_format(c)) for x, *_ in batches),
                      self.averaged.module)
