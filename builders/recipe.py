"""Recipes: the YAML that names everything a build needs, validated with errors that name the key."""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from builders.dc_augment import check_strategy
from builders.errors import RecipeError
from builders.networks import available_networks
from condensed_datasets.constants import IPC_LIMIT
from condensed_datasets.paths import NAME_PATTERN
from condensed_datasets.sources import SOURCES

#: Where builds write and read real data unless told otherwise.
DEFAULT_ROOT = "data"


def shipped_recipes_dir() -> Path:
    """The shipped recipes: ``builders/recipes/`` in an installed wheel (``recipes/`` travels there, see
    pyproject.toml), else the checkout's ``recipes/`` beside this package."""
    here = Path(__file__).resolve().parent
    packaged = here / "recipes"
    return packaged if packaged.is_dir() else here.parent / "recipes"


#: Where build-on-demand, the expert and run-spec loaders find the shipped recipes; ``CONDENSED_RECIPES_DIR``
#: points them at a folder of your own.
RECIPES_DIR = Path(os.environ.get("CONDENSED_RECIPES_DIR") or shipped_recipes_dir())


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
    #: each training step's loss through torch.compile (ConvNets without batch statistics, class-index labels):
    #: true, false, or "auto": on a CPU for evaluations of builders.evaluate.AUTO_COMPILE_MIN_STEPS steps or more
    compile: bool | str = "auto"


@dataclass
class Recipe:
    """A validated build recipe."""

    source: str
    method: str
    ipc: int | None = None  # None only for jobs that make no set (expert training)
    model: str = "ConvNet"
    seed: int = 0
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
        """Plain data for metadata: the recipe as built (the entry of ``ipc_overrides`` for this ipc is
        already merged in; the entries for other ipcs are not recorded)."""
        # Never through the other ipcs' entries: asdict copies without sharing, so a YAML alias there would
        # be expanded (a "billion laughs" recipe), and they do not describe this set anyway.
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "ipc_overrides"}
        out["eval"] = asdict(self.eval)
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
_REQUIRED = ("source", "method")


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
#: Recipe and evaluation seeds are below this: their evaluation's run seeds (``seed * 1000 + 17 + run``, and 7919
#: more for the random baseline) must fit the 64 bits a torch generator takes.
SEED_LIMIT = 2 ** 63 // 1000

#: Integers a recipe may hold: what a torch seed or size takes (a 64-bit signed integer).
INT_LIMIT = 2 ** 63


def scalar_problem(value: Any) -> str | None:
    """Why a recipe or run-spec value cannot be used though its type is right (None: it can): a string holding
    a NUL character (no path, name or note holds one; the OS refuses it in paths), an integer past 64 bits
    (what a torch seed or size takes), a float that is not finite."""
    if isinstance(value, str) and "\x00" in value:
        return f"a NUL character in {value!r}"
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
        return f"{value} is out of range (a 64-bit integer, below 2**63)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    return None


#: The most values a recipe, run spec or --set value may stand for once its YAML aliases (``*name``, which repeat
#: what their anchor ``&name`` names) are expanded: a few lines can otherwise stand for billions of values (a
#: "billion laughs" file) that an error message or the metadata would write out. Shipped recipes hold under 200.
YAML_VALUE_LIMIT = 100_000


def expansion_problem(value: Any) -> str | None:
    """Why ``value`` (what YAML read) stands for too many values once its aliases are expanded (None: it does
    not); counted without expanding anything, and stopping at the limit (a recursive alias stands for infinitely
    many)."""
    count, pending = 0, [value]
    while pending:
        node = pending.pop()
        count += 1
        if count > YAML_VALUE_LIMIT:
            return (f"it stands for more than {YAML_VALUE_LIMIT:,} values once its YAML aliases ('*name') are "
                    "expanded; write the values out instead of repeating anchors")
        if isinstance(node, dict):
            pending += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            pending += node
    return None


AUTO = "auto"  # the default of a switch that decides by the machine; such a key takes true, false or "auto"


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Coerce ``value`` to the type of ``expected`` (int->float allowed; true/false where ``expected`` is
    :data:`AUTO`) or raise naming ``key``."""
    if expected is None:
        return value
    if isinstance(expected, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(expected, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        if scalar_problem(value):
            raise RecipeError(f"{key}: {scalar_problem(value)}")
        return value
    if isinstance(expected, float):
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if scalar_problem(value):  # an integer past 64 bits is no finite float either
            raise RecipeError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if isinstance(expected, str):
        if expected == AUTO and isinstance(value, bool):  # a switch whose default is "auto" takes true/false too
            return value
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        if scalar_problem(value):
            raise RecipeError(f"{key}: {scalar_problem(value)}")
        return value
    if isinstance(expected, list):
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def unknown_key_hints(given: Any, valid: Any) -> list[str]:
    """The keys of ``given`` not in ``valid``, each quoted with the closest valid key when one is close (a
    YAML key may be a number, null or a date as well as a string)."""
    hints = []
    for key in sorted(set(given) - set(valid), key=repr):
        close = difflib.get_close_matches(key, sorted(valid), n=1) if isinstance(key, str) else []
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return hints


def _unknown(section: str, given: set[Any], valid: set[str]) -> None:
    hints = unknown_key_hints(given, valid)
    if hints:
        raise RecipeError(f"unknown key{'s' if len(hints) > 1 else ''} in {section}: {', '.join(hints)}; "
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
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {pair!r}: the value is not valid YAML ({exc}); quote it, "
                              f"e.g. --set '{key.strip()}=\"...\"'") from None
        except RecursionError:
            raise RecipeError(f"--set {key.strip()}=...: the value is nested too deeply") from None
        problem = expansion_problem(value)
        if problem:
            raise RecipeError(f"--set {key.strip()}=...: {problem}")
        out.append((key.strip(), value))
    return out


def read_yaml_mapping(path: str | os.PathLike, what: str, missing_hint: str = "",
                      keys_hint: str = "") -> dict[str, Any]:
    """The mapping a YAML file holds; RecipeError naming ``what`` (recipe, run spec) when it is missing,
    not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no {what} at {path}{missing_hint}")
    try:
        data = yaml.safe_load(path.read_bytes())  # bytes: PyYAML checks the encoding (YAMLError, not UnicodeDecodeError)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a {what}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} is a YAML mapping of keys{keys_hint}")
    problem = expansion_problem(data)
    if problem:
        raise RecipeError(f"{path}: {problem}")
    return data


def load_recipe_data(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a recipe file."""
    return read_yaml_mapping(path, "recipe", f"; shipped recipes: {', '.join(available_recipes())}",
                             f" ({', '.join(sorted(_TOP_KEYS))})")


def parse_recipe(data: dict[str, Any], overrides: list[tuple[str, Any]] | tuple = ()) -> Recipe:
    """Validate a raw mapping into a Recipe. ``overrides`` (dotted key, value) are applied first and again
    after the ``ipc_overrides`` entry of the chosen ipc, so a value given on the command line always wins.

    This checks everything but the method's own ``params``: those, and whether the method exists, are
    the method's to check (:func:`builders.build.prepare`).
    """
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of keys ({', '.join(sorted(_TOP_KEYS))})")
    try:
        data = copy.deepcopy(data)
    except RecursionError:
        raise RecipeError("the recipe is nested too deeply") from None
    for key, value in overrides:
        set_dotted(data, key, value)
    _unknown("the recipe", set(data), _TOP_KEYS)
    for key in _REQUIRED:
        if key not in data:
            raise RecipeError(f"missing key {key!r} (a recipe needs {', '.join(_REQUIRED)}, and ipc unless it "
                              "makes no set)")
    source = str(data["source"]).lower()
    if source not in SOURCES:
        raise RecipeError(f"source: unknown {data['source']!r}; valid: {', '.join(SOURCES)}")
    data["source"] = source
    if not isinstance(data["method"], str) or not NAME_PATTERN.match(data["method"]):
        raise RecipeError(f"method: {data['method']!r} is not a method name (lower-case letters, digits, '_')")
    if data.get("ipc") is not None:
        data["ipc"] = _check_type("ipc", data["ipc"], 0)
        if data["ipc"] < 1:
            raise RecipeError(f"ipc: must be >= 1, got {data['ipc']}")
        if data["ipc"] >= IPC_LIMIT:
            raise RecipeError(f"ipc: must be below {IPC_LIMIT} (a set's file name holds at most 9 digits), "
                              f"got {data['ipc']}")

    data["classes"] = _check_classes(data.get("classes"), source)
    overrides_map = _ipc_overrides(data.get("ipc_overrides"))
    for key, value in overrides_map.get(data.get("ipc"), {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    for key, value in overrides:  # the command line wins over ipc_overrides
        set_dotted(data, key, value)
    data["ipc_overrides"] = overrides_map

    defaults = Recipe(source=source, method="")
    for key in ("seed", "iterations", "checkpoint_every"):
        data[key] = _check_type(key, data.get(key, getattr(defaults, key)), 0)
        if data[key] < 0:
            raise RecipeError(f"{key}: must be >= 0, got {data[key]}")
    if data["seed"] >= SEED_LIMIT:
        raise RecipeError(f"seed: must be below {SEED_LIMIT} (its evaluation's run seeds, seed * 1000 + 17 + run, "
                          f"must fit 64 bits), got {data['seed']}")
    for key in ("model", "augment", "notes"):
        if key in data:
            data[key] = _check_type(key, data[key], "")
    rpc = data.get("real_per_class")
    low = data.get("ipc") or 1
    if rpc is not None and (isinstance(rpc, bool) or not isinstance(rpc, int) or rpc < low):
        raise RecipeError(f"real_per_class: expected an integer >= ipc ({low}) or null, got {rpc!r}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError("params: expected a mapping of the method's own settings")
    data["params"] = params
    data["eval"] = _eval_spec(data.get("eval"))
    recipe = Recipe(**data)
    _validate_names(recipe)
    return recipe


_IPC_KEY = re.compile(r"[0-9]{1,18}")  # ASCII digits only: "²".isdigit() is true, int("²") fails


def _ipc_overrides(raw: Any) -> dict[int, dict[str, Any]]:
    """``ipc_overrides`` checked: integer ipcs >= 1, each a mapping of recipe keys."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise RecipeError("ipc_overrides: expected a mapping {ipc: {key: value}}")
    out: dict[int, dict[str, Any]] = {}
    allowed = _TOP_KEYS - {"source", "method", "ipc", "ipc_overrides", "classes"}
    for key, entry in raw.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and _IPC_KEY.fullmatch(key))) \
                or not 1 <= int(key) < INT_LIMIT:
            raise RecipeError(f"ipc_overrides: key {key!r} is not an ipc (an integer >= 1)")
        if not isinstance(entry, dict):
            raise RecipeError(f"ipc_overrides.{key}: expected a mapping of recipe keys")
        _unknown(f"ipc_overrides.{key}", set(entry), allowed)
        out[int(key)] = entry
    return out


_EVAL_NULLABLE = ("model", "augment", "test_per_class")  # null: the recipe's model / augment, every test image


def _eval_spec(ev: Any) -> EvalSpec:
    """The ``eval`` section checked against :class:`EvalSpec`."""
    ev = ev or {}
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
        if value is None and key not in _EVAL_NULLABLE:
            raise RecipeError(f"eval.{key}: expected a value, got null (leave the key out for its default, "
                              f"{getattr(base, key)!r})")
        checked[key] = value if value is None else _check_type(f"eval.{key}", value, expected)
    spec = EvalSpec(**checked)
    for key in ("runs", "epochs", "batch", "test_per_class"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise RecipeError(f"eval.{key}: must be >= 1")
    if spec.every < 0:
        raise RecipeError(f"eval.every: must be >= 0 (0: only at the end), got {spec.every}")
    if spec.lr <= 0:
        raise RecipeError(f"eval.lr: must be > 0, got {spec.lr}")
    if spec.compile not in (True, False, AUTO):
        raise RecipeError(f"eval.compile: unknown {spec.compile!r}; valid: true, false, auto")
    return spec


def stored_evaluation(recipe: dict[str, Any]) -> tuple[EvalSpec, str | None, str]:
    """The evaluation protocol a built set's recorded ``recipe`` names: its ``eval`` section checked as a
    recipe's (keys this version does not know left out), the recipe's model (or None) and the augmentation
    (``eval.augment``, else the recipe's, else ``none``); RecipeError naming the key when one is unusable."""
    ev = recipe.get("eval") or {}
    if isinstance(ev, dict):
        ev = {k: v for k, v in ev.items() if k in _EVAL_KEYS}
    spec = _eval_spec(ev)
    model, augment = recipe.get("model"), spec.augment or recipe.get("augment") or "none"
    for key, value in (("model", model), ("augment", augment)):
        if value is not None and not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
    if augment != "none":
        try:
            check_strategy(augment)
        except ValueError as exc:
            raise RecipeError(f"augment: {exc}") from None
    return spec, model, augment


def check_params(section: str, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``params``, each value type-checked against its default; RecipeError names
    an unknown key (with the valid ones) or a value of the wrong type."""
    _unknown(section, set(params), set(defaults))
    merged = dict(defaults)
    for key, value in params.items():
        merged[key] = _check_type(f"params.{key}", value, defaults[key])
    return merged


def check_choice(key: str, value: Any, valid: tuple[Any, ...]) -> None:
    """RecipeError naming ``params.key`` unless ``value`` is one of ``valid``."""
    if not any(value == choice and type(value) is type(choice) for choice in valid):
        names = ", ".join(str(choice).lower() if isinstance(choice, bool) else str(choice) for choice in valid)
        raise RecipeError(f"params.{key}: unknown {value!r}; valid: {names}")


def check_at_least(params: dict[str, Any], keys: tuple[str, ...], low: float, *, strict: bool = False,
                   meaning: str = "", section: str = "params") -> None:
    """RecipeError naming ``{section}.{key}`` for the first of ``params[keys]`` below ``low`` (or not above it,
    when ``strict``)."""
    for key in keys:
        value = params[key]
        if value <= low if strict else value < low:
            low_text = f"{low:g}" if isinstance(low, float) else str(low)
            raise RecipeError(f"{section}.{key}: must be {'>' if strict else '>='} {low_text}"
                              f"{f' ({meaning})' if meaning else ''}, got {value}")


def _check_classes(value: Any, source: str) -> list[int] | None:
    """``classes``: null, or a non-empty list of distinct source class indices."""
    if value is None:
        return None
    k = SOURCES[source].num_classes
    if (not isinstance(value, list) or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in value)):
        raise RecipeError(f"classes: expected a non-empty list of class indices in [0, {k}) of {source} "
                          f"(or null for all classes), got {value!r}")
    if len(set(value)) != len(value):
        raise RecipeError(f"classes: lists a class twice: {value}")
    return list(value)


def _validate_names(recipe: Recipe) -> None:
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
            check_strategy(strategy)  # DSA's families, or DC's "dc:..." evaluation augmentation
        except ValueError as exc:
            raise RecipeError(f"{key}: {exc} (or 'none')") from exc


RUN_SPEC_PREFIXES = ("continual_", "nas_")  # recipes/ also holds the protocol runners' specs, not build recipes


def available_recipes() -> list[str]:
    """Names of the build recipes shipped in ``recipes/`` (the runners' specs left out)."""
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith(RUN_SPEC_PREFIXES))


def available_run_specs() -> list[str]:
    """Names of the protocol runners' specs shipped in ``recipes/`` (``continual_*``, ``nas_*``)."""
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if p.name.startswith(RUN_SPEC_PREFIXES))


def shipped_recipe_path(method: str, source: str) -> Path:
    """The shipped recipe for ``method`` on ``source``; RecipeError lists the shipped ones if absent."""
    if not NAME_PATTERN.match(str(method)) or not NAME_PATTERN.match(str(source)):
        raise RecipeError(f"no shipped recipe for method {method!r} on {source!r}: not valid names")
    path = RECIPES_DIR / f"{method}_{source}.yaml"
    if not path.is_file():
        raise RecipeError(
            f"no shipped recipe for method {method!r} on {source!r} ({path}); "
            f"shipped: {', '.join(available_recipes()) or 'none'}"
        )
    return path
