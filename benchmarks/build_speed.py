"""Iterations per second and peak memory of a build, for a recipe.

    python benchmarks/build_speed.py recipes/dm_cifar10.yaml --iterations 50 [--set KEY=VALUE ...]

Runs the engine for the first ``--warmup`` + ``--iterations`` iterations of the recipe's own schedule (the
recipe keeps its iteration count, which choices such as DM's ``params.compile: auto`` depend on; a recipe with
fewer is extended to that many) and stops it there: no evaluation, no set saved, only the build log under
--out. Then prints and (with --record) writes a JSON record to benchmarks/results/ with the device, command
and date.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import click
import torch
from machine import write_record  # benchmarks/machine.py (scripts run from benchmarks/)

from builders.allocator import tune_allocator
from builders.build import load_recipe
from builders.cli import tune_allocator_for
from builders.engine import Engine, resolve_device
from builders.host_threads import limit_threads_for
from builders.recipe import parse_overrides


class _Timed(Exception):
    """Raised by the per-iteration callback after the last timed iteration: the build stops there."""


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--iterations", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True, help="Iterations not timed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--device", default="auto")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/bench"))
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording (e.g. other load on the machine).")
@click.option("--allocator", type=click.Choice(["method", "on", "off"]), default="method", show_default=True,
              help="The allocator settings: as the command line gives the recipe's method, or on / off.")
@click.option("--threads", type=click.Choice(["cli", "keep"]), default="cli", show_default=True,
              help="CPU threads: as the command line sets them for the device (one on a GPU), or torch's default.")
@click.option("--stamps", is_flag=True,
              help="Print 'BENCH_ITER <iteration> <perf_counter> <process_time>' after each iteration.")
def main(recipe: Path, iterations: int, warmup: int, overrides: tuple[str, ...], device: str, out: Path,
         data_root: Path | None, record: bool, note: str, stamps: bool, allocator: str, threads: str) -> None:
    """Time RECIPE's build loop (with the allocator settings the command line gives its method)."""
    wanted = warmup + iterations
    pairs = parse_overrides(overrides) + [("checkpoint_every", 0)]
    r = load_recipe(recipe, pairs)
    if r.iterations < wanted:
        r = load_recipe(recipe, [*pairs, ("iterations", wanted)])
    if allocator == "on":
        tune_allocator()
    elif allocator == "method":
        tune_allocator_for(r)  # as the command line does for this method
    if threads == "cli":
        limit_threads_for(resolve_device(device))  # as the command line does for this device
    engine = Engine(r, out_root=out, data_root=data_root, device=device, evaluate=False, progress=False)
    times: list[float] = []

    def tick(iteration: int, loss: float) -> None:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        if stamps:
            click.echo(f"BENCH_ITER {iteration} {times[-1]} {time.process_time()}")
        if len(times) == wanted:
            raise _Timed

    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        engine.run(on_iteration=tick)
    except _Timed:
        pass
    timed = times[warmup:]
    rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    result = {
        "recipe": str(recipe),
        "method": r.method, "source": r.source, "ipc": r.ipc, "model": r.model,
        "overrides": list(overrides),
        "recipe_iterations": r.iterations,
        "iterations_timed": len(timed) - 1,
        "iterations_per_second": round(rate, 4),
        "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else
                  f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if engine.device.type == "cuda"
                           else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if engine.device.type == "cuda" else "process max RSS",
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "note": note,
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        click.echo(f"recorded {write_record(f'speed_{r.method}_{r.source}_ipc{r.ipc}_{engine.device.type}', result)}")


if __name__ == "__main__":
    main()
