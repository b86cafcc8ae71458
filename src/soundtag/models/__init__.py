"""Model registry: each family registers its constructors under a short name."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}

_Factory = TypeVar("_Factory", bound=Callable[..., nn.Module])


def register(name: str) -> Callable[[_Factory], _Factory]:
    """Class decorator adding a model constructor to ``MODELS`` under ``name``."""

    def add(factory: _Factory) -> _Factory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return add


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int, **params: Any) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs; ``params`` go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")
    factory = MODELS[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown parameter(s): {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    return factory(num_classes, **params)


# Importing the families registers them.
from . import mobilenet, panns, resnet, vgg  # noqa: E402,F401
