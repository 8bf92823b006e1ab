"""Every set of a source that can be loaded, wherever it is: a local root, the package, a hub repository."""

from __future__ import annotations

import os
from typing import Any

from condensed_datasets.catalogue import default_repo_id, list_embedded, list_local, sort_key
from condensed_datasets.hub import list_repo
from condensed_datasets.sources import get_source


def available(
    source: str,
    root: str | os.PathLike | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    download: bool = False,
) -> list[dict[str, Any]]:
    """Every set of ``source`` that can be loaded: local (under ``root``), embedded, and, with
    ``download=True``, those of the hub repository (``repo_id``, default ``{org}/condensed-{source}``).

    Each row: source, method, ipc, file, where (``local``/``embedded``/``hub``), location (path or repo id),
    size, sha256 (hub rows), accuracy_mean, accuracy_std, improvement_over_random, ...
    Raises :class:`~condensed_datasets.errors.HubError` subclasses when the repository cannot be read.
    """
    name = get_source(source).name
    rows: list[dict[str, Any]] = []
    if root is not None:
        rows += list_local(root, name)
    rows += list_embedded(name)
    if download:
        rows += list_repo(repo_id or default_repo_id(name), revision=revision, source=name)
    return sorted(rows, key=sort_key)
