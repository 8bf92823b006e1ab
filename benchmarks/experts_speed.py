"""Expert training: K experts one after another (``train_expert``) against K at once
(``train_experts_together``), interleaved.

    python benchmarks/experts_speed.py [--experts 5] [--epochs 1] [--per-class 5000] [--rounds 2]
        [--warmup 1] [--device cuda] [--record]

The MTT/DATM buffer workload: ConvNet on every image of a CIFAR-10-shaped split (generated uniform
random bytes, ``--per-class`` images per class; the speed does not depend on the pixels), SGD lr 0.01
without momentum, batch 256, per-sample DSA ``color_crop_cutout_flip_scale_rotate``. Alternates one by
one and together (A, B, A, B); records the wall seconds (and process CPU seconds) of each, the speedup,
and the largest difference between the two ways' final parameters (float rounding only; on a GPU, TF32
convolutions included). ``--warmup N`` first runs each way N times untimed (default 0: on a GPU the first
timed run would otherwise pay the CUDA, cuDNN and kernel-loading start-up).
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch
from machine import device_name, provenance, write_record  # benchmarks/machine.py (scripts run from benchmarks/)

from builders.augment import Augmenter
from builders.data import RealData
from builders.experts import ExpertSettings, flat_parameters, train_expert, train_experts_together
from builders.networks import build_network
from condensed_datasets.sources import get_source


def generated_split(per_class: int, device: torch.device) -> RealData:
    """A CIFAR-10-shaped split of random bytes, ``per_class`` images per class, class-contiguous."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10 * per_class, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(10).repeat_interleave(per_class)
    return RealData(images, labels, get_source("cifar10"), device=device)


@click.command()
@click.option("--experts", type=int, default=5, show_default=True)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--per-class", type=int, default=5000, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=0, show_default=True,
              help="Untimed runs of each way first (on a GPU: start-up costs out of the timed runs).")
@click.option("--model", default="ConvNet", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--record", is_flag=True)
@click.option("--note", default="")
def main(experts: int, epochs: int, per_class: int, rounds: int, warmup: int, model: str, device: str,
         record: bool, note: str) -> None:
    """Time EXPERTS experts trained one by one and together."""
    dev = torch.device(device)
    real = generated_split(per_class, dev)
    settings = ExpertSettings(epochs=epochs, augmenter=Augmenter("color_crop_cutout_flip_scale_rotate"))
    seeds = list(range(1, experts + 1))

    def fresh() -> list[torch.nn.Module]:
        return [build_network(model, 3, 10, (32, 32), seed=s).to(dev) for s in seeds]

    def one_by_one() -> list[torch.nn.Module]:
        nets = fresh()
        for net, s in zip(nets, seeds):
            train_expert(net, real, settings, torch.Generator().manual_seed(s))
        return nets

    def together() -> list[torch.nn.Module]:
        nets = fresh()
        train_experts_together(nets, real, settings, [torch.Generator().manual_seed(s) for s in seeds])
        return nets

    def timed(fn) -> tuple[dict, list[torch.nn.Module]]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        nets = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}, nets

    for _ in range(warmup):
        for fn in (one_by_one, together):
            timed(fn)
    runs, gaps = [], []
    for r in range(rounds):
        finals = {}
        for mode, fn in (("one_by_one", one_by_one), ("together", together)):
            result, nets = timed(fn)
            finals[mode] = [flat_parameters(n).cpu() for n in nets]
            runs.append({"mode": mode, "round": r, **result})
            click.echo(json.dumps(runs[-1]))
        gaps.append(max(float((a - b).abs().max()) for a, b in zip(finals["one_by_one"], finals["together"])))

    def median(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["mode"] == mode)

    result = {
        "benchmark": f"{experts} experts one by one vs together",
        "workload": {"model": model, "images": len(real), "shape": [3, 32, 32], "epochs": epochs, "batch": 256,
                     "lr": 0.01, "augment": "color_crop_cutout_flip_scale_rotate", "order": "one_by_one, together",
                     "untimed_warmup_runs_each": warmup},
        "runs": runs,
        "speedup_wall_median": round(median("one_by_one", "wall_s") / median("together", "wall_s"), 3),
        "speedup_cpu_median": round(median("one_by_one", "cpu_s") / median("together", "cpu_s"), 3),
        "max_abs_parameter_difference": max(gaps),
        **provenance("experts_speed.py", device_name(dev), note),
    }
    click.echo(json.dumps(result, indent=1))
    if record:
        click.echo(f"recorded {write_record(f'experts_{experts}x{model}_{dev.type}', result)}")


if __name__ == "__main__":
    main()
