"""Accuracy of DM's reduced-precision real branch: a recipe built at fp32 and at bf16-real, two seeds each.

    python benchmarks/precision_check.py [--recipe recipes/quickstart.yaml] [--seeds 0,1] [--device cuda]
                                         [--data-root DIR] [--record]

Builds alternate (fp32 seed 0, bf16-real seed 0, fp32 seed 1, bf16-real seed 1), each a full build with
the recipe's own evaluation, in this process under a temporary output root. The record lists every
build's evaluation (mean, std, per-run accuracies, random baseline) and wall time, and the two
precisions' mean over seeds: ``params.precision: bf16-real`` may be a default only where this shows
the same accuracy within run-to-run spread (issue 11).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from machine import write_record  # benchmarks/machine.py (scripts run from benchmarks/)

from builders.build import build, load_recipe
from builders.recipe import parse_overrides

PRECISIONS = ("fp32", "bf16-real")


@click.command()
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("recipes/quickstart.yaml"), show_default=True)
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the real data lives (default: a temporary root; Fashion-MNIST comes from the system copy).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe overrides for every build.")
@click.option("--record", is_flag=True)
def main(recipe: Path, seeds: str, device: str, data_root: Path | None, overrides: tuple[str, ...],
         record: bool) -> None:
    """Build RECIPE at both precisions for each seed and compare the evaluations."""
    builds = []
    with tempfile.TemporaryDirectory(prefix="precision_check_") as tmp:
        for seed in [int(s) for s in seeds.split(",")]:
            for precision in PRECISIONS:
                pairs = parse_overrides(overrides) + [("seed", seed), ("params.precision", precision)]
                r = load_recipe(recipe, pairs)
                start = time.perf_counter()
                cset = build(r, out_root=Path(tmp) / f"{precision}_{seed}", data_root=data_root, device=device,
                             progress=False)
                wall = time.perf_counter() - start
                ev = cset.metadata.get("evaluation") or {}
                row = {"seed": seed, "precision": precision, "wall_s": round(wall, 1),
                       "accuracy_mean": ev.get("accuracy_mean"), "accuracy_std": ev.get("accuracy_std"),
                       "accuracies": ev.get("accuracies"), "random_accuracy_mean": ev.get("random_accuracy_mean"),
                       "build_wall_time_s": cset.metadata.get("build", {}).get("wall_time_s")}
                builds.append(row)
                click.echo(json.dumps(row))

    def mean_of(precision: str) -> float:
        return statistics.mean(b["accuracy_mean"] for b in builds if b["precision"] == precision)

    result = {
        "benchmark": "DM real branch precision: fp32 vs bf16-real, the recipe's evaluation",
        "recipe": str(recipe), "overrides": list(overrides), "order": "fp32, bf16-real per seed",
        "builds": builds,
        "mean_accuracy_over_seeds": {p: round(mean_of(p), 3) for p in PRECISIONS},
        "difference_bf16_minus_fp32": round(mean_of("bf16-real") - mean_of("fp32"), 3),
        "run_to_run_std_fp32": [b["accuracy_std"] for b in builds if b["precision"] == "fp32"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/precision_check.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        kind = "cuda" if result["device"] != "cpu" else "cpu"
        path = write_record(f"precision_{recipe.stem}_{kind}", result)
        click.echo(f"recorded {path}")


if __name__ == "__main__":
    main()
