"""Spawned by tests/test_distributed.py: tiny builds on a 2-process gloo group (loopback, a file rendezvous)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

import builders.recipe
from builders.build import build, make_engine, recipe_from_dict
from builders.errors import BuildError
from condensed_datasets import CondensedFashionMNIST
from condensed_datasets.format import CondensedSet


def builds_worker(rank: int, init_file: str, recipes: dict, data_root: str, out_root: str) -> None:
    """Each recipe (name -> recipe dict) built without evaluation; rank 0 writes each set under ``out_root/name``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name, recipe in recipes.items():
            build(recipe_from_dict(recipe), out_root=f"{out_root}/{name}", data_root=data_root, device="cpu",
                  evaluate=False, progress=False)
    finally:
        dist.destroy_process_group()


def on_demand_worker(rank: int, init_file: str, recipes_dir: str, root: str) -> None:
    """Every rank asks for the same missing set with ``build=True`` (recipes from ``recipes_dir``); each writes
    what it read to ``root/rank{rank}.json``."""
    torch.set_num_threads(1)
    builders.recipe.RECIPES_DIR = Path(recipes_dir)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ds = CondensedFashionMNIST(root, method="dm", ipc=2, build=True)
        seen = {"length": len(ds), "build": ds.metadata["build"], "data_sum": float(ds.data.double().sum())}
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def refused_save_worker(rank: int, init_file: str, recipe: dict, data_root: str, out_root: str) -> None:
    """Both ranks build ``recipe``; after iteration 1 a set appears at its path on rank 0 (what another process's
    build would write), so rank 0's final save is refused. Each rank writes how its build ended to
    ``out_root/rank{rank}.txt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        engine = make_engine(recipe_from_dict(recipe), out_root=out_root, data_root=data_root, device="cpu",
                             evaluate=False, progress=False)

        def another_process_writes_the_set(done: int, loss: float) -> None:
            if rank == 0 and done == 1:
                CondensedSet(torch.zeros(10, 1, 28, 28), torch.arange(10), source="fashionmnist", method="dm",
                             ipc=1).save(engine.paths.set)

        try:
            engine.run(on_iteration=another_process_writes_the_set)
            ended = "returned"
        except BuildError as exc:
            ended = f"BuildError: {exc}"
        (Path(out_root) / f"rank{rank}.txt").write_text(ended)
    finally:
        dist.destroy_process_group()
