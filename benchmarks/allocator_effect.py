"""The effect of the command line's allocator settings (builders/allocator.py) on a build's loop.

    python benchmarks/allocator_effect.py recipes/dsa_fashionmnist.yaml --set ipc=1 [--rounds 2] [--record]

Runs ``build_speed.py RECIPE`` in child processes, alternately without the settings and with them
(``--allocator off`` / ``on``: off, on, off, on, ...; on also for a method the command line leaves
untuned), and records for each child its seconds per iteration (wall and process CPU), user and system
CPU seconds and peak RSS (``os.wait4``; whole process, start-up and data loading included).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
from children import REPO, run_stamped  # benchmarks/children.py (scripts run from benchmarks/)
from machine import write_record  # benchmarks/machine.py

from builders.allocator import ENV_OFF
from condensed_datasets.sources import install_system_fashion_mnist


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--timed", type=int, default=3, show_default=True)
@click.option("--record", is_flag=True)
@click.option("--note", default="")
def main(recipe: Path, overrides: tuple[str, ...], rounds: int, warmup: int, timed: int, record: bool,
         note: str) -> None:
    """Time RECIPE's loop with and without the allocator settings, interleaved."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="allocator_effect_") as tmp_name:
        tmp = Path(tmp_name)
        install_system_fashion_mnist(tmp / "data")
        cmd = [sys.executable, str(REPO / "benchmarks" / "build_speed.py"), str(recipe.resolve()), "--device", "cpu",
               "--data-root", str(tmp / "data"), "--warmup", str(warmup), "--iterations", str(timed), "--stamps"]
        for pair in overrides:
            cmd += ["--set", pair]
        for r in range(rounds):
            for mode in ("off", "on"):
                env = {k: v for k, v in os.environ.items() if k != ENV_OFF}
                env["PYTHONPATH"] = str(REPO)
                # on: whether or not the command line applies them to this method
                figures = run_stamped([*cmd, "--allocator", mode, "--out", str(tmp / f"out_{mode}_{r}")], env,
                                      tmp / f"{mode}_{r}.log", warmup, timed)
                runs.append({"allocator_settings": mode, "round": r, **figures})
                click.echo(json.dumps(runs[-1]))

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["allocator_settings"] == mode)

    result = {
        "benchmark": "allocator settings on/off", "recipe": str(recipe), "overrides": list(overrides),
        "timed_iterations": f"{warmup + 1}-{warmup + timed}", "runs": runs,
        "sys_s_median": {"off": med("off", "sys_s"), "on": med("on", "sys_s")},
        "s_per_iteration_median": {"off": med("off", "s_per_iteration"), "on": med("on", "s_per_iteration")},
        "peak_rss_mib_median": {"off": med("off", "peak_rss_mib"), "on": med("on", "peak_rss_mib")},
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["python", "benchmarks/allocator_effect.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": note,
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        path = write_record(f"allocator_{recipe.stem}_{'_'.join(o.replace('=', '-') for o in overrides)}", result)
        click.echo(f"recorded {path}")


if __name__ == "__main__":
    main()
