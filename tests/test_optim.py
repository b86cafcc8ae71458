"""Optimisers, Lookahead and learning-rate schedules against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from soundtag.config import OptimConfig, TrainConfig
from soundtag.errors import ConfigError
from soundtag.optim import OPTIMIZERS, SCHEDULES, Lookahead, build_optimizer, build_schedule, schedule_hooks

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


def test_flat_cos_holds_the_rate_then_follows_half_a_cosine_to_lr_over_1e5():
    total, flat = 40, 30  # fastai's fit_flat_cos with pct_start 0.75
    got = rates(OptimConfig(lr=LR, schedule="flat_cos", schedule_params={"flat": 0.75}), total)
    floor = LR / 1e5
    assert got[:flat] == pytest.approx([LR] * flat, rel=1e-12)
    for step in (30, 32, 34, 35, 37, 39):
        assert got[step] == pytest.approx(cos_between(LR, floor, (step - flat) / (total - 1 - flat)), rel=1e-9), step
    assert got[39] == pytest.approx(floor, rel=1e-9)
    assert rates(OptimConfig(lr=LR, schedule="flat_cos"), 8)[:6] == [LR] * 6  # default: 0.75 of the steps


class Record:
    def __init__(self, val_loss: float, figure: float = 0.0):
        self.val_loss, self.figure = val_loss, figure


def plateau_rates(params: dict, records: list[Record], steps: int = 2, warmup: float = 0.0) -> list[float]:
    """The rate of each epoch's first step; the schedule stepped each batch and told each epoch's figures."""
    config = OptimConfig(lr=LR, schedule="plateau", warmup=warmup, schedule_params=params)
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    schedule = build_schedule(optimizer, config, steps * len(records))
    assert schedule_hooks(schedule) == [schedule]
    out = []
    for record in records:
        out.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps):
            optimizer.step()
            schedule.step()
        schedule.epoch_end(None, record)
    return out + [optimizer.param_groups[0]["lr"]]


def test_plateau_cuts_the_rate_after_patience_epochs_without_a_lower_loss():
    losses = [1.0, 0.9, 0.95, 0.92, 0.91, 0.8, 0.85, 0.86, 0.87, 0.88]
    got = plateau_rates({"factor": 0.5, "patience": 2}, [Record(v) for v in losses])
    # best 0.9 at epoch 2; epochs 3-5 are not lower: cut after the 3rd (epoch 5); 0.8 is a new best;
    # epochs 7-9 not lower: cut after epoch 9
    expected = [LR] * 5 + [LR / 2] * 4 + [LR / 4] * 2
    assert got == pytest.approx(expected, rel=1e-12)


def test_plateau_can_watch_the_figure_and_keeps_a_floor_and_the_warm_up():
    figures = [0.5, 0.6, 0.6, 0.55, 0.7, 0.7]
    got = plateau_rates({"factor": 0.1, "patience": 0, "monitor": "figure", "min_lr": LR / 20},
                        [Record(1.0, f) for f in figures])
    # higher is better: epochs 3, 4 and 6 do not improve (patience 0: cut at once), floored at lr / 20
    assert got == pytest.approx([LR, LR, LR, LR / 10, LR / 20, LR / 20, LR / 20], rel=1e-12)
    warm = plateau_rates({}, [Record(1.0)] * 2, steps=5, warmup=0.4)  # 4 warm-up steps of 10
    assert warm[0] == pytest.approx(LR / 4, rel=1e-12) and warm[1] == pytest.approx(LR, rel=1e-12)


def test_plateau_state_survives_a_checkpoint():
    config = OptimConfig(lr=LR, schedule="plateau", schedule_params={"patience": 0})
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
    schedule = build_schedule(optimizer, config, 10)
    for loss in (1.0, 2.0):
        schedule.epoch_end(None, Record(loss))
    again = build_schedule(build_optimizer(torch.nn.Linear(2, 2).parameters(), config), config, 10)
    again.load_state_dict(schedule.state_dict())
    assert (again.scale, again.best, again.bad) == (0.5, 1.0, 0)


@pytest.mark.parametrize("config, message", [
    (OptimConfig(schedule="cosine", schedule_params={"flat": 0.5}),
     "schedule 'cosine' got unknown schedule_params flat; accepted: none"),
    (OptimConfig(schedule="plateau", schedule_params={"cooldown": 2}),
     "schedule 'plateau' got unknown schedule_params cooldown; accepted: factor, patience, monitor, min_lr"),
    (OptimConfig(schedule="plateau", schedule_params={"monitor": "accuracy"}), "monitor one of loss, figure"),
    (OptimConfig(schedule="flat_cos", schedule_params={"flat": 1.5}), "flat .* between 0 and 1, not 1.5"),
])
def test_schedule_parameters_are_checked_before_training(config, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(optim=config).validate()


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
    assert SCHEDULES.names() == ["constant", "cosine", "flat_cos", "onecycle", "plateau"]


@pytest.mark.parametrize("change, message", [
    ({"name": "adam"}, "unknown optimiser 'adam'; valid optimisers: adamw, radam, sgd"),
    ({"schedule": "step"}, "unknown schedule 'step'; valid schedules: constant, cosine, flat_cos, onecycle, plateau"),
])
def test_unknown_optimiser_or_schedule_is_a_config_error_listing_valid_names(change, message):
    config = OptimConfig(**change)
    with pytest.raises(ConfigError) as caught:
        TrainConfig(optim=config).validate()
    assert str(caught.value) == message
    with pytest.raises(ConfigError, match=message):
        optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config)
        build_schedule(optimizer, config, 10)
