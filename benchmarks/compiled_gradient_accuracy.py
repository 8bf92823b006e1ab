"""How close the compiled gradient (``realbranch.classifier_loss``, compiled) comes to the exact one.

    python benchmarks/compiled_gradient_accuracy.py [--device cpu] [--size 28] [--seeds 8] [--record]

For each seed: a fresh network (a ReLU ConvNet and a sigmoid one), a batch of standard-normal images and
random labels; the gradient of the mean cross-entropy with respect to every parameter, computed plainly in
float32, compiled in float32 (on a CPU the Winograd route; ``--route direct`` forces the direct one) and
plainly in float64 (the reference). Records, per seed, the largest relative error over the parameters
(relative to each parameter's float64 gradient norm; parameters whose exact gradient is 0, such as a
convolution's bias before instance norm, are left out).

ReLU's derivative jumps at 0: a unit whose input lies within float rounding of 0 may fall on either side
in two float32 computations, and one such unit moves the whole gradient by a few 1e-3 of its norm. The
sigmoid network has no such jump, so its errors show the routes' rounding alone.
"""

from __future__ import annotations

import click
import torch
from machine import device_name, provenance, write_record  # benchmarks/machine.py (scripts run from benchmarks/)

from builders import realbranch
from builders.networks import build_network

MODELS = ("ConvNetW32", "ConvNetAS")  # ReLU (width 32) and sigmoid (width 128)


def _gradient(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, compiled: bool
              ) -> list[torch.Tensor]:
    """Every parameter's gradient of the mean cross-entropy (zeros where a parameter is unused)."""
    loss = realbranch.classifier_loss(net, images, targets, compiled)
    return list(torch.autograd.grad(loss, list(net.parameters()), allow_unused=True, materialize_grads=True))


def largest_relative_error(got: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """Largest ``|got - exact| / |exact|`` over the parameters whose exact gradient is not ~0."""
    scale = max(float(e.norm()) for e in exact)
    return max(float((g.double() - e).norm() / e.norm()) for g, e in zip(got, exact)
               if float(e.norm()) > 1e-9 * scale)


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--size", type=int, default=28, show_default=True, help="Image side (Fashion-MNIST: 28).")
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--seeds", type=int, default=8, show_default=True)
@click.option("--route", type=click.Choice(["default", "direct"]), default="default", show_default=True,
              help="direct: the compiled direct route on a CPU too (no Winograd).")
@click.option("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default).")
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording.")
def main(device: str, size: int, batch: int, seeds: int, route: str, threads: int, record: bool, note: str) -> None:
    """Relative error of the plain and the compiled float32 gradient against float64, per seed."""
    if threads:
        torch.set_num_threads(threads)
    if route == "direct":
        realbranch.winograd.plan = lambda spec, weights: None  # this process only: the direct compiled route
    rows = []
    for model in MODELS:
        for seed in range(seeds):
            net = build_network(model, 1, 10, (size, size), seed=seed).to(device)
            generator = torch.Generator().manual_seed(1000 + seed)
            images = torch.randn(batch, 1, size, size, generator=generator).to(device)
            targets = torch.randint(0, 10, (batch,), generator=generator).to(device)
            exact_net = build_network(model, 1, 10, (size, size)).to(device).double()
            exact_net.load_state_dict(net.state_dict())
            exact = [g.detach() for g in _gradient(exact_net, images.double(), targets, False)]
            row = {"model": model, "seed": seed,
                   "plain": largest_relative_error(_gradient(net, images, targets, False), exact),
                   "compiled": largest_relative_error(_gradient(net, images, targets, True), exact)}
            row = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()}
            click.echo(row)
            rows.append(row)
    summary = {model: {kind: max(float(r[kind]) for r in rows if r["model"] == model) for kind in ("plain", "compiled")}
               for model in MODELS}
    result = {
        "benchmark": "relative error of the float32 gradient (plain, compiled) against float64",
        "config": {"size": size, "batch": batch, "seeds": seeds, "route": route, "threads": torch.get_num_threads(),
                   "models": list(MODELS), "images": "standard normal", "labels": "uniform random"},
        "rows": rows,
        "largest": summary,
        **provenance("compiled_gradient_accuracy.py", device_name(device), note),
    }
    click.echo(summary)
    if record:
        click.echo(f"recorded {write_record('compiled_gradient_accuracy_' + device.split(':')[0], result)}")


if __name__ == "__main__":
    main()
