"""Optimisers, Lookahead and learning-rate schedules against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from soundtag.config import OptimConfig, TrainConfig
from soundtag.errors import ConfigError
from soundtag.optim import OPTIMIZERS, SCHEDULES, Lookahead, build_optimizer, build_schedule

LR = 0.01


def rates(config: OptimConfig, total_steps: int) -> list[float]:
    """The learning rate each of `total_steps` optimiser steps runs at."""
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    schedule = build_schedule(optimizer, config, total_steps)
    out = []
    for _ in range(total_steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def cos_between(start: float, end: float, pct: float) -> float:
    """Cosine annealing from `start` (pct 0) to `end` (pct 1)."""
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))


# ---------------------------------------------------------------- schedules


def test_one_cycle_rises_to_the_peak_over_the_warm_up_then_anneals_to_the_floor():
    # torch's OneCycleLR: lr/25 at step 0, lr at step pct_start * total - 1, lr/25/1e4 at the last step
    total, warmup = 100, 0.3
    initial, floor, peak_step = LR / 25, LR / 25 / 1e4, warmup * total - 1
    got = rates(OptimConfig(lr=LR, schedule="onecycle", warmup=warmup), total)

    def expected(step: int) -> float:
        if step <= peak_step:
            return cos_between(initial, LR, step / peak_step)
        return cos_between(LR, floor, (step - peak_step) / (total - 1 - peak_step))

    assert got[0] == pytest.approx(initial, rel=1e-9)
    assert got[29] == pytest.approx(LR, rel=1e-9)
    assert got[64] == pytest.approx((LR + floor) / 2, rel=1e-9)  # half-way down
    assert got[99] == pytest.approx(floor, rel=1e-9)
    for step in (0, 7, 15, 29, 30, 47, 64, 81, 99):
        assert got[step] == pytest.approx(expected(step), rel=1e-9), step


@pytest.mark.parametrize("warmup, total", [(0.2, 5), (0.1, 10), (0.25, 4), (0.05, 20)])
def test_one_cycle_with_a_warm_up_of_exactly_one_step_still_runs_from_start_to_floor(warmup, total):
    """Regression: torch's OneCycleLR divides by zero when warmup * total_steps == 1 (the fast
    preset's 0.2 with 5 steps in all)."""
    got = rates(OptimConfig(lr=LR, schedule="onecycle", warmup=warmup), total)
    assert all(math.isfinite(r) for r in got)
    assert got[0] == pytest.approx(LR / 25, rel=1e-9)
    assert got[-1] == pytest.approx(LR / 25 / 1e4, rel=1e-9)
    assert max(got) > LR / 2


def test_cosine_warms_up_linearly_then_follows_half_a_cosine():
    total, warm = 100, 20  # warmup 0.2 of 100 steps
    got = rates(OptimConfig(lr=LR, schedule="cosine", warmup=0.2), total)
    assert got[0] == pytest.approx(LR / warm, rel=1e-9)
    assert got[9] == pytest.approx(LR * 10 / warm, rel=1e-9)
    assert got[19] == pytest.approx(LR, rel=1e-9)  # end of the warm-up
    assert got[20] == pytest.approx(LR, rel=1e-9)
    assert got[40] == pytest.approx(LR * (1 + math.cos(math.pi / 4)) / 2, rel=1e-9)  # a quarter down
    assert got[60] == pytest.approx(LR / 2, rel=1e-9)  # half-way
    assert got[80] == pytest.approx(LR * (1 + math.cos(3 * math.pi / 4)) / 2, rel=1e-9)
    assert got[99] == pytest.approx(LR * (1 + math.cos(math.pi * 79 / 80)) / 2, rel=1e-9)  # last step


def test_constant_warms_up_linearly_then_stays():
    got = rates(OptimConfig(lr=LR, schedule="constant", warmup=0.1), 50)  # 5 warm-up steps
    assert got[:5] == pytest.approx([LR * k / 5 for k in range(1, 6)], rel=1e-9)
    assert got[5:] == pytest.approx([LR] * 45, rel=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_no_warm_up_starts_at_the_full_rate(schedule):
    assert rates(OptimConfig(lr=LR, schedule=schedule, warmup=0.0), 10)[0] == pytest.approx(LR, rel=1e-9)


def test_schedules_drive_lookaheads_inner_optimiser():
    config = OptimConfig(name="sgd", lookahead=True, schedule="constant", lr=LR, warmup=0.5)
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    build_schedule(optimizer, config, 4)
    assert optimizer.inner.param_groups[0]["lr"] == pytest.approx(LR / 2, rel=1e-9)


# ---------------------------------------------------------------- optimisers


@pytest.mark.parametrize("name, cls, extra", [
    ("adamw", torch.optim.AdamW, {}),
    ("sgd", torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
    ("radam", torch.optim.RAdam, {"decoupled_weight_decay": True}),
])
def test_each_optimiser_is_its_torch_class_with_the_configs_rates(name, cls, extra):
    config = OptimConfig(name=name, lr=0.02, weight_decay=0.003, momentum=0.8)
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.003)
    assert {k: group[k] for k in extra} == extra


def test_lookahead_wraps_the_configured_optimiser():
    config = OptimConfig(name="radam", lookahead=True)
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    assert isinstance(optimizer, Lookahead) and type(optimizer.inner) is torch.optim.RAdam
    assert (optimizer.k, optimizer.alpha) == (5, 0.5)


def test_lookahead_pulls_the_weights_to_the_slow_copy_every_k_steps():
    # plain SGD with lr 1 on loss -w moves w up by exactly 1 a step
    w = torch.nn.Parameter(torch.zeros(()))
    optimizer = Lookahead(torch.optim.SGD([w], lr=1.0), k=3, alpha=0.25)
    seen = []
    for _ in range(6):
        optimizer.zero_grad()
        (-w).backward()
        optimizer.step()
        seen.append(w.item())
    # step 3: slow 0 -> 0 + 0.25 * (3 - 0) = 0.75; step 6: 0.75 + 0.25 * (3.75 - 0.75) = 1.5
    assert seen == [1.0, 2.0, 0.75, 1.75, 2.75, 1.5]
    assert optimizer.slow[0].item() == 1.5


# ---------------------------------------------------------------- names


def test_registries_hold_the_documented_names():
    assert OPTIMIZERS.names() == ["adamw", "radam", "sgd"]
    assert SCHEDULES.names() == ["constant", "cosine", "onecycle"]


@pytest.mark.parametrize("change, message", [
    ({"name": "adam"}, "unknown optimiser 'adam'; valid optimisers: adamw, radam, sgd"),
    ({"schedule": "step"}, "unknown schedule 'step'; valid schedules: constant, cosine, onecycle"),
])
def test_unknown_optimiser_or_schedule_is_a_config_error_listing_valid_names(change, message):
    config = OptimConfig(**change)
    with pytest.raises(ConfigError) as caught:
        TrainConfig(optim=config).validate()
    assert str(caught.value) == message
    with pytest.raises(ConfigError, match=message):
        optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
        build_schedule(optimizer, config, 10)
