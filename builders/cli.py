"""Command line: condensed-build, -eval, -show, -publish, -list, -continual and -nas."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import click

from builders import distributed
from builders.allocator import tune_allocator
from builders.build import build, load_recipe, makes_set
from builders.continual import run_continual
from builders.data import RealData
from builders.engine import BuildPaths, resolve_device
from builders.errors import BuildError, BuildersError, RecipeError
from builders.evaluate import evaluate_set
from builders.host_threads import limit_threads_for
from builders.nas import run_nas
from builders.networks import available_networks
from builders.publish import publish_to_dir, publish_to_hub
from builders.recipe import DEFAULT_ROOT, SEED_LIMIT, Recipe, parse_overrides, stored_evaluation
from builders.registry import get_method
from builders.runspec import load_spec
from builders.show import save_grid
from condensed_datasets import catalogue
from condensed_datasets._text import printable
from condensed_datasets.errors import CondensedDatasetsError, HubError
from condensed_datasets.format import CondensedSet
from condensed_datasets.hub import list_repo
from condensed_datasets.sources import SOURCES

#: What the commands report as one line: the packages' own errors and the file system's. Anything else is a
#: bug and keeps its traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (CondensedDatasetsError, BuildersError, OSError)


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
            raise click.ClickException(printable(exc, keep="\n")) from exc

    return wrapper


def tune_allocator_for(recipe: Recipe) -> bool:
    """Apply the allocator settings (:func:`builders.allocator.tune_allocator`) unless the recipe's method declines
    them (``Method.tunes_allocator``; runners that are no condensation method, e.g. experts, take them); True if
    applied."""
    return getattr(get_method(recipe.method), "tunes_allocator", True) and tune_allocator()


def _limit_threads_for_spec(spec_values: dict[str, Any], device: str | None) -> None:
    """:func:`builders.host_threads.limit_threads_for` the device a run spec names (--device first); a value
    that is no name is left to the runner's own checks."""
    name = device or spec_values.get("device") or "auto"
    if isinstance(name, str):
        limit_threads_for(resolve_device(name))


def _silent(*args: Any, **kwargs: Any) -> None:
    """click.echo on ranks other than 0 under torchrun."""


def counted(n: Any, noun: str) -> str:
    """``"1 run"``, ``"5 runs"``: a count and its noun, plural unless the count is 1."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_evaluation(ev: dict[str, Any] | None) -> str:
    """One human line per result of an ``evaluation`` metadata block."""
    if not ev or ev.get("accuracy_mean") is None:
        return "not evaluated"

    def pm(mean: Any, std: Any) -> str:
        return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}") + " %"

    protocol = ", ".join(counted(ev[k], k[:-1]) for k in ("runs", "epochs") if ev.get(k) is not None)
    lines = [printable(f"{ev.get('model') or 'model?'}: {pm(ev['accuracy_mean'], ev.get('accuracy_std'))}"
                       + (f" ({protocol})" if protocol else ""))]
    if ev.get("random_accuracy_mean") is not None:
        gain = ev.get("improvement_over_random")
        lines.append(f"random real, same ipc: {pm(ev['random_accuracy_mean'], ev.get('random_accuracy_std'))}"
                     + ("" if gain is None else f" -> improvement {gain:+.2f} points"))
    for name, res in (ev.get("cross_architecture") or {}).items():
        lines.append(printable(f"{name}: {pm(res['accuracy_mean'], res.get('accuracy_std'))}"))
    return "\n".join(lines)


@click.command(name="condensed-build")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key; dotted for nested keys (eval.runs=1, params.lr_img=10).")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_ROOT,
              show_default=True, help="Output root; the set goes to OUT/condensed/SOURCE/.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the real data lives (default: the output root).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint beside the output.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing set or an unfinished build's checkpoint (start over; with --resume, continue "
                   "the checkpoint and replace the set).")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation.")
@click.option("--download", is_flag=True, help="Download the real data if it is missing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
@distributed.record_errors  # under torchrun: a failing rank's traceback goes into torchrun's report
def build_command(recipe: Path, overrides: tuple[str, ...], out_root: Path | None, data_root: Path | None,
                  device: str, resume: bool, overwrite: bool, no_eval: bool, download: bool, quiet: bool) -> None:
    """Build the condensed set a RECIPE (YAML) describes, evaluate it and save it.

    Under torchrun (``torchrun --nproc_per_node=N $(which condensed-build) RECIPE``) the build runs across
    the N processes; rank 0 alone writes, logs and prints.
    """
    r = load_recipe(recipe, parse_overrides(overrides))
    tune_allocator_for(r)
    dev = resolve_device(device)
    limit_threads_for(dev)
    echo = click.echo if distributed.env_is_main() else _silent  # under torchrun one rank speaks
    quiet = quiet or not distributed.env_is_main()
    options = dict(out_root=out_root, data_root=data_root, device=device, resume=resume, overwrite=overwrite,
                   evaluate=not no_eval, progress=not quiet, download=download)
    if not makes_set(r):  # e.g. expert trajectories
        echo(f"running {r.method} on {r.source}, model {r.model}, device {dev}, seed {r.seed}")
        echo(build(r, **options).summary())
        return
    steps = counted(r.iterations, "iteration") if get_method(r.method).iterative else "one-shot selection"
    echo(f"building {r.method} on {r.source}, ipc {r.ipc}, {steps}, model {r.model}, device {dev}, seed {r.seed}")
    cset = build(r, **options)
    paths = BuildPaths.for_recipe(r, out_root)
    echo(f"saved {paths.set}")
    echo(f"grid  {paths.grid}")
    wall = cset.metadata["build"].get("wall_time_s")
    if wall is not None:
        echo(f"time  {wall:.1f} s")
    echo(format_evaluation(cset.evaluation))


@click.command(name="condensed-eval")
@click.argument("set_file", metavar="SET", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", default=None, help="Network to train (default: the one the set was built with).")
@click.option("--models", default="", help="Comma-separated extra networks (cross-architecture).")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Number of runs (default: recipe's).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: recipe's).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_ROOT, show_default=True,
              help="Where the real train and test data live (ROOT/FashionMNIST/..., as torchvision lays them out).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=click.IntRange(min=0, max=SEED_LIMIT, max_open=True), default=None,
              help="Evaluation seed (default: the set's).")
@click.option("--save", is_flag=True, help="Write the evaluation into the set's metadata.")
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_user_errors
def eval_command(set_file: Path, model: str | None, models: str, runs: int | None, epochs: int | None,
                 root: Path | None, device: str, seed: int | None, save: bool, as_json: bool,
                 quiet: bool = False) -> None:
    """Evaluate a condensed SET with the papers' protocol on the real test split."""
    tune_allocator()
    cset = CondensedSet.load(set_file)
    loaded = hashlib.sha256(set_file.read_bytes()).hexdigest() if save else None
    try:  # the protocol recorded in the file (a stranger's, perhaps), checked as a recipe's before any work
        ev, recipe_model, augment = stored_evaluation(cset.metadata.get("recipe") or {})
    except RecipeError as exc:
        raise RecipeError(f"{set_file}: the evaluation settings recorded in it are unusable ({exc}); rebuild the "
                          "set, or evaluate it with your own code") from None
    if seed is None:
        seed = cset.metadata.get("seed") or 0
        if not 0 <= seed < SEED_LIMIT:
            raise RecipeError(f"{set_file}: the seed recorded in it ({seed}) is not an evaluation seed (0 to "
                              f"{SEED_LIMIT - 1}); pass --seed")
    model = model or ev.model or recipe_model or "ConvNet"
    extra = [m.strip() for m in models.split(",") if m.strip()]
    for name in [model, *extra]:
        if name not in available_networks():
            raise click.BadParameter(f"unknown network {name!r}; valid: {', '.join(available_networks())}")
    dev = distributed.local_device(resolve_device(device))
    limit_threads_for(dev)
    data_root = root  # never a path from the file: a set's metadata is a stranger's
    train = RealData.from_source(cset.source, data_root, train=True, device=dev)
    test = RealData.from_source(cset.source, data_root, train=False, device=dev)
    space = cset.metadata.get("normalization") if cset.zca is not None else None
    train.set_zca(cset.zca, space)  # a set built in ZCA space is evaluated on whitened real images
    test.set_zca(cset.zca, space)
    with distributed.session(dev):  # under torchrun: the runs are split across the processes
        result = evaluate_set(
            cset.images.to(dev), cset.labels, soft_labels=cset.soft_labels, lr=cset.lr, ipc=cset.ipc, model=model,
            models=extra, runs=runs or ev.runs, epochs=epochs or ev.epochs, default_lr=ev.lr, batch=ev.batch,
            augment=augment,
            seed=seed, train=train, test=test,
            progress=not quiet and distributed.env_is_main(), compile=ev.compile,
        )
    if not distributed.env_is_main():  # one rank prints and saves
        return
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else format_evaluation(result))
    if save:
        if not set_file.is_file() or hashlib.sha256(set_file.read_bytes()).hexdigest() != loaded:
            raise BuildError(f"{set_file} changed while it was evaluated (rebuilt or replaced); the evaluation above "
                             "is of the set as it was and was not saved: run condensed-eval --save again")
        cset.with_metadata(evaluation=result).save(set_file)
        click.echo(f"saved the evaluation into {set_file}")


@click.command(name="condensed-show")
@click.argument("set_file", metavar="SET", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="At most this many images per class (one row each).")
@_user_errors
def show_command(set_file: Path, output: Path, per_class: int) -> None:
    """Draw a condensed SET as a PNG grid, one row per class, and print its summary."""
    cset = CondensedSet.load(set_file)
    if output.exists() and os.path.samefile(output, set_file):
        raise click.BadParameter(f"{output} is the SET itself: the grid would replace the set; write the PNG "
                                 "elsewhere", param_hint="'-o' / '--output'")
    try:
        save_grid(cset, output, max_per_class=per_class)
    except OSError as exc:  # a file where a folder of the path should be, a folder that cannot be written
        raise click.ClickException(f"cannot write {output}: {exc.strerror} ({exc.filename}); pass -o a PNG path "
                                   "in a folder you can write to") from None
    click.echo(f"{cset.source} {cset.method} ipc {cset.ipc}: {len(cset)} images {tuple(cset.images.shape[1:])}")
    click.echo(format_evaluation(cset.evaluation))
    click.echo(f"wrote {output}")


@click.command(name="condensed-publish")
@click.argument("set_file", metavar="SET", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--repo", "repo_id", default=None, metavar="ORG/NAME",
              help="Dataset repository (default: ORG/condensed-SOURCE, ORG from CONDENSED_DATASETS_ORG, "
                   "else condensed-datasets).")
@click.option("--revision", default=None, metavar="BRANCH",
              help="Branch to commit to (default: main; created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private (when it does not exist yet).")
@click.option("--dry-run", is_flag=True, help="Print what would be published (files, card, index); change nothing.")
@click.option("--force", is_flag=True, help="Replace a different file already published under the same name.")
@click.option("--to-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the repository layout to this folder instead of the hub (mirrors, air-gapped sites).")
@click.option("--license", "license_", default=None, help="License in the card (default: the source dataset's).")
@_user_errors
def publish_command(set_file: Path, repo_id: str | None, revision: str | None, private: bool, dry_run: bool,
                    force: bool, to_dir: Path | None, license_: str | None) -> None:
    """Publish a condensed SET with an updated dataset card and index.json: to a hub dataset repository in
    one commit, or with --to-dir to a folder laid out the same way. The same bytes again is a no-op."""
    if to_dir is not None:
        if revision is not None or private:
            raise click.UsageError("--revision and --private apply to the hub, not to --to-dir")
        result = publish_to_dir(set_file, to_dir, repo_id=repo_id, dry_run=dry_run, force=force, license=license_)
    else:
        result = publish_to_hub(set_file, repo_id, revision=revision, private=private, dry_run=dry_run,
                                force=force, license=license_)
    plan = result.plan
    if dry_run:
        click.echo(f"dry run: nothing was changed. Publishing to {result.target} would write:")
    click.echo(plan.describe())
    if not plan.changed:
        return
    if dry_run:
        click.echo(f"\n----- README.md -----\n{plan.card}")
        click.echo(f"----- index.json -----\n{catalogue.index_to_bytes(plan.index).decode()}", nl=False)
    elif result.commit_url:
        click.echo(f"committed to {result.target}: {result.commit_url}")
    else:
        click.echo(f"wrote {len(result.written)} files to {result.target}")


def _size_text(size: Any) -> str:
    if size is None:
        return "-"
    size = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"


@click.command(name="condensed-list")
@click.argument("source", required=False, type=click.Choice(sorted(SOURCES), case_sensitive=False))
@click.option("--repo", "repo_id", default=None, metavar="ORG/NAME",
              help="List a hub dataset repository (its index.json).")
@click.option("--revision", default=None, help="Revision of --repo (default: main).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="List the sets under a local root (ROOT/condensed/SOURCE/).")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="List a published folder (condensed-publish --to-dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@_user_errors
def list_command(source: str | None, repo_id: str | None, revision: str | None, root: Path | None,
                 folder: Path | None, as_json: bool) -> None:
    """List condensed sets (method, ipc, accuracy, size): of a hub repository, a published folder or a local
    root; with none of those, the sets embedded in the package and, given SOURCE, its default hub repository."""
    rows: list[dict[str, Any]] = []
    if repo_id:
        rows += list_repo(repo_id, revision=revision, source=source)
    if folder is not None:
        rows += catalogue.list_folder(folder, source)
    if root is not None:
        rows += catalogue.list_local(root, source)
    if not (repo_id or folder is not None or root is not None):
        rows += catalogue.list_embedded(source)
        if source:
            default = catalogue.default_repo_id(source)
            try:
                rows += list_repo(default, revision=revision, source=source)
            except HubError as exc:
                click.echo(printable(f"note: {default} not listed: {exc}", keep="\n"), err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        click.echo("no sets found")
        return
    header = ("where", "location", "source", "method", "ipc", "accuracy (%)", "vs random", "size")
    table = [header] + [tuple(printable(cell) for cell in (
        r["where"], str(r.get("location", "")), r["source"], r["method"], str(r["ipc"]),
        "-" if r.get("accuracy_mean") is None else f"{r['accuracy_mean']:.2f}"
        + ("" if r.get("accuracy_std") is None else f" ± {r['accuracy_std']:.2f}"),
        "-" if r.get("improvement_over_random") is None else f"{r['improvement_over_random']:+.2f}",
        _size_text(r.get("size")),
    )) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                   .rstrip())


def _spec_command(name: str, outputs: str, data: str) -> Callable[[Callable[..., Any]], Any]:
    """The options every run-spec command shares (SPEC, --set, --out, --data-root, --device, --quiet)."""
    def wrap(func: Callable[..., Any]) -> Any:
        for option in reversed((
            click.argument("spec", type=click.Path(dir_okay=False, path_type=Path)),
            click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                         help="Override a spec key (dotted)."),
            click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                         help=f"Where {outputs} go (default: the spec's out)."),
            click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                         help=f"Where {data} (default: the spec's root)."),
            click.option("--device", default=None, help="auto, cpu or cuda (default: the spec's)."),
        )):
            func = option(func)
        return click.command(name=name)(func)
    return wrap


@_spec_command("condensed-continual", "continual.json and continual.png", "the real data lives")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_user_errors
def continual_command(spec: Path, overrides: tuple[str, ...], out: Path | None, data_root: Path | None,
                      device: str | None, quiet: bool) -> None:
    """Run the class-incremental protocol of a SPEC (YAML): per-step accuracy per method, JSON and a plot."""
    spec_values = load_spec(spec, parse_overrides(overrides))
    _limit_threads_for_spec(spec_values, device)
    run_continual(spec_values, data_root=data_root, out=out, device=device,
                  progress=not quiet, echo=click.echo)


@_spec_command("condensed-nas", "nas.json and nas.png", "the real data and the proxy sets live")
@click.option("--only", default=None, metavar="TABLE",
              help="Make only this table ('truth' or a proxy's name) and keep it for a later full run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_user_errors
def nas_command(spec: Path, overrides: tuple[str, ...], out: Path | None, data_root: Path | None,
                device: str | None, only: str | None, quiet: bool) -> None:
    """Rank a SPEC's (YAML) search space on real data and on proxy sets; print the rank correlations."""
    spec_values = load_spec(spec, parse_overrides(overrides))
    _limit_threads_for_spec(spec_values, device)
    run_nas(spec_values, data_root=data_root, out=out, device=device,
            progress=not quiet, echo=click.echo, only=only)
