"""``eval.compile``: an evaluation's training steps plain against compiled, interleaved, on this machine.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/eval_compile.py [--epochs 40] [--rounds 3] [--record]

Trains a fresh ConvNet on 100 Fashion-MNIST-shaped random images (the ipc 10 set's size; one step per epoch at
the protocol's batch of 256) with the papers' protocol and DSA (``builders.evaluate.train_network``): first once
compiled, timing its first step (the compilation; with an empty ``TORCHINDUCTOR_CACHE_DIR``, a whole one), then
``--rounds`` pairs of plain and compiled runs of ``--epochs`` epochs, and records the seconds per step of each,
their ratio, and the steps after which compiling pays for its first step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")  # read before torch starts writing to it
_COLD = bool(_CACHE) and Path(_CACHE).is_dir() and not any(Path(_CACHE).iterdir())

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402
from machine import cpu_name, provenance, write_record  # noqa: E402  (benchmarks/machine.py)

from builders.augment import Augmenter  # noqa: E402
from builders.compile_setting import CompileSetting  # noqa: E402
from builders.evaluate import train_network  # noqa: E402
from builders.networks import build_network  # noqa: E402
from builders.train_settings import TrainSettings  # noqa: E402


def _train(epochs: int, compile: CompileSetting | None, images: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Seconds of each epoch (one step each) of a fresh ConvNet's training."""
    net = build_network("ConvNet", 1, 10, (28, 28), seed=1)
    settings = TrainSettings(epochs=epochs, augmenter=Augmenter("color_crop_cutout_flip_scale_rotate"))
    stamps = [time.perf_counter()]
    train_network(net, images, targets, settings, torch.Generator().manual_seed(0), compile=compile,
                  on_epoch=lambda: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


@click.command()
@click.option("--epochs", type=click.IntRange(2), default=40, show_default=True, help="Epochs (steps) per run.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True, help="Plain/compiled pairs.")
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="")
def main(epochs: int, rounds: int, record: bool, note: str) -> None:
    """Time an evaluation's training steps plain and compiled."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(100, 1, 28, 28, generator=g)
    targets = torch.arange(10).repeat_interleave(10)
    first = _train(2, CompileSetting(True, True, "ConvNet", key="eval.compile"), images, targets)[0]
    click.echo(f"first compiled step (compilation included): {first:.1f} s")
    per_step: dict[str, list[float]] = {"plain": [], "compiled": []}
    for r in range(rounds):
        for name in ("plain", "compiled"):
            setting = None if name == "plain" else CompileSetting(True, True, "ConvNet", key="eval.compile")
            per_step[name].append(statistics.median(_train(epochs, setting, images, targets)))
            click.echo(f"round {r} {name:8}: {per_step[name][-1]:.3f} s/step")
    plain, compiled = statistics.median(per_step["plain"]), statistics.median(per_step["compiled"])
    result = {
        "benchmark": "evaluation training step, plain vs eval.compile (ConvNet, 100 images 1x28x28, DSA)",
        "inductor_cache": "empty at the start (cold)" if _COLD else "as found (may be warm)",
        "epochs_per_run": epochs, "rounds": rounds,
        "first_compiled_step_s": round(first, 2),
        "s_per_step": {k: [round(v, 4) for v in vs] for k, vs in per_step.items()},
        "plain_s_per_step_median": round(plain, 4), "compiled_s_per_step_median": round(compiled, 4),
        "speedup": round(plain / compiled, 3),
        "break_even_steps": round((first - compiled) / max(1e-9, plain - compiled), 1),
        **provenance("eval_compile.py", f"cpu: {cpu_name()}, {os.cpu_count()} cores, "
                                        f"{torch.get_num_threads()} torch threads", note),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        click.echo(f"recorded {write_record('eval_compile_cpu', result)}")


if __name__ == "__main__":
    sys.exit(main())
