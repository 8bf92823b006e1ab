"""The class-incremental protocol behind ``condensed-continual`` (the DM paper's, script ``CL_DM.py``).

For each method and each class order: the classes are split into ``steps`` groups; step ``t``'s memory
is a set of ``ipc`` images per class of group ``t``, built with that group's classes only (recipe key
``classes``); at step ``t`` a fresh network with a head over all the source's classes is trained from
scratch on the union of the memories of steps ``0..t`` (GDumb-style) and tested on the real test images
of the classes seen so far. ``runs`` networks per order and step; mean and std per step over every
order and run, as ``CL_DM.py`` reports them.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from builders.augment import Augmenter
from builders.build import load_recipe, make_engine, run_continuing
from builders.data import RealData
from builders.engine import resolve_device
from builders.errors import BuildError, RecipeError
from builders.evaluate import TrainSettings, train_runs
from builders.nas import accuracy
from builders.networks import available_networks, build_network
from builders.plots import continual_plot
from builders.progress import progress_bar
from builders.recipe import RECIPES_DIR, check_at_least
from builders.runspec import check_augment, check_keys, check_overrides
from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.continual import ClassIncrementalBuffer
from condensed_datasets.format import CondensedSet
from condensed_datasets.sources import get_source

_SPEC = {"source": "", "root": "data", "sets_root": None, "out": "", "device": "auto", "seed": 0, "steps": 5,
         "ipc": 20, "orders": [0, 1, 2, 3, 4], "runs": 3, "model": "ConvNet", "epochs": 1000, "lr": 0.01,
         "batch": 256, "augment": "color_crop_cutout_flip_scale_rotate", "test_per_class": None, "methods": {},
         "notes": ""}
_METHOD = {"recipe": "", "set": {}}


def check_spec(data: dict[str, Any]) -> dict[str, Any]:
    """A validated ``condensed-continual`` spec (RecipeError names the key)."""
    spec = check_keys("the continual spec", data, _SPEC, required=("source", "out", "methods"))
    info = get_source(spec["source"])
    spec["source"] = info.name
    for key in ("steps", "ipc", "runs", "epochs", "batch"):
        if spec[key] < 1:
            raise RecipeError(f"{key}: must be >= 1, got {spec[key]}")
    if info.num_classes % spec["steps"]:
        raise RecipeError(f"steps: {info.num_classes} classes do not split into {spec['steps']} equal steps")
    check_at_least(spec, ("lr",), 0, strict=True, section="the continual spec")
    check_augment("augment", spec["augment"])
    if not spec["out"]:
        raise RecipeError("out: expected the folder continual.json and continual.png go to, got ''")
    if spec["sets_root"] is not None and not isinstance(spec["sets_root"], str):
        raise RecipeError(f"sets_root: expected a folder (a string) or null, got {spec['sets_root']!r}")
    tpc = spec["test_per_class"]
    if tpc is not None and (isinstance(tpc, bool) or not isinstance(tpc, int) or tpc < 1):
        raise RecipeError(f"test_per_class: expected an integer >= 1 or null (every test image), got {tpc!r}")
    if not 0 <= spec["seed"] < 2 ** 32:  # net_seed() and numpy's order permutation take 32-bit seeds
        raise RecipeError(f"seed: must be in [0, 2**32), got {spec['seed']}")
    if not spec["orders"] or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2 ** 32
                                     for o in spec["orders"]):
        raise RecipeError(f"orders: expected a non-empty list of order seeds (integers in [0, 2**32)), got "
                          f"{spec['orders']!r}")
    if spec["model"] not in available_networks():
        raise RecipeError(f"model: unknown network {spec['model']!r}; valid: {', '.join(available_networks())}")
    if not isinstance(spec["methods"], dict) or not spec["methods"]:
        raise RecipeError("methods: expected a mapping {label: {recipe: FILE, set: {KEY: VALUE}}}")
    methods = {}
    for label, entry in spec["methods"].items():
        m = check_keys(f"methods.{label}", entry, _METHOD, required=("recipe",))
        m["path"] = _recipe_path(m["recipe"])
        check_overrides(f"methods.{label}.set", m["set"])
        methods[str(label)] = m
    spec["methods"] = methods
    return spec


def _recipe_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    if (RECIPES_DIR / name).is_file():
        return RECIPES_DIR / name
    raise RecipeError(f"no recipe {name!r} (neither a file nor in {RECIPES_DIR})")


def step_builder(recipe_path: Path, overrides: dict[str, Any], *, data_root: Path, device: str,
                 progress: bool) -> Callable[[str, str, int, list[int], Path], Path]:
    """A buffer's ``build`` callable: the recipe with ``overrides``, built on one step's classes only."""

    def build(source: str, method: str, ipc: int, classes: list[int], root: Path) -> Path:
        recipe = load_recipe(recipe_path, [*sorted(overrides.items()), ("ipc", ipc), ("classes", list(classes))])
        if recipe.source != source or recipe.method != method:
            raise RecipeError(f"{recipe_path} builds {recipe.method} on {recipe.source}, not {method} on {source}")
        engine = make_engine(recipe, out_root=root, data_root=data_root, device=device, evaluate=False,
                             progress=progress)
        run_continuing(engine)  # a step killed earlier continues (this runner has no --resume)
        return engine.paths.set

    return build


def _seen_test(test: RealData, memories: list[CondensedSet], seen: list[int],
               per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real test images of the ``seen`` classes (at most ``per_class`` each) in the space of the step sets
    ``memories`` (their normalisation, and their ZCA whitening when they have one), and their labels."""
    spaces = [m.metadata.get("normalization") for m in memories]
    if any(space != spaces[0] for space in spaces):
        raise BuildError(f"the step sets were built in different normalisations ({spaces}); their union is not "
                         "one training set: build every step with the same recipe")
    test.set_zca(memories[0].zca, spaces[0])
    rows = torch.cat([test.class_indices[c][:per_class] for c in seen])
    return test.rows(rows), test.labels[rows.to(test.device)]


def net_seed(seed: int, order: int, step: int, run: int) -> int:
    """The seed of one evaluation network: recorded, derived from the spec, never the clock."""
    return seed * 1_000_000 + order * 10_000 + step * 100 + run


def run_continual(spec: dict[str, Any], *, data_root: str | os.PathLike | None = None,
                  out: str | os.PathLike | None = None, device: str | None = None, progress: bool = True,
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol; writes ``continual.json`` (every run) and ``continual.png`` under ``out``."""
    spec = check_spec(spec)
    dev = resolve_device(device or spec["device"])
    root = Path(data_root if data_root is not None else spec["root"])
    sets_root = Path(spec["sets_root"]) if spec["sets_root"] else root
    out_dir = Path(out if out is not None else spec["out"])
    info = get_source(spec["source"])
    test = RealData.from_source(info.name, root, train=False, device=dev)
    augmenter = Augmenter(spec["augment"]) if spec["augment"] != "none" else None
    settings = TrainSettings(epochs=spec["epochs"], lr=spec["lr"], batch=spec["batch"], augmenter=augmenter)
    c, h, w = info.image_shape
    runs: list[dict[str, Any]] = []
    summary: dict[str, list[dict[str, Any]]] = {}
    echo(f"class-incremental {info.name}: {spec['steps']} steps of {info.num_classes // spec['steps']} classes, "
         f"ipc {spec['ipc']}, orders {spec['orders']}, {spec['runs']} {spec['model']} per order and step, "
         f"{spec['epochs']} epochs, device {dev}")
    bar = progress_bar(len(spec["methods"]) * len(spec["orders"]) * spec["steps"] * spec["runs"] * spec["epochs"],
                       "continual: training", enabled=progress, unit="epoch")
    for label, m in spec["methods"].items():
        method = load_recipe(m["path"], [*sorted(m["set"].items()), ("ipc", spec["ipc"])]).method
        build = step_builder(m["path"], m["set"], data_root=root, device=str(dev), progress=progress)
        per_step: list[list[float]] = [[] for _ in range(spec["steps"])]
        for order in spec["orders"]:
            buffer = ClassIncrementalBuffer(info.name, method, spec["ipc"], spec["steps"], order, sets_root,
                                            build=build)
            for step in range(spec["steps"]):
                memory = buffer.dataset(step, target_type="hard")
                images = memory.data.to(dev)
                targets = torch.tensor(memory.targets, dtype=torch.int64, device=dev)
                x_test, y_test = _seen_test(test, [buffer.memory(s) for s in range(step + 1)],
                                            buffer.seen_classes(step), spec["test_per_class"])
                seeds = [net_seed(spec["seed"], order, step, run) for run in range(spec["runs"])]
                nets = [build_network(spec["model"], c, info.num_classes, (h, w), seed=s).to(dev) for s in seeds]
                # the runs' networks trained at once on a GPU (builders.ensemble), one by one elsewhere
                train_runs(nets, images, targets, settings, seeds, on_epoch=bar.update)
                for run, (seed, net) in enumerate(zip(seeds, nets)):
                    acc = accuracy(net, x_test, y_test)
                    per_step[step].append(acc)
                    runs.append({"method": label, "order": order, "class_order": buffer.order, "step": step,
                                 "classes": buffer.classes(step), "memory_size": len(memory), "run": run,
                                 "seed": seed, "test_images": len(y_test), "accuracy": round(acc, 4),
                                 "memory_set": str(buffer.path(step))})
        summary[label] = [{"step": t, "mean": round(statistics.fmean(a), 4),
                           "std": round(statistics.pstdev(a), 4) if len(a) > 1 else 0.0, "n": len(a)}
                          for t, a in enumerate(per_step)]
        echo(f"{label:>10}: " + "  ".join(f"{r['mean']:.1f}±{r['std']:.1f}" for r in summary[label]))
    bar.close()
    result = {"spec": {**spec, "methods": {k: {"recipe": str(v["path"]), "set": v["set"]}
                                           for k, v in spec["methods"].items()}},
              "device": str(dev), "protocol": settings.describe(), "summary": summary, "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_bytes(out_dir / "continual.json",
                                   (json.dumps(result, indent=1, sort_keys=True, default=str) + "\n").encode())

    png = continual_plot(summary, out_dir / "continual.png",
                         f"{info.name}: {spec['steps']} steps, ipc {spec['ipc']}, {len(spec['orders'])} orders "
                         f"x {spec['runs']} nets")
    echo(f"wrote {json_path}\nwrote {png}")
    return result
