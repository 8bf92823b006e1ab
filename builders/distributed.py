"""Running one build on several processes with ``torch.distributed`` (launched by ``torchrun``).

Under ``torchrun`` (the environment holds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address) a build joins one process group: backend ``nccl`` when the build's device is CUDA (each process
takes GPU ``LOCAL_RANK``), ``gloo`` otherwise. Outside torchrun everything here is the one-process case
and costs nothing.

What this module gives the builders:

- :func:`session`: join the group for the duration of a build (and leave it);
- :func:`current`: this process's place (rank, world size, backend); ``is_main`` is rank 0, the only
  rank that writes files, logs and shows progress;
- :func:`owned_block` / :func:`owned_items`: the deterministic split of work items over ranks (contiguous
  blocks, rank 0 first, sizes differing by at most one);
- :func:`map_items`: run a function on this rank's share of a list and gather every result, in list
  order, on every rank (nested calls run locally: the outer one already split the work);
- :func:`sync_rows`: make every rank hold every rank's block of rows of a tensor (bit-exact copies);
- :func:`all_reduce_sum`, :func:`all_reduce_gradients`, :func:`broadcast_object`, :func:`gather_to_main`,
  :func:`barrier`;
- :class:`BatchShard`: this rank's share of every batch of a computation whose per-sample terms are
  summed over ranks (data-parallel student steps of trajectory matching), with the sums it needs.

Errors: a rank that fails exits non-zero with its own message; torchrun then stops the other ranks
and reports which rank failed (``@record`` on the entry point adds its traceback to torchrun's report).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from builders.errors import BuildError

T = TypeVar("T")
R = TypeVar("R")

#: The environment torchrun sets for every worker.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the build: rank ``rank`` of ``world_size`` (``backend`` None: no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0: the rank that writes files, logs and progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there are several processes (collectives do something)."""
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        """The ``build.world_size`` / ``build.backend`` facts recorded in a set's metadata."""
        return {"world_size": self.world_size, "backend": self.backend or "none"}


SINGLE = World()
_nested = False  # True inside map_items: inner maps run locally


def under_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def restarted() -> bool:
    """True when torchrun restarted this job after a failure (``TORCHELASTIC_RESTART_COUNT`` > 0)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def current() -> World:
    """This process's place: from the initialised group, else the one-process world."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 dist.get_backend())


def local_device(device: torch.device) -> torch.device:
    """The device this rank computes on: GPU ``LOCAL_RANK`` for CUDA under torchrun, else ``device``."""
    if device.type == "cuda" and device.index is None and under_torchrun():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block (no-op outside torchrun, or when a group already exists,
    which is then left as it is)."""
    if not under_torchrun() or not dist.is_available() or dist.is_initialized():
        yield current()
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_device(device))
    # torchrun keeps one rendezvous store across restarts of the job: keys of an earlier attempt (the dead
    # ranks' addresses) would be read again, so each attempt works under its own prefix.
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"condensed-build/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


# -- splitting work ------------------------------------------------------------------------------


def owned_block(count: int, world: World) -> range:
    """The items ``world.rank`` owns of ``count``: a contiguous block; blocks go to ranks in order and
    differ in size by at most one (rank r: ``[r*count//N, (r+1)*count//N)``)."""
    n = world.world_size
    return range(world.rank * count // n, (world.rank + 1) * count // n)


def blocks(count: int, world_size: int) -> list[range]:
    """Every rank's block of ``count`` items (see :func:`owned_block`)."""
    return [owned_block(count, World(r, world_size)) for r in range(world_size)]


def owned_items(items: Sequence[T], world: World) -> list[T]:
    """This rank's block of ``items``."""
    return [items[i] for i in owned_block(len(items), world)]


def map_items(items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """``[fn(x) for x in items]``, each item computed on the rank that owns it and every result gathered,
    in order, on every rank. Inside another ``map_items`` (or without a group) it runs locally."""
    global _nested
    world = current()
    if not world.active or _nested:
        return [fn(x) for x in items]
    _nested = True
    try:
        mine = [fn(x) for x in owned_items(items, world)]
    finally:
        _nested = False
    parts: list[Any] = [None] * world.world_size
    dist.all_gather_object(parts, mine)
    return [result for part in parts for result in part]


# -- moving data ---------------------------------------------------------------------------------


@torch.no_grad()
def sync_rows(tensor: torch.Tensor, row_blocks: list[range]) -> None:
    """In place: rows ``row_blocks[r]`` of ``tensor`` become rank r's (a broadcast per rank: exact copies)."""
    world = current()
    if not world.active:
        return
    data = tensor.detach()
    for rank, rows in enumerate(row_blocks):
        if len(rows):
            part = data[rows.start:rows.stop]
            if part.is_contiguous():
                dist.broadcast(part, src=rank)
            else:
                copy = part.contiguous()
                dist.broadcast(copy, src=rank)
                part.copy_(copy)


def all_reduce_sum(value: float | torch.Tensor) -> float | torch.Tensor:
    """The sum over ranks (a float, or a tensor reduced in place and returned)."""
    world = current()
    if not world.active:
        return value
    if isinstance(value, torch.Tensor):
        dist.all_reduce(value)
        return value
    box = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(world))
    dist.all_reduce(box)
    return float(box.item())


def all_reduce_gradients(parameters: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's ``.grad`` over ranks (those without one contribute zeros)."""
    world = current()
    if not world.active:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of the ranks' tensors (on every rank). Backward: the gradient as it is (the result
    feeds a computation every rank repeats identically, so each rank's part gets that gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _FanOut(torch.autograd.Function):
    """Forward: the (identical) tensor as it is. Backward: the ranks' gradients summed (each rank used it
    for its own share of the samples)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


@dataclass(frozen=True)
class BatchShard:
    """This rank's share of every batch of a computation that every rank repeats with the same values
    except for per-sample terms, which are split across ranks and summed (gradients of a mean loss).

    Rank r takes the contiguous block :func:`owned_block` of each batch's positions.
    """

    world: World

    def share(self, count: int) -> range:
        """Positions ``[start, stop)`` of a batch of ``count`` samples this rank computes."""
        if count < self.world.world_size:
            raise BuildError(f"a batch of {count} samples cannot be split across {self.world.world_size} processes; "
                             "raise the batch size (e.g. params.batch_syn) or launch fewer processes")
        return owned_block(count, self.world)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' parts summed (differentiable: each part's gradient is the sum's)."""
        return _SumOverRanks.apply(tensor)

    def fan_out(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (identical on every rank) for use on this rank's share; its gradient is summed over ranks."""
        return _FanOut.apply(tensor)

    @torch.no_grad()
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place, the ranks' parts summed (no gradient); returns ``tensor``."""
        dist.all_reduce(tensor)
        return tensor


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects only; never data from a file)."""
    world = current()
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj``, by rank, on rank 0; None on the other ranks."""
    world = current()
    if not world.active:
        return [obj]
    parts: list[Any] = [None] * world.world_size if world.is_main else None  # type: ignore[assignment]
    dist.gather_object(obj, parts, dst=0)
    return parts


def barrier() -> None:
    """Wait for every rank."""
    if current().active:
        dist.barrier()


def _collective_device(world: World) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")


def require_ranks_at_most(count: int, what: str) -> None:
    """BuildError when the job has more processes than ``count`` items of ``what`` to split."""
    world = current()
    if world.world_size > count:
        raise BuildError(f"{world.world_size} processes but only {count} {what} to split across them; "
                         f"launch at most {count} processes (torchrun --nproc_per_node)")


def env_is_main() -> bool:
    """True unless torchrun made this process a rank other than 0 (readable before the group exists)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def record_errors(func: Callable[..., R]) -> Callable[..., R]:
    """Under torchrun, torchelastic's ``@record``: a failing rank's traceback goes into torchrun's failure
    report. Outside torchrun, ``func`` unchanged."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        if under_torchrun():
            return record(func)(*args, **kwargs)
        return func(*args, **kwargs)

    return wrapper
