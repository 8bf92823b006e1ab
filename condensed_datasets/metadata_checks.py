"""The checks of a set's metadata, field by field: every value a stranger's file can hold is of the type the
package reads, so no later reader (listing, card, repr, show, evaluation) meets a surprise.

Each check returns the first problem as a sentence, or None; :mod:`condensed_datasets.format` turns it into
:class:`~condensed_datasets.errors.CondensedSetError` naming the file.
"""

from __future__ import annotations

import math
from typing import Any

from condensed_datasets.constants import SUPPORTED_FORMAT_VERSIONS
from condensed_datasets.errors import UnknownNameError
from condensed_datasets.paths import check_ipc, check_method, check_name
from condensed_datasets.sources import SOURCES

#: At most this many classes (Tiny ImageNet has 200; ImageNet-1k 1000) and characters per class name.
MAX_CLASSES = 100_000
MAX_TEXT = 1_000
#: The evaluation block's numbers (``None`` allowed) and counts.
_EVAL_NUMBERS = ("accuracy_mean", "accuracy_std", "random_accuracy_mean", "random_accuracy_std",
                 "improvement_over_random")
_EVAL_COUNTS = ("runs", "epochs")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool) that a float can hold."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows 10**400)
        return False


def is_count(value: Any) -> bool:
    """A non-negative int (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def names_problem(source: Any, method: Any, ipc: Any) -> str | None:
    """Why ``source``/``method``/``ipc`` cannot name a set (they become paths), or None."""
    try:
        check_name(source.lower() if isinstance(source, str) else source, "source")
        check_method(method)
        check_ipc(ipc)
    except UnknownNameError as exc:
        return str(exc)
    return None


def metadata_problem(meta: Any) -> str | None:
    """The first way ``meta`` (a set's metadata) breaks the format's types and names, or None."""
    if not isinstance(meta, dict):
        return f"metadata must be a JSON object, got {type(meta).__name__}"
    version = meta.get("format_version")
    if version is None:
        return "metadata has no format_version"
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_FORMAT_VERSIONS:
        return (f"unknown format_version {version!r} (this package reads {sorted(SUPPORTED_FORMAT_VERSIONS)}); "
                "upgrade condensed-datasets")
    for key in ("source", "method", "ipc", "classes"):
        if key not in meta:
            return f"metadata has no {key!r}"
    if not isinstance(meta["source"], str) or meta["source"] != meta["source"].lower():
        return f"metadata source {meta['source']!r} is not a valid name (lower-case letters, digits and '_')"
    problem = names_problem(meta["source"], meta["method"], meta["ipc"])
    if problem:
        return f"metadata: {problem}"
    return _classes_problem(meta) or _shape_problem(meta) or _normalization_problem(meta.get("normalization")) \
        or _channels_problem(meta) or _evaluation_problem(meta.get("evaluation")) or _plain_problem(meta)


def _classes_problem(meta: dict[str, Any]) -> str | None:
    classes = meta["classes"]
    if (not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) and len(c) <= MAX_TEXT for c in classes)):
        return f"metadata 'classes' must be a non-empty list of class names (at most {MAX_CLASSES})"
    info = SOURCES.get(meta["source"])
    if info is not None and "class_subset" not in meta and len(classes) != info.num_classes:  # subsets: format.py
        return f"{info.name} has {info.num_classes} classes, the metadata names {len(classes)}"
    if info is not None and "class_subset" not in meta and classes != list(info.classes):
        wrong = next(i for i, (got, want) in enumerate(zip(classes, info.classes)) if got != want)
        return (f"metadata 'classes' must be {info.name}'s class names in its label order; class {wrong} is named "
                f"{classes[wrong]!r}, not {info.classes[wrong]!r}")
    return None


def _shape_problem(meta: dict[str, Any]) -> str | None:
    shape = meta.get("image_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 3
                              or not all(is_count(d) and d >= 1 for d in shape)):
        return f"metadata 'image_shape' must be [C, H, W] of positive ints, got {shape!r}"
    return None


def _channels_problem(meta: dict[str, Any]) -> str | None:
    """The image shape's channels agree with the source's and with the normalisation's."""
    shape, norm, info = meta.get("image_shape"), meta.get("normalization"), SOURCES.get(meta["source"])
    if shape is None:
        return None
    if info is not None and shape[0] != info.channels:
        return f"{info.name} images have {info.channels} channel(s), the metadata says {shape[0]}"
    if norm is not None and len(norm["mean"]) != shape[0]:
        return f"normalization has {len(norm['mean'])} channels, the images have {shape[0]}"
    return None


def _normalization_problem(norm: Any) -> str | None:
    if norm is None:
        return None
    if not isinstance(norm, dict) or not isinstance(norm.get("mean"), list) or not isinstance(norm.get("std"), list):
        return "metadata 'normalization' must be {'mean': [...], 'std': [...]}"
    mean, std = norm["mean"], norm["std"]
    if not mean or len(mean) != len(std) or not all(is_number(v) for v in mean + std):
        return "metadata 'normalization': mean and std must be lists of finite numbers of the same length"
    if not all(v > 0 for v in std):
        return f"metadata 'normalization': every std must be > 0, got {std}"
    return None


def _evaluation_problem(ev: Any) -> str | None:
    if ev is None:
        return None
    if not isinstance(ev, dict):
        return "metadata 'evaluation' must be a JSON object"
    for key in _EVAL_NUMBERS:
        if ev.get(key) is not None and not is_number(ev[key]):
            return f"metadata evaluation.{key} must be a finite number, got {ev[key]!r}"
    for key in _EVAL_COUNTS:
        if ev.get(key) is not None and not is_count(ev[key]):
            return f"metadata evaluation.{key} must be a non-negative int, got {ev[key]!r}"
    if ev.get("model") is not None and not isinstance(ev["model"], str):
        return f"metadata evaluation.model must be a string, got {ev['model']!r}"
    cross = ev.get("cross_architecture")
    if cross is not None:
        if not isinstance(cross, dict) or not all(isinstance(r, dict) for r in cross.values()):
            return "metadata evaluation.cross_architecture must map network names to results"
        for name, result in cross.items():
            for key in ("accuracy_mean", "accuracy_std"):
                if not is_number(result.get(key)):
                    return f"metadata evaluation.cross_architecture.{name}.{key} must be a finite number"
    return None


def _plain_problem(meta: dict[str, Any]) -> str | None:
    """The other fields readers use: recipe and zca objects, an int seed, a string recipe_file."""
    for key in ("recipe", "zca", "build", "versions"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return f"metadata {key!r} must be a JSON object"
    if meta.get("seed") is not None and (isinstance(meta["seed"], bool) or not isinstance(meta["seed"], int)):
        return f"metadata 'seed' must be an int, got {meta['seed']!r}"
    if meta.get("recipe_file") is not None and not isinstance(meta["recipe_file"], str):
        return "metadata 'recipe_file' must be a string"
    return None
