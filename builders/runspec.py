"""Run specs: the YAML of the protocol runners (condensed-continual, condensed-nas), checked key by key."""

from __future__ import annotations

import os
from typing import Any

from builders.augment import parse_strategy
from builders.errors import RecipeError
from builders.recipe import read_yaml_mapping, scalar_problem, set_dotted, unknown_key_hints


def load_spec(path: str | os.PathLike, overrides: list[tuple[str, Any]] = ()) -> dict[str, Any]:
    """The mapping of a runner's YAML file with ``overrides`` (dotted keys) applied."""
    data = read_yaml_mapping(path, "run spec")
    for key, value in overrides:
        set_dotted(data, key, value)
    return data


def check_keys(section: str, data: Any, defaults: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``defaults`` updated with ``data``; RecipeError for a missing required key, an unknown key (with
    the closest valid one) or a value whose type differs from its default's (ints pass as floats)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{section}: expected a mapping, got {data!r}")
    for key in required:
        if key not in data:
            raise RecipeError(f"{section}: missing key {key!r}")
    hints = unknown_key_hints(data, defaults)
    if hints:
        raise RecipeError(f"{section}: unknown key{'s' if len(hints) > 1 else ''} {', '.join(hints)}; "
                          f"valid keys: {', '.join(sorted(defaults))}")
    out = dict(defaults)
    for key, value in data.items():
        default = defaults[key]
        if value is None and isinstance(default, (str, int, float, list)):
            raise RecipeError(f"{section}.{key}: expected {type(default).__name__}, got null")
        if default is not None and value is not None:
            if isinstance(default, bool) != isinstance(value, bool):
                raise RecipeError(f"{section}.{key}: expected {type(default).__name__}, got {value!r}")
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if not isinstance(value, type(default)):
                raise RecipeError(f"{section}.{key}: expected {type(default).__name__}, got {value!r}")
            if scalar_problem(value):
                raise RecipeError(f"{section}.{key}: {scalar_problem(value)}")
        out[key] = value
    return out


def check_augment(key: str, strategy: str) -> None:
    """RecipeError unless ``strategy`` is ``none`` or a DSA strategy (what the runners' training takes)."""
    if strategy != "none":
        try:
            parse_strategy(strategy)
        except ValueError as exc:
            raise RecipeError(f"{key}: {exc} (or 'none')") from None


def check_overrides(section: str, overrides: Any) -> None:
    """RecipeError unless ``overrides`` maps dotted recipe keys (strings) to values."""
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and k for k in overrides):
        raise RecipeError(f"{section}: expected a mapping of recipe keys (dotted strings) to values, got {overrides!r}")
