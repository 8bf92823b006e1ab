"""What sets exist where: the hub repositories' ``index.json``, published folders, local roots, embedded sets.

Names used everywhere:

- a hub repository per source: ``{org}/condensed-{source}`` (dataset repo). ``org`` is the environment
  variable ``CONDENSED_DATASETS_ORG`` when set, else :data:`DEFAULT_ORG`;
- a set's file name in a repository (and under ``{root}/condensed/{source}/``): ``{method}_ipc{ipc}.safetensors``;
- ``index.json`` beside the sets: the machine-readable catalogue of the repository (see :func:`index_entry`);
- embedded sets: ``condensed_datasets/embedded/{source}/{method}_ipc{ipc}.safetensors`` inside the package
  (folder overridable with ``CONDENSED_DATASETS_EMBEDDED_DIR`` or by setting :data:`EMBEDDED_DIR`).

This module reads only file headers (never the tensors) to list local sets, and never touches the network
itself: hub listings go through :mod:`condensed_datasets.hub`, imported lazily.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from condensed_datasets.constants import (
    DEFAULT_ORG,
    EMBEDDED_DIR_ENV,
    FORMAT_VERSION,
    HUB_INDEX_NAME,
    HUB_INDEX_VERSION,
    INDEX_LIMIT,
    METHODS,
    ORG_ENV,
)
from condensed_datasets.errors import CondensedSetError, IndexFormatError, SkippedEntryWarning, UnknownNameError
from condensed_datasets.format import read_file_metadata, whole_set_problem
from condensed_datasets.metadata_checks import MAX_TEXT, is_count, is_number
from condensed_datasets.paths import check_name, parse_set_filename, set_filename
from condensed_datasets.sources import SOURCES, get_source

#: The package's own folder of embedded sets (tests may monkeypatch this attribute).
EMBEDDED_DIR: Path = Path(__file__).resolve().parent / "embedded"


# -- names -------------------------------------------------------------------------------------------------
def hub_org() -> str:
    """The hub organisation: ``$CONDENSED_DATASETS_ORG`` or :data:`DEFAULT_ORG`."""
    return os.environ.get(ORG_ENV, "").strip().strip("/") or DEFAULT_ORG


def default_repo_id(source: str) -> str:
    """The dataset repository of ``source``: ``{org}/condensed-{source}``."""
    return f"{hub_org()}/condensed-{get_source(source).name}"


def _method_rank(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def sort_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    """Order of listings and card tables: source, method in the project's order, ipc, location."""
    return (entry.get("source", ""), _method_rank(entry.get("method", "")), entry.get("method", ""),
            int(entry.get("ipc", 0)), entry.get("where", ""))


def describe_sets(sets: dict[str, list[int]]) -> str:
    """``{"dm": [1, 10]}`` -> ``"dm ipc 1, 10"`` (``"none"`` when empty)."""
    if not sets:
        return "none"
    ordered = sorted(sets.items(), key=lambda kv: (_method_rank(kv[0]), kv[0]))
    return "; ".join(f"{method} ipc {', '.join(map(str, sorted(ipcs)))}" for method, ipcs in ordered)


def sets_by_method(entries: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Listing entries -> ``{method: sorted ipcs}``."""
    out: dict[str, list[int]] = {}
    for entry in entries:
        out.setdefault(entry["method"], []).append(int(entry["ipc"]))
    return {method: sorted(set(ipcs)) for method, ipcs in out.items()}


# -- headers and entries -------------------------------------------------------------------------------------
def read_set_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``condensed_datasets`` metadata of a set file, reading only its header (not the tensors).

    Checks the safetensors framing against the file size, so a truncated file is reported; full
    validation is :meth:`CondensedSet.load`.
    """
    return read_file_metadata(path)


def _num(value: Any) -> float | None:
    return None if value is None or isinstance(value, bool) else float(value)


def recipe_summary(metadata: dict[str, Any]) -> dict[str, Any]:
    """The short form of a set's recipe for catalogues: model, iterations, seed (and its name when recorded)."""
    recipe = metadata.get("recipe") or {}
    out: dict[str, Any] = {}
    for key in ("name", "model", "iterations", "augment"):
        value = recipe.get(key)
        if value not in (None, "") and (isinstance(value, str) or is_number(value)):
            out[key] = value
    seed = metadata.get("seed", recipe.get("seed"))
    if is_number(seed):
        out["seed"] = seed
    if metadata.get("recipe_file"):
        out["file"] = metadata["recipe_file"]
    return out


def index_entry(metadata: dict[str, Any], *, sha256: str | None, size: int) -> dict[str, Any]:
    """One set's entry of ``index.json`` (and of listings): what a catalogue needs, from the set's metadata.

    Keys: source, method, ipc, sha256, size, num_images, image_shape, soft_labels, format_version,
    accuracy_mean, accuracy_std, improvement_over_random, random_accuracy_mean, evaluation (model, runs,
    epochs) and recipe (short form, :func:`recipe_summary`). Missing evaluations are ``None``.
    """
    ev = metadata.get("evaluation") or {}
    classes = metadata.get("classes") or []
    return {
        "source": metadata["source"],
        "method": metadata["method"],
        "ipc": int(metadata["ipc"]),
        "sha256": sha256,
        "size": int(size),
        "num_images": len(classes) * int(metadata["ipc"]),
        "image_shape": list(metadata.get("image_shape") or []),
        "format_version": metadata.get("format_version", FORMAT_VERSION),
        "accuracy_mean": _num(ev.get("accuracy_mean")),
        "accuracy_std": _num(ev.get("accuracy_std")),
        "improvement_over_random": _num(ev.get("improvement_over_random")),
        "random_accuracy_mean": _num(ev.get("random_accuracy_mean")),
        "evaluation": {k: ev[k] for k in ("model", "runs", "epochs") if ev.get(k) is not None},
        "recipe": recipe_summary(metadata),
    }


# -- index.json ----------------------------------------------------------------------------------------------
def make_index(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An ``index.json`` document from ``{file name: entry}``."""
    return {"index_version": HUB_INDEX_VERSION, "files": {name: dict(files[name]) for name in sorted(files)}}


def index_to_bytes(index: dict[str, Any]) -> bytes:
    """``index.json``'s bytes: sorted keys, two-space indent, newline at the end (stable for the same content)."""
    return (json.dumps(index, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")


def read_index(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """:func:`parse_index` of the file at ``path``; one over :data:`INDEX_LIMIT` bytes is an IndexFormatError,
    refused before it is read."""
    name = str(path) if name is None else name
    size = Path(path).stat().st_size
    if size > INDEX_LIMIT:
        raise IndexFormatError(f"{name} is {size} bytes, over the {INDEX_LIMIT}-byte limit of an index; it is not "
                               "a condensed-datasets index (list the folder's sets without it, or rebuild it with "
                               "condensed-publish)")
    return parse_index(Path(path).read_bytes(), name)


def parse_index(data: bytes | str, name: str = HUB_INDEX_NAME) -> dict[str, Any]:
    """Parse and check an ``index.json`` document; raises IndexFormatError naming ``name`` when it is malformed."""
    try:
        index = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8 and numbers of > 4300 digits
        raise IndexFormatError(f"{name} is not JSON: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("files"), dict):
        raise IndexFormatError(f"{name} is not a condensed-datasets index (no 'files' mapping)")
    version = index.get("index_version")
    if not isinstance(version, int) or version > HUB_INDEX_VERSION:
        raise IndexFormatError(f"{name} has index_version {version!r}; this package reads up to {HUB_INDEX_VERSION} "
                         "(upgrade condensed-datasets)")
    files = {}
    for fname, entry in index["files"].items():
        problem = index_entry_problem(fname, entry)
        if problem:
            warnings.warn(f"{name}: entry {fname!r} left out: {problem}", SkippedEntryWarning, stacklevel=2)
        else:
            files[fname] = entry
    return {**index, "files": files}


_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_ENTRY_NUMBERS = ("accuracy_mean", "accuracy_std", "improvement_over_random", "random_accuracy_mean")
_ENTRY_COUNTS = ("size", "num_images", "format_version")


def index_entry_problem(fname: str, entry: Any) -> str | None:
    """Why one ``index.json`` entry cannot be listed, published over or trusted for a SHA-256, or None.

    The file name must be a set's; source and method valid names agreeing with it; numbers finite; the
    evaluation and recipe summaries objects of plain values.
    """
    parsed = parse_set_filename(fname)
    if parsed is None:
        return "not a set's file name ({method}_ipc{ipc}.safetensors)"
    if not isinstance(entry, dict):
        return "not a JSON object"
    for key in ("source", "method", "ipc", "sha256", "size"):
        if key not in entry:
            return f"no {key!r}"
    try:
        check_name(entry["source"], "source")
    except UnknownNameError as exc:
        return str(exc)
    if (entry["method"], entry["ipc"]) != parsed or isinstance(entry["ipc"], bool):
        return f"method {entry['method']!r} / ipc {entry['ipc']!r} disagree with the file name"
    if entry["sha256"] is not None and not (isinstance(entry["sha256"], str) and _SHA256.match(entry["sha256"])):
        return f"sha256 {entry['sha256']!r} is not 64 lower-case hex digits"
    for key in _ENTRY_COUNTS:
        if entry.get(key) is not None and not is_count(entry[key]):
            return f"{key} {entry[key]!r} is not a non-negative int"
    for key in _ENTRY_NUMBERS:
        if entry.get(key) is not None and not is_number(entry[key]):
            return f"{key} {entry[key]!r} is not a finite number"
    shape = entry.get("image_shape")
    if shape is not None and (not isinstance(shape, list) or not all(is_count(d) for d in shape)):
        return f"image_shape {shape!r} is not a list of ints"
    for key in ("evaluation", "recipe"):
        block = entry.get(key)
        if block is None:
            continue
        if not isinstance(block, dict) or not all(
                v is None or is_number(v) or isinstance(v, bool) or (isinstance(v, str) and len(v) <= MAX_TEXT)
                for v in block.values()):
            return f"{key} is not an object of plain values (strings, numbers)"
    return None


def index_listing(index: dict[str, Any], *, where: str, location: str,
                  source: str | None = None) -> list[dict[str, Any]]:
    """The entries of an index as listing rows (``file``, ``where``, ``location`` added), optionally one source."""
    rows = []
    for fname, entry in index["files"].items():
        if source is not None and entry.get("source") != get_source(source).name:
            continue
        rows.append({**entry, "file": fname, "where": where, "location": location})
    return sorted(rows, key=sort_key)


# -- local roots, folders, embedded sets ------------------------------------------------------------------------
def _scan_folder(folder: Path, *, where: str, source: str | None = None) -> list[dict[str, Any]]:
    """Listing rows for the set files directly in ``folder`` (headers only; unreadable files, and files that do
    not hold the whole set their name says, are skipped)."""
    rows: list[dict[str, Any]] = []
    if not folder.is_dir():
        return rows
    for path in sorted(folder.iterdir()):
        named = parse_set_filename(path.name)
        if named is None or not path.is_file():
            continue
        try:
            meta = read_set_metadata(path)
            entry = index_entry(meta, sha256=None, size=path.stat().st_size)
        except (CondensedSetError, OSError) as exc:
            warnings.warn(f"{path} left out of the listing: {exc}", SkippedEntryWarning, stacklevel=2)
            continue
        if source is not None and entry["source"] != get_source(source).name:
            continue
        problem = whole_set_problem(meta, entry["source"], *named)
        if problem:
            warnings.warn(f"{path} left out of the listing: it {problem}", SkippedEntryWarning, stacklevel=2)
            continue
        rows.append({**entry, "file": path.name, "where": where, "location": str(path)})
    return rows


def list_local(root: str | os.PathLike, source: str | None = None) -> list[dict[str, Any]]:
    """The sets under ``{root}/condensed/{source}/`` (every source when ``source`` is None), from their headers."""
    return _scan_sources(Path(root).expanduser() / "condensed", source, where="local")


def _scan_sources(base: Path, source: str | None, where: str) -> list[dict[str, Any]]:
    """The sets under ``base/{source}/`` for one source, or for every source folder when ``source`` is None."""
    names = [get_source(source).name] if source else (sorted(p.name for p in base.iterdir() if p.is_dir())
                                                      if base.is_dir() else [])
    known = [name for name in names if name in SOURCES]
    for name in sorted(set(names) - set(known)):
        warnings.warn(f"{base / name} left out of the listing: {name!r} is not a source "
                      f"({', '.join(SOURCES)})", SkippedEntryWarning, stacklevel=2)
    names = known
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += _scan_folder(base / name, where=where, source=name)
    return sorted(rows, key=sort_key)


def list_folder(folder: str | os.PathLike, source: str | None = None) -> list[dict[str, Any]]:
    """The sets of a published folder (``condensed-publish --to-dir``): its ``index.json``, else its files."""
    folder = Path(folder).expanduser()
    index_path = folder / HUB_INDEX_NAME
    if index_path.is_file():
        index = read_index(index_path)
        return index_listing(index, where="folder", location=str(folder), source=source)
    return sorted(_scan_folder(folder, where="folder", source=source), key=sort_key)


def embedded_dir() -> Path:
    """The folder of embedded sets: ``$CONDENSED_DATASETS_EMBEDDED_DIR`` or :data:`EMBEDDED_DIR`."""
    override = os.environ.get(EMBEDDED_DIR_ENV)
    return Path(override).expanduser() if override else EMBEDDED_DIR


def embedded_path(source: str, method: str, ipc: int) -> Path | None:
    """The embedded file of ``source``/``method``/``ipc``, or None when the package ships none."""
    path = embedded_dir() / get_source(source).name / set_filename(method, ipc)
    return path if path.is_file() else None


def list_embedded(source: str | None = None) -> list[dict[str, Any]]:
    """The sets shipped inside the package (``embedded/{source}/``), from their headers."""
    return _scan_sources(embedded_dir(), source, where="embedded")
