"""Model registry: each module of this package registers its families under short names.

Every model maps input [B, 1, n_features, frames] to `(logits, embedding)` in eval
mode. In training mode a model with extra heads returns
`(logits, embedding, [(loss weight, logits), ...])`; the loop adds their weighted
losses. A family that takes the waveform sets `INPUT = "waveform"`; one that needs
log-mels (not MFCCs) sets `INPUT = "logmel"`. A family fitted in closed form
instead of trained has `fit(clips, multilabel)`; one with parts fitted on the
training clips before training has `prepare(clips)` (see `train._train_fold`).
A module that can compute the same function in fewer steps for inference has
`fold()`, which rewrites it in place (see `folded`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..features import FeatureConfig
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", package=__name__)
CLASSIFIERS = ("head", "aux_heads")  # the layers whose shape follows the class list
BACKBONE = "backbone"  # a wrapper's whole network of another family (the fused model's)


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def create_model(name: str, num_classes: int, features: FeatureConfig | None = None, **params: Any) -> nn.Module:
    """Build model `name` with `num_classes` outputs; `params` go to its constructor,
    and `features` (the front end it will see) to a family that takes it."""
    factory = MODELS.get(name)
    signature = inspect.signature(factory).parameters
    accepted = [p for p in signature if p not in ("num_classes", "features")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown parameter(s): {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    if "features" in signature and features is not None:
        params["features"] = features
    return factory(num_classes, **params)


def folded(model: nn.Module) -> nn.Module:
    """`model` itself, rewritten in place for inference: every part that has a
    `fold()` (MobileNetV2's adapter) computes the same outputs, to rounding, in
    fewer layers; eval mode. Never train or save a folded model."""
    for module in list(model.modules()):
        fold = getattr(module, "fold", None)
        if callable(fold):
            fold()
    return model.eval()


def check_features(name: str, kind: str) -> None:
    """Fail when model `name` cannot take features of `kind` (a waveform model on
    log-mels, or a spectrogram model on the waveform)."""
    wants = getattr(MODELS.get(name), "INPUT", "spectrogram")
    if wants == "logmel" and kind != "logmel":
        raise ConfigError(f"model {name!r} computes summary statistics from log-mel features, not features of "
                          f"kind {kind!r}; use features: {{kind: logmel}}")
    if (kind == "waveform") != (wants == "waveform"):
        needs = "features: {kind: waveform, hop_length: 1}" if wants == "waveform" else "log-mel or MFCC features"
        raise ConfigError(f"model {name!r} takes the {wants}, not features of kind {kind!r}; use {needs}")


def is_classifier(weight: str) -> bool:
    """Whether a state-dict entry belongs to a class-dependent layer (dropped by --init across class lists),
    a wrapper's backbone's included."""
    return weight.removeprefix(f"{BACKBONE}.").split(".", 1)[0] in CLASSIFIERS


def init_target(model: nn.Module, weights: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Where another run's weights go (--init): a plain run of a wrapper's backbone
    family initialises its backbone (the run's head left out: the wrapper has its
    own); any other run's weights the whole model."""
    backbone = getattr(model, BACKBONE, None)
    if isinstance(backbone, nn.Module) and not any(n.startswith(f"{BACKBONE}.") for n in weights):
        return backbone, {n: t for n, t in weights.items() if n.split(".", 1)[0] != "head"}
    return model, weights
