"""Refill the dropped patches of a patch-dropped set (DQ's second stage) with a pretrained masked autoencoder.

The autoencoder is Hugging Face ``transformers``' ``ViTMAEForPreTraining`` (install the ``dq-mae`` extra).
The reference refills with MAE ViT-L/16; the published Hugging Face checkpoint of that architecture is
``facebook/vit-mae-large`` (the default here). Each image is mapped to [0, 1] pixels, resized so that one
stored patch covers one MAE patch, normalised as the MAE expects (ImageNet mean and std), encoded with
exactly the kept patches visible, decoded, and brought back to the set's size and space; kept pixels stay
exactly as stored.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.nn.functional as F

from condensed_datasets.pixel_storage import expand_mask

DEFAULT_MAE = "facebook/vit-mae-large"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_mae(weights: str | os.PathLike = DEFAULT_MAE, *, download: bool = False) -> Any:
    """A ``ViTMAEForPreTraining`` from a hub id or a local folder (``save_pretrained``), in eval mode.

    ImportError without ``transformers``; RuntimeError, saying how to get them, without the weights.
    """
    try:
        from transformers import ViTMAEForPreTraining  # optional extra: dq-mae
    except ImportError as exc:
        raise ImportError("refilling dropped patches needs Hugging Face transformers: "
                          "pip install 'condensed-datasets[dq-mae]'") from exc
    try:
        model = ViTMAEForPreTraining.from_pretrained(str(weights), local_files_only=not download)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:  # the last: a folder's pickle holding more than tensors
        raise RuntimeError(
            f"MAE weights {str(weights)!r} are not available here or not readable ({type(exc).__name__}). Refilling dropped patches "
            f"needs a pretrained ViTMAEForPreTraining checkpoint such as {DEFAULT_MAE!r} (MAE ViT-L/16, as the DQ "
            f"reference uses): pass download=True, or fetch it once with `hf download {DEFAULT_MAE}` "
            "(huggingface_hub's CLI), or give the path of a folder written by save_pretrained()"
        ) from exc
    if getattr(model.config, "norm_pix_loss", False):
        raise RuntimeError(f"{weights}: this MAE predicts per-patch normalised pixels (norm_pix_loss=True), which "
                           "cannot refill a patch whose own statistics are unknown; use one trained without it, "
                           f"such as {DEFAULT_MAE!r}")
    return model.eval()


def refill_patches(
    images: torch.Tensor,
    patch_mask: torch.Tensor,
    normalization: dict[str, Any],
    mae: Any,
    *,
    batch: int = 64,
) -> torch.Tensor:
    """``images`` [N,C,H,W] (set space) with the patches where ``patch_mask`` [N, rows, cols] is False
    replaced by ``mae``'s reconstruction; kept pixels are returned unchanged."""
    n, c, h, w = images.shape
    rows, cols = patch_mask.shape[1:]
    p = h // rows
    big = (rows * mae.config.patch_size, cols * mae.config.patch_size)
    channels = mae.config.num_channels
    if c not in (1, channels):
        raise ValueError(f"{c}-channel images cannot go through a {channels}-channel MAE")
    mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float32).view(1, -1, 1, 1)
    mae_mean = torch.tensor(IMAGENET_MEAN[:channels] if channels == 3 else (0.5,) * channels).view(1, -1, 1, 1)
    mae_std = torch.tensor(IMAGENET_STD[:channels] if channels == 3 else (0.5,) * channels).view(1, -1, 1, 1)
    length = rows * cols
    flat = patch_mask.reshape(n, length)
    keep = int(flat[0].sum()) if n else 0
    if n and not (flat.sum(1) == keep).all():
        raise ValueError("every image must keep the same number of patches")
    out = []
    old_ratio = mae.config.mask_ratio
    mae.config.mask_ratio = (length - keep - 0.5) / length  # so that int(L * (1 - ratio)) == keep
    try:
        for start in range(0, n, batch):
            x, m = images[start : start + batch], flat[start : start + batch]
            pixels = (x * std + mean).expand(-1, channels, -1, -1)
            pixels = F.interpolate(pixels, size=big, mode="bicubic", align_corners=False) if big != (h, w) else pixels
            # kept patches first (in raster order), dropped after: the MAE keeps exactly ours visible
            noise = (~m).float() + torch.arange(length).float().div(2 * length)
            with torch.no_grad():
                result = mae(pixel_values=(pixels - mae_mean) / mae_std, noise=noise,
                             interpolate_pos_encoding=big != (mae.config.image_size, mae.config.image_size))
            if not torch.equal(result.mask.bool(), ~m):
                raise RuntimeError("the MAE did not keep exactly the stored patches visible")
            recon = mae.unpatchify(result.logits, original_image_size=big) * mae_std + mae_mean
            recon = F.interpolate(recon, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            recon = recon.mean(1, keepdim=True) if c == 1 and channels != 1 else recon
            out.append((recon.clamp(0, 1) - mean) / std)
    finally:
        mae.config.mask_ratio = old_ratio
    refilled = torch.cat(out) if out else images.clone()
    return torch.where(expand_mask(patch_mask, p).unsqueeze(1), images, refilled)
