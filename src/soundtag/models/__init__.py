"""Model registry: each module of this package registers its families under short names."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", package=__name__)


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
