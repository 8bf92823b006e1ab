"""Real training data for a build: uint8 on the device, normalised on the fly, indexed per class."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from builders.errors import RecipeError
from builders.transfer import to_device
from condensed_datasets.sources import SourceInfo, get_source, load_split
from condensed_datasets.zca import ZCA


class RealData:
    """One split of a real source held as uint8 on ``device``, with per-class row indices.

    ``zca`` (None by default; set it with :meth:`set_zca`) whitens every image this split hands out.
    A ZCA space is the references' (MTT, DATM: kornia's ZCA on ``ToTensor()`` images): the whitening
    applies to the raw [0, 1] pixels, with no mean/std normalisation before it; without ZCA the images
    are normalised by the source's per-channel mean and std.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: SourceInfo,
        device: torch.device | str = "cpu",
        source_rows: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"real images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        self.info = info
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(torch.int64).to(self.device)
        self.source_rows = (
            torch.arange(len(labels), dtype=torch.int64) if source_rows is None else source_rows.to(torch.int64)
        )
        self.mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.zca: ZCA | None = None
        labels_cpu = self.labels.cpu()
        self.class_indices: list[torch.Tensor] = [
            torch.nonzero(labels_cpu == c, as_tuple=False).flatten() for c in range(info.num_classes)
        ]
        empty = [c for c, idx in enumerate(self.class_indices) if len(idx) == 0]
        if empty:
            raise ValueError(f"{info.name}: no real images for classes {empty}")

    @classmethod
    def from_source(
        cls,
        source: str,
        root: str | os.PathLike,
        *,
        train: bool = True,
        device: torch.device | str = "cpu",
        per_class: int | None = None,
        download: bool = False,
        classes: list[int] | None = None,
    ) -> "RealData":
        """Load a split of ``source`` under ``root``; ``per_class`` keeps the first that many images per class.

        ``classes`` (source class indices) keeps only those classes, relabelled 0..k-1 in that order:
        a build on a class subset never sees the other classes.
        """
        info = get_source(source)
        images, labels = load_split(info.name, root, train=train, download=download)
        rows = torch.arange(len(labels), dtype=torch.int64)
        if per_class is not None or classes is not None:
            chosen = range(info.num_classes) if classes is None else classes
            keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in chosen])
            keep, _ = torch.sort(keep)
            images, labels, rows = images[keep], labels[keep], rows[keep]
        if classes is not None:
            relabel = torch.full((info.num_classes,), -1, dtype=torch.int64)
            relabel[torch.tensor(classes, dtype=torch.int64)] = torch.arange(len(classes))
            labels = relabel[labels.to(torch.int64)]
            info = replace(info, classes=tuple(info.classes[c] for c in classes))
        return cls(images, labels, info, device, source_rows=rows)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def set_zca(self, zca: ZCA | None, normalization: dict[str, list[float]] | None = None) -> None:
        """Whiten every image handed out from now on with ``zca`` (None: no whitening). The whitening
        applies to raw [0, 1] pixels unless ``normalization`` (a set's recorded mean/std, as sets
        built before ZCA moved to raw pixels carry) says what comes before it."""
        self.zca = None if zca is None else zca.to(self.device)
        if normalization is None:
            normalization = self.space_normalization()
        self.mean = torch.tensor(normalization["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(normalization["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def space_normalization(self) -> dict[str, list[float]]:
        """The mean/std applied before the whitening (the set's recorded ``normalization``): the
        source's without ZCA, the identity (raw [0, 1] pixels) with it."""
        if self.zca is None:
            return {"mean": list(self.info.mean), "std": list(self.info.std)}
        channels = len(self.info.mean)
        return {"mean": [0.0] * channels, "std": [1.0] * channels}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (any device) -> float32 images in the set's space: normalised, or with ``zca``
        set, the whitened raw [0, 1] pixels."""
        out = (images.to(self.device, torch.float32) / 255.0 - self.mean) / self.std
        return out if self.zca is None else self.zca(out)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in the set's space -> [0,1] pixel values (unclamped; un-whitened when ``zca`` is set)."""
        images = images.to(self.device)
        if self.zca is not None:
            images = self.zca.invert(images)
        return images * self.std + self.mean

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Images at positions ``idx`` of this split, in the build's space (see :meth:`normalize`)."""
        return self.normalize(self.images[to_device(idx, self.device)])

    def pick_class(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Positions of ``n`` random images of class ``c`` without replacement (all of them if it has fewer)."""
        pool = self.class_indices[c]
        return pool[torch.randperm(len(pool), generator=generator)[:n]]

    def sample_class(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random images of class ``c`` without replacement (all of them if the class has fewer)."""
        return self.rows(self.pick_class(c, n, generator))

    def random_class_balanced(self, ipc: int, generator: torch.Generator) -> torch.Tensor:
        """Positions of ``ipc`` random images per class, class-contiguous."""
        picks = []
        for c, pool in enumerate(self.class_indices):
            if len(pool) < ipc:
                raise RecipeError(f"class {c} has {len(pool)} real images, fewer than ipc {ipc}; lower ipc")
            picks.append(self.pick_class(c, ipc, generator))
        return torch.cat(picks)
