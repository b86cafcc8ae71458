"""The name → object registry every configurable component is looked up in."""

from __future__ import annotations

import sys

import pytest

from soundtag.errors import ConfigError
from soundtag.registry import Registry


def test_entries_by_name_in_registration_order_and_names_sorted():
    things: Registry[int] = Registry("thing")
    things.add("b", 2)

    @things.register("a")
    def one() -> int:
        return 1

    assert things.get("b") == 2 and things.get("a") is one
    assert list(things) == ["b", "a"] and things.names() == ["a", "b"]
    assert "a" in things and "c" not in things


def test_unknown_name_is_a_config_error_listing_the_valid_names_sorted():
    things: Registry[int] = Registry("thing")
    for name in ("zeta", "alpha", "mu"):
        things.add(name, 0)
    with pytest.raises(ConfigError) as caught:
        things.get("beta")
    assert str(caught.value) == "unknown thing 'beta'; valid things: alpha, mu, zeta"


def test_a_name_is_registered_once():
    things: Registry[int] = Registry("thing")
    things.add("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        things.add("a", 2)


def test_a_packages_modules_are_imported_on_the_first_lookup(tmp_path, monkeypatch):
    package = tmp_path / "registry_test_plugins"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from soundtag.registry import Registry\nTHINGS = Registry('thing', package=__name__)\n")
    for name in ("first", "second"):
        (package / f"{name}.py").write_text(f"from . import THINGS\nTHINGS.add({name!r}, {name!r}.upper())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = ["registry_test_plugins", "registry_test_plugins.first", "registry_test_plugins.second"]
    try:
        from registry_test_plugins import THINGS  # type: ignore[import-not-found]

        assert modules[1] not in sys.modules  # nothing imported before a lookup
        assert THINGS.get("second") == "SECOND"
        assert THINGS.names() == ["first", "second"]
    finally:
        for name in modules:
            sys.modules.pop(name, None)
