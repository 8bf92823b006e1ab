"""Where a build's iterations spend their time: ``torch.profiler`` over a window of iterations.

    python benchmarks/dm_profile.py recipes/dm_fashionmnist.yaml [--warmup 10] [--iterations 30]
        [--set KEY=VALUE ...] [--device cuda] [--record] [--tag TEXT]

Runs the engine (no evaluation, nothing saved outside ``--out``) for ``warmup + iterations``
iterations, profiles the last ``iterations`` of them (CPU and, on a GPU, CUDA activities) and prints
the operators by self device time and by self host time. The record holds both tables, the per-
iteration wall time of the window, and per iteration: device busy time, host time, the operators
dispatched from Python, and the counts of kernel launches, stream synchronisations and host-device
copies (the signs of a host-bound loop).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch
from machine import provenance, write_record  # benchmarks/machine.py (scripts run from benchmarks/)
from profiler_events import device_busy_us, python_operators
from torch.profiler import ProfilerActivity, profile

from builders.build import load_recipe
from builders.cli import tune_allocator_for
from builders.engine import Engine, resolve_device
from builders.host_threads import limit_threads_for
from builders.recipe import parse_overrides

RUNTIME_CALLS = ("cudaLaunchKernel", "cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize",
                 "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--warmup", type=int, default=10, show_default=True, help="Iterations before the window.")
@click.option("--iterations", type=int, default=30, show_default=True, help="Iterations profiled.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--device", default="auto")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/profile"))
@click.option("--rows", type=int, default=25, show_default=True, help="Operators in each table.")
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--tag", default="", help="Added to the record's name (e.g. compile).")
@click.option("--note", default="")
def main(recipe: Path, warmup: int, iterations: int, overrides: tuple[str, ...], device: str, out: Path,
         rows: int, record: bool, tag: str, note: str) -> None:
    """Profile RECIPE's build loop over iterations WARMUP+1 .. WARMUP+ITERATIONS."""
    pairs = parse_overrides(overrides) + [("iterations", warmup + iterations), ("checkpoint_every", 0)]
    r = load_recipe(recipe, pairs)
    tune_allocator_for(r)  # as the command line does for this method
    limit_threads_for(resolve_device(device))  # and for this device
    engine = Engine(r, out_root=out, device=device, evaluate=False, progress=False, overwrite=True)
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    prof = profile(activities=activities)
    window: dict[str, float] = {}

    def tick(iteration: int, loss: float) -> None:
        if cuda:
            torch.cuda.synchronize()
        if iteration == warmup:
            window["start"] = time.perf_counter()
            prof.start()
        elif iteration == warmup + iterations:
            prof.stop()
            window["stop"] = time.perf_counter()

    engine.run(on_iteration=tick)
    events = prof.key_averages()
    by_device = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
    by_host = events.table(sort_by="self_cpu_time_total", row_limit=rows)
    calls = {e.key: e.count for e in events if e.key in RUNTIME_CALLS}
    # operators dispatched from Python (an aten:: event without an aten:: parent): on a GPU each launches
    # one kernel or a few, so this is what a host-bound loop pays for, and it can be counted on a CPU
    top_level = python_operators(prof.events())
    device_us = device_busy_us(events)
    host_us = sum(e.self_cpu_time_total for e in events)
    result = {
        "benchmark": "profile of a build's iterations (torch.profiler)",
        "recipe": str(recipe), "overrides": list(overrides),
        "iterations_profiled": iterations, "after_warmup": warmup,
        "s_per_iteration_in_window": round((window["stop"] - window["start"]) / iterations, 5),
        "per_iteration": {
            "device_busy_ms": round(device_us / 1000 / iterations, 2),
            "host_self_ms": round(host_us / 1000 / iterations, 2),
            "top_level_operators": round(top_level / iterations, 1),
            **{name: round(count / iterations, 1) for name, count in sorted(calls.items())},
        },
        "table_by_device_time": by_device,
        "table_by_host_time": by_host,
        **provenance("dm_profile.py", torch.cuda.get_device_name() if cuda else "cpu", note),
    }
    click.echo(by_device)
    if cuda:
        click.echo(by_host)
    click.echo(json.dumps({k: v for k, v in result.items() if not k.startswith("table")}, indent=2))
    if record:
        stem = f"profile_{r.method}_{r.source}_ipc{r.ipc}_{engine.device.type}" + (f"_{tag}" if tag else "")
        click.echo(f"recorded {write_record(stem, result)}")


if __name__ == "__main__":
    main()
