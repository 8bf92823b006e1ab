"""DM's compiled iteration with inductor's caches cold and warm, in fresh processes.

    python benchmarks/compile_cache.py --device cuda [--source cifar10-generated] [--record]
    python benchmarks/compile_cache.py --device cpu --source fashionmnist --set params.compile=true

Runs ``build_speed.py`` (DM, ipc 10) four times, each in a new process, against two inductor cache folders
of its own: A cold, A warm, B cold, B warm (``TORCHINDUCTOR_CACHE_DIR``), and records each run's seconds per
iteration, its wall time (compilation included) and the warm/cold ratios. On an H100 code loaded from the
caches ran 2-3x slower (compile_cache_cuda_2026-11-26.json); the package now compiles afresh off the CPU
(:func:`builders.compiling.compile_static`), so warm and cold should match there.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from dm_vs_reference import SOURCES, prepare_source, recipe_path  # benchmarks/dm_vs_reference.py
from machine import device_name, provenance, write_record  # benchmarks/machine.py (scripts run from benchmarks/)

REPO = Path(__file__).resolve().parent.parent
CASES = (("A", "cold"), ("A", "warm"), ("B", "cold"), ("B", "warm"))


def _seconds_per_iteration(stdout: str) -> float:
    """build_speed.py's figure, from the JSON it prints."""
    found = re.search(r'"iterations_per_second": ([0-9.]+)', stdout)
    if found is None:
        raise click.ClickException(f"build_speed.py printed no iterations_per_second:\n{stdout[-2000:]}")
    return round(1.0 / float(found.group(1)), 5)


@click.command()
@click.option("--device", default="cuda", show_default=True)
@click.option("--source", type=click.Choice(sorted(SOURCES)), default="cifar10-generated", show_default=True)
@click.option("--warmup", type=int, default=4, show_default=True, help="Iterations not timed (compilation).")
@click.option("--iterations", type=int, default=16, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Passed to build_speed.py.")
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording.")
def main(device: str, source: str, warmup: int, iterations: int, overrides: tuple[str, ...], record: bool,
         note: str) -> None:
    """Time DM iterations in fresh processes with inductor's caches cold and warm."""
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="compile_cache_") as tmp_name:
        tmp = Path(tmp_name)
        data, harness = prepare_source(tmp, source)
        paths = [p for p in (str(REPO), harness) if p]
        command = [sys.executable, str(REPO / "benchmarks" / "build_speed.py"),
                   str(recipe_path("dm", source)), "--device", device, "--data-root", str(data),
                   "--warmup", str(warmup), "--iterations", str(iterations), "--set", "ipc=10"]
        for pair in overrides:
            command += ["--set", pair]
        for i, (cache, state) in enumerate(CASES):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths),
                       TORCHINDUCTOR_CACHE_DIR=str(tmp / f"cache_{cache}"))
            start = time.perf_counter()
            done = subprocess.run([*command, "--out", str(tmp / f"out_{i}")], env=env, capture_output=True,
                                  text=True, cwd=REPO, check=False)
            if done.returncode:
                raise click.ClickException(f"build_speed.py failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
            run = {"cache": cache, "state": state, "s_per_iteration": _seconds_per_iteration(done.stdout),
                   "wall_s": round(time.perf_counter() - start, 1)}
            click.echo(run)
            runs.append(run)

    def median(state: str) -> float:
        return round(statistics.median(r["s_per_iteration"] for r in runs if r["state"] == state), 5)

    result = {
        "benchmark": "DM iteration, fresh processes, inductor caches cold and warm",
        "config": {"source": source, "ipc": 10, "method": "dm", "warmup": warmup, "iterations": iterations,
                   "overrides": list(overrides), "order": "A cold, A warm, B cold, B warm"},
        "runs": runs,
        "cold_s_per_iteration_median": median("cold"),
        "warm_s_per_iteration_median": median("warm"),
        "warm_over_cold": round(median("warm") / median("cold"), 3),
        **provenance("compile_cache.py", device_name(device), note),
    }
    click.echo(result)
    if record:
        stem = "compile_cache_" + device.split(":")[0]
        click.echo(f"recorded {write_record(stem, result)}")


if __name__ == "__main__":
    main()
