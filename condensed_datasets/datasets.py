"""torchvision-style Dataset classes over condensed sets: one thin subclass per real source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import Dataset
from torchvision.datasets import VisionDataset

from condensed_datasets._text import printable
from condensed_datasets.catalogue import describe_sets, embedded_path, list_embedded, list_local, sets_by_method
from condensed_datasets.errors import (
    CondensedSetError,
    HubNotFoundError,
    HubOfflineError,
    HubServerError,
    HubStalledError,
    SetNotFoundError,
    UnknownNameError,
)
from condensed_datasets.format import CondensedSet, whole_set_problem
from condensed_datasets.hub import download_set, is_hub_copy
from condensed_datasets.listing import available
from condensed_datasets.mae_refill import load_mae, refill_patches
from condensed_datasets.paths import check_ipc, check_method, check_repo_id, check_revision, set_path
from condensed_datasets.sources import get_source, load_split
from condensed_datasets.zca import ZCA

TARGET_TYPES = ("auto", "hard", "soft")


def available_sets(root: str | os.PathLike, source: str) -> dict[str, list[int]]:
    """The sets of ``source`` present under ``root``: method -> sorted ipcs (readable files only)."""
    return sets_by_method(list_local(root, get_source(source).name))


def _needs_hub_check(path: Path) -> bool:
    """With ``download=True``: is this local file one to check against the hub (a download, or a broken file)?

    A valid file without a download record was built here and is used as it is.
    """
    if is_hub_copy(path):
        return True
    try:
        CondensedSet.load(path)
    except (CondensedSetError, OSError):
        return True
    return False


class SetSpace:
    """The map from real uint8 images into a condensed set's own input space, built from its metadata.

    That is ``(x / 255 - mean) / std`` with the set's recorded normalisation, then, for a set built in
    ZCA space (metadata ``zca``), the set's whitening ``(x - zca_mean) @ zca_transform`` on the flattened
    image. The builders whiten raw [0, 1] pixels as the references do, so such a set records the
    identity (mean 0, std 1) as its normalisation and the map is ``zca(x / 255)``. The whitening's tensors live in the set's file, not in its metadata: pass them as ``zca``
    (a :class:`~condensed_datasets.zca.ZCA`); metadata that names a ZCA without one is an error.
    Picklable, so it can travel to DataLoader workers; usable as a transform on uint8 tensors.
    """

    def __init__(self, metadata: dict[str, Any], zca: ZCA | None = None) -> None:
        norm = metadata.get("normalization")
        if norm is None:
            info = get_source(metadata["source"])
            norm = {"mean": list(info.mean), "std": list(info.std)}
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(norm["std"], dtype=torch.float32).view(-1, 1, 1)
        self.image_shape = tuple(metadata.get("image_shape") or ())
        if metadata.get("zca") is not None and zca is None:
            raise CondensedSetError("this set lives in ZCA-whitened space (metadata 'zca'); pass its whitening, "
                             "e.g. SetSpace(cset.metadata, zca=cset.zca)")
        self.zca: ZCA | None = zca

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [C,H,W] or [N,C,H,W] -> float32 images in the set's space, same shape."""
        if images.dtype != torch.uint8:
            raise TypeError(f"real images must be uint8 (0..255), got {images.dtype}")
        out = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        return out if self.zca is None else self.zca(out)

    def __repr__(self) -> str:
        whitening = "" if self.zca is None else f", zca(eps={self.zca.eps}, dim={self.zca.dim})"
        return f"SetSpace(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}{whitening})"


class RealImages(Dataset):
    """Real uint8 images and int labels, served as (float tensor [C,H,W] in a set's space, int)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, to_space: Callable[[torch.Tensor], torch.Tensor]):
        self.images = images
        self.targets = targets
        self.to_space = to_space

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.to_space(self.images[index]), int(self.targets[index])


class CondensedVisionDataset(VisionDataset):
    """A condensed set read from ``{root}/condensed/{source}/{method}_ipc{ipc}.safetensors``.

    ``ds[i]`` is ``(image, target)``: image a float tensor [C,H,W] in the set's own space; target an int,
    or the soft-label probability vector when ``target_type="soft"`` (the default ``"auto"`` uses soft
    labels when the set has them; ``"hard"`` forces ints).

    Where the set comes from, in order: the local file; a set embedded in the package (only when no
    ``repo_id``/``revision`` is asked for); with ``download=True``, the hub dataset repository ``repo_id``
    (default ``{org}/condensed-{source}``, see :mod:`condensed_datasets.hub`) at ``revision`` (default
    ``main``), checked against the hub's SHA-256 and saved under ``root``; with ``build=True``, a build
    on demand with the shipped recipe; else a RuntimeError that says how to get it.

    A patch-dropped set (DQ with ``patch_drop``) stores only its kept patches: ``patch_mask`` says which,
    and dropped patches are 0 (the normalisation's mean) unless ``refill`` names a pretrained MAE (a hub id
    such as ``"facebook/vit-mae-large"`` or a local folder; needs the ``dq-mae`` extra) to fill them in.
    """

    source: ClassVar[str] = ""

    def __init__(
        self,
        root: str | os.PathLike,
        method: str,
        ipc: int,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        target_type: str = "auto",
        download: bool = False,
        build: bool = False,
        repo_id: str | None = None,
        revision: str | None = None,
        refill: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a folder path (str or os.PathLike), got {root!r}")
        super().__init__(root, transform=transform, target_transform=target_transform)
        if not self.source:
            raise TypeError("CondensedVisionDataset is a base class; use a subclass such as CondensedCIFAR10")
        check_method(method)
        ipc = check_ipc(ipc)
        if repo_id is not None:
            check_repo_id(repo_id)
        if revision is not None:
            check_revision(revision)
        if target_type not in TARGET_TYPES:
            raise UnknownNameError(f"unknown target_type {target_type!r}; valid: {', '.join(TARGET_TYPES)}")

        path = self._locate(method, ipc, download=download, build=build, repo_id=repo_id, revision=revision)
        cset = CondensedSet.load(path)
        problem = whole_set_problem(cset.metadata, self.source, method, ipc)
        if problem:
            raise SetNotFoundError(f"{path} {problem}; the file is misnamed or damaged — delete it and build or "
                                   "download it again")
        if target_type == "soft" and cset.soft_labels is None:
            raise UnknownNameError(f"target_type='soft' but {path} has no soft labels; use 'hard' or 'auto'")

        self.path = path
        self.method = method
        self.ipc = ipc
        self.metadata: dict[str, Any] = cset.metadata
        self.data: torch.Tensor = cset.images
        self.patch_mask: torch.Tensor | None = cset.patch_mask  # patch-dropped sets: True where a patch was kept
        if refill is not None and cset.patch_mask is not None:
            self.data = refill_patches(cset.images, cset.patch_mask, cset.metadata["normalization"],
                                       load_mae(refill, download=download))
        self.targets: list[int] = cset.labels.tolist()
        self.soft_targets: torch.Tensor | None = (
            None if cset.soft_labels is None else torch.softmax(cset.soft_labels, dim=1)
        )
        self.lr: torch.Tensor | None = cset.lr
        self.zca: ZCA | None = cset.zca  # the set's whitening, when it was built in ZCA space
        self.classes: list[str] = cset.classes
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.target_type = (
            ("soft" if self.soft_targets is not None else "hard") if target_type == "auto" else target_type
        )

    # -- lookup ---------------------------------------------------------------------------------------
    def _locate(self, method: str, ipc: int, *, download: bool = False, build: bool = False,
                repo_id: str | None = None, revision: str | None = None) -> Path:
        """The file to read: local file -> embedded set -> hub download -> build on demand -> clear error."""
        path = set_path(self.root, self.source, method, ipc)
        if Path(self.root).exists() and not Path(self.root).is_dir():
            raise SetNotFoundError(f"root {self.root} is a file, not a folder; pass the folder that holds (or "
                                   f"will hold) condensed/{self.source}/")
        if path.exists() and not path.is_file():
            raise SetNotFoundError(f"{path} is not a file (a folder or other entry is where the set should be); "
                                   "move it away, then download or build the set")
        if path.is_file():
            # With download=True a downloaded file is checked against the hub, a broken one replaced.
            if not (download and _needs_hub_check(path)):
                return path
        elif repo_id is None and revision is None:
            embedded = embedded_path(self.source, method, ipc)
            if embedded is not None:
                return embedded
        if download:
            try:
                return download_set(self.root, self.source, method, ipc, repo_id=repo_id, revision=revision)
            except (HubNotFoundError, HubOfflineError, HubServerError, HubStalledError):
                if not build:
                    raise
        if build:
            # The one import of builders by the consumer (DESIGN.md): only build-on-demand needs the producer.
            from builders.build import build_set

            built = Path(build_set(self.source, method, ipc, self.root))
            if not built.is_file():
                raise SetNotFoundError(f"building {method} ipc {ipc} for {self.source} did not produce {built}")
            return built
        entries, where = list_local(self.root, self.source), f"under {path.parent}"
        if repo_id is None and revision is None:  # the embedded sets are loadable too (the lookup above)
            embedded = list_embedded(self.source)
            entries, where = entries + embedded, where + (" or embedded in the package" if embedded else "")
        local = sets_by_method(entries)
        recipe = f"recipes/{method}_{self.source}.yaml"
        if local.get(method):
            raise UnknownNameError(
                f"no {method} set with ipc {ipc} for {self.source} {where}; available ipcs for "
                f"{method}: {', '.join(map(str, local[method]))}. To get ipc {ipc}, pass build=True or run "
                f"`condensed-build {recipe} --out {self.root} --set ipc={ipc}`"
            )
        raise SetNotFoundError(
            f"Condensed set not found at {path}. You can use download=True to download it, "
            f"build=True to build it, or run "
            f"`condensed-build {recipe} --out {self.root} --set ipc={ipc}`. Sets present for {self.source}: {describe_sets(local)}"
        )

    @classmethod
    def available(
        cls,
        root: str | os.PathLike | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
        download: bool = False,
    ) -> list[dict[str, Any]]:
        """The sets of this source that can be loaded: local (under ``root``), embedded, and with
        ``download=True`` those listed in the hub repository's ``index.json`` (``repo_id``, default
        ``{org}/condensed-{source}``). One dict per set: source, method, ipc, where, location, size,
        accuracy_mean, accuracy_std, improvement_over_random, ... (:func:`condensed_datasets.listing.available`).
        """
        if not cls.source:
            raise TypeError("CondensedVisionDataset is a base class; use a subclass such as CondensedCIFAR10")
        return available(cls.source, root=root, repo_id=repo_id, revision=revision, download=download)

    # -- Dataset -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.data[index].clone()
        target: Any
        if self.target_type == "soft":
            assert self.soft_targets is not None
            target = self.soft_targets[index].clone()
        else:
            target = self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def extra_repr(self) -> str:
        lines = [f"Source: {self.source}", f"Method: {self.method}", f"IPC: {self.ipc}", f"Targets: {self.target_type}"]
        evaluation = self.metadata.get("evaluation") or {}
        if evaluation.get("accuracy_mean") is not None:
            accuracy = f"{float(evaluation['accuracy_mean']):.2f}"
            if evaluation.get("accuracy_std") is not None:
                accuracy += f" ± {float(evaluation['accuracy_std']):.2f}"
            accuracy += " %"
            details = [printable(evaluation[k]) for k in ("model",) if evaluation.get(k)]
            if evaluation.get("runs"):
                details.append(f"{evaluation['runs']} runs")
            lines.append(f"Recorded accuracy: {accuracy}" + (f" ({', '.join(details)})" if details else ""))
        return "\n".join(lines)

    # -- the real data, in the set's space ------------------------------------------------------------------
    @property
    def set_space(self) -> SetSpace:
        """The transform that maps real uint8 images into this set's space (from its metadata)."""
        return SetSpace(self.metadata, zca=self.zca)

    def real_to_set_space(self, images: torch.Tensor) -> torch.Tensor:
        """Real uint8 images [C,H,W] or [N,C,H,W] -> float images as this set's images are."""
        return self.set_space(images)

    def real_test_set(self, download: bool = False) -> Dataset:
        """The real test split of the source (under the same root), items (float [C,H,W] in the set's space, int)."""
        images, targets = load_split(self.source, self.root, train=False, download=download)
        space = self.set_space
        if space.image_shape and tuple(images.shape[1:]) != space.image_shape:
            raise CondensedSetError(
                f"real {self.source} test images are {tuple(images.shape[1:])}, "
                f"the set's images are {space.image_shape}"
            )
        return RealImages(images, targets, space)


class CondensedMNIST(CondensedVisionDataset):
    """Condensed MNIST (1x28x28, 10 classes)."""

    source = "mnist"


class CondensedFashionMNIST(CondensedVisionDataset):
    """Condensed Fashion-MNIST (1x28x28, 10 classes)."""

    source = "fashionmnist"


class CondensedSVHN(CondensedVisionDataset):
    """Condensed SVHN (3x32x32, 10 classes)."""

    source = "svhn"


class CondensedCIFAR10(CondensedVisionDataset):
    """Condensed CIFAR-10 (3x32x32, 10 classes)."""

    source = "cifar10"


class CondensedCIFAR100(CondensedVisionDataset):
    """Condensed CIFAR-100 (3x32x32, 100 classes)."""

    source = "cifar100"


class CondensedTinyImageNet(CondensedVisionDataset):
    """Condensed Tiny-ImageNet (3x64x64, 200 classes)."""

    source = "tinyimagenet"
