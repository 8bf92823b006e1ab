"""Spawned by tests/test_distributed.py: tiny builds on a 2-process gloo group (loopback, a file rendezvous)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from builders.build import build, recipe_from_dict


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
