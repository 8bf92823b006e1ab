"""Pictures of a condensed set: a PNG grid, one row per class."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torchvision.utils import save_image

from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.format import CondensedSet


def to_pixels(cset: CondensedSet) -> torch.Tensor:
    """The set's images mapped back to [0,1] pixels: un-whitened (ZCA sets), then un-normalised."""
    images = cset.images if cset.zca is None else cset.zca.invert(cset.images)
    norm = cset.metadata.get("normalization")
    if norm:
        mean = torch.tensor(norm["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(norm["std"]).view(1, -1, 1, 1)
        images = images * std + mean
    else:  # no recorded space: stretch to the set's own range
        images = (images - images.min()) / (images.max() - images.min()).clamp_min(1e-12)
    return images.clamp(0, 1)


def save_grid(cset: CondensedSet, path: str | os.PathLike, max_per_class: int = 10) -> Path:
    """Write a PNG grid, atomically: one row per class, at most ``max_per_class`` images per row."""
    per_row = min(cset.ipc, max_per_class)
    pick = torch.cat([torch.arange(c * cset.ipc, c * cset.ipc + per_row) for c in range(cset.num_classes)])
    png = io.BytesIO()
    save_image(to_pixels(cset)[pick], png, format="png", nrow=per_row, padding=2, pad_value=1.0)
    return atomic_write_bytes(path, png.getvalue())
