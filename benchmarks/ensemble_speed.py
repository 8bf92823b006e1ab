"""Training N same-shaped networks together (builders/ensemble.py) against one after another.

    python benchmarks/ensemble_speed.py [--nets 5] [--epochs 20] [--rounds 2] [--device cpu] [--record]

The evaluation protocol's workload: ConvNet on a 100-image set (ipc 10, Fashion-MNIST-shaped random
images), batch 256, DSA ``color_crop_cutout_flip_scale_rotate``. Alternates sequential and together
(A, B, A, B); records wall seconds and, on the CPU, process CPU seconds of each.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import click
import torch
from machine import cpu_name, provenance, write_record  # benchmarks/machine.py (scripts run from benchmarks/)

from builders.augment import Augmenter
from builders.ensemble import train_together
from builders.evaluate import TrainSettings, label_loss, train_network
from builders.networks import build_network


@click.command()
@click.option("--nets", type=int, default=5, show_default=True)
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--model", default="ConvNet", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--record", is_flag=True)
@click.option("--note", default="")
def main(nets: int, epochs: int, rounds: int, model: str, device: str, record: bool, note: str) -> None:
    """Time sequential vs together training of NETS networks."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(100, 1, 28, 28, generator=g).to(dev)
    targets = torch.arange(10).repeat_interleave(10).to(dev)
    settings = TrainSettings(epochs=epochs, batch=256, augmenter=Augmenter("color_crop_cutout_flip_scale_rotate"))
    seeds = list(range(1, nets + 1))

    def fresh() -> list[torch.nn.Module]:
        return [build_network(model, 1, 10, (28, 28), seed=s).to(dev) for s in seeds]

    def sequential() -> None:
        for net, s in zip(fresh(), seeds):
            train_network(net, images, targets, settings, torch.Generator().manual_seed(s))

    def together() -> None:
        train_together(fresh(), images, targets, settings, [torch.Generator().manual_seed(s) for s in seeds],
                       label_loss)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    together()  # warm-up (vmap's first trace)
    sequential()
    runs = []
    for r in range(rounds):
        for name, fn in (("sequential", sequential), ("together", together)):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            runs.append({"mode": name, "round": r, "wall_s": round(time.perf_counter() - wall, 3),
                         "cpu_s": round(time.process_time() - cpu, 3),
                         "load_average_1min": round(os.getloadavg()[0], 2)})
            click.echo(json.dumps(runs[-1]))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    result = {
        "benchmark": f"{nets} x {model} trained together vs sequentially", "epochs": epochs, "set": "100 images",
        "runs": runs,
        "speedup_wall_median": round(med("sequential", "wall_s") / med("together", "wall_s"), 3),
        "speedup_cpu_median": round(med("sequential", "cpu_s") / med("together", "cpu_s"), 3),
        **provenance("ensemble_speed.py", torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                     f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads", note),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        path = write_record(f"ensemble_{nets}x{model}_{dev.type}", result)
        click.echo(f"recorded {path}")


if __name__ == "__main__":
    main()
