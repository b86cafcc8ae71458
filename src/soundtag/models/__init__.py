"""Model registry: each module of this package registers its families under short names.

Every model maps input [B, 1, n_features, frames] to `(logits, embedding)` in eval
mode. In training mode a model with extra heads returns
`(logits, embedding, [(loss weight, logits), ...])`; the loop adds their weighted
losses. A family that takes the waveform sets `INPUT = "waveform"`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", package=__name__)
CLASSIFIERS = ("head", "aux_heads")  # the layers whose shape follows the class list


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def create_model(name: str, num_classes: int, **params: Any) -> nn.Module:
    """Build model `name` with `num_classes` outputs; `params` go to its constructor."""
    factory = MODELS.get(name)
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown parameter(s): {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    return factory(num_classes, **params)


def check_features(name: str, kind: str) -> None:
    """Fail when model `name` cannot take features of `kind` (a waveform model on
    log-mels, or a spectrogram model on the waveform)."""
    wants = getattr(MODELS.get(name), "INPUT", "spectrogram")
    if (kind == "waveform") != (wants == "waveform"):
        needs = "features: {kind: waveform, hop_length: 1}" if wants == "waveform" else "log-mel or MFCC features"
        raise ConfigError(f"model {name!r} takes the {wants}, not features of kind {kind!r}; use {needs}")


def is_classifier(weight: str) -> bool:
    """Whether a state-dict entry belongs to a class-dependent layer (dropped by --init across class lists)."""
    return weight.split(".", 1)[0] in CLASSIFIERS
