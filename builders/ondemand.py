"""Build on demand: what the Dataset classes call with build=True."""

from __future__ import annotations

import os
from pathlib import Path


def build_set(source: str, method: str, ipc: int, root: str | os.PathLike, *, device: str = "auto") -> Path:
    """Build ``method`` on ``source`` at ``ipc`` with the shipped recipe; save it under ``root``; return its path."""
    from builders.engine import Engine
    from builders.recipe import load_recipe, shipped_recipe_path

    recipe = load_recipe(shipped_recipe_path(method, source), [("ipc", int(ipc)), ("root", str(root))])
    engine = Engine(recipe, out_root=root, data_root=root, device=device)
    engine.run()
    return engine.paths.set


def build_subset_set(source: str, method: str, ipc: int, classes: list[int], root: str | os.PathLike, *,
                     device: str = "auto", overrides: list[tuple[str, object]] = ()) -> Path:
    """Build ``method`` on the source classes ``classes`` only (labels 0..k-1 in that order) with the shipped
    recipe and ``overrides`` (dotted keys); save it under ``root``; return its path."""
    from builders.engine import Engine
    from builders.recipe import load_recipe, shipped_recipe_path

    recipe = load_recipe(shipped_recipe_path(method, source),
                         [("ipc", int(ipc)), ("root", str(root)), ("classes", list(classes)), *overrides])
    engine = Engine(recipe, out_root=root, data_root=root, device=device)
    engine.run()
    return engine.paths.set
