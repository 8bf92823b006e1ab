"""Gradient matching's real gradient (DC, DSA) on a CPU: CPU time and peak memory by pass size and route.

    python benchmarks/real_gradient_passes.py run [--passes 256,128,64,32] [--routes plain,compiled] [--rounds 2]
        [--shape fashionmnist|cifar] [--repeats 4] [--record] [--note TEXT]
    python benchmarks/real_gradient_passes.py build RECIPE [--passes 256,32] [--rounds 2] [--warmup 1] [--timed 3]
        [--set KEY=VALUE ...] [--record] [--note TEXT]

One class's real gradient (:func:`builders.realbranch.real_class_gradient`: ConvNet, 256 random images of one
class, a fresh network per call) with :data:`builders.realbranch.GRADIENT_PASS` set to each ``--passes`` value,
uncompiled (``plain``) or compiled (``compiled``: on a CPU the Winograd route), each variant in its own
process so that its memory is its own. A child makes one untimed call (the compilation, for ``compiled``:
with a warm inductor cache, after the first round, a cache hit), then resets its peak RSS
(``/proc/self/clear_refs``) and times ``--repeats`` calls: CPU seconds (all threads) and wall seconds per
gradient, its RSS before them and its peak RSS over them. Variants alternate within each round (all variants,
then again), so that every variant sees the same machine conditions.

``build`` times whole builds of a DC or DSA recipe instead (``build_speed.py --stamps`` with
``GRADIENT_PASS`` set to each ``--passes`` value, one process each, alternating): seconds and CPU seconds per
iteration over iterations ``warmup + 1`` to ``warmup + timed``, and each child's peak RSS (``os.wait4``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import build_speed  # benchmarks/build_speed.py (scripts run from benchmarks/)
import click
import torch
from children import REPO, run_stamped
from machine import device_name, provenance, write_record

from builders import realbranch
from builders.networks import build_network
from condensed_datasets.sources import install_system_fashion_mnist

SHAPES = {"fashionmnist": (1, 28), "cifar": (3, 32)}


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise click.ClickException(f"/proc/self/status has no {field} (Linux only)")


def _reset_peak_rss() -> None:
    """Make the peak RSS (``VmHWM``) restart from the current RSS (Linux ``clear_refs`` value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


@click.group()
def main() -> None:
    """Gradient matching's real gradient by pass size and route."""


@main.command()
@click.option("--route", type=click.Choice(["plain", "compiled"]), required=True)
@click.option("--pass-size", type=click.IntRange(1), required=True)
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="fashionmnist")
@click.option("--repeats", type=click.IntRange(1), default=4)
def child(route: str, pass_size: int, shape: str, repeats: int) -> None:
    """One variant: print its figures as JSON (run by ``run``)."""
    channels, size = SHAPES[shape]
    realbranch.GRADIENT_PASS = pass_size
    images = torch.randn(256, channels, size, size, generator=torch.Generator().manual_seed(0))

    def gradient(seed: int) -> None:
        net = build_network("ConvNet", channels, 10, (size, size), seed=seed)
        realbranch.real_class_gradient(net, list(net.parameters()), images, 3, compiled=route == "compiled")

    gradient(1000)  # untimed: the compilation (compiled), the allocator's first growth
    rss_before = _status_mib("VmRSS")
    _reset_peak_rss()
    cpu, wall = [], []
    for seed in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        gradient(seed)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    click.echo(json.dumps({"cpu_s": cpu, "wall_s": wall, "rss_before_mib": round(rss_before, 1),
                           "peak_rss_mib": round(_status_mib("VmHWM"), 1)}))


@main.command()
@click.option("--passes", default="256,128,64,32", show_default=True, help="Pass sizes, comma-separated.")
@click.option("--routes", default="plain,compiled", show_default=True, help="plain and/or compiled.")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=4, show_default=True, help="Timed gradients a child.")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="fashionmnist", show_default=True)
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording (e.g. other load on the machine).")
def run(passes: str, routes: str, rounds: int, repeats: int, shape: str, record: bool, note: str) -> None:
    """Every (route, pass size) variant in its own process, interleaved over ``--rounds``."""
    sizes = _pass_sizes(passes)
    route_list = routes.split(",")
    if not set(route_list) <= {"plain", "compiled"}:
        raise click.BadParameter(f"--routes: plain and/or compiled, got {routes!r}")
    variants = [(r, s) for r in route_list for s in sizes]
    runs: dict[str, list[dict]] = {f"{r}_{s}": [] for r, s in variants}
    for rnd in range(rounds):
        for r, s in variants:
            cmd = [sys.executable, __file__, "child", "--route", r, "--pass-size", str(s), "--shape", shape,
                   "--repeats", str(repeats)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
            if done.returncode != 0:
                raise click.ClickException(f"{r} {s}: child failed:\n{done.stderr[-3000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            runs[f"{r}_{s}"].append(figures)
            click.echo(f"round {rnd} {r:8s} pass {s:3d}: {statistics.median(figures['cpu_s']):.3f} CPU-s, "
                       f"peak RSS {figures['peak_rss_mib']:.0f} MiB (before {figures['rss_before_mib']:.0f})")

    def median(key: str, figures: list[dict]) -> float:
        return round(statistics.median(v for f in figures for v in f[key]), 4)

    channels, size = SHAPES[shape]
    result = {
        "benchmark": f"gradient matching real gradient, one class (256 images, ConvNet {channels}x{size}x{size}): "
                     "route and pass size",
        "runs": runs,
        "cpu_s_median": {k: median("cpu_s", v) for k, v in runs.items()},
        "wall_s_median": {k: median("wall_s", v) for k, v in runs.items()},
        "peak_over_before_mib": {k: [round(f["peak_rss_mib"] - f["rss_before_mib"], 1) for f in v]
                                 for k, v in runs.items()},
        "peak_rss_mib_max": {k: max(f["peak_rss_mib"] for f in v) for k, v in runs.items()},
        "order": ", ".join(runs) + f", each in its own process, x {rounds} rounds",
        **provenance("real_gradient_passes.py", device_name("cpu"), note),
    }
    click.echo(json.dumps({k: result[k] for k in ("cpu_s_median", "peak_over_before_mib")}, indent=2))
    if record:
        path = write_record("real_gradient_passes_cpu" + ("" if shape == "fashionmnist" else f"_{shape}"), result)
        click.echo(f"recorded {path}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--pass-size", type=click.IntRange(1), required=True)
@click.argument("build_speed_args", nargs=-1, type=click.UNPROCESSED)
def build_child(pass_size: int, build_speed_args: tuple[str, ...]) -> None:
    """``build_speed.py BUILD_SPEED_ARGS`` with ``GRADIENT_PASS`` set to ``--pass-size`` (run by ``build``)."""
    realbranch.GRADIENT_PASS = pass_size
    build_speed.main(list(build_speed_args))


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--passes", default="256,32", show_default=True, help="Pass sizes, comma-separated.")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--warmup", type=click.IntRange(1), default=1, show_default=True, help="Iterations not timed.")
@click.option("--timed", type=click.IntRange(1), default=3, show_default=True, help="Iterations timed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe overrides (build_speed.py).")
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording (e.g. other load on the machine).")
def build(recipe: Path, passes: str, rounds: int, warmup: int, timed: int, overrides: tuple[str, ...], record: bool,
          note: str) -> None:
    """Whole builds of RECIPE with each pass size, alternating, one process each."""
    sizes = _pass_sizes(passes)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="real_gradient_passes_") as tmp_name:
        tmp = Path(tmp_name)
        if not install_system_fashion_mnist(tmp / "data"):
            raise click.ClickException("no system copy of Fashion-MNIST (CONDENSED_FASHION_MNIST_DIR)")
        env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
        for rnd in range(rounds):
            for size in sizes:
                cmd = [sys.executable, __file__, "build-child", "--pass-size", str(size), str(recipe.resolve()),
                       "--device", "cpu", "--data-root", str(tmp / "data"), "--out", str(tmp / f"out_{size}_{rnd}"),
                       "--warmup", str(warmup - 1), "--iterations", str(timed + 1), "--stamps"]
                cmd += [arg for pair in overrides for arg in ("--set", pair)]
                figures = run_stamped(cmd, env, tmp / f"{size}_{rnd}.log", warmup, timed)
                runs.append({"pass_size": size, "round": rnd, **figures})
                click.echo(f"round {rnd} pass {size:3d}: {figures['s_per_iteration']:.3f} s/it "
                           f"({figures['cpu_s_per_iteration']:.3f} CPU-s/it), peak RSS {figures['peak_rss_mib']} MiB")

    def median(size: int, key: str) -> float:
        return round(statistics.median(r[key] for r in runs if r["pass_size"] == size), 4)

    result = {
        "benchmark": "gradient matching build iterations by real gradient pass size (realbranch.GRADIENT_PASS)",
        "config": {"recipe": str(recipe), "overrides": list(overrides),
                   "timed_iterations": f"{warmup + 1}-{warmup + timed}",
                   "order": ", ".join(str(s) for s in sizes) + f", alternating, x {rounds} rounds"},
        "runs": runs,
        "s_per_iteration_median": {str(s): median(s, "s_per_iteration") for s in sizes},
        "cpu_s_per_iteration_median": {str(s): median(s, "cpu_s_per_iteration") for s in sizes},
        "peak_rss_mib_max": {str(s): max(r["peak_rss_mib"] for r in runs if r["pass_size"] == s) for s in sizes},
        **provenance("real_gradient_passes.py", device_name("cpu"), note),
    }
    click.echo(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if record:
        path = write_record(f"real_gradient_passes_build_{recipe.stem}_cpu", result)
        click.echo(f"recorded {path}")


def _pass_sizes(passes: str) -> list[int]:
    """``--passes``: comma-separated sizes of at least 1."""
    try:
        sizes = [int(p) for p in passes.split(",")]
    except ValueError:
        raise click.BadParameter(f"--passes: comma-separated integers, got {passes!r}") from None
    if any(s < 1 for s in sizes):
        raise click.BadParameter(f"--passes: sizes of at least 1, got {passes!r}")
    return sizes


if __name__ == "__main__":
    main()
