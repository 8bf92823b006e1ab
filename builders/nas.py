"""NAS proxies: train every architecture of a search space on a Dataset, rank them, compare rankings.

:func:`train_architectures` trains each ConvNet of a :class:`~condensed_datasets.nas.SearchSpace` with one
fixed protocol (same seed, same schedule) and tests it on a held-out split; :func:`run_nas` is the
protocol behind ``condensed-nas``: a ground-truth table from real training images, one table per proxy
set, the rank-correlation report, JSON and a scatter plot.

Networks are trained one by one (the architectures of a space differ in shape; no multi-network
trainer is used here).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from builders.augment import Augmenter
from builders.build import load_recipe, make_engine, run_continuing
from builders.data import RealData
from builders.engine import resolve_device
from builders.errors import BuildError, RecipeError
from builders.evaluate import TrainSettings, train_network
from builders.networks import ConvNet
from builders.plots import nas_scatter
from builders.recipe import check_at_least, shipped_recipe_path
from builders.runspec import check_augment, check_keys, check_overrides
from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.datasets import CondensedVisionDataset
from condensed_datasets.errors import CondensedDatasetsError
from condensed_datasets.format import CondensedSet
from condensed_datasets.nas import TOPS, Architecture, ArchitectureResult, SearchSpace, rank_report
from condensed_datasets.sources import get_source


@dataclass
class NASProtocol:
    """How every architecture of one table is trained: the evaluation protocol's SGD, its own schedule."""

    epochs: int
    lr: float = 0.01
    batch: int = 256
    augment: str = "none"
    seed: int = 0


def stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a Dataset's ``(image, target)`` pairs as tensors: images [N,C,H,W]; targets int64 class
    indices, or float probability vectors when the targets are tensors."""
    if isinstance(dataset, TensorDataset):
        images, targets = dataset.tensors[:2]
        return images.float(), targets
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    x = torch.stack([torch.as_tensor(im, dtype=torch.float32) for im in images])
    if isinstance(targets[0], torch.Tensor) and targets[0].dim() == 1:
        return x, torch.stack(targets).float()
    return x, torch.tensor([int(t) for t in targets], dtype=torch.int64)


def build_architecture(arch: Architecture, channels: int, num_classes: int, image_size: tuple[int, int],
                       seed: int) -> ConvNet:
    """A ConvNet of ``arch``, initialised from ``seed`` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(int(seed))
        return ConvNet(channels, num_classes, image_size, **arch.settings())


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy (percent) of ``net`` on ``images`` / int ``labels``."""
    net.eval()
    correct = sum(int((net(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                  for i in range(0, len(labels), batch))
    return 100.0 * correct / max(1, len(labels))


def train_architectures(space: SearchSpace, train: Dataset, val: Dataset, *, protocol: NASProtocol,
                        num_classes: int, device: str | torch.device = "cpu", progress: bool = False,
                        desc: str = "architectures",
                        on_result: Callable[[ArchitectureResult], None] | None = None) -> list[ArchitectureResult]:
    """Train every architecture of ``space`` on ``train`` with ``protocol`` and test it on ``val``
    (hard labels); one row per architecture: its name, accuracy (percent) and training time (s)."""
    device = torch.device(device)
    x, y = stack(train)
    vx, vy = stack(val)
    if vy.dtype != torch.int64:
        raise ValueError("the validation Dataset must have class-index targets")
    x, y, vx, vy = x.to(device), y.to(device), vx.to(device), vy.to(device)
    c, h, w = x.shape[1:]
    augmenter = Augmenter(protocol.augment) if protocol.augment != "none" else None
    settings = TrainSettings(epochs=protocol.epochs, lr=protocol.lr, batch=protocol.batch, augmenter=augmenter)
    rows = []
    for arch in tqdm(space.architectures(), desc=desc, disable=None if progress else True,  # None: off a terminal
                     dynamic_ncols=True):
        started = time.perf_counter()
        net = build_architecture(arch, c, num_classes, (h, w), protocol.seed).to(device)
        train_network(net, x, y, settings, torch.Generator().manual_seed(protocol.seed))
        acc = accuracy(net, vx, vy)
        row = ArchitectureResult(arch.name, round(acc, 4), round(time.perf_counter() - started, 3), arch.settings())
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


# -- the runner ----------------------------------------------------------------------------------------

_SPEC = {"source": "", "root": "data", "out": "", "device": "auto", "seed": 0, "space": {}, "truth": {},
         "validation": {}, "proxy_protocol": {}, "proxies": [], "tops": list(TOPS), "notes": ""}
_PROTOCOL = {"epochs": 1, "lr": 0.01, "batch": 256, "augment": "none"}
_TRUTH = {"per_class": 0, **_PROTOCOL}
_VALIDATION = {"per_class": 100}
_PROXY = {"name": "", "method": "", "ipc": 0, "path": "", "download": False, "build": False, "set": {}}


_PROXY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def check_spec(data: dict[str, Any]) -> dict[str, Any]:
    """A validated ``condensed-nas`` spec (RecipeError names the key)."""
    spec = check_keys("the NAS spec", data, _SPEC, required=("source", "out", "truth", "proxies"))
    get_source(spec["source"])
    try:
        spec["space"] = SearchSpace.from_dict(spec["space"])
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"space: {exc}") from exc
    spec["truth"] = check_keys("truth", spec["truth"], _TRUTH, required=("per_class", "epochs"))
    spec["validation"] = check_keys("validation", spec["validation"], _VALIDATION)
    spec["proxy_protocol"] = check_keys("proxy_protocol", spec["proxy_protocol"], _PROTOCOL, required=("epochs",))
    for section in ("truth", "proxy_protocol"):
        for key in ("epochs", "batch"):
            if spec[section][key] < 1:
                raise RecipeError(f"{section}.{key}: must be >= 1")
        check_at_least(spec[section], ("lr",), 0, strict=True, section=section)
        check_augment(f"{section}.augment", spec[section]["augment"])
    if not spec["out"]:
        raise RecipeError("out: expected the folder nas.json, nas.png and tables/ go to, got ''")
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in spec["tops"]):
        raise RecipeError(f"tops: expected a list of integers >= 1 (top-k cuts of the ranking), got {spec['tops']!r}")
    if spec["truth"]["per_class"] < 1 or spec["validation"]["per_class"] < 1:
        raise RecipeError("truth.per_class and validation.per_class: must be >= 1")
    if not isinstance(spec["proxies"], list) or not spec["proxies"]:
        raise RecipeError("proxies: expected a non-empty list of {name, method, ipc} or {name, path}")
    proxies = []
    for i, entry in enumerate(spec["proxies"]):
        p = check_keys(f"proxies[{i}]", entry, _PROXY, required=("name",))
        if not _PROXY_NAME.fullmatch(p["name"]) or p["name"] == "truth":  # it names the file tables/NAME.json
            raise RecipeError(f"proxies[{i}].name: {p['name']!r} is not a table name (letters, digits, '.', '_', "
                              "'-', not starting with '.'; not 'truth')")
        check_overrides(f"proxies[{i}].set", p["set"])
        if not p["path"] and not (p["method"] and p["ipc"] >= 1):
            raise RecipeError(f"proxies[{i}]: give method and ipc (a set looked up under root) or path")
        proxies.append(p)
    if len({p["name"] for p in proxies}) != len(proxies):
        raise RecipeError("proxies: names must be distinct")
    spec["proxies"] = proxies
    return spec


def split_rows(real: RealData, truth_per_class: int, val_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ground-truth training images (the first ``truth_per_class`` of each class) and of
    the validation images (the last ``val_per_class`` of each class): disjoint, both from the train split."""
    truth, val = [], []
    for c, pool in enumerate(real.class_indices):
        if truth_per_class + val_per_class > len(pool):
            raise RecipeError(f"class {c} has {len(pool)} training images, fewer than truth.per_class "
                              f"{truth_per_class} + validation.per_class {val_per_class}")
        truth.append(pool[:truth_per_class])
        val.append(pool[len(pool) - val_per_class:])
    return torch.cat(truth), torch.cat(val)


def load_proxy(entry: dict[str, Any], source: str, root: str | os.PathLike,
               device: str = "auto") -> tuple[CondensedSet, str]:
    """The set a proxy entry names, and where it came from: ``path``; or ``method``/``ipc`` looked up under
    ``root`` (local, embedded, hub with ``download``), else built with the shipped recipe and the entry's
    ``set`` overrides when ``build`` is true."""
    if entry["path"]:
        return CondensedSet.load(entry["path"]), str(entry["path"])
    cls = next(k for k in _dataset_classes() if k.source == get_source(source).name)
    try:
        ds = cls(root, method=entry["method"], ipc=entry["ipc"], download=entry["download"])
        return CondensedSet.load(ds.path), str(ds.path)
    except CondensedDatasetsError:
        if not entry["build"]:
            raise

    overrides = [("ipc", entry["ipc"]), *sorted(entry["set"].items())]
    engine = make_engine(load_recipe(shipped_recipe_path(entry["method"], source), overrides), out_root=root,
                         data_root=root, device=device, evaluate=False)
    return run_continuing(engine), str(engine.paths.set)  # a proxy build killed earlier continues


def _dataset_classes() -> list[type[CondensedVisionDataset]]:
    return [k for k in CondensedVisionDataset.__subclasses__() if getattr(k, "source", None)]


def _proxy_dataset(cset: CondensedSet, real: RealData) -> TensorDataset:
    if cset.zca is not None:
        raise RecipeError("a proxy set built in ZCA space cannot be ranked against un-whitened real images; "
                          "use a set built without ZCA")
    norm = cset.metadata.get("normalization") or {}
    if norm and any([round(v, 6) for v in norm.get(key, [])] != [round(float(v), 6) for v in ours.flatten()]
                    for key, ours in (("mean", real.mean), ("std", real.std))):
        raise RecipeError(f"a proxy set uses another normalisation ({norm}) than the source's; it cannot share "
                          "validation images: use a set built in the source's own normalisation")
    if cset.metadata.get("class_subset") is not None:
        raise RecipeError("a proxy set must hold every class of the source, not a class subset")
    targets = torch.softmax(cset.soft_labels, 1) if cset.soft_labels is not None else cset.labels
    return TensorDataset(cset.images, targets)


def _cached_table(path: Path, key: dict[str, Any], compute: Callable[[], list[ArchitectureResult]],
                  echo: Callable[[str], None]) -> list[ArchitectureResult]:
    """The table stored at ``path`` when it was made with the same ``key``; else computed and stored."""
    text = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == text:
                rows = [ArchitectureResult(**row) for row in stored["rows"]]
                echo(f"reusing {path}")
                return rows
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BuildError(f"{path}: not a table this command wrote ({type(exc).__name__}: {exc}); delete it "
                             "to make the table again") from None
    rows = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"key": text, "rows": [asdict(r) for r in rows]}, sort_keys=True).encode())
    return rows


def run_nas(spec: dict[str, Any], *, data_root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
            device: str | None = None, progress: bool = True, echo: Callable[[str], None] = print,
            only: str | None = None) -> dict[str, Any]:
    """The ``condensed-nas`` protocol: ground truth, proxies, reports; writes ``nas.json`` and ``nas.png``.

    Each table is kept under ``out/tables/`` with what made it, and reused by a later run of the same spec;
    ``only`` ("truth" or a proxy's name) makes just that table, so several processes can share the work.
    """
    spec = check_spec(spec)
    names = ["truth", *(p["name"] for p in spec["proxies"])]
    if only is not None and only not in names:
        raise RecipeError(f"--only {only!r}: valid: {', '.join(names)}")
    dev = resolve_device(device or spec["device"])
    root = Path(data_root if data_root is not None else spec["root"])
    out_dir = Path(out if out is not None else spec["out"])
    space: SearchSpace = spec["space"]
    real = RealData.from_source(spec["source"], root, train=True, device="cpu")
    truth_rows, val_rows = split_rows(real, spec["truth"]["per_class"], spec["validation"]["per_class"])
    val = TensorDataset(real.rows(val_rows), real.labels[val_rows])
    truth_set = TensorDataset(real.rows(truth_rows), real.labels[truth_rows])
    echo(f"NAS on {spec['source']}: {len(space)} architectures, ground truth {len(truth_rows)} real images "
         f"({spec['truth']['per_class']}/class, {spec['truth']['epochs']} epochs), validation {len(val_rows)} "
         f"held-out training images, device {dev}")
    protocol = {k: v for k, v in spec["truth"].items() if k != "per_class"}
    tables = out_dir / "tables"
    common = {"source": spec["source"], "space": space.to_dict(), "seed": spec["seed"],
              "validation": spec["validation"], "device": dev.type}

    def truth_table() -> list[ArchitectureResult]:
        return train_architectures(space, truth_set, val, protocol=NASProtocol(**protocol, seed=spec["seed"]),
                                   num_classes=real.num_classes, device=dev, progress=progress, desc="ground truth")

    if only in (None, "truth"):
        truth = _cached_table(tables / "truth.json", {**common, "truth": spec["truth"]}, truth_table, echo)
        if only == "truth":
            return {"truth": [asdict(r) for r in truth]}
    result: dict[str, Any] = {
        "spec": {**spec, "space": space.to_dict()},
        "device": str(dev),
        "validation_rows": "last validation.per_class images of each class of the train split",
        "truth": [asdict(r) for r in truth] if only is None else [],
        "proxies": {},
    }
    for entry in spec["proxies"]:
        if only is not None and entry["name"] != only:
            continue
        cset, where = load_proxy(entry, spec["source"], root, str(dev))
        overlap = 0
        if cset.indices is not None:
            overlap = len(set(cset.indices.tolist()) & set(real.source_rows[val_rows].tolist()))
        key = {**common, "proxy_protocol": spec["proxy_protocol"], "set_bytes_sha": _sha(cset)}
        table = _cached_table(tables / f"{entry['name']}.json", key, lambda: train_architectures(
            space, _proxy_dataset(cset, real), val, protocol=NASProtocol(**spec["proxy_protocol"], seed=spec["seed"]),
            num_classes=real.num_classes, device=dev, progress=progress, desc=entry["name"]), echo)
        if only is not None:
            return {"proxy": entry["name"], "table": [asdict(r) for r in table]}
        report = rank_report(table, truth, spec["tops"])
        result["proxies"][entry["name"]] = {"set": where, "method": cset.method, "ipc": cset.ipc,
                                            "images": len(cset), "validation_overlap": overlap,
                                            "table": [asdict(r) for r in table], "report": report}
        echo(format_report(entry["name"], report))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_bytes(out_dir / "nas.json", (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())

    png = nas_scatter(result, out_dir / "nas.png")
    echo(f"wrote {json_path}\nwrote {png}")
    return result


def _sha(cset: CondensedSet) -> str:
    return hashlib.sha256(cset.to_bytes()).hexdigest()


def format_report(name: str, report: dict[str, Any]) -> str:
    """Human lines for one proxy's report."""
    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:+.3f}"

    tops = "  ".join(f"top{k}: rho {num(v['spearman'])} tau {num(v['kendall'])}" for k, v in report["top"].items())
    return (f"{name}: Spearman {num(report['spearman'])}  Kendall {num(report['kendall'])}  {tops}\n"
            f"  picked {report['picked']} -> {report['picked_truth_accuracy']:.2f} % on real (rank "
            f"{report['picked_truth_rank']}/{report['architectures']}; best {report['best_truth_accuracy']:.2f} %); "
            f"search {report['proxy_time_s']:.1f} s vs ground truth {report['truth_time_s']:.1f} s")
