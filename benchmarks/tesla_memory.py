"""Peak memory of one trajectory-matching iteration, unrolled vs constant memory, as syn_steps grows.

    python benchmarks/tesla_memory.py [--steps 5,10,20,40] [--model ConvNetW32] [--shape 3x32x32]
                                      [--images 20] [--classes 10] [--batch-syn 0] [--device auto]
                                      [--child-timeout 300] [--tag NAME] [--record]

Each (memory mode, syn_steps) setting runs in a fresh subprocess: one MTT matching loss and its
backward on random synthetic images (memory does not depend on their content) with a random expert
start and target, per-sample DSA, every image in every step (or ``--batch-syn`` images per step, as
the MTT recipes for large ipc do). A setting that runs out of GPU memory is recorded as such
(``"oom": true``), one that outlasts ``--child-timeout`` as ``"timeout": true``. Measured:

- on a GPU: ``torch.cuda.max_memory_allocated()`` during the iteration minus the memory allocated
  before it (so the network, images and expert vectors are not counted);
- on the CPU: the process's peak resident set (``ru_maxrss``) after the iteration minus its resident
  set just before it (allocator caching and one-time allocations make this coarser than on a GPU).

It also prints the loss and the norm of the image gradient per setting: the two modes must agree.
With --record the result goes to benchmarks/results/ as JSON with device, command and date.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import click
import torch
from machine import write_record  # benchmarks/machine.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]


def _current_rss_mib() -> float:
    """Resident set size now (Linux /proc), MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(memory: str, steps: int, model: str, shape: tuple[int, int, int], images: int, classes: int,
            device: str, batch_syn: int = 0, seed: int = 0) -> dict:
    """One setting, in this process: build the problem, run one loss + backward, report memory and time."""
    sys.path.insert(0, str(ROOT))
    from builders.augment import Augmenter
    from builders.experts import ParamLayout, flat_parameters
    from builders.methods.mtt import matching_loss
    from builders.methods.trajectory import StudentTrajectory, make_plan, raw_from_syn_lr, syn_lr_from_raw
    from builders.networks import build_network

    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    net = build_network(model, shape[0], classes, shape[1:], seed=seed).to(dev)
    for p in net.parameters():
        p.requires_grad_(False)
    layout = ParamLayout.of(net)
    start = flat_parameters(net)
    target = start + 0.01 * torch.randn(start.shape, generator=g).to(dev)
    x = torch.randn(images, *shape, generator=g).to(dev).requires_grad_(True)
    labels = torch.arange(classes).repeat_interleave(max(1, images // classes))[:images].to(dev)
    augmenter = Augmenter("color_crop_cutout_flip_scale_rotate")
    plan = make_plan(images, steps, batch_syn, g, augmenter)
    traj = StudentTrajectory(net, layout, start, target, plan, augmenter)
    raw = raw_from_syn_lr(0.01, 0.01).to(dev).requires_grad_(True)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_mib()
    t0 = time.perf_counter()
    loss = matching_loss(traj, x, syn_lr_from_raw(raw, 0.01), labels, memory)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _peak_rss_mib() - before
    seconds = time.perf_counter() - t0
    return {"memory": memory, "syn_steps": steps, "peak_mib": round(peak, 1), "seconds": round(seconds, 3),
            "loss": float(loss.detach()), "image_grad_norm": float(x.grad.norm()), "lr_grad": float(raw.grad),
            "parameters": layout.numel}


@click.command()
@click.option("--steps", default="5,10,20,40", show_default=True, help="Comma-separated syn_steps values.")
@click.option("--modes", default="unrolled,constant", show_default=True)
@click.option("--model", default="ConvNetW32", show_default=True)
@click.option("--shape", default="3x32x32", show_default=True, help="CxHxW of the images.")
@click.option("--images", type=int, default=20, show_default=True, help="Synthetic images (all used every step).")
@click.option("--classes", type=int, default=10, show_default=True)
@click.option("--batch-syn", type=int, default=0, show_default=True, help="Synthetic images per step (0: all).")
@click.option("--child-timeout", type=float, default=300.0, show_default=True, help="Seconds per setting.")
@click.option("--tag", default="", help="Added to the record's file name (e.g. cifar100_ipc50).")
@click.option("--device", default="auto", show_default=True)
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--child", default=None, hidden=True, help="Internal: MODE:STEPS, run one setting and print JSON.")
def main(steps: str, modes: str, model: str, shape: str, images: int, classes: int, batch_syn: int,
         child_timeout: float, tag: str, device: str, record: bool, child: str | None) -> None:
    """Peak memory of unrolled vs constant-memory trajectory matching."""
    dims = tuple(int(v) for v in shape.lower().split("x"))
    if len(dims) != 3:
        raise click.BadParameter(f"--shape: expected CxHxW, got {shape!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if child is not None:
        mode, n = child.split(":")
        try:
            row = measure(mode, int(n), model, dims, images, classes, device, batch_syn)  # type: ignore[arg-type]
        except torch.cuda.OutOfMemoryError as exc:
            row = {"memory": mode, "syn_steps": int(n), "oom": True, "error": str(exc).splitlines()[0]}
        click.echo(json.dumps(row))
        return
    results = []
    for n in [int(v) for v in steps.split(",")]:
        for mode in modes.split(","):
            cmd = [sys.executable, __file__, "--model", model, "--shape", shape, "--images", str(images),
                   "--classes", str(classes), "--batch-syn", str(batch_syn), "--device", device,
                   "--child", f"{mode}:{n}"]
            try:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=child_timeout)
            except subprocess.TimeoutExpired:
                row = {"memory": mode, "syn_steps": n, "timeout": True, "seconds": f"> {child_timeout}"}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            if row.get("oom") or row.get("timeout"):
                click.echo(f"{mode:9s} syn_steps {n:3d}: {'out of GPU memory' if row.get('oom') else 'timed out'}")
                continue
            click.echo(f"{mode:9s} syn_steps {n:3d}: peak {row['peak_mib']:8.1f} MiB  {row['seconds']:7.2f} s  "
                       f"loss {row['loss']:.6f}  |grad images| {row['image_grad_norm']:.6e}")
    dev_name = (torch.cuda.get_device_name() if device.startswith("cuda") else
                f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    record_data = {
        "benchmark": "tesla_memory",
        "what": "peak memory of one MTT matching loss + backward, unrolled vs constant memory",
        "model": model, "image_shape": list(dims), "images": images, "classes": classes,
        "augment": "color_crop_cutout_flip_scale_rotate (per sample)", "batch_syn": batch_syn or "all",
        "measure": ("torch.cuda.max_memory_allocated minus allocated before the iteration" if device.startswith("cuda")
                    else "peak RSS (ru_maxrss) minus RSS before the iteration, fresh subprocess per setting"),
        "device": dev_name,
        "torch": torch.__version__,
        "results": results,
        "command": " ".join(["python", "benchmarks/tesla_memory.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }
    if record:
        kind = "cuda" if device.startswith("cuda") else "cpu"
        path = write_record(f"tesla_memory_{model}_{kind}{'_' + tag if tag else ''}", record_data)
        click.echo(f"recorded {path}")


if __name__ == "__main__":
    main()
