"""Name → object tables for everything a config or command line names (models,
augmentations, layouts, optimisers, schedules, output and export formats)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, cast

from .errors import ConfigError

T = TypeVar("T")
_Entry = TypeVar("_Entry")


class Registry(Generic[T]):
    """Entries of one `kind` ("model", "schedule", ...) by name, in registration order.

    With `package` (a dotted name), every module of that package is imported on
    the first lookup, so that a module registering its entries is found by
    being there.
    """

    def __init__(self, kind: str, package: str | None = None, plural: str | None = None) -> None:
        self.kind, self.plural = kind, plural or f"{kind}s"
        self._package = package
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[_Entry], _Entry]:
        """Decorator adding the decorated function or class under `name`."""

        def decorate(entry: _Entry) -> _Entry:
            self.add(name, cast(T, entry))
            return entry

        return decorate

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry called `name`; a `ConfigError` listing the valid names if there is none."""
        self._load()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names in registration order."""
        self._load()
        return iter(list(self._entries))

    def _load(self) -> None:
        if self._package is None:
            return
        for module in pkgutil.iter_modules(importlib.import_module(self._package).__path__):
            importlib.import_module(f"{self._package}.{module.name}")
        self._package = None
