"""Optimisers (AdamW, SGD, RAdam, optional Lookahead) and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from .config import OptimConfig
from .registry import Registry

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
OPTIMIZERS: Registry[Callable[[Params, OptimConfig], torch.optim.Optimizer]] = Registry("optimiser")
SCHEDULES: Registry[Callable[[torch.optim.Optimizer, OptimConfig, int], LRScheduler]] = Registry("schedule")


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


def _warmup_steps(config: OptimConfig, total_steps: int) -> int:
    return max(1, int(config.warmup * total_steps))


def build_schedule(optimizer: torch.optim.Optimizer | Lookahead, config: OptimConfig,
                   total_steps: int) -> LRScheduler:
    """The configured per-step schedule, on Lookahead's inner optimiser."""
    inner = optimizer.inner if isinstance(optimizer, Lookahead) else optimizer
    return SCHEDULES.get(config.schedule)(inner, config, total_steps)
