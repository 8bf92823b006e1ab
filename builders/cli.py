"""Command line: condensed-build, condensed-eval, condensed-show."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import click

from condensed_datasets.format import CondensedSet

_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, FileNotFoundError, OSError)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user error into one clear message and a non-zero exit (CONDENSED_DEBUG=1 shows the traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except _USER_ERRORS as exc:
            if os.environ.get("CONDENSED_DEBUG"):
                raise
            raise click.ClickException(str(exc)) from exc

    return wrapper


def format_evaluation(ev: dict[str, Any] | None) -> str:
    """One human line per result of an ``evaluation`` metadata block."""
    if not ev:
        return "not evaluated"
    lines = [f"{ev['model']}: {ev['accuracy_mean']:.2f} ± {ev['accuracy_std']:.2f} % "
             f"({ev['runs']} runs, {ev['epochs']} epochs)"]
    if "random_accuracy_mean" in ev:
        lines.append(f"random real, same ipc: {ev['random_accuracy_mean']:.2f} ± {ev['random_accuracy_std']:.2f} % "
                     f"-> improvement {ev['improvement_over_random']:+.2f} points")
    for name, res in (ev.get("cross_architecture") or {}).items():
        lines.append(f"{name}: {res['accuracy_mean']:.2f} ± {res['accuracy_std']:.2f} %")
    return "\n".join(lines)


@click.command(name="condensed-build")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key; dotted for nested keys (eval.runs=1, params.lr_img=10).")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output root (default: the recipe's root); the set goes to ROOT/condensed/SOURCE/.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the real data lives (default: the recipe's root).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint beside the output.")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation.")
@click.option("--download", is_flag=True, help="Download the real data if it is missing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def build_command(recipe: Path, overrides: tuple[str, ...], out_root: Path | None, data_root: Path | None,
                  device: str, resume: bool, no_eval: bool, download: bool, quiet: bool) -> None:
    """Build the condensed set a RECIPE (YAML) describes, evaluate it and save it."""
    from builders.engine import Engine
    from builders.recipe import load_recipe, parse_overrides

    r = load_recipe(recipe, parse_overrides(overrides))
    engine = Engine(r, out_root=out_root, data_root=data_root, device=device, resume=resume,
                    evaluate=not no_eval, progress=not quiet, download=download)
    click.echo(f"building {r.method} on {r.source}, ipc {r.ipc}, {r.iterations} iterations, "
               f"model {r.model}, device {engine.device}, seed {r.seed}")
    cset = engine.run()
    click.echo(f"saved {engine.paths.set}")
    click.echo(f"grid  {engine.paths.grid}")
    wall = cset.metadata["build"].get("wall_time_s")
    if wall is not None:
        click.echo(f"time  {wall:.1f} s")
    click.echo(format_evaluation(cset.evaluation))


@click.command(name="condensed-eval")
@click.argument("set_file", metavar="SET", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", default=None, help="Network to train (default: the one the set was built with).")
@click.option("--models", default="", help="Comma-separated extra networks (cross-architecture).")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Number of runs (default: recipe's).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: recipe's).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the real test data lives (default: the set's recipe root).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=None, help="Evaluation seed (default: the set's).")
@click.option("--save", is_flag=True, help="Write the evaluation into the set's metadata.")
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
@_user_errors
def eval_command(set_file: Path, model: str | None, models: str, runs: int | None, epochs: int | None,
                 root: Path | None, device: str, seed: int | None, save: bool, as_json: bool) -> None:
    """Evaluate a condensed SET with the papers' protocol on the real test split."""
    from builders.data import RealData
    from builders.engine import resolve_device
    from builders.evaluate import evaluate_set
    from builders.networks import available_networks

    cset = CondensedSet.load(set_file)
    recipe = cset.metadata.get("recipe") or {}
    ev = recipe.get("eval") or {}
    model = model or ev.get("model") or recipe.get("model") or "ConvNet"
    extra = [m.strip() for m in models.split(",") if m.strip()]
    for name in [model, *extra]:
        if name not in available_networks():
            raise click.BadParameter(f"unknown network {name!r}; valid: {', '.join(available_networks())}")
    dev = resolve_device(device)
    data_root = root or Path(recipe.get("root", "data"))
    train = RealData.from_source(cset.source, data_root, train=True, device=dev)
    test = RealData.from_source(cset.source, data_root, train=False, device=dev)
    augment = ev.get("augment") or recipe.get("augment") or "none"
    result = evaluate_set(
        cset.images.to(dev), cset.labels, soft_labels=cset.soft_labels, lr=cset.lr, ipc=cset.ipc, model=model,
        models=extra, runs=runs or ev.get("runs", 5), epochs=epochs or ev.get("epochs", 1000),
        default_lr=ev.get("lr", 0.01), batch=ev.get("batch", 256), augment=augment,
        seed=cset.metadata.get("seed", 0) if seed is None else seed, train=train, test=test,
    )
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else format_evaluation(result))
    if save:
        cset.with_metadata(evaluation=result).save(set_file)
        click.echo(f"saved the evaluation into {set_file}")


@click.command(name="condensed-show")
@click.argument("set_file", metavar="SET", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True)
@_user_errors
def show_command(set_file: Path, output: Path, per_class: int) -> None:
    """Draw a condensed SET as a PNG grid, one row per class, and print its summary."""
    from builders.show import save_grid

    cset = CondensedSet.load(set_file)
    save_grid(cset, output, max_per_class=per_class)
    click.echo(f"{cset.source} {cset.method} ipc {cset.ipc}: {len(cset)} images {tuple(cset.images.shape[1:])}")
    click.echo(format_evaluation(cset.evaluation))
    click.echo(f"wrote {output}")
