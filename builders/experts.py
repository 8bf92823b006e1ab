"""Expert trajectories for trajectory matching (MTT, DATM): training them and the store they live in.

An *expert* is a network trained on the real training split with plain SGD (the papers' buffer
settings: lr ``lr_teacher`` = 0.01, no momentum, no weight decay, batch 256, per-sample DSA), or with
FTD's GSAM over that SGD (:mod:`builders.gsam`; DATM's buffers), stored apart (``..._gsam``).
Its *trajectory* is its flattened parameters (``torch.cat`` of ``net.parameters()`` in order) at
initialisation and after every epoch: a float32 tensor ``[epochs + 1, P]``.

The store, one folder per (source, model, ZCA on/off)::

    ROOT/experts/{source}/{model}/{zca|plain}/
        index.json                  what the store holds (below); rewritten atomically per expert
        expert_0000.safetensors     tensor "trajectory" [E+1, P] float32, metadata JSON
        expert_0001.safetensors     ...
        zca.safetensors             the whitening (zca_mean [D], zca_transform [D,D]) when zca is on

``index.json`` records: format version, source, model, zca (and its eps), epochs, parameter count
and the parameter names/shapes, the training settings (optimizer, lr, momentum, weight decay,
batch, augmentation, real images per class), the recipe seed, and one entry per finished expert:
its file, its seeds (initialisation and data order / augmentation) and its test accuracy.

No pickle anywhere: trajectories are safetensors, the index is JSON. Every file is written
atomically, so an interrupted run leaves complete experts only; running the recipe again skips
them (each expert's seeds derive from the recipe seed and its number alone, so the store does not
depend on where a run was interrupted).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from filelock import FileLock
from filelock import Timeout as LockTimeout
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

from builders import distributed
from builders.augment import Augmenter
from builders.data import RealData
from builders.ensemble import can_train_together, ran_out_of_memory, train_together, use_together
from builders.errors import BuildError, ExpertStoreError, RecipeError
from builders.evaluate import label_loss, test_accuracy, train_step
from builders.gsam import EXPERT_OPTIMIZERS, FTD_EPOCHS, GSAMSettings, gsam_train_step
from builders.networks import build_network
from builders.recipe import AUTO, DEFAULT_ROOT, RECIPES_DIR, Recipe, check_at_least, check_choice, load_recipe_data
from builders.registry import register
from builders.train_settings import TrainSettings
from builders.transfer import to_device
from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets._version import __version__
from condensed_datasets.constants import LOCK_TIMEOUT_S
from condensed_datasets.format import read_safetensors_metadata
from condensed_datasets.zca import DEFAULT_EPS, ZCA, fit_zca

STORE_VERSION = 1
STORE_INDEX_NAME = "index.json"  # the store's own index (not a hub index.json)
ZCA_NAME = "zca.safetensors"
EXPERT_KEY = "condensed_datasets_expert"
ZCA_KEY = "condensed_datasets_zca"
ZCA_INPUT = "pixels"  # the whitening applies to raw [0, 1] pixels (recorded in zca.safetensors)


# --------------------------------------------------------------------------------------------------
# flat parameters


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a network's parameters, in ``named_parameters()`` order: how a flat vector
    of ``numel`` values splits back into tensors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, net: nn.Module) -> "ParamLayout":
        named = list(net.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def sizes(self) -> list[int]:
        out = []
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(n)
        return out

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` [P] shaped as the parameters, by name (differentiable, no copies)."""
        if flat.dim() != 1 or flat.shape[0] != self.numel:
            raise ValueError(f"flat parameters must be [{self.numel}], got {tuple(flat.shape)}")
        return {name: part.view(shape) for name, part, shape in zip(self.names, flat.split(self.sizes), self.shapes)}

    def describe(self) -> list[list[Any]]:
        """[[name, shape], ...] for JSON."""
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]


def flat_parameters(net: nn.Module) -> torch.Tensor:
    """All of ``net``'s parameters, detached and concatenated in order: [P]."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


# --------------------------------------------------------------------------------------------------
# where stores live


def expert_dir(root: str | os.PathLike, source: str, model: str, zca: bool, optimizer: str = "sgd") -> Path:
    """The default store folder: ``ROOT/experts/{source}/{model}/{zca|plain}`` (``..._gsam`` for GSAM experts)."""
    folder = ("zca" if zca else "plain") + ("" if optimizer == "sgd" else f"_{optimizer}")
    return Path(root).expanduser() / "experts" / source / model / folder


def build_command(source: str, model: str, zca: bool, min_epochs: int = 0, out: str | os.PathLike | None = None,
                  optimizer: str = "sgd") -> str:
    """The command that builds the store a trajectory-matching recipe needs: the shipped experts recipe of
    ``source`` plus the overrides that make it fit (model, zca, optimizer, epochs, output root)."""
    shipped = RECIPES_DIR / f"experts_{source}.yaml"
    data = load_recipe_data(shipped) if shipped.is_file() else {}
    params = data.get("params") or {}
    parts = [f"condensed-build recipes/experts_{source}.yaml"]
    if model != data.get("model", "ConvNet"):
        parts.append(f"--set model={model}")
    parts.append(f"--set params.zca={'true' if zca else 'false'}")
    if optimizer != "sgd":  # GSAM experts: DATM's buffer command trains them FTD_EPOCHS epochs
        parts.append(f"--set params.optimizer={optimizer}")
        min_epochs = max(min_epochs, FTD_EPOCHS)
    if min_epochs > params.get("epochs", ExpertTraining.defaults["epochs"]):
        parts.append(f"--set params.epochs={min_epochs}")
    if out is not None and str(out) != DEFAULT_ROOT:
        parts.append(f"--out {out}")
    return " ".join(parts)


def derive_seed(recipe_seed: int, expert: int, purpose: str) -> int:
    """A 63-bit seed for expert ``expert``'s ``purpose`` ('init' or 'train'), from the recipe seed alone."""
    digest = hashlib.sha256(f"experts:{recipe_seed}:{expert}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------------------------------
# the store


class ExpertStore:
    """One folder of expert trajectories with its JSON index (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.index = index

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "ExpertStore":
        """Read an existing store; ExpertStoreError if there is none or its index is unreadable."""
        path = Path(path)
        index_path = path / STORE_INDEX_NAME
        if not index_path.is_file():
            raise ExpertStoreError(f"no expert trajectories at {path} ({STORE_INDEX_NAME} is missing)")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExpertStoreError(f"{index_path}: unreadable expert index ({exc}); delete the folder and "
                                   "build the experts again") from exc
        if not isinstance(index, dict) or index.get("format_version") != STORE_VERSION:
            raise ExpertStoreError(f"{index_path}: not an expert index of format version {STORE_VERSION}")
        problem = _index_problem(index)
        if problem:
            raise ExpertStoreError(f"{index_path}: damaged expert index ({problem}); delete the folder and build "
                                   "the experts again")
        return cls(path, index)

    @classmethod
    def create_or_extend(cls, path: str | os.PathLike, header: dict[str, Any]) -> "ExpertStore":
        """The store at ``path`` for experts trained as ``header`` says: opened when it exists and
        matches, created empty when absent; ExpertStoreError when it holds experts trained otherwise."""
        path = Path(path)
        if (path / STORE_INDEX_NAME).is_file():
            store = cls.open(path)
            differ = sorted(k for k in header if store.index.get(k) != header[k])
            if differ:
                detail = "; ".join(f"{k}: store {store.index.get(k)!r}, recipe {header[k]!r}" for k in differ)
                raise ExpertStoreError(
                    f"{path} holds experts trained differently ({detail}). Delete that folder to retrain, "
                    "or write these experts elsewhere with --set params.expert_dir=PATH"
                )
            return store
        store = cls(path, {**header, "experts": []})
        store._write_index()
        return store

    # -- facts -----------------------------------------------------------------------------------
    @property
    def experts(self) -> list[dict[str, Any]]:
        """One entry per finished expert, by expert number."""
        return sorted(self.index.get("experts", []), key=lambda e: e["index"])

    @property
    def num_experts(self) -> int:
        return len(self.index.get("experts", []))

    @property
    def epochs(self) -> int:
        return int(self.index["epochs"])

    @property
    def parameter_count(self) -> int:
        return int(self.index["parameter_count"])

    @property
    def model(self) -> str:
        return str(self.index["model"])

    @property
    def zca_enabled(self) -> bool:
        return bool(self.index["zca"])

    def has(self, expert: int) -> bool:
        """True when expert number ``expert`` is finished and its file is present."""
        return any(e["index"] == expert and (self.path / e["file"]).is_file() for e in self.experts)

    def file(self, position: int) -> Path:
        """The trajectory file of the ``position``-th finished expert (0-based, in expert order)."""
        return self.path / self.experts[position]["file"]

    def summary(self) -> str:
        """One line per fact, for the command line."""
        accs = [e["test_accuracy"] for e in self.experts]
        mean = sum(accs) / len(accs) if accs else float("nan")
        return (f"{self.num_experts} experts x {self.epochs} epochs of {self.model} on {self.index['source']} "
                f"(zca {'on' if self.zca_enabled else 'off'}, {self.parameter_count} parameters) at {self.path}\n"
                f"test accuracy of the experts: mean {mean:.2f} %, min {min(accs, default=float('nan')):.2f} %, "
                f"max {max(accs, default=float('nan')):.2f} %")

    # -- reading trajectories --------------------------------------------------------------------
    def snapshots(self, position: int, epochs: list[int]) -> torch.Tensor:
        """Rows ``epochs`` of the ``position``-th expert's trajectory, [len(epochs), P] float32 (only those
        rows are read from disk)."""
        path = self.file(position)
        top = self.epochs
        bad = [e for e in epochs if not 0 <= e <= top]
        if bad:
            raise ExpertStoreError(f"{path}: epochs {bad} outside the stored 0..{top}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                view = handle.get_slice("trajectory")
                shape = list(view.get_shape())
                fits = shape == [top + 1, self.parameter_count]
                rows = [view[e : e + 1] for e in epochs] if fits else []
        except Exception as exc:  # safetensors' own error types
            raise ExpertStoreError(f"{path}: unreadable trajectory ({exc}); delete it and run the experts "
                                   "recipe again (finished experts are kept)") from exc
        if not fits:  # a file cut short, or of another store: the index's epochs and parameters say what it holds
            raise ExpertStoreError(f"{path}: a trajectory of shape {shape}, the index says [{top + 1}, "
                                   f"{self.parameter_count}]; delete it and run the experts recipe again")
        out = torch.cat(rows)
        return out

    def trajectory(self, position: int) -> torch.Tensor:
        """The whole trajectory of the ``position``-th expert, [E+1, P] float32 (validated)."""
        path = self.file(position)
        data = path.read_bytes()
        read_safetensors_metadata(data, str(path))  # framing check before parsing
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors' own error types
            raise ExpertStoreError(f"{path}: unreadable trajectory ({exc}); delete it and run the experts recipe "
                                   "again (finished experts are kept)") from exc
        traj = tensors.get("trajectory")
        if traj is None or traj.dtype != torch.float32 or tuple(traj.shape) != (self.epochs + 1, self.parameter_count):
            raise ExpertStoreError(f"{path}: expected a float32 'trajectory' [{self.epochs + 1}, "
                                   f"{self.parameter_count}]")
        return traj

    def load_zca(self) -> ZCA | None:
        """The store's whitening (None when zca is off)."""
        if not self.zca_enabled:
            return None
        path = self.path / ZCA_NAME
        if not path.is_file():
            raise ExpertStoreError(f"{path} is missing: this store was trained in ZCA space; rebuild it")
        data = path.read_bytes()
        meta = json.loads(read_safetensors_metadata(data, str(path)).get(ZCA_KEY, "{}"))
        if meta.get("input") != ZCA_INPUT:
            raise ExpertStoreError(f"{path}: this whitening was fitted on normalised images (before ZCA moved to "
                                   "raw [0, 1] pixels as in the references); delete the store and rebuild it")
        tensors = st_load(data)
        return ZCA.from_tensors(tensors["zca_mean"], tensors["zca_transform"], meta.get("eps", DEFAULT_EPS))

    # -- writing ---------------------------------------------------------------------------------
    def save_zca(self, zca: ZCA, fitted_on: str) -> None:
        """Write the whitening the experts were trained in (atomically)."""
        data = st_save(zca.tensors(), metadata={ZCA_KEY: json.dumps(
            {"eps": zca.eps, "fitted_on": fitted_on, "input": ZCA_INPUT}, sort_keys=True)})
        atomic_write_bytes(self.path / ZCA_NAME, data)

    def add(self, expert: int, trajectory: torch.Tensor, record: dict[str, Any]) -> None:
        """Write expert ``expert``'s trajectory [E+1, P] and enter it (with ``record``) in the index."""
        expected = (self.epochs + 1, self.parameter_count)
        if tuple(trajectory.shape) != expected:
            raise ValueError(f"trajectory must be {list(expected)}, got {list(trajectory.shape)}")
        name = f"expert_{expert:04d}.safetensors"
        meta = {"expert": expert, "source": self.index["source"], "model": self.model, "epochs": self.epochs,
                "parameter_count": self.parameter_count, **record}
        data = st_save({"trajectory": trajectory.detach().to("cpu", torch.float32).contiguous()},
                       metadata={EXPERT_KEY: json.dumps(meta, sort_keys=True)})
        atomic_write_bytes(self.path / name, data)
        lock = FileLock(str(self.path / f".{STORE_INDEX_NAME}.lock"), timeout=LOCK_TIMEOUT_S)
        try:
            with lock:  # another run extending this store may have entered experts since this one read the index
                by_number = {e["index"]: e for e in [*self._experts_on_disk(), *self.index.get("experts", [])]}
                by_number[expert] = {"index": expert, "file": name, **record}
                self.index["experts"] = [by_number[k] for k in sorted(by_number)]
                self._write_index()
        except LockTimeout:
            raise ExpertStoreError(f"another run has held the lock of {self.path} for over {LOCK_TIMEOUT_S:.0f} s "
                                   f"(lock {lock.lock_file}); if none is running, delete the lock file and "
                                   "retry") from None

    def _experts_on_disk(self) -> list[dict[str, Any]]:
        """The entries of the index now on disk, when it describes experts trained as this store's are."""
        try:
            disk = json.loads((self.path / STORE_INDEX_NAME).read_text())
        except (OSError, ValueError, RecursionError):
            return []
        same = isinstance(disk, dict) and not _index_problem(disk) and all(
            disk.get(k) == v for k, v in self.index.items() if k not in ("experts", "num_experts"))
        return list(disk["experts"]) if same else []

    def _write_index(self) -> None:
        self.index["num_experts"] = len(self.index.get("experts", []))
        atomic_write_bytes(self.path / STORE_INDEX_NAME, (json.dumps(self.index, indent=2, sort_keys=True) + "\n").encode())

    # -- checking a store against what a recipe needs --------------------------------------------
    def check_compatible(self, *, source: str, model: str, zca: bool, parameter_count: int,
                         min_epochs: int, build_hint: str, optimizer: str = "sgd") -> None:
        """ExpertStoreError naming the mismatch and ``build_hint`` unless this store serves the recipe."""
        problems = []
        trained_with = str(self.index.get("training", {}).get("optimizer", "SGD")).lower()
        if trained_with != optimizer:
            problems.append(f"experts trained with {trained_with}, the recipe needs {optimizer} (params.expert_optimizer)")
        if self.index.get("source") != source:
            problems.append(f"source {self.index.get('source')!r}, the recipe needs {source!r}")
        if self.model != model:
            problems.append(f"model {self.model!r}, the recipe needs {model!r}")
        if self.zca_enabled != zca:
            problems.append(f"zca {'on' if self.zca_enabled else 'off'}, the recipe needs it "
                            f"{'on' if zca else 'off'}")
        if self.parameter_count != parameter_count:
            problems.append(f"{self.parameter_count} parameters per network, the recipe's network has "
                            f"{parameter_count}")
        if self.epochs < min_epochs:
            problems.append(f"{self.epochs} epochs per expert, the recipe reaches epoch {min_epochs} "
                            "(max_start_epoch + expert_epochs)")
        if self.num_experts == 0:
            problems.append("no finished expert")
        if problems:
            raise ExpertStoreError(f"the expert trajectories at {self.path} do not fit this recipe: "
                                   f"{'; '.join(problems)}. Build fitting ones with `{build_hint}`")


_EXPERT_FILE = re.compile(r"expert_[0-9]{4,}\.safetensors")  # what add() names them: a file in the store itself


def _index_problem(index: dict[str, Any]) -> str | None:
    """What is wrong with the shape of an expert index (None: nothing): the facts every reader uses."""
    def count(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    for key, ok in (("source", isinstance(index.get("source"), str)), ("model", isinstance(index.get("model"), str)),
                    ("zca", isinstance(index.get("zca"), bool)), ("epochs", count(index.get("epochs"), 1)),
                    ("parameter_count", count(index.get("parameter_count"), 1)),
                    ("training", isinstance(index.get("training", {}), dict)),
                    ("experts", isinstance(index.get("experts", []), list))):
        if not ok:
            return f"{key}: {index.get(key)!r}"
    for entry in index.get("experts", []):
        if not (isinstance(entry, dict) and count(entry.get("index"), 0) and isinstance(entry.get("file"), str)
                and _EXPERT_FILE.fullmatch(entry["file"])
                and isinstance(entry.get("test_accuracy"), (int, float)) and not isinstance(entry["test_accuracy"], bool)):
            return f"expert entry {entry!r} lacks an index, a file expert_NNNN.safetensors or a test_accuracy"
    return None


def open_for_recipe(path: Path, *, source: str, model: str, zca: bool, parameter_count: int,
                    min_epochs: int, build_hint: str, optimizer: str = "sgd") -> ExpertStore:
    """The store a trajectory-matching recipe reads, checked; ExpertStoreError (with the command that
    builds it) when it is missing or does not fit."""
    try:
        store = ExpertStore.open(path)
    except ExpertStoreError as exc:
        raise ExpertStoreError(f"{exc}. Trajectory matching needs expert trajectories first: run "
                               f"`{build_hint}` (or point params.expert_dir at a store)") from exc
    store.check_compatible(source=source, model=model, zca=zca, parameter_count=parameter_count,
                           min_epochs=min_epochs, build_hint=build_hint, optimizer=optimizer)
    return store


# --------------------------------------------------------------------------------------------------
# training one expert


@dataclass
class ExpertSettings:
    """How an expert trains: the papers' buffer settings (SGD without momentum or weight decay)."""

    epochs: int
    lr: float = 0.01
    batch: int = 256
    augmenter: Augmenter | None = None
    gsam: GSAMSettings | None = None  # None: plain SGD; else FTD's GSAM over that SGD (builders.gsam)

    def describe(self) -> dict[str, Any]:
        return {"optimizer": "SGD", "lr": self.lr, "momentum": 0.0, "weight_decay": 0.0, "batch": self.batch,
                "lr_schedule": "constant",
                "augment": self.augmenter.strategy if self.augmenter is not None else "none",
                **(self.gsam.describe() if self.gsam is not None else {})}


def train_expert(
    net: nn.Module,
    real: RealData,
    settings: ExpertSettings,
    generator: torch.Generator,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Train ``net`` in place on every image of ``real``; return its trajectory [epochs+1, P] (float32, CPU)
    and its training accuracy (percent) over the last epoch's augmented batches."""
    opt = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=0.0, weight_decay=0.0)
    n = len(real)
    snapshots = [flat_parameters(net).cpu()]
    accuracy = 0.0
    net.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        correct = torch.zeros((), dtype=torch.int64, device=real.device)  # counted on the device: no wait per step
        for start in range(0, n, settings.batch):
            pos = order[start : start + settings.batch]
            y = real.labels[to_device(pos, real.device)]
            if settings.gsam is None:
                logits = train_step(net, opt, real.rows(pos), y, settings.augmenter, generator)
            else:  # constant lr: rho = rho_max (builders.gsam)
                logits = gsam_train_step(net, opt, real.rows(pos), y, settings.augmenter, generator,
                                         settings.gsam, settings.gsam.rho(settings.lr, settings.lr, settings.lr))
            correct += (logits.argmax(1) == y).sum()
        accuracy = 100.0 * int(correct) / n
        snapshots.append(flat_parameters(net).cpu())
        if on_epoch is not None:
            on_epoch(epoch + 1, accuracy)
    return torch.stack(snapshots), accuracy


def train_experts_together(
    nets: list[nn.Module],
    real: RealData,
    settings: ExpertSettings,
    generators: list[torch.Generator],
    *,
    images: torch.Tensor | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[tuple[torch.Tensor, float]]:
    """``[train_expert(net, real, settings, g) for net, g in zip(nets, generators)]``, the networks trained at
    once (:func:`builders.ensemble.train_together`: the same batch orders and augmentation draws, the same
    trajectories up to float rounding). They read the split's images normalised once, as one float tensor on
    its device: ``images`` (:func:`all_rows` of ``real``) when given, else made here. Plain SGD only (GSAM
    experts train one by one). ``on_epoch(epoch, mean train accuracy)``."""
    if settings.gsam is not None:
        raise ValueError("train_experts_together: GSAM experts train one by one (train_expert)")
    n = len(real)
    images = all_rows(real) if images is None else images
    plan = TrainSettings(epochs=settings.epochs, lr=settings.lr, batch=settings.batch, momentum=0.0,
                         weight_decay=0.0, augmenter=settings.augmenter, lr_decay=False)
    snapshots = [[flat_parameters(net).cpu()] for net in nets]
    accuracies = [0.0] * len(nets)

    def epoch_end(epoch: int, correct: torch.Tensor) -> None:
        for i, net in enumerate(nets):
            snapshots[i].append(flat_parameters(net).cpu())
            accuracies[i] = 100.0 * int(correct[i]) / n
        if on_epoch is not None:
            on_epoch(epoch, sum(accuracies) / len(accuracies))

    for net in nets:
        net.train()
    train_together(nets, images, real.labels, plan, generators, label_loss, on_epoch_end=epoch_end)
    return [(torch.stack(s), a) for s, a in zip(snapshots, accuracies)]


def all_rows(real: RealData, chunk: int = 4096) -> torch.Tensor:
    """Every image of ``real`` in the build's space (:meth:`RealData.rows`), as one float tensor on its device,
    made ``chunk`` images at a time (the whitening's products stay small)."""
    n = len(real)
    return torch.cat([real.rows(torch.arange(start, min(n, start + chunk))) for start in range(0, n, chunk)])


def fit_split_zca(real: RealData, eps: float = DEFAULT_EPS, chunk: int = 4096) -> ZCA:
    """Fit the whitening on every image of ``real`` as raw [0, 1] pixels (no mean/std normalisation),
    in chunks: what MTT's and DATM's ``utils.get_dataset`` do (kornia ``ZCAWhitening(eps=0.1)`` fitted
    on ``ToTensor()`` images when ``--zca``)."""
    if real.zca is not None:
        raise ValueError("fit the ZCA on un-whitened images (this split already has one set)")

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(real), chunk):
            yield real.images[start : start + chunk].to(torch.float32) / 255.0

    return fit_zca(batches(), eps, device=real.device)


# --------------------------------------------------------------------------------------------------
# the job: recipe ``method: experts``


@register
class ExpertTraining:
    """Recipe ``method: experts``: train ``num_experts`` experts on the real data and store their
    trajectories (no condensed set). ``condensed-build recipes/experts_{source}.yaml``; a run that is
    interrupted and run again trains only the experts the store lacks."""

    name: ClassVar[str] = "experts"
    produces_set: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {
        "num_experts": 100,
        "epochs": 50,
        "lr_teacher": 0.01,
        "batch": 256,
        "zca": False,
        "expert_dir": "",  # "" -> OUT_ROOT/experts/{source}/{model}/{zca|plain}[_gsam]
        # sgd, or gsam: FTD's GSAM (builders/gsam.py) with the FTD/DATM buffer command's settings below
        "optimizer": "sgd",
        # several experts trained at once (builders.ensemble): true, false, or "auto": on a GPU, where one
        # expert's small steps leave it idle; together_group of them at a time (5: chosen here, as the
        # ensemble benchmark's 5 networks; not tuned). Plain SGD, and BatchNorm only in ConvNets.
        "together": AUTO,
        "together_group": 5,
        "rho_max": 0.01,
        "rho_min": 0.01,
        "alpha": 0.3,
        "adaptive": True,
    }

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        p = recipe.params
        check_at_least(p, ("num_experts", "epochs", "batch"), 1)
        check_at_least(p, ("lr_teacher",), 0, strict=True)
        check_choice("optimizer", p["optimizer"], EXPERT_OPTIMIZERS)
        check_choice("together", p["together"], (False, True, AUTO))
        check_at_least(p, ("together_group",), 1)
        if p["together"] is True and p["optimizer"] != "sgd":
            raise RecipeError("params.together: true trains plain SGD experts at once; GSAM experts "
                              f"(params.optimizer: {p['optimizer']}) train one by one: set params.together: auto "
                              "or false")
        check_at_least(p, ("rho_max", "rho_min", "alpha"), 0)
        if p["rho_min"] != p["rho_max"]:
            raise RecipeError(f"params.rho_min ({p['rho_min']}) must equal params.rho_max ({p['rho_max']}): the "
                              "experts' lr is constant, and GSAM's rho follows the lr (as the reference asserts)")

    def __init__(self, recipe: Recipe, *, out_root: str | os.PathLike, data_root: str | os.PathLike,
                 device: torch.device, progress: bool = True, download: bool = False) -> None:
        self.recipe, self.params = recipe, recipe.params
        self.out_root, self.data_root = Path(out_root), Path(data_root)
        self.device, self.progress, self.download = device, progress, download

    def store_path(self) -> Path:
        """Where this recipe's store goes: params.expert_dir, else under the output root."""
        r = self.recipe
        if self.params["expert_dir"]:
            return Path(self.params["expert_dir"]).expanduser()
        return expert_dir(self.out_root, r.source, r.model, self.params["zca"], self.params["optimizer"])

    def header(self, layout: ParamLayout, settings: ExpertSettings) -> dict[str, Any]:
        """What every expert of the store shares (compared when a store is extended)."""
        r = self.recipe
        return {
            "format_version": STORE_VERSION,
            "kind": "expert_trajectories",
            "source": r.source,
            "model": r.model,
            "zca": bool(self.params["zca"]),
            "zca_eps": DEFAULT_EPS if self.params["zca"] else None,
            "epochs": settings.epochs,
            "parameter_count": layout.numel,
            "parameters": layout.describe(),
            "training": {**settings.describe(), "real_per_class": r.real_per_class},
            "recipe_seed": r.seed,
        }

    def run(self) -> ExpertStore:
        """Train the missing experts of the store; return it."""
        r, p = self.recipe, self.params
        real = RealData.from_source(r.source, self.data_root, train=True, device=self.device,
                                    per_class=r.real_per_class, download=self.download)
        test = RealData.from_source(r.source, self.data_root, train=False, device=self.device,
                                    per_class=r.eval.test_per_class, download=self.download)
        augmenter = Augmenter(r.augment) if r.augment != "none" else None
        gsam = (GSAMSettings(rho_max=p["rho_max"], rho_min=p["rho_min"], alpha=p["alpha"], adaptive=p["adaptive"])
                if p["optimizer"] == "gsam" else None)
        settings = ExpertSettings(epochs=p["epochs"], lr=p["lr_teacher"], batch=p["batch"], augmenter=augmenter,
                                  gsam=gsam)
        c, h, w = real.image_shape
        probe = build_network(r.model, c, real.num_classes, (h, w), seed=0)  # the architecture, for its layout
        layout = ParamLayout.of(probe)
        world = distributed.current()
        store, zca = None, None
        if world.is_main:  # one rank reads and writes the store; under torchrun the others are told
            store = ExpertStore.create_or_extend(self.store_path(), self.header(layout, settings))
            if p["zca"]:
                zca = store.load_zca() if (store.path / ZCA_NAME).is_file() else None
                if zca is None:
                    zca = fit_split_zca(real)
                    store.save_zca(zca, fitted_on=f"{r.source} train split, {len(real)} images, raw [0, 1] pixels")
        index, zca = distributed.broadcast_object((store.index if store is not None else None, zca))
        store = store if store is not None else ExpertStore(self.store_path(), index)
        if zca is not None:
            real.set_zca(zca)
        test.set_zca(real.zca)
        todo = [k for k in range(p["num_experts"]) if not store.has(k)]
        bar = tqdm(total=len(todo), disable=None if self.progress and world.is_main else True,  # None: off a terminal
                   desc=f"experts {r.source} {r.model}", unit="expert", dynamic_ncols=True)
        group = self._together_group(probe, settings)
        images = all_rows(real) if group > 1 and todo else None  # normalised once for every group
        while group > 1 and todo:  # one process: groups of experts at once, each group stored when it is done
            chunk = todo[:group]
            try:
                items = self._train_group(chunk, real, images, test, settings, bar)
            except RuntimeError as error:
                if not ran_out_of_memory(error):
                    raise
                group = self._out_of_memory(len(chunk), error)  # the rest train one by one (below)
                images = None
                continue
            for item in items:
                store.add(*item)
                bar.set_postfix(expert=item[0], test_acc=f"{item[2]['test_accuracy']:.2f}")
            bar.update(len(chunk))
            todo = todo[len(chunk):]
        # torchrun: experts in rounds of world_size, rank r trains the r-th of each round; rank 0 writes
        # every finished expert of a round before the next starts (an interruption keeps whole rounds).
        for first in range(0, len(todo), world.world_size):
            round_ = todo[first:first + world.world_size]
            mine = round_[world.rank] if world.rank < len(round_) else None
            done = self._train_one(mine, real, test, settings, bar) if mine is not None else None
            for item in distributed.gather_to_main(done) or []:
                if item is not None:
                    store.add(*item)
                    bar.set_postfix(expert=item[0], test_acc=f"{item[2]['test_accuracy']:.2f}")
            bar.update(len(round_))
        bar.close()
        store.index = distributed.broadcast_object(store.index)  # every rank returns the finished store
        return store

    def _together_group(self, probe: nn.Module, settings: ExpertSettings) -> int:
        """How many experts (networks like ``probe``) train at once under ``params.together`` here (1: one by one)."""
        p = self.params
        if p["together"] is False or p["together_group"] == 1:
            return 1
        plan = TrainSettings(epochs=settings.epochs, augmenter=settings.augmenter)
        why = ("GSAM experts train one by one" if settings.gsam is not None else
               "under torchrun each rank trains its experts one by one" if distributed.current().active else
               f"model {self.recipe.model} cannot train together (BatchNorm outside a ConvNet)" if not can_train_together(probe, plan)
               else None)
        if why is not None:
            if p["together"] is True:
                raise BuildError(f"params.together: true, but {why}; set params.together: auto or false")
            return 1
        if p["together"] == AUTO and not use_together(self.device, p["together_group"]):
            return 1
        return p["together_group"]

    def _out_of_memory(self, group: int, error: Exception) -> int:
        """After ``group`` experts at once ran out of GPU memory: under ``params.together: auto`` a warning, and
        the rest train one by one (returns 1); under ``true`` a BuildError that says what to lower."""
        if self.params["together"] is True:
            raise BuildError(f"{group} experts at once ran out of GPU memory ({str(error).splitlines()[0]}); lower "
                             "params.together_group or set params.together: auto or false") from error
        warnings.warn(f"{group} experts at once ran out of GPU memory; the remaining experts train one by one "
                      "(lower params.together_group to keep training them together)", stacklevel=3)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return 1

    def _seeded(self, k: int, real: RealData) -> tuple[nn.Module, torch.Generator, int, int]:
        """Expert ``k``'s fresh network and data-order generator, and their seeds (from the recipe seed and
        ``k`` alone: the store does not depend on how the experts were grouped or interrupted)."""
        r = self.recipe
        c, h, w = real.image_shape
        init_seed, train_seed = derive_seed(r.seed, k, "init"), derive_seed(r.seed, k, "train")
        net = build_network(r.model, c, real.num_classes, (h, w), seed=init_seed).to(self.device)
        return net, torch.Generator().manual_seed(train_seed), init_seed, train_seed

    def _train_one(self, k: int, real: RealData, test: RealData, settings: ExpertSettings,
                   bar: tqdm) -> tuple[int, torch.Tensor, dict[str, Any]]:
        """Train expert ``k``: (k, trajectory, index record)."""
        net, generator, init_seed, train_seed = self._seeded(k, real)

        def report(epoch: int, acc: float) -> None:
            bar.set_postfix(expert=k, epoch=f"{epoch}/{settings.epochs}", train_acc=f"{acc:.1f}")

        trajectory, train_acc = train_expert(net, real, settings, generator, on_epoch=report)
        return k, trajectory, self._record(net, test, init_seed, train_seed, train_acc)

    def _train_group(self, ks: list[int], real: RealData, images: torch.Tensor | None, test: RealData,
                     settings: ExpertSettings, bar: tqdm) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """Train experts ``ks`` at once (:func:`train_experts_together`): their (k, trajectory, index record)."""
        seeded = [self._seeded(k, real) for k in ks]

        def report(epoch: int, acc: float) -> None:
            bar.set_postfix(experts=f"{ks[0]}-{ks[-1]}", epoch=f"{epoch}/{settings.epochs}", train_acc=f"{acc:.1f}")

        done = train_experts_together([s[0] for s in seeded], real, settings, [s[1] for s in seeded],
                                      images=images, on_epoch=report)
        return [(k, trajectory, self._record(net, test, init_seed, train_seed, train_acc, together=len(ks)))
                for k, (net, _, init_seed, train_seed), (trajectory, train_acc) in zip(ks, seeded, done)]

    def _record(self, net: nn.Module, test: RealData, init_seed: int, train_seed: int, train_acc: float,
                together: int = 1) -> dict[str, Any]:
        """A trained expert's index record: its seeds, accuracies and provenance."""
        return {
            "init_seed": init_seed, "train_seed": train_seed, "test_accuracy": round(test_accuracy(net, test), 4),
            "train_accuracy": round(train_acc, 4), "test_split": f"{test.info.name} test, {len(test)} images",
            "versions": {"condensed_datasets": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "device": self.device.type,
            **({"trained_together": together} if together > 1 else {}),
        }
