"""DM, DC or DSA iteration time of this package against the papers' reference code, side by side on one machine.

    python benchmarks/dm_vs_reference.py --reference /path/to/DatasetCondensation [--rounds 2] [--record]
        [--method dm|dc|dsa] [--device cpu|cuda] [--source fashionmnist|cifar10-generated] [--ipc 10]

``--reference`` is a checkout of VICO-UoE/DatasetCondensation. It is copied to a temporary folder and
that copy is patched at run time (nothing of it enters this repository): the one-word ``.view(`` ->
``.reshape(`` fix in its ConvNet's ``forward`` and ``embed`` that current PyTorch needs, ``x[:] = x[0].clone()`` for its
siamese DSA's ``x[:] = x[0]`` (current PyTorch refuses that overlapping copy for a one-image batch), a timestamp printed at the end of
each iteration (after a CUDA synchronisation on a GPU), and its evaluations switched off. DM runs
``main_DM.py`` (the timestamp after its one image update an iteration); DC and DSA run ``main.py --method
DC|DSA`` (the timestamp after an iteration's outer loop: ``outer_loop`` image updates, the network trained
``inner_loop`` epochs between them). Both sides run the same configuration: ipc 10 (``--ipc``), batch_real
256, ConvNet (depth 3, width 128, instance norm), DSA ``color_crop_cutout_flip_scale_rotate`` for DM and
DSA, images initialised from real ones (DC: from noise, its recipe's and ``main.py``'s default), against
the package's ``recipes/<method>_<source>.yaml``, on the CPU with PyTorch's default threads or on the GPU
(``--device cuda``). The data is Fashion-MNIST (the system copy, installed under a temporary data root)
or, with ``--source cifar10-generated``, CIFAR-10-shaped generated images (uniform random bytes, 5,000
per class, seed 0) written in CIFAR-10's own file layout; torchvision's MD5 check of those files is
switched off for both sides by a ``sitecustomize`` module on their path (speed does not depend on the
pixels). Runs alternate (reference, package, reference, package, ...), each in its
own process; iterations ``warmup + 1`` to ``warmup + timed`` are timed (defaults: 6 to 25), in wall
seconds and in the process's CPU seconds (all threads; steadier than wall time on a busy machine). For each
run the child's user and system CPU seconds and peak RSS come from ``os.wait4`` (whole process,
start-up and data loading included). The reference needs scipy (``--reference-pythonpath`` adds a
folder holding it when this environment has none).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from children import STAMP, per_iteration, run_child  # benchmarks/children.py (scripts run from benchmarks/)
from machine import cpu_name, write_record  # benchmarks/machine.py

from condensed_datasets.sources import install_system_fashion_mnist

REPO = Path(__file__).resolve().parent.parent
#: source -> (the reference's --dataset, the package's recipe name after "<method>_")
SOURCES = {"fashionmnist": ("FashionMNIST", "fashionmnist"), "cifar10-generated": ("CIFAR10", "cifar10")}
#: method -> (the reference's script, its extra arguments, the line after which an iteration ends)
REFERENCE_SCRIPTS = {
    "dm": ("main_DM.py", ["--init", "real", "--dsa_strategy", "color_crop_cutout_flip_scale_rotate"],
           "optimizer_img.step()"),
    "dc": ("main.py", ["--method", "DC", "--init", "noise"], "loss_avg /= (num_classes*args.outer_loop)"),
    "dsa": ("main.py", ["--method", "DSA", "--init", "real", "--dsa_strategy", "color_crop_cutout_flip_scale_rotate"],
            "loss_avg /= (num_classes*args.outer_loop)"),
}


def recipe_path(method: str, source: str) -> Path:
    """The package's recipe that :func:`main` times for ``method`` on ``source``."""
    return REPO / "recipes" / f"{method}_{SOURCES[source][1]}.yaml"
ACCEPT_GENERATED_CIFAR = (
    '"""Benchmark harness only: accept generated CIFAR-10 files (torchvision checks the real files\' MD5)."""\n'
    "import torchvision.datasets.cifar\n"
    "torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True\n"
    "torchvision.datasets.cifar.CIFAR10._check_integrity = lambda self: True\n"
)


def write_generated_cifar10(root: Path, per_class: int = 5000, test_per_class: int = 1000, seed: int = 0) -> None:
    """CIFAR-10's python layout (``cifar-10-batches-py``) holding uniform random images, class-balanced."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n_per_class: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.permutation(np.repeat(np.arange(10), n_per_class))
        return rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8), labels.tolist()

    data, labels = batch(per_class)
    parts = np.array_split(np.arange(len(labels)), 5)
    for i, rows in enumerate(parts, start=1):
        _write_pickle(folder / f"data_batch_{i}", {"data": data[rows], "labels": [labels[j] for j in rows]})
    test_data, test_labels = batch(test_per_class)
    _write_pickle(folder / "test_batch", {"data": test_data, "labels": test_labels})
    _write_pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)]})


def prepare_source(tmp: Path, source: str) -> tuple[Path, str]:
    """``source``'s files in ``tmp/data`` (one of :data:`SOURCES`), and the folder children need on their
    PYTHONPATH to read them (``""`` for none; the generated CIFAR-10 needs :data:`ACCEPT_GENERATED_CIFAR`)."""
    data = tmp / "data"
    if source == "fashionmnist":
        if not install_system_fashion_mnist(data):
            raise click.ClickException("no system copy of Fashion-MNIST (CONDENSED_FASHION_MNIST_DIR)")
        return data, ""
    write_generated_cifar10(data)
    (tmp / "harness").mkdir()
    (tmp / "harness" / "sitecustomize.py").write_text(ACCEPT_GENERATED_CIFAR)
    return data, str(tmp / "harness")


def _write_pickle(path: Path, obj: dict) -> None:
    """CIFAR-10's own container format is a Python pickle; torchvision reads it as such."""
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _replace_once(text: str, old: str, new: str, where: str) -> str:
    if text.count(old) != 1:
        raise click.ClickException(f"{where}: expected exactly one {old!r}; is this the DatasetCondensation "
                                   "reference (main_DM.py, networks.py)?")
    return text.replace(old, new)


def patch_reference(src: Path, dst: Path, method: str = "dm") -> None:
    """Copy the reference checkout to ``dst`` and patch the copy for ``method`` (see the module docstring)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    nets = (dst / "networks.py").read_text()
    start = nets.index("class ConvNet(")
    end = nets.index("\nclass ", start + 1)
    body = nets[start:end]
    if body.count("out.view(") != 2:  # forward (DC, DSA) and embed (DM)
        raise click.ClickException("networks.py: expected ConvNet's forward and embed to hold one 'out.view(' each; "
                                   "is this the DatasetCondensation reference?")
    fixed = body.replace("out.view(", "out.reshape(")
    (dst / "networks.py").write_text(nets[:start] + fixed + nets[end:])
    utils = (dst / "utils.py").read_text()  # the siamese DSA copies: one sample's draw over its own batch
    utils, copies = re.subn(r"(\w+)\[:\] = \1\[0\]\n", r"\1[:] = \1[0].clone()\n", utils)
    if not copies:
        raise click.ClickException("utils.py: no siamese 'x[:] = x[0]' lines; is this the DatasetCondensation "
                                   "reference?")
    (dst / "utils.py").write_text(utils)
    script, _, iteration_end = REFERENCE_SCRIPTS[method]
    main = (dst / script).read_text()
    main = _replace_once(main, "if it in eval_it_pool:", "if False:  # benchmark: no evaluation", script)
    ends = list(re.finditer(rf"\n(\s*){re.escape(iteration_end)}\n", main))
    if len(ends) != 1:
        raise click.ClickException(f"{script}: expected one {iteration_end!r} line to time, found {len(ends)}")
    end, indent = ends[0].end(), ends[0].group(1)
    main = (main[:end] + f"{indent}torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
            f"{indent}print('{STAMP}', it, time.perf_counter(), time.process_time(), flush=True)\n" + main[end:])
    (dst / script).write_text(main)


def _durations(stamps: list[float], warmup: int, timed: int) -> list[float]:
    """Each timed iteration's seconds (``warmup + 1 .. warmup + timed``), rounded to 0.1 ms."""
    window = stamps[warmup - 1:warmup + timed]
    return [round(b - a, 4) for a, b in zip(window, window[1:])]


def parse_env_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a mapping; a pair without ``=`` or with an empty or non-identifier key is refused."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE with KEY a variable name",
                                     param_hint="--variant-env")
        env[key] = value
    return env


def variant_figures(reference: list[float], variant: list[float], variant_cpu: list[float]) -> dict:
    """The variant side's medians and its speedup over the reference, per round and median."""
    median = statistics.median(variant)
    return {"package_variant_s_per_iteration_median": median,
            "package_variant_cpu_s_per_iteration_median": statistics.median(variant_cpu),
            "package_variant_speedup_median": round(statistics.median(reference) / median, 3),
            "package_variant_speedup_per_round": [round(a / b, 3) for a, b in zip(reference, variant)]}


@click.command()
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Checkout of VICO-UoE/DatasetCondensation (main_DM.py, networks.py, utils.py).")
@click.option("--rounds", type=int, default=2, show_default=True, help="Pairs (reference, package) to run.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Iterations not timed.")
@click.option("--timed", type=int, default=20, show_default=True, help="Iterations timed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Recipe overrides for the package's side only (e.g. params.precision=bf16-real).")
@click.option("--reference-pythonpath", default="", help="Extra PYTHONPATH for the reference (e.g. scipy).")
@click.option("--python", "python", default=sys.executable, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--source", type=click.Choice(sorted(SOURCES)), default="fashionmnist", show_default=True)
@click.option("--method", type=click.Choice(sorted(REFERENCE_SCRIPTS)), default="dm", show_default=True)
@click.option("--ipc", type=click.IntRange(1), default=10, show_default=True)
@click.option("--variant-env", "variant_env", multiple=True, metavar="KEY=VALUE",
              help="Each round also runs the package with these environment variables (side 'package_variant'), "
                   "e.g. OMP_NUM_THREADS=1.")
@click.option("--record", is_flag=True, help="Write the result to benchmarks/results/.")
@click.option("--note", default="", help="Conditions worth recording (e.g. other load on the machine).")
def main(reference: Path, rounds: int, warmup: int, timed: int, overrides: tuple[str, ...],
         reference_pythonpath: str, python: str, device: str, source: str, method: str, ipc: int,
         variant_env: tuple[str, ...], record: bool, note: str) -> None:
    """Time DM (DC, DSA) iterations of the reference and of this package, interleaved."""
    if warmup < 1 or timed < 1:
        raise click.BadParameter("--warmup and --timed must be >= 1")
    variant = parse_env_pairs(variant_env)
    total = warmup + timed
    with tempfile.TemporaryDirectory(prefix=f"{method}_vs_reference_") as tmp_name:
        tmp = Path(tmp_name)
        data, harness = prepare_source(tmp, source)
        patch_reference(reference, tmp / "ref", method)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # both on the CPU
        elif not torch.cuda.is_available():
            raise click.ClickException("--device cuda: no CUDA device here")
        ref_env = dict(env, PYTHONPATH=os.pathsep.join(
            p for p in (str(tmp / "ref"), harness, reference_pythonpath) if p))
        pkg_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), harness) if p))
        script, script_args, _ = REFERENCE_SCRIPTS[method]
        ref_cmd = [python, script, "--dataset", SOURCES[source][0], "--model", "ConvNet", "--ipc", str(ipc),
                   "--batch_real", "256", *script_args, "--num_exp", "1", "--Iteration", str(total - 1),
                   "--data_path", str(data), "--save_path", str(tmp / "ref_out")]
        pkg_cmd = [python, str(REPO / "benchmarks" / "build_speed.py"), str(recipe_path(method, source)),
                   "--device", device, "--data-root", str(data), "--out", "PKG_OUT",
                   "--warmup", str(warmup - 1), "--iterations", str(timed + 1), "--stamps", "--set", f"ipc={ipc}"]
        for pair in overrides:
            pkg_cmd += ["--set", pair]
        sides = [("reference", ref_cmd, tmp / "ref", ref_env), ("package", pkg_cmd, REPO, pkg_env)]
        if variant:
            sides.append(("package_variant", pkg_cmd, REPO, dict(pkg_env, **variant)))
        runs: list[dict] = []
        for r in range(rounds):
            for side, cmd, cwd, run_env in sides:
                cmd = [str(tmp / f"{side}_out_{r}") if c == "PKG_OUT" else c for c in cmd]  # a fresh output per run
                result = run_child(cmd, run_env, tmp / f"{side}_{r}.log", cwd)
                result["iteration_s"] = _durations(result["stamps"], warmup, timed)  # spread within the run
                result["s_per_iteration"] = round(per_iteration(result.pop("stamps"), warmup, timed), 4)
                result["cpu_s_per_iteration"] = round(per_iteration(result.pop("cpu_stamps"), warmup, timed), 4)
                runs.append({"side": side, "round": r, **result})
                click.echo(f"round {r} {side:15s}: {result['s_per_iteration']:.3f} s/it "
                           f"({result['cpu_s_per_iteration']:.3f} CPU-s/it), user {result['user_s']} s, "
                           f"sys {result['sys_s']} s, peak RSS {result['peak_rss_mib']} MiB, wall {result['wall_s']} s")

    def side(name: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["side"] == name]

    ref_it = statistics.median(side("reference", "s_per_iteration"))
    pkg_it = statistics.median(side("package", "s_per_iteration"))
    ref_cpu, pkg_cpu = (statistics.median(side("reference", "cpu_s_per_iteration")),
                        statistics.median(side("package", "cpu_s_per_iteration")))
    result = {
        "benchmark": f"{method.upper()} iteration, reference {script} vs this package",
        "config": {"source": source, "ipc": ipc, "method": method, "batch_real": 256, "model": "ConvNet",
                   "reference_arguments": script_args, "package_recipe": str(recipe_path(method, source).name),
                   "package_overrides": list(overrides), "package_variant_env": variant,
                   "timed_iterations": f"{warmup + 1}-{total}",
                   "order": f"{', '.join(name for name, *_ in sides)}, alternating"},
        "runs": runs,
        "reference_s_per_iteration_median": ref_it,
        "package_s_per_iteration_median": pkg_it,
        "speedup_median": round(ref_it / pkg_it, 3),
        "speedup_per_round": [round(a / b, 3) for a, b in zip(side("reference", "s_per_iteration"),
                                                              side("package", "s_per_iteration"))],
        "reference_cpu_s_per_iteration_median": ref_cpu,
        "package_cpu_s_per_iteration_median": pkg_cpu,
        "cpu_time_ratio_median": round(ref_cpu / pkg_cpu, 3),
        "reference_peak_rss_mib_max": max(side("reference", "peak_rss_mib")),
        "package_peak_rss_mib_max": max(side("package", "peak_rss_mib")),
        **(variant_figures(side("reference", "s_per_iteration"), side("package_variant", "s_per_iteration"),
                           side("package_variant", "cpu_s_per_iteration")) if variant else {}),
        "device": (f"cuda: {torch.cuda.get_device_name()} (host cpu: {cpu_name()}, {os.cpu_count()} cores)"
                   if device == "cuda" else
                   f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"),
        "torch": torch.__version__,
        "reference_patches": ["networks.py ConvNet.forward and .embed: .view( -> .reshape(",
                              ("utils.py DSA: x[:] = x[0] -> x[:] = x[0].clone() (today's PyTorch refuses the "
                               "overlapping copy when the batch holds one image, as at ipc 1)"),
                              (f"{script}: evaluations off, timestamp after each iteration's "
                               f"{REFERENCE_SCRIPTS[method][2]!r} (after torch.cuda.synchronize() on a GPU)")],
        "cpu_and_rss": "whole child process (os.wait4): start-up and data loading included",
        "command": " ".join(["python", "benchmarks/dm_vs_reference.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": note,
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        tag = "_".join([*(p.replace("params.", "").replace("=", "-") for p in overrides),
                        *(f"variant-{k}-{v}" for k, v in variant.items())])
        where = "" if (source, ipc) == ("fashionmnist", 10) else f"_{source}_ipc{ipc}"
        base = f"{method}_vs_reference_{device}{where}"
        path = write_record(f"{base}{'_' + tag if tag else ''}", result)
        click.echo(f"recorded {path}")


if __name__ == "__main__":
    main()
