"""The one way a recipe becomes a build: read it, let its method check it, run the engine (or the job).

The command line, build-on-demand (``CondensedX(..., build=True)``) and the tests all come through here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as LockTimeout

import builders.experts  # noqa: F401 - registers the expert-training job
import builders.methods  # noqa: F401 - registers every method
from builders import distributed
from builders.engine import Engine, resolve_device
from builders.errors import BuildError, RecipeError
from builders.experts import ExpertStore
from builders.recipe import DEFAULT_ROOT, Recipe, check_params, load_recipe_data, parse_recipe, shipped_recipe_path
from builders.registry import get_method
from condensed_datasets.format import CondensedSet

#: How long build-on-demand waits for another process building the same set.
BUILD_LOCK_TIMEOUT_S = 24 * 3600.0


def prepare(recipe: Recipe) -> Recipe:
    """``recipe`` with its method's params checked and completed from the method's defaults, and the method's
    own checks passed; RecipeError otherwise."""
    kind = get_method(recipe.method)
    if getattr(kind, "produces_set", True) and recipe.ipc is None:
        raise RecipeError(f"missing key 'ipc' (method {recipe.method} builds a set: say how many images per class)")
    params = check_params(f"params (method {recipe.method})", recipe.params, kind.defaults)
    recipe = dataclasses.replace(recipe, params=params)
    kind.check_recipe(recipe)
    return recipe


def recipe_from_dict(data: dict[str, Any], overrides: list[tuple[str, Any]] | tuple = ()) -> Recipe:
    """A raw mapping (plus dotted overrides, which win) -> a recipe checked by its method."""
    return prepare(parse_recipe(data, overrides))


def load_recipe(path: str | os.PathLike, overrides: list[tuple[str, Any]] | tuple = ()) -> Recipe:
    """Read a recipe file, apply dotted overrides (they win over everything in the file) and check it."""
    return recipe_from_dict(load_recipe_data(path), overrides)


def makes_set(recipe: Recipe) -> bool:
    """False for jobs that write no condensed set (expert training)."""
    return getattr(get_method(recipe.method), "produces_set", True)


def build(
    recipe: Recipe,
    *,
    out_root: str | os.PathLike = DEFAULT_ROOT,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    evaluate: bool = True,
    progress: bool = True,
    download: bool = False,
) -> CondensedSet | ExpertStore:
    """Run a checked recipe: the engine for a method (returns the saved set), or the job (expert training
    returns its store). Real data is read under ``data_root`` (default: ``out_root``)."""
    data_root = out_root if data_root is None else data_root
    with distributed.session(resolve_device(device)):  # under torchrun: one build across its processes
        if not makes_set(recipe):
            if overwrite:  # a job's store (expert trajectories) is extended by every run, never replaced
                raise RecipeError(f"overwrite (--overwrite) does not apply to method {recipe.method}: it writes no "
                                  "set, and what it stores is extended by each run, never replaced; to start "
                                  "anew, pass another --out (or params.expert_dir) or delete the existing store")
            job = get_method(recipe.method)(recipe, out_root=out_root, data_root=data_root,
                                            device=distributed.local_device(resolve_device(device)),
                                            progress=progress, download=download)
            return job.run()
        engine = make_engine(recipe, out_root=out_root, data_root=data_root, device=device, resume=resume,
                             overwrite=overwrite, evaluate=evaluate, progress=progress, download=download)
        if distributed.current().active:
            return engine.run()
        lock = _build_lock(engine.paths.set, timeout=0)
        try:
            engine.paths.set.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except LockTimeout:  # its log, checkpoint and set are that build's: touch none of them
            raise BuildError(f"another process is building {engine.paths.set} now (lock {lock.lock_file}); wait "
                             "for it to finish, or pass --out to build elsewhere") from None
        except OSError:  # no lock can be taken in that folder: the engine names the problem
            return engine.run()
        try:
            return engine.run()
        finally:
            lock.release()


def make_engine(recipe: Recipe, *, out_root: str | os.PathLike = DEFAULT_ROOT, data_root: str | os.PathLike | None = None,
                **options: Any) -> Engine:
    """The engine that builds ``recipe`` (a method that makes a set) under ``out_root``."""
    if not makes_set(recipe):
        raise RecipeError(f"method {recipe.method} makes no set; run it with build()")
    return Engine(recipe, out_root=out_root, data_root=out_root if data_root is None else data_root, **options)


def run_continuing(engine: Engine) -> CondensedSet:
    """Run ``engine`` for a runner that has no --resume (condensed-continual, condensed-nas): a build killed
    earlier continues from its checkpoint; BuildError naming the checkpoint to delete when it cannot."""
    engine.resume = engine.paths.checkpoint.is_file()
    try:
        return engine.run()
    except BuildError as exc:
        if not engine.resume:
            raise
        raise BuildError(f"could not continue the earlier build of {engine.paths.set}: {exc}. Delete "
                         f"{engine.paths.checkpoint} to start this build over") from exc


def build_set(source: str, method: str, ipc: int, root: str | os.PathLike, *, device: str = "auto") -> Path:
    """Build ``method`` on ``source`` at ``ipc`` with the shipped recipe under ``root``; return the set's path.

    What ``CondensedX(..., build=True)`` calls. One process builds a given set at a time (a lock file beside
    it); another asking for the same set waits and then finds it. An interrupted earlier build is resumed
    from its checkpoint. Inside a running ``torch.distributed`` process group (a torchrun job that called
    ``init_process_group``) every rank must ask for the same set: they build it together, rank 0 holds
    the lock and writes, and every rank returns once the set is on rank 0's disk.
    """
    return _build_on_demand(source, method, [("ipc", int(ipc))], root, device)


def build_subset_set(source: str, method: str, ipc: int, classes: list[int], root: str | os.PathLike, *,
                     device: str = "auto", overrides: list[tuple[str, Any]] | tuple = ()) -> Path:
    """Build ``method`` on the source classes ``classes`` only (labels 0..k-1 in that order) with the shipped
    recipe and ``overrides``, under ``root``, as :func:`build_set` does; return the set's path (what a
    continual-learning buffer with ``build=True`` calls)."""
    return _build_on_demand(source, method, [("ipc", int(ipc)), ("classes", list(classes)), *overrides], root,
                            device)


def _build_on_demand(source: str, method: str, overrides: list[tuple[str, Any]], root: str | os.PathLike,
                     device: str) -> Path:
    recipe = load_recipe(shipped_recipe_path(method, source), overrides)
    engine = make_engine(recipe, out_root=root, data_root=root, device=device)
    target = engine.paths.set
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _build_lock(target, timeout=BUILD_LOCK_TIMEOUT_S)
    if distributed.current().active:
        return _build_across_ranks(engine, lock)
    try:
        with lock:
            if target.is_file():  # built by another process while this one waited
                return target
            engine.resume = engine.paths.checkpoint.is_file()
            try:
                engine.run()
            except BuildError as exc:
                if not engine.resume:
                    raise
                raise BuildError(f"build=True could not continue the earlier build of {target}: {exc}. Delete "
                                 f"{engine.paths.checkpoint} to start this build over") from exc
    except LockTimeout:
        raise _lock_timeout(target, lock) from None
    return target


def _build_across_ranks(engine: Engine, lock: FileLock) -> Path:
    """Build-on-demand by every rank of the running process group: rank 0 takes the lock and decides (the set
    is there / resume its checkpoint / build), every rank follows, rank 0 writes (the engine's split)."""
    target, world = engine.paths.set, distributed.current()
    status = "build"
    if world.is_main:
        try:
            lock.acquire()
        except LockTimeout:
            status = "timeout"
        else:
            status = "exists" if target.is_file() else "resume" if engine.paths.checkpoint.is_file() else "build"
    status = distributed.broadcast_object(status)
    if status == "timeout":
        raise _lock_timeout(target, lock)
    try:
        if status != "exists":
            engine.resume = status == "resume"
            engine.run()  # every rank returns once rank 0 has written the set
    finally:
        if world.is_main:
            lock.release()
    return target


def _build_lock(target: Path, *, timeout: float) -> FileLock:
    """The lock beside ``target`` that one process building it holds (build=True and condensed-build)."""
    return FileLock(str(target.parent / f".{target.name}.build.lock"), timeout=timeout)


def _lock_timeout(target: Path, lock: FileLock) -> BuildError:
    return BuildError(f"another process has been building {target} for over {BUILD_LOCK_TIMEOUT_S:.0f} s "
                      f"(lock {lock.lock_file}); if none is, delete the lock file and retry")


__all__ = ["DEFAULT_ROOT", "build", "build_set", "build_subset_set", "load_recipe", "make_engine", "makes_set", "prepare",
           "recipe_from_dict", "run_continuing"]
