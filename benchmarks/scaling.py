"""Wall time of a DM build and an expert build at 1 and 2 processes (torchrun), interleaved.

    python benchmarks/scaling.py --data-root DATA [--repeats 2] [--record] [--note TEXT]
    python benchmarks/scaling.py --data-root DATA --device cuda --procs 1,2,4 --record   # a multi-GPU machine

Each configuration runs ``condensed-build`` as a fresh command (the time a user waits, process start
included) in rounds A, B, C, A, B, C ... so that load from other programs falls on all of them alike.
Configurations: one plain process (default thread count), and ``torchrun --nproc_per_node=N`` for each N
of ``--procs`` (on the CPU with ``OMP_NUM_THREADS=1`` per process, torchrun's own default). The DM
build's own time is read from the set's ``build.wall_time_s`` (loop and write, no process start).
With ``--record`` the result goes to ``benchmarks/results/scaling_{device}_{date}.json``.
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

import click
import torch
from machine import cpu_name, write_record  # benchmarks/machine.py (scripts run from benchmarks/)

from condensed_datasets.format import CondensedSet

REPO = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "condensed-build"

# Sizes chosen here for a shared 2-core CPU: builds of tens of seconds, not paper settings.
WORKLOADS = {
    "dm": {"source": "fashionmnist", "method": "dm", "ipc": 10, "model": "ConvNetW32", "seed": 0,
           "iterations": 10, "checkpoint_every": 0, "augment": "color_crop_cutout_flip_scale_rotate",
           "real_per_class": 100, "params": {"batch_real": 64}},
    "experts": {"source": "fashionmnist", "method": "experts", "ipc": 1, "model": "ConvNetW32", "seed": 0,
                "real_per_class": 100, "augment": "color_crop_cutout_flip_scale_rotate",
                "params": {"num_experts": 4, "epochs": 1, "batch": 128}, "eval": {"test_per_class": 50}},
}


def _command(config: str, recipe: Path, out: Path, data_root: Path, device: str) -> list[str]:
    build = [str(CLI), str(recipe), "--out", str(out), "--data-root", str(data_root), "--device", device,
             "--quiet", "--no-eval", "--overwrite"]
    if config == "plain":
        return build
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config}", *build]




@click.command()
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--procs", default="2", show_default=True, help="Comma-separated torchrun process counts.")
@click.option("--repeats", type=int, default=2, show_default=True)
@click.option("--workloads", default="dm,experts", show_default=True)
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording (other load on the machine ...).")
def main(data_root: Path, device: str, procs: str, repeats: int, workloads: str, record: bool, note: str) -> None:
    """Time DM and expert builds at 1 and N processes."""
    configs = ["plain"] + [p.strip() for p in procs.split(",") if p.strip()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for name in workloads.split(","):
            recipe = Path(tmp) / f"{name}.yaml"
            recipe.write_text(json.dumps(WORKLOADS[name]))
            results[name] = {c: {"command_s": [], "build_s": []} for c in configs}
            for _ in range(repeats):
                for config in configs:
                    out = Path(tmp) / f"out-{name}-{config}"
                    if name == "experts":  # a fresh store each time: otherwise nothing is left to train
                        subprocess.run(["rm", "-rf", str(out)], check=True)
                    cmd = _command(config, recipe, out, data_root, device)
                    if config != "plain" and device == "cpu":
                        cmd_env = {**env, "OMP_NUM_THREADS": "1"}
                    else:
                        cmd_env = env
                    start = time.perf_counter()
                    done = subprocess.run(cmd, env=cmd_env, capture_output=True, text=True)
                    elapsed = time.perf_counter() - start
                    if done.returncode:
                        raise click.ClickException(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                    results[name][config]["command_s"].append(round(elapsed, 2))
                    if name == "dm":
                        cset = CondensedSet.load(out / "condensed" / "fashionmnist" / "dm_ipc10.safetensors")
                        results[name][config]["build_s"].append(cset.metadata["build"]["wall_time_s"])
                    click.echo(f"{name} {config}: {elapsed:.1f} s")
    summary = {
        name: {config: {k: {"runs": v, "median": statistics.median(v)} for k, v in times.items() if v}
               for config, times in per.items()}
        for name, per in results.items()
    }
    record_ = {
        "what": "wall time of a build at 1 process (plain) and N processes (torchrun --standalone), interleaved",
        "workloads": {name: WORKLOADS[name] for name in results},
        "results_s": summary,
        "device": device if device != "cpu" else f"cpu: {cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": note,
    }
    click.echo(json.dumps(summary, indent=2))
    if record:
        path = write_record(f"scaling_{device}", record_)
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
