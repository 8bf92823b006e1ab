"""Run specs: the YAML of the protocol runners (condensed-continual, condensed-nas), checked key by key."""

from __future__ import annotations

import difflib
import os
from typing import Any

from builders.errors import RecipeError
from builders.recipe import read_yaml_mapping, set_dotted


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
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, list(defaults), 1))
                             else "") for k in unknown]
        raise RecipeError(f"{section}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                          f"valid keys: {', '.join(sorted(defaults))}")
    out = dict(defaults)
    for key, value in data.items():
        default = defaults[key]
        if default is not None and value is not None:
            if isinstance(default, bool) != isinstance(value, bool):
                raise RecipeError(f"{section}.{key}: expected {type(default).__name__}, got {value!r}")
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if not isinstance(value, type(default)):
                raise RecipeError(f"{section}.{key}: expected {type(default).__name__}, got {value!r}")
        out[key] = value
    return out
