"""Spawned by tests/test_distributed.py: kept light (torch and builders.distributed only) so that each
spawned process starts quickly."""

from __future__ import annotations

import torch
import torch.distributed as dist

from builders import distributed


def collectives_worker(rank: int, init_file: str) -> None:
    """Each helper of builders.distributed on a 2-process gloo group, against hand-computed values."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = distributed.current()
        assert (world.rank, world.world_size, world.backend) == (rank, 2, "gloo")
        assert world.describe() == {"world_size": 2, "backend": "gloo"}
        # rank 0 squares 1, rank 1 squares 2 and 3 (nested maps run locally)
        assert distributed.map_items([1, 2, 3], lambda x: x * x + sum(distributed.map_items([0, 0], int))) == [1, 4, 9]
        assert distributed.all_reduce_sum(rank + 1.0) == 3.0
        rows = torch.full((4, 2), float(rank))
        distributed.sync_rows(rows, [range(0, 1), range(1, 4)])
        assert rows[:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
        with_grad, without = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        with_grad.grad = torch.full((3,), rank + 1.0)
        distributed.all_reduce_gradients([with_grad, without])
        assert with_grad.grad.tolist() == [3.0, 3.0, 3.0] and without.grad.tolist() == [0.0, 0.0]
        assert distributed.broadcast_object({"from": rank}) == {"from": 0}
        assert distributed.gather_to_main(rank * 10) == ([0, 10] if rank == 0 else None)
        # a batch split: rank 0 takes samples [0, 2) of 5, rank 1 [2, 5); sums with hand-computed gradients
        shard = distributed.BatchShard(world)
        assert shard.share(5) == (range(2) if rank == 0 else range(2, 5))
        assert shard.sum_(torch.tensor([rank + 1.0])).tolist() == [3.0]
        x = torch.tensor([1.0, 2.0], requires_grad=True)  # the same on both ranks
        summed = shard.sum((rank + 1.0) * shard.fan_out(x))  # (1 + 2) * x on both ranks
        assert summed.tolist() == [3.0, 6.0]
        (summed * torch.tensor([1.0, 10.0])).sum().backward()
        assert x.grad.tolist() == [3.0, 30.0]  # d/dx of the (replicated) 3 * (x0 + 10 x1)
        distributed.barrier()
    finally:
        dist.destroy_process_group()

