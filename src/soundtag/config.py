"""Training configuration: plain dataclasses, loaded from YAML presets and files.

A config is resolved once (preset, then file, then command-line overrides),
checked before any training starts, and saved in the run folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError
from .features import FeatureConfig

if TYPE_CHECKING:
    import torch

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


@dataclass
class TrainConfig:
    """Everything that decides how a run trains."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: list[dict[str, Any]] = field(default_factory=list)
    epochs: int = 30
    epoch_clips: int | None = None
    batch_size: int = 32
    patience: int = 10
    label_smoothing: float = 0.0
    folds: int | str = 5
    train_folds: list[int] | None = None
    noisy: str = "include"
    noisy_weight: float = 1.0
    threads: int = 0
    bf16: bool = False
    channels_last: bool = True
    seed: int = 0

    def validate(self) -> None:
        """Fail with the valid choices on anything unknown, before training starts."""
        from . import augment, optim
        optim.OPTIMIZERS.get(self.optim.name)
        optim.SCHEDULES.get(self.optim.schedule)
        _choice("pad mode", self.crop.pad_mode, augment.PAD_MODES)
        _choice("noisy", self.noisy, ("include", "exclude"))
        if not (isinstance(self.folds, int) and self.folds >= 2) and self.folds != "own":
            raise ConfigError(f"folds must be a whole number ≥ 2 or 'own', not {self.folds!r}")
        if not 0 <= self.crop.low_pct <= self.crop.high_pct <= 100:
            raise ConfigError(f"crop percentiles need 0 ≤ low_pct ≤ high_pct ≤ 100, got "
                              f"{self.crop.low_pct} and {self.crop.high_pct}")
        if self.epoch_clips is not None and self.epoch_clips < 1:
            raise ConfigError(f"epoch_clips must be at least 1 (or left out), not {self.epoch_clips}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        try:
            augment.build(self.augment)
            self.create_model(2)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def create_model(self, num_classes: int) -> torch.nn.Module:
        """The configured network for `num_classes` classes, freshly initialised."""
        from . import models
        return models.create_model(self.model.name, num_classes, n_mels=self.features.n_features,
                                   **self.model.params)

    def num_threads(self) -> int:
        return self.threads or min(os.cpu_count() or 1, 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "config")


def _choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _build(cls: type, data: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from nested dicts, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        nested = _nested_type(known[name].type)
        values[name] = _build(nested, value, f"{where}.{name}") if nested and isinstance(value, dict) else value
    return cls(**values)


def _nested_type(annotation: Any) -> type | None:
    names = {"FeatureConfig": FeatureConfig, "ModelConfig": ModelConfig,
             "CropConfig": CropConfig, "OptimConfig": OptimConfig}
    return names.get(str(annotation))


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
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options")
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
    data = merge(data, overrides or {})
    config = TrainConfig.from_dict(data)
    config.validate()
    return config
