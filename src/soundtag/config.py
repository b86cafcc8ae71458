"""Training configuration: plain dataclasses, loaded from YAML presets and files.

A config is resolved once (preset, then file, then command-line overrides),
checked before any training starts, and saved in the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError
from .features import FeatureConfig
from .tta import TTA

if TYPE_CHECKING:
    import torch

LARGEST = 2**63 - 1  # whole numbers in a config fit 64 bits
TYPE_WORDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string",
              type(None): "null"}


SELECTIONS = ("inner", "last")


@dataclass
class ModelConfig:
    name: str = "cnn6"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CropConfig:
    """Training crops: a length per batch between two percentiles of clip lengths."""

    low_pct: float = 25.0
    high_pct: float = 75.0
    pad_mode: str = "wrap"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-2
    momentum: float = 0.9
    lookahead: bool = False
    schedule: str = "onecycle"
    warmup: float = 0.1
    schedule_params: dict[str, Any] = field(default_factory=dict)  # e.g. plateau's factor, patience, monitor


@dataclass
class AverageConfig:
    """Weight averaging: `kind` ema (after every step) or swa (at every epoch end),
    from `start` (a share of the steps or epochs); `decay` is EMA's, per step."""

    kind: str = "ema"
    start: float = 0.75
    decay: float = 0.999


@dataclass
class TrainConfig:
    """Everything that decides how a run trains."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: list[dict[str, Any]] = field(default_factory=list)
    copies: list[dict[str, float]] | None = None  # offline copies of each training clip: [{pitch, stretch}, ...]
    epochs: int = 30
    epoch_clips: int | None = None
    batch_size: int = 32
    patience: int = 10
    early_stop_from: float = 0.5  # no early stopping before this share of the epochs (rate still high)
    selection: str = "inner"  # what picks a fold's epoch: an inner split of its training clips, or "last"
    inner_fraction: float = 0.15  # share of a fold's training clips held out for selection ("inner")
    label_smoothing: float = 0.0
    loss: str | None = None  # default: the task's (bce for multi-label sets, cross_entropy otherwise)
    loss_params: dict[str, Any] = field(default_factory=dict)
    origin_loss: dict[str, dict[str, Any]] = field(default_factory=dict)  # origin → {name, params}: its clips' loss
    average: AverageConfig | None = None  # EMA or SWA of the weights, kept as the fold's weights
    tta: TTA = field(default_factory=TTA)  # the views predictions (and held-out scores) use unless told otherwise
    folds: int | str = 5
    train_folds: list[int] | None = None
    noisy: str = "include"
    noisy_weight: float = 1.0
    origin_weights: dict[str, float] = field(default_factory=dict)  # origin → loss-weight factor
    batch_shares: dict[str, float] | None = None  # origin → share of every batch; None: plain shuffle
    corrections: str | None = None  # a label corrections CSV (fname, old_labels, new_labels) from `soundtag review`
    threads: int = 0
    bf16: bool = False
    channels_last: bool = True
    seed: int = 0

    def validate(self) -> None:
        """Fail with the valid choices on anything unknown, before training starts."""
        from . import augment, optim
        optim.OPTIMIZERS.get(self.optim.name)
        optim.check_schedule(self.optim)
        check_choice("pad mode", self.crop.pad_mode, augment.PAD_MODES)
        from .clips import NOISY_POLICIES
        from .task import check_loss
        check_choice("noisy", self.noisy, NOISY_POLICIES)
        check_loss(self.loss, self.loss_params)
        self._check_origin_options()
        from .copies import variants
        variants(self.copies)
        if not (isinstance(self.folds, int) and self.folds >= 2) and self.folds != "own":
            raise ConfigError(f"folds must be a whole number ≥ 2 or 'own', not {self.folds!r}")
        if not 0 <= self.crop.low_pct <= self.crop.high_pct <= 100:
            raise ConfigError(f"crop percentiles need 0 ≤ low_pct ≤ high_pct ≤ 100, got "
                              f"{self.crop.low_pct} and {self.crop.high_pct}")
        if self.epoch_clips is not None and self.epoch_clips < 1:
            raise ConfigError(f"epoch_clips must be at least 1 (or left out), not {self.epoch_clips}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        check_choice("selection", self.selection, SELECTIONS)
        if not 0 < self.inner_fraction < 1 or not 0 <= self.early_stop_from <= 1:
            raise ConfigError(f"inner_fraction must be between 0 and 1 (not {self.inner_fraction}) and "
                              f"early_stop_from between 0 and 1 (not {self.early_stop_from})")
        if not 0 <= self.threads <= 1024:
            raise ConfigError(f"threads must be between 0 (all usable cores, up to 2) and 1024, not {self.threads}")
        try:
            augment.check_kind(self.augment, self.features.kind)
            self.create_model(2)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        except (TypeError, IndexError, OverflowError) as e:  # a component's parameter of the wrong kind
            raise ConfigError(f"model or augmentation parameters: {' '.join(str(e).split())}") from None

    def _check_origin_options(self) -> None:
        """origin_weights, batch_shares, origin_loss and average."""
        from .averaging import AVERAGES
        from .clips import ORIGINS
        from .loader import share_counts
        from .task import check_loss
        for what in ("origin_weights", "batch_shares", "origin_loss"):
            for origin, value in (getattr(self, what) or {}).items():
                if origin not in ORIGINS:
                    raise ConfigError(f"unknown origin {origin!r} in {what}; valid: {', '.join(ORIGINS)}")
                if what != "origin_loss" and not value > 0:
                    raise ConfigError(f"{what}.{origin} must be above 0, not {value}")
        noisy = self.origin_weights.get("noisy", self.noisy_weight)
        if self.noisy_weight not in (1, noisy):
            raise ConfigError(f"noisy_weight ({self.noisy_weight}) and origin_weights.noisy ({noisy}) both set "
                              "the noisy clips' loss weight; give it once")
        if self.batch_shares is not None:
            if not math.isclose(sum(self.batch_shares.values()), 1, abs_tol=1e-6):
                raise ConfigError(f"batch_shares must add up to 1, not {sum(self.batch_shares.values()):g}")
            few = [o for o, n in share_counts(self.batch_shares, self.batch_size).items() if n == 0]
            if few:
                raise ConfigError(f"batch_shares: {few[0]}'s share {self.batch_shares[few[0]]} of batch_size "
                                  f"{self.batch_size} is less than one clip")
        for origin, spec in self.origin_loss.items():
            if not isinstance(spec.get("name"), str) or set(spec) - {"name", "params"} or \
                    not isinstance(spec.get("params", {}), dict):
                raise ConfigError(f"origin_loss.{origin} must be {{name: LOSS, params: {{...}}}} (params optional), "
                                  f"not {_shown(spec)}")
            try:
                check_loss(spec["name"], spec.get("params", {}))
            except ConfigError as e:
                raise ConfigError(f"origin_loss.{origin}: {e}") from None
        if self.average is not None:
            AVERAGES.get(self.average.kind)
            if not 0 <= self.average.start < 1:
                raise ConfigError(f"average.start must be at least 0 and below 1, not {self.average.start}")
            if not 0 < self.average.decay < 1:
                raise ConfigError(f"average.decay must be between 0 and 1, not {self.average.decay}")

    def create_model(self, num_classes: int) -> torch.nn.Module:
        """The configured network for `num_classes` classes, freshly initialised."""
        from . import models
        models.check_features(self.model.name, self.features.kind)
        return models.create_model(self.model.name, num_classes, self.features,
                                   n_mels=self.features.n_features, **self.model.params)

    def num_threads(self) -> int:
        return self.threads or min(os.cpu_count() or 1, 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return build_dataclass(cls, data, "config")


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def build_dataclass(cls: type, data: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from nested dicts, rejecting unknown keys and
    values that do not match their field's annotation; `where` names the source."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options, not {_shown(data)}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(k if isinstance(k, str) and k.isprintable() else repr(k) for k in data if k not in hints)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(hints))}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        optional = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
        if dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            value = build_dataclass(hint, value, f"{where}.{name}")
        elif optional is not None and isinstance(value, dict):  # a section that may be null
            value = build_dataclass(optional, value, f"{where}.{name}")
        elif not _matches(value, hint):
            raise ConfigError(f"{where}.{name} must be {_describe(hint)}, not {_shown(value)}")
        values[name] = value
    try:
        return cls(**values)
    except ConfigError as e:  # a nested section's own checks (FeatureConfig)
        raise ConfigError(f"{where}: {e}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML loads it) fits a field annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is tuple:  # tuple[X, ...], written as a list
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    if hint is int:
        return type(value) is int and -LARGEST <= value <= LARGEST
    if hint is float:
        return (type(value) is int and -LARGEST <= value <= LARGEST
                or type(value) is float and math.isfinite(value))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of items each {_describe(args[0])}"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return TYPE_WORDS.get(hint, hint.__name__)


def _shown(value: Any) -> str:
    """A short one-line rendering of a value from a config."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 2, 4, 4, 40, 40
    try:
        return short.repr(value)
    except ValueError:  # an int too long to print
        return f"a {type(value).__name__} too large to print"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge plain dicts; lists and scalars in `override` replace, and so
    does a dict naming another component (a model `name` other than the base's)."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        nested = isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name")
        out[key] = merge(old, value) if nested else value
    return out


def presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("soundtag.presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's mapping of options; unreadable, non-UTF-8 or malformed files
    are a one-line `ConfigError` naming the file and the line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text; save the file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, not {_shown(data)}")
    return data


def resolve(preset: str | None = "fast", file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset, then config file, then overrides; validated."""
    data: dict[str, Any] = {}
    if preset:
        if preset not in presets():
            raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(presets())}")
        data = yaml.safe_load(resources.files("soundtag.presets").joinpath(f"{preset}.yaml").read_text())
    if file:
        data = merge(data, load_yaml(file))
        build_dataclass(TrainConfig, data, f"{file}: config")  # so that a wrong value names the file
    data = merge(data, overrides or {})
    config = TrainConfig.from_dict(data)
    config.validate()
    return config
