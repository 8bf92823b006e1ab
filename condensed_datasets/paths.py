"""Where sets live and what their files are called, and the one check of every name that becomes a path.

``{root}/condensed/{source}/{method}_ipc{ipc}.safetensors``. Sources, methods, repository ids and
revisions come from strangers' files and indexes: each is checked against a fixed alphabet here before
it reaches a path or a URL, so no name can climb out of the folder it is meant for.
"""

from __future__ import annotations

import numbers
import os
import re
from pathlib import Path

from condensed_datasets.constants import IPC_LIMIT, METHODS, SET_SUFFIX, USER_METHOD_PREFIX
from condensed_datasets.errors import UnknownNameError

#: Source and method names: lower-case letters, digits and underscores, starting with a letter.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")  # \Z, not $: "$" also matches before a final "\n"
#: ``{method}_ipc{ipc}.safetensors``
SET_FILE_PATTERN = re.compile(r"^(?P<method>[a-z][a-z0-9_]{0,63})_ipc(?P<ipc>[1-9][0-9]{0,8})\.safetensors\Z")
#: ``owner/name`` as the Hugging Face Hub spells repository ids: each part ends in a letter, digit or ``_``
#: (with no ``--``, ``..`` or final ``.git``, checked by :func:`check_repo_id`), as huggingface_hub requires.
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}\w)?/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}\w)?\Z",
                             re.ASCII)
#: A branch, tag or commit: letters, digits and ``._-/``; no empty, ``.`` or ``..`` segment.
_REVISION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*\Z")


def check_name(value: object, what: str) -> str:
    """``value`` if it is a valid source or method name (``[a-z][a-z0-9_]*``), else UnknownNameError naming ``what``."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise UnknownNameError(
            f"{what} {value!r} is not a valid name: lower-case letters, digits and '_', starting with a letter "
            "(at most 64 characters)"
        )
    return value


def check_method(value: object) -> str:
    """``value`` if it names a method of this package (:data:`METHODS`) or a user's own (``user_<name>``)."""
    check_name(value, "method")
    if value not in METHODS and not (value.startswith(USER_METHOD_PREFIX) and len(value) > len(USER_METHOD_PREFIX)):
        raise UnknownNameError(f"unknown method {value!r}; valid methods: {', '.join(METHODS)}, or "
                               f"'{USER_METHOD_PREFIX}<name>' for a method of your own")
    return value


def check_ipc(value: object) -> int:
    """``value`` as an int if it is a positive integer (a Python or NumPy int, not a bool) below :data:`IPC_LIMIT`,
    else UnknownNameError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value < IPC_LIMIT:
        raise UnknownNameError(f"ipc must be a positive int below {IPC_LIMIT}, got {value!r}")
    return int(value)


def check_repo_id(value: object) -> str:
    """``value`` if it is a hub repository id ``owner/name`` that huggingface_hub accepts, else UnknownNameError."""
    if (not isinstance(value, str) or not REPO_ID_PATTERN.match(value) or ".." in value or "--" in value
            or value.endswith(".git")):
        raise UnknownNameError(f"repository id {value!r} is not of the form 'owner/name' "
                               "(letters, digits, '.', '_', '-'; each part ending in a letter, digit or '_'; "
                               "no '--', '..' or final '.git')")
    return value


def check_revision(value: object) -> str:
    """``value`` if it is a plausible branch, tag or commit name (no '..', no leading '/'), else UnknownNameError."""
    if (not isinstance(value, str) or len(value) > 255 or not _REVISION_PATTERN.match(value)
            or any(part in (".", "..") for part in value.split("/"))):
        raise UnknownNameError(f"revision {value!r} is not a branch, tag or commit name "
                               "(letters, digits, '.', '_', '-', '/'; no '..')")
    return value


def set_filename(method: str, ipc: int) -> str:
    """``{method}_ipc{ipc}.safetensors``, the file name of a set on disk and on the hub."""
    return f"{check_name(method, 'method')}_ipc{check_ipc(ipc)}{SET_SUFFIX}"


def parse_set_filename(name: str) -> tuple[str, int] | None:
    """(method, ipc) of a set file name, or None for any other name."""
    match = SET_FILE_PATTERN.match(name)
    return (match["method"], int(match["ipc"])) if match else None


def canonical_source(source: object) -> str:
    """A source name as paths spell it: lower case, without '-' or '_' ("CIFAR-10" -> "cifar10")."""
    key = source.lower().replace("-", "").replace("_", "") if isinstance(source, str) else source
    return check_name(key, "source")


def source_dir(root: str | os.PathLike, source: str) -> Path:
    """``{root}/condensed/{source}``: the folder of one source's sets under ``root``."""
    return Path(root).expanduser() / "condensed" / canonical_source(source)


def set_path(root: str | os.PathLike, source: str, method: str, ipc: int) -> Path:
    """Where a set lives: ``{root}/condensed/{source}/{method}_ipc{ipc}.safetensors``."""
    return source_dir(root, source) / set_filename(method, ipc)


def subset_set_path(root: str | os.PathLike, source: str, method: str, ipc: int, classes: list[int],
                    num_classes: int | None = None) -> Path:
    """Where a set of some of a source's classes lives (labels 0..k-1 in the order of ``classes``):
    ``{root}/condensed/{source}/classes/{method}_ipc{ipc}_c{i}-{j}-....safetensors``. UnknownNameError unless
    ``classes`` are distinct class indices (below ``num_classes`` when given)."""
    if (not isinstance(classes, (list, tuple)) or not classes or len(set(classes)) != len(classes)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)
            or (num_classes is not None and max(classes) >= num_classes)):
        bound = f" in [0, {num_classes})" if num_classes is not None else ""
        raise UnknownNameError(f"classes {classes!r}: expected distinct class indices{bound}")
    stem = set_filename(method, ipc).removesuffix(SET_SUFFIX)
    return source_dir(root, source) / "classes" / f"{stem}_c{'-'.join(str(c) for c in classes)}{SET_SUFFIX}"


def beside(path: Path, suffix: str) -> Path:
    """A file next to a set that shares its stem: ``dm_ipc10.safetensors`` -> ``dm_ipc10{suffix}``."""
    return path.with_name(path.name.removesuffix(SET_SUFFIX) + suffix)
