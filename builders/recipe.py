"""Recipes: the YAML that names everything a build needs, validated with errors that name the key."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from condensed_datasets.sources import SOURCES, get_source

RECIPES_DIR = Path(os.environ.get("CONDENSED_RECIPES_DIR", Path(__file__).resolve().parents[1] / "recipes"))


class RecipeError(ValueError):
    """A recipe that cannot be built: names the key, the problem and the valid choices."""


@dataclass
class EvalSpec:
    """How a built set is evaluated: the protocol of the papers, on the real test split."""

    model: str | None = None  # None: the recipe's model
    models: list[str] = field(default_factory=list)  # extra models for cross-architecture evaluation
    runs: int = 5
    epochs: int = 1000
    every: int = 0  # evaluate every N iterations during the build; 0: only at the end
    lr: float = 0.01  # used unless the set carries a learned lr
    batch: int = 256
    augment: str | None = None  # None: the recipe's augment; "none": no augmentation
    random_baseline: bool = True
    test_per_class: int | None = None  # test on at most this many real test images per class (quick runs)


@dataclass
class Recipe:
    """A validated build recipe."""

    source: str
    method: str
    ipc: int
    model: str = "ConvNet"
    seed: int = 0
    root: str = "data"
    iterations: int = 0
    checkpoint_every: int = 0
    augment: str = "none"
    real_per_class: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    ipc_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    notes: str = ""
    classes: list[int] | None = None  # build on these source classes only (labels 0..k-1 in this order)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for metadata (JSON-serialisable; ipc_overrides keys become strings)."""
        out = asdict(self)
        out["ipc_overrides"] = {str(k): v for k, v in self.ipc_overrides.items()}
        if self.classes is None:
            del out["classes"]  # recipes of whole sources record what they always did
        return out

    @property
    def eval_model(self) -> str:
        return self.eval.model or self.model

    @property
    def eval_augment(self) -> str:
        return self.eval.augment if self.eval.augment is not None else self.augment


_TOP_KEYS = {f for f in Recipe.__dataclass_fields__}
_EVAL_KEYS = {f for f in EvalSpec.__dataclass_fields__}
_REQUIRED = ("source", "method", "ipc")


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Coerce ``value`` to the type of ``expected`` (int->float allowed) or raise naming ``key``."""
    if expected is None:
        return value
    if isinstance(expected, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(expected, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(expected, float):
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(expected, str):
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(expected, list):
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def _unknown(section: str, given: set[str], valid: set[str]) -> None:
    bad = sorted(given - valid)
    if bad:
        import difflib

        hints = []
        for key in bad:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecipeError(f"unknown key{'s' if len(bad) > 1 else ''} in {section}: {', '.join(hints)}; "
                          f"valid keys: {', '.join(sorted(valid))}")


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted == 'a.b'`` (creating dicts on the way)."""
    parts = dotted.split(".")
    if not all(parts):
        raise RecipeError(f"--set {dotted}: empty key part")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``KEY=VALUE`` strings -> (dotted key, YAML-parsed value)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set eval.runs=1")
        key, raw = pair.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def load_recipe_data(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no recipe at {path}; shipped recipes: {', '.join(available_recipes())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of keys ({', '.join(sorted(_TOP_KEYS))})")
    return data


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a raw mapping into a Recipe; method params are checked against the method's defaults."""
    from builders.methods import get_method  # the registry imports methods; keep this module light

    data = copy.deepcopy(data)
    _unknown("the recipe", set(data), _TOP_KEYS)
    try:  # methods that build no set (expert trajectories) need no ipc
        if not getattr(get_method(str(data.get("method"))), "produces_set", True):
            data.setdefault("ipc", 1)
    except ValueError:
        pass  # an unknown method is reported below, after the required keys
    for key in _REQUIRED:
        if key not in data:
            raise RecipeError(f"missing key {key!r} (a recipe needs {', '.join(_REQUIRED)})")
    source = str(data["source"]).lower()
    if source not in SOURCES:
        raise RecipeError(f"source: unknown {data['source']!r}; valid: {', '.join(SOURCES)}")
    data["source"] = source
    defaults = Recipe(source=source, method="", ipc=1)
    for key in ("ipc", "seed", "iterations", "checkpoint_every"):
        data[key] = _check_type(key, data.get(key, getattr(defaults, key)), 0)
    if data["ipc"] < 1:
        raise RecipeError(f"ipc: must be >= 1, got {data['ipc']}")
    for key in ("iterations", "checkpoint_every", "seed"):
        if data[key] < 0:
            raise RecipeError(f"{key}: must be >= 0, got {data[key]}")

    data["classes"] = _check_classes(data.get("classes"), source)

    overrides = data.get("ipc_overrides") or {}
    if not isinstance(overrides, dict):
        raise RecipeError("ipc_overrides: expected a mapping {ipc: {key: value}}")
    overrides = {int(k): v for k, v in overrides.items()}
    chosen = overrides.get(data["ipc"], {})
    if not isinstance(chosen, dict):
        raise RecipeError(f"ipc_overrides.{data['ipc']}: expected a mapping of recipe keys")
    _unknown(f"ipc_overrides.{data['ipc']}", set(chosen),
             _TOP_KEYS - {"source", "method", "ipc", "ipc_overrides", "classes"})
    for key, value in chosen.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data["ipc_overrides"] = overrides

    try:
        method_cls = get_method(str(data["method"]))
    except ValueError as exc:
        raise RecipeError(f"method: {exc}") from exc
    for key in ("model", "root", "augment", "notes"):
        if key in data:
            data[key] = _check_type(key, data[key], "")
    rpc = data.get("real_per_class")
    if rpc is not None and (isinstance(rpc, bool) or not isinstance(rpc, int) or rpc < data["ipc"]):
        raise RecipeError(f"real_per_class: expected an integer >= ipc ({data['ipc']}) or null, got {rpc!r}")

    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError("params: expected a mapping of the method's own settings")
    valid_params = dict(method_cls.defaults)
    _unknown(f"params (method {method_cls.name})", set(params), set(valid_params))
    merged = dict(valid_params)
    for key, value in params.items():
        merged[key] = _check_type(f"params.{key}", value, valid_params[key])
    data["params"] = merged

    ev = data.get("eval") or {}
    if not isinstance(ev, dict):
        raise RecipeError("eval: expected a mapping")
    _unknown("eval", set(ev), _EVAL_KEYS)
    base = EvalSpec()
    checked = {}
    for key, value in ev.items():
        expected = getattr(base, key)
        if key in ("model", "augment"):
            expected = ""
        elif key == "test_per_class":
            expected = 0
        checked[key] = value if value is None else _check_type(f"eval.{key}", value, expected)
    data["eval"] = EvalSpec(**checked)
    for key in ("runs", "epochs", "batch", "test_per_class"):
        value = getattr(data["eval"], key)
        if value is not None and value < 1:
            raise RecipeError(f"eval.{key}: must be >= 1")

    recipe = Recipe(**data)
    _validate_names(recipe)
    method_cls.check_recipe(recipe)
    return recipe


def _check_classes(value: Any, source: str) -> list[int] | None:
    """``classes``: null, or a non-empty list of distinct source class indices."""
    if value is None:
        return None
    k = get_source(source).num_classes
    if (not isinstance(value, list) or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in value)):
        raise RecipeError(f"classes: expected a non-empty list of class indices in [0, {k}) of {source} "
                          f"(or null for all classes), got {value!r}")
    if len(set(value)) != len(value):
        raise RecipeError(f"classes: lists a class twice: {value}")
    return list(value)


def _validate_names(recipe: Recipe) -> None:
    from builders.augment import parse_strategy
    from builders.networks import available_networks

    names = available_networks()
    for key, model in [("model", recipe.model), ("eval.model", recipe.eval.model)] + [
        (f"eval.models[{i}]", m) for i, m in enumerate(recipe.eval.models)
    ]:
        if model is not None and model not in names:
            raise RecipeError(f"{key}: unknown network {model!r}; valid: {', '.join(names)}")
    for key, strategy in (("augment", recipe.augment), ("eval.augment", recipe.eval.augment)):
        if strategy is None or strategy == "none":
            continue
        try:
            parse_strategy(strategy)
        except ValueError as exc:
            raise RecipeError(f"{key}: {exc} (or 'none')") from exc


def load_recipe(path: str | os.PathLike, overrides: list[tuple[str, Any]] = ()) -> Recipe:
    """Read, override (dotted keys) and validate a recipe file."""
    data = load_recipe_data(path)
    for key, value in overrides:
        set_dotted(data, key, value)
    return recipe_from_dict(data)


RUN_SPEC_PREFIXES = ("continual_", "nas_")  # recipes/ also holds the protocol runners' specs, not build recipes


def available_recipes() -> list[str]:
    """Names of the build recipes shipped in ``recipes/`` (the runners' specs left out)."""
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith(RUN_SPEC_PREFIXES))


def available_run_specs() -> list[str]:
    """Names of the protocol runners' specs shipped in ``recipes/`` (``continual_*``, ``nas_*``)."""
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if p.name.startswith(RUN_SPEC_PREFIXES))


def shipped_recipe_path(method: str, source: str) -> Path:
    """The shipped recipe for ``method`` on ``source``; RecipeError lists the shipped ones if absent."""
    path = RECIPES_DIR / f"{method}_{source}.yaml"
    if not path.is_file():
        raise RecipeError(
            f"no shipped recipe for method {method!r} on {source!r} ({path}); "
            f"shipped: {', '.join(available_recipes()) or 'none'}"
        )
    return path
