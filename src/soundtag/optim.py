"""Optimisers (AdamW, SGD, RAdam, optional Lookahead) and learning-rate schedules.

A schedule entry is `entry(optimizer, config, total_steps, **config.schedule_params)`
and is stepped once a batch; one that is also a loop `Hook` (ReduceLROnPlateau)
joins the fold's hooks and sees every epoch's figures.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from .config import OptimConfig
from .errors import ConfigError
from .loop import EpochRecord, FoldState, Hook
from .registry import Registry

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
OPTIMIZERS: Registry[Callable[[Params, OptimConfig], torch.optim.Optimizer]] = Registry("optimiser")
SCHEDULES: Registry[Callable[..., LRScheduler]] = Registry("schedule")
DIV_FINAL = 1e5  # flat_cos ends at lr / DIV_FINAL (fastai's fit_flat_cos)


class Lookahead:
    """Lookahead (Zhang et al., 2019) around any optimiser: every `k` steps the
    slow weights move `alpha` of the way to the fast ones, which restart there."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        self.inner, self.k, self.alpha = inner, k, alpha
        self.steps = 0
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def step(self, closure=None):
        loss = self.inner.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            with torch.no_grad():
                for slow, fast in zip(self.slow, (p for g in self.param_groups for p in g["params"])):
                    slow.add_(fast - slow, alpha=self.alpha)
                    fast.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "slow": self.slow, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        for slow, saved in zip(self.slow, state["slow"]):
            slow.copy_(saved)
        self.steps = state["steps"]


@OPTIMIZERS.register("adamw")
def _adamw(params: Params, config: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@OPTIMIZERS.register("sgd")
def _sgd(params: Params, config: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


@OPTIMIZERS.register("radam")
def _radam(params: Params, config: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.RAdam(params, lr=config.lr, weight_decay=config.weight_decay,
                             decoupled_weight_decay=True)


def build_optimizer(params: Params, config: OptimConfig) -> torch.optim.Optimizer | Lookahead:
    """The configured optimiser, wrapped in Lookahead if asked."""
    opt = OPTIMIZERS.get(config.name)(params, config)
    return Lookahead(opt) if config.lookahead else opt


@SCHEDULES.register("onecycle")
def _onecycle(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LRScheduler:
    """torch's one-cycle: cosine up from lr/25 over the warm-up, then down to lr/2.5e5."""
    warm = max(config.warmup, 1e-3)
    if total_steps > 1 and abs(warm * total_steps - 1) < 1e-9:
        warm = 1.5 / total_steps  # torch divides by zero when the warm-up is exactly one step
    return OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=warm)


@SCHEDULES.register("cosine")
def _cosine(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LRScheduler:
    """Linear warm-up to lr, then half a cosine down towards 0 at `total_steps`."""
    warmup = _warmup_steps(config, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return LambdaLR(optimizer, factor)


@SCHEDULES.register("constant")
def _constant(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LRScheduler:
    """Linear warm-up to lr, then lr."""
    warmup = _warmup_steps(config, total_steps)
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


@SCHEDULES.register("flat_cos")
def _flat_cos(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int, *,
              flat: float = 0.75) -> LRScheduler:
    """fastai's fit_flat_cos: lr for the first `flat` share of the steps, then half
    a cosine down to lr / 1e5 at the last step (no warm-up)."""
    if not 0 <= flat <= 1:
        raise ConfigError(f"schedule flat_cos: schedule_params flat is the share of steps at the full rate, "
                          f"between 0 and 1, not {flat}")
    flat_steps = round(flat * total_steps)

    def factor(step: int) -> float:
        if step < flat_steps:
            return 1.0
        pct = min(1.0, (step - flat_steps) / max(1, total_steps - 1 - flat_steps))
        return 1 / DIV_FINAL + (1 - 1 / DIV_FINAL) * (1 + math.cos(math.pi * pct)) / 2

    return LambdaLR(optimizer, factor)


class Plateau(LRScheduler, Hook):
    """ReduceLROnPlateau as a schedule and a loop hook: a linear warm-up per step,
    and after each epoch the rate times `factor` once the monitored figure
    (`loss`: the validation loss, lower is better; `figure`: the validation
    MAP@3 or lwlrap, higher is better) has not improved for `patience` epochs,
    never below `min_lr`."""

    MONITORS = ("loss", "figure")

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, factor: float, patience: int,
                 monitor: str, min_lr: float) -> None:
        if monitor not in self.MONITORS or not 0 < factor < 1 or patience < 0 or min_lr < 0:
            raise ConfigError(f"schedule plateau: schedule_params need monitor one of {', '.join(self.MONITORS)} "
                              f"(not {monitor!r}), 0 < factor < 1 (not {factor}), patience ≥ 0 (not {patience}) "
                              f"and min_lr ≥ 0 (not {min_lr})")
        self.warmup_steps, self.factor, self.patience = warmup_steps, factor, patience
        self.monitor, self.min_lr = monitor, min_lr
        self.scale, self.best, self.bad = 1.0, None, 0
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        warm = min(1.0, (self.last_epoch + 1) / self.warmup_steps)
        return [max(self.min_lr, base * self.scale) * warm for base in self.base_lrs]

    def epoch_end(self, state: FoldState, record: EpochRecord) -> None:
        value = record.val_loss if self.monitor == "loss" else -record.figure
        if self.best is None or value < self.best:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            self.scale *= self.factor
            self.bad = 0
            self._last_lr = self.get_lr()  # the new rate holds from the next batch on
            for group, lr in zip(self.optimizer.param_groups, self._last_lr):
                group["lr"] = lr


@SCHEDULES.register("plateau")
def _plateau(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int, *, factor: float = 0.5,
             patience: int = 3, monitor: str = "loss", min_lr: float = 0.0) -> LRScheduler:
    return Plateau(optimizer, _warmup_steps(config, total_steps), factor, patience, monitor, min_lr)


def _warmup_steps(config: OptimConfig, total_steps: int) -> int:
    return max(1, int(config.warmup * total_steps))


def check_schedule(config: OptimConfig) -> None:
    """Fail before training on an unknown schedule, schedule parameter or value."""
    accepted = [name for name, p in inspect.signature(SCHEDULES.get(config.schedule)).parameters.items()
                if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(config.schedule_params) - set(accepted))
    if unknown:
        raise ConfigError(f"schedule {config.schedule!r} got unknown schedule_params {', '.join(unknown)}; "
                          f"accepted: {', '.join(accepted) or 'none'}")
    build_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr), config, 10)


def build_schedule(optimizer: torch.optim.Optimizer | Lookahead, config: OptimConfig,
                   total_steps: int) -> LRScheduler:
    """The configured per-step schedule, on Lookahead's inner optimiser."""
    inner = optimizer.inner if isinstance(optimizer, Lookahead) else optimizer
    return SCHEDULES.get(config.schedule)(inner, config, total_steps, **config.schedule_params)


def schedule_hooks(schedule: LRScheduler) -> list[Hook]:
    """The schedule itself where it also watches the epochs (it is a Hook)."""
    return [schedule] if isinstance(schedule, Hook) else []
