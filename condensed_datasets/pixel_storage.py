"""Compact storage of real-image sets: uint8 pixels, or only the kept patches of each image plus a mask.

A set's images live in its normalised space, ``x = (u / 255 - mean) / std`` for pixels ``u`` in 0..255.
A coreset of real images loses nothing when stored as ``u`` (a quarter of float32's bytes); the loader
applies the same normalisation and gets the same float tensors, bit for bit. A patch-dropped set (Dataset
Quantization's second stage) stores, per image, its kept ``p x p`` patches as pixels and a bit-packed mask
of which patches were kept; dropped patches load as 0 (the normalisation's mean).

Metadata ``storage`` says which: ``{"images": "uint8"}`` or ``{"images": "patches", "patch_size": p,
"kept": k}``. File tensors: ``images`` uint8 [N,C,H,W]; or ``patches`` uint8 [N,k,C,p,p] (kept patches in
raster order) and ``patch_mask`` uint8 [N, ceil(L/8)] (bit ``i % 8`` of byte ``i // 8`` set when patch
``i`` of the ``L = (H/p)(W/p)`` raster-ordered patches was kept).
"""

from __future__ import annotations

from typing import Any

import torch

from condensed_datasets.errors import StorageError

STORAGES = ("uint8", "patches")
STORED_TENSORS = frozenset({"patches", "patch_mask"})  # file-only tensors of the patch storage
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
#: A patch file keeps at least 1/MAX_DROP_FACTOR of each image's patches (chosen here, a wide margin over the
#: builders' patch_drop <= 0.9): so decoding never makes more than this many times the pixels the file holds.
MAX_DROP_FACTOR = 64


def storage_problem(storage: Any) -> str | None:
    """Why a metadata ``storage`` block is not one this module reads (types only), or None."""
    if not isinstance(storage, dict) or storage.get("images") not in STORAGES:
        return f"metadata 'storage' must be {{'images': one of {', '.join(STORAGES)}, ...}}, got {storage!r}"
    if storage["images"] == "patches":
        p, kept = storage.get("patch_size"), storage.get("kept")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (p, kept)):
            return f"metadata storage 'patches' needs ints patch_size >= 1 and kept >= 1, got {p!r} and {kept!r}"
    return None


def _check_drop_factor(kept: Any, length: int) -> None:
    """StorageError unless ``kept`` is an int >= 1 and at least 1/MAX_DROP_FACTOR of ``length`` patches."""
    if isinstance(kept, bool) or not isinstance(kept, int) or kept < 1 or length > MAX_DROP_FACTOR * kept:
        raise StorageError(f"storage keeps {kept!r} of {length} patches per image, under 1/{MAX_DROP_FACTOR} of them "
                           "(or none); not a patch-dropped set this package reads")


def _stats(normalization: dict[str, Any], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float32).view(1, -1, 1, 1)
    if mean.shape[1] != channels or std.shape[1] != channels:
        raise StorageError(f"normalization has {mean.shape[1]} channel means for {channels}-channel images")
    return mean, std


def from_uint8(pixels: torch.Tensor, normalization: dict[str, Any]) -> torch.Tensor:
    """uint8 pixels [N,C,H,W] -> float32 images in the normalised space (the builders' exact arithmetic)."""
    mean, std = _stats(normalization, pixels.shape[1])
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def to_uint8(images: torch.Tensor, normalization: dict[str, Any], where: torch.Tensor | None = None) -> torch.Tensor:
    """Float images in the normalised space -> the uint8 pixels they came from.

    StorageError unless decoding those pixels gives back exactly ``images`` (at the pixels ``where`` is
    True, when given): images that are not real pixels under this normalisation are refused, never
    silently rounded.
    """
    mean, std = _stats(normalization, images.shape[1])
    pixels = ((images.float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    same = from_uint8(pixels, normalization) == images.float()
    if not (same if where is None else same | ~where).all():
        raise StorageError("images are not exactly uint8 pixels under the set's normalisation; store float32")
    return pixels


def patch_grid(shape: tuple[int, ...] | list[int], patch_size: int) -> tuple[int, int]:
    """(rows, columns) of ``patch_size`` patches over images of ``shape`` [C,H,W]."""
    _, h, w = shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise StorageError(f"patch size {patch_size} does not divide the {h}x{w} images")
    return h // patch_size, w // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N,C,H,W] -> [N, L, C, p, p], patches in raster order."""
    n, c, h, w = images.shape
    gh, gw = patch_grid((c, h, w), patch_size)
    p = patch_size
    return images.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c, p, p)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[N, L, C, p, p] -> [N,C,H,W] (inverse of :func:`patchify`)."""
    n, _, c, p, _ = patches.shape
    gh, gw = grid
    return patches.reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * p, gw * p)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, L] -> uint8 [N, ceil(L/8)], bit ``i % 8`` of byte ``i // 8`` for entry ``i``."""
    n, length = mask.shape
    padded = torch.zeros(n, -(-length // 8) * 8, dtype=torch.uint8)
    padded[:, :length] = mask.to(torch.uint8)
    return (padded.view(n, -1, 8) * _BITS).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(bits: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 [N, ceil(L/8)] -> bool [N, L]."""
    return ((bits.unsqueeze(-1) & _BITS) > 0).reshape(bits.shape[0], bits.shape[1] * 8)[:, :length]


def encode_images(
    images: torch.Tensor, storage: dict[str, Any], normalization: dict[str, Any], patch_mask: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The file tensors that hold ``images`` (float, normalised) under ``storage``."""
    kind = storage.get("images")
    if kind == "uint8":
        if patch_mask is not None:
            raise StorageError("a patch mask needs storage 'patches', not 'uint8'")
        return {"images": to_uint8(images, normalization)}
    if kind != "patches":
        raise StorageError(f"storage images: unknown {kind!r}; valid: {', '.join(STORAGES)}")
    p = storage.get("patch_size")
    if not isinstance(p, int) or isinstance(p, bool):
        raise StorageError(f"storage 'patches' needs an integer patch_size, got {p!r}")
    grid = patch_grid(tuple(images.shape[1:]), p)
    if patch_mask is None or tuple(patch_mask.shape) != (images.shape[0], *grid) or patch_mask.dtype != torch.bool:
        raise StorageError(f"storage 'patches' needs a bool patch_mask [N, {grid[0]}, {grid[1]}]")
    flat = patch_mask.reshape(images.shape[0], -1)
    kept = flat.sum(1)
    if len(kept) and not (kept == kept[0]).all():
        raise StorageError("every image must keep the same number of patches")
    if storage.get("kept") != (int(kept[0]) if len(kept) else storage.get("kept")):
        raise StorageError(f"storage kept={storage.get('kept')!r}, but the mask keeps {int(kept[0])} patches")
    _check_drop_factor(storage.get("kept"), grid[0] * grid[1])  # what is written must load
    patches = patchify(images, p)
    if (patches[~flat] != 0).any():
        raise StorageError("dropped patches must be 0 (the normalisation's mean) in the images")
    pixels = to_uint8(images, normalization, where=expand_mask(patch_mask, p).unsqueeze(1))
    kept_patches = patchify(pixels, p)[flat].reshape(images.shape[0], -1, *patches.shape[2:])
    return {"patches": kept_patches.contiguous(), "patch_mask": pack_mask(flat)}


def decode_images(
    tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float images (and, for patch storage, the bool patch mask [N, rows, cols]) from a file's tensors."""
    storage = metadata["storage"]
    kind = storage.get("images") if isinstance(storage, dict) else None
    shape = metadata.get("image_shape")
    normalization = metadata.get("normalization")
    if normalization is None:
        raise StorageError("stored pixels need metadata 'normalization'")
    if kind == "uint8":
        pixels = tensors.get("images")
        if pixels is None or pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise StorageError("storage 'uint8' needs a uint8 tensor 'images' [N,C,H,W]")
        return from_uint8(pixels, normalization), None
    if kind != "patches":
        raise StorageError(f"metadata storage: unknown {storage!r}; valid images: {', '.join(STORAGES)}")
    patches, bits = tensors.get("patches"), tensors.get("patch_mask")
    if patches is None or bits is None or patches.dtype != torch.uint8 or bits.dtype != torch.uint8:
        raise StorageError("storage 'patches' needs uint8 tensors 'patches' and 'patch_mask'")
    if not isinstance(shape, list) or len(shape) != 3:
        raise StorageError("storage 'patches' needs metadata image_shape [C,H,W]")
    p, kept = storage.get("patch_size"), storage.get("kept")
    grid = patch_grid(shape, p)
    n, length = patches.shape[0], grid[0] * grid[1]
    _check_drop_factor(kept, length)
    if tuple(patches.shape) != (n, kept, shape[0], p, p) or tuple(bits.shape) != (n, -(-length // 8)):
        raise StorageError(f"patches {tuple(patches.shape)} / patch_mask {tuple(bits.shape)} do not match "
                           f"{kept} kept {p}x{p} patches of {shape} images")
    mask = unpack_mask(bits, length)
    if (mask.sum(1) != kept).any():
        raise StorageError(f"patch_mask does not keep exactly {kept} patches per image")
    full = torch.zeros(n, length, shape[0], p, p, dtype=torch.uint8)
    full[mask] = patches.reshape(-1, shape[0], p, p)
    mask = mask.view(n, *grid)
    images = from_uint8(unpatchify(full, grid), normalization)
    return torch.where(expand_mask(mask, p).unsqueeze(1), images, 0.0), mask


def expand_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch mask [N, rows, cols] -> pixel mask [N, rows*p, cols*p]."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
