"""DM's ``params.compile``: the package against itself, compiled real branch on and off, interleaved.

    python benchmarks/dm_compile.py ab [--recipe R] [--cold] [--rounds 2] [--warmup 3] [--timed 8] [--record]
    python benchmarks/dm_compile.py chunk [--repeats 3] [--record] [--note TEXT]

``ab`` runs ``build_speed.py`` on a DM recipe (default ``recipes/dm_fashionmnist.yaml``: Fashion-MNIST,
ipc 10, ConvNet, DSA, batch_real 256) alternately with ``--set params.compile=false`` and ``true`` (off,
on, off, on, ...), each in its own process, and reports wall and CPU seconds (all threads) per iteration
over iterations ``warmup + 1`` to ``warmup + timed`` (the first compilation falls in the warm-up), the
time from each child's start to the end of its first iteration, the iterations after which compiling
has paid for itself, and each child's user/sys CPU and peak RSS (``os.wait4``, whole process). With
``--cold`` every child gets an empty inductor cache, so its first iteration holds a whole compilation.

``chunk`` times the real branch alone (ConvNet, 10 classes x 256 random 28x28 images, a fresh network
per call) in one process, interleaved, after one untimed call of each compiled variant (the
compilations): uncompiled passes of 64 images, the compiled direct route (passes of 256) and the
compiled Winograd route (:mod:`builders.winograd`) in passes of 16, 32 and 64.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from children import run_stamped  # benchmarks/children.py (scripts run from benchmarks/)
from machine import cpu_name, provenance, write_record  # benchmarks/machine.py

from builders import realbranch
from builders.build import load_recipe
from builders.networks import build_network
from condensed_datasets.sources import install_system_fashion_mnist

REPO = Path(__file__).resolve().parent.parent


def _device() -> str:
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _record(result: dict, name: str) -> None:
    path = write_record(name, result)
    click.echo(f"recorded {path}")


@click.group()
def main() -> None:
    """DM with and without ``params.compile``."""


@main.command()
@click.option("--rounds", type=int, default=2, show_default=True, help="Pairs (off, on) to run.")
@click.option("--warmup", type=click.IntRange(1), default=3, show_default=True, help="Iterations not timed.")
@click.option("--timed", type=click.IntRange(1), default=8, show_default=True, help="Iterations timed.")
@click.option("--python", "python", default=sys.executable, show_default=True)
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=REPO / "recipes" / "dm_fashionmnist.yaml", show_default=True, help="A DM recipe.")
@click.option("--cold", is_flag=True,
              help="Each child with an empty inductor cache of its own (TORCHINDUCTOR_CACHE_DIR): the first "
                   "iteration then holds a whole compilation, as a machine's first build does.")
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording (e.g. other load on the machine).")
def ab(rounds: int, warmup: int, timed: int, python: str, recipe: Path, cold: bool, record: bool, note: str) -> None:
    """Build iterations with the compiled real branch off and on, alternating."""
    runs: list[dict] = []
    r_recipe = load_recipe(recipe, [])
    with tempfile.TemporaryDirectory(prefix="dm_compile_") as tmp_name:
        tmp = Path(tmp_name)
        if not install_system_fashion_mnist(tmp / "data"):
            raise click.ClickException("no system copy of Fashion-MNIST (CONDENSED_FASHION_MNIST_DIR)")
        base = [python, str(REPO / "benchmarks" / "build_speed.py"), str(recipe.resolve()),
                "--device", "cpu", "--data-root", str(tmp / "data"),
                "--warmup", str(warmup - 1), "--iterations", str(timed + 1), "--stamps"]
        for r in range(rounds):
            for compiled in (False, True):
                env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
                if cold:
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor_{compiled}_{r}")
                cmd = base + ["--out", str(tmp / f"out_{compiled}_{r}")]  # a build refuses to overwrite a set
                cmd += ["--set", f"params.compile={'true' if compiled else 'false'}"]  # never the recipe's auto
                result = run_stamped(cmd, env, tmp / f"{compiled}_{r}.log", warmup, timed)
                runs.append({"compile": compiled, "round": r, **result})
                click.echo(f"round {r} compile={compiled!s:5}: {result['s_per_iteration']:.3f} s/it "
                           f"({result['cpu_s_per_iteration']:.3f} CPU-s/it), peak RSS {result['peak_rss_mib']} MiB")

    def median(compiled: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["compile"] is compiled)

    result = {
        "benchmark": "DM iteration, this package: params.compile off vs on",
        "config": {"recipe": str(recipe), "source": r_recipe.source, "ipc": r_recipe.ipc, "model": r_recipe.model,
                   "batch_real": r_recipe.params["batch_real"], "augment": r_recipe.augment,
                   "timed_iterations": f"{warmup + 1}-{warmup + timed}", "order": "off, on, alternating",
                   "inductor_cache": "empty, one per child" if cold else "the user's (warm after the first run)"},
        "runs": runs,
        "off_s_per_iteration_median": median(False, "s_per_iteration"),
        "on_s_per_iteration_median": median(True, "s_per_iteration"),
        "off_cpu_s_per_iteration_median": median(False, "cpu_s_per_iteration"),
        "on_cpu_s_per_iteration_median": median(True, "cpu_s_per_iteration"),
        "cpu_time_ratio_off_over_on": round(median(False, "cpu_s_per_iteration")
                                            / median(True, "cpu_s_per_iteration"), 3),
        "wall_ratio_off_over_on": round(median(False, "s_per_iteration") / median(True, "s_per_iteration"), 3),
        "to_first_iteration_s_median": {"off": median(False, "to_first_iteration_s"),
                                         "on": median(True, "to_first_iteration_s")},
        # iterations after which compiling has paid for its later first iteration
        "break_even_iterations": round((median(True, "to_first_iteration_s") - median(False, "to_first_iteration_s"))
                                       / max(1e-9, median(False, "s_per_iteration") - median(True, "s_per_iteration")),
                                       1),
        "peak_rss_mib_max": {"off": max(r["peak_rss_mib"] for r in runs if not r["compile"]),
                             "on": max(r["peak_rss_mib"] for r in runs if r["compile"])},
        **provenance("dm_compile.py", _device(), note),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        _record(result, f"dm_compile_ab_cpu{'' if recipe.stem == 'dm_fashionmnist' else '_' + recipe.stem}"
                        f"{'_cold' if cold else ''}")


@main.command()
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording (e.g. other load on the machine).")
@click.option("--shape", type=click.Choice(["fashionmnist", "cifar"]), default="fashionmnist", show_default=True,
              help="1x28x28 images (Fashion-MNIST) or 3x32x32 (CIFAR-shaped).")
def chunk(repeats: int, record: bool, note: str, shape: str) -> None:
    """The real branch alone: uncompiled passes, the compiled direct route, the compiled Winograd route."""
    g = torch.Generator().manual_seed(0)
    channels, size = (1, 28) if shape == "fashionmnist" else (3, 32)
    batches = [torch.randn(256, channels, size, size, generator=g) for _ in range(10)]
    variants = [("plain", 64), ("direct", 256), ("winograd", 16), ("winograd", 32), ("winograd", 64)]
    sizes = {"plain": "CHUNK", "direct": "COMPILED_CHUNK", "winograd": "WINOGRAD_CHUNK"}

    def call(kind: str, size: int, seed: int) -> tuple[float, float]:
        net = build_network("ConvNet", channels, 10, (size, size), seed=seed)
        for p in net.parameters():
            p.requires_grad_(False)
        original_size, original_plan = getattr(realbranch, sizes[kind]), realbranch.winograd.plan
        setattr(realbranch, sizes[kind], size)
        if kind == "direct":  # the compiled route without Winograd: plan accepts nothing
            realbranch.winograd.plan = lambda spec, weights: None
        try:
            cpu, wall = time.process_time(), time.perf_counter()
            realbranch.class_mean_embeddings(net, batches, compiled=kind != "plain")
            return time.process_time() - cpu, time.perf_counter() - wall
        finally:
            setattr(realbranch, sizes[kind], original_size)
            realbranch.winograd.plan = original_plan

    for kind, size in variants[1:]:
        call(kind, size, seed=1000)  # the compilation of each pass size, untimed
    times: dict[str, list[tuple[float, float]]] = {f"{k}_{s}": [] for k, s in variants}
    for rep in range(repeats):
        for kind, size in variants:
            times[f"{kind}_{size}"].append(call(kind, size, seed=rep))
            click.echo(f"repeat {rep} {kind} {size}: {times[f'{kind}_{size}'][-1][0]:.2f} CPU-s")
    result = {
        "benchmark": f"DM real branch alone (10 classes x 256 images, ConvNet {channels}x{size}x{size}): route and "
                     "pass size",
        "cpu_s": {k: [round(c, 3) for c, _ in v] for k, v in times.items()},
        "wall_s": {k: [round(w, 3) for _, w in v] for k, v in times.items()},
        "cpu_s_median": {k: round(statistics.median(c for c, _ in v), 3) for k, v in times.items()},
        "order": ", ".join(f"{k}_{s}" for k, s in variants) + ", repeated",
        **provenance("dm_compile.py", _device(), note),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        _record(result, "dm_compiled_chunk_cpu" + ("" if shape == "fashionmnist" else f"_{shape}"))


if __name__ == "__main__":
    main()
