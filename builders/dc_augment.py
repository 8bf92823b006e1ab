"""DC's evaluation augmentation (Zhao, Mopuri & Bilen, ICLR 2021), for the sources where DC uses it.

The DC reference (VICO-UoE/DatasetCondensation, ``utils.py``) trains its evaluation networks on MNIST
with its own augmentation, not DSA: ``get_daparam`` sets ``strategy = 'crop_scale_rotate'`` for MNIST
(``'none'`` elsewhere) with ``crop = 4``, ``scale = 0.2``, ``rotate = 45``, ``noise = 0.001``, and
``augment`` applies to every image ONE family chosen uniformly among the strategy's:

- crop: pad by ``crop`` pixels filled with the batch's per-channel mean, then cut the original size
  at an offset drawn in ``{0, ..., 2 crop - 1}`` per axis (a shift in ``[-crop, crop - 1]``);
- scale: resize (nearest) to ``int(u_h H) x int(u_w H)``, ``u ~ U(1 - scale, 1 + scale)``, centred on
  a zero canvas, cut back to ``H x W`` at the centre;
- rotate: rotate by an integer angle in ``[-rotate, rotate - 1]`` degrees about the centre, the
  outside filled with the mean of the per-channel means (the reference uses scipy's cubic spline;
  bilinear sampling here);
- noise: add ``noise * N(0, 1)`` per pixel.

A recipe names it as ``dc:`` plus the families, e.g. ``eval.augment: dc:crop_scale_rotate``; any other
strategy is DSA's (:mod:`builders.augment`). Randomness comes from an explicit CPU generator only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from builders.augment import Augmenter, parse_strategy

__all__ = ["DC_FAMILIES", "PREFIX", "DCAugmenter", "check_strategy", "make_augmenter"]

PREFIX = "dc:"
DC_FAMILIES: tuple[str, ...] = ("crop", "scale", "rotate", "noise")


def _families(strategy: str) -> tuple[str, ...]:
    parts = tuple(strategy[len(PREFIX):].split("_"))
    bad = [p for p in parts if p not in DC_FAMILIES]
    if not strategy.startswith(PREFIX) or bad or not parts or len(set(parts)) != len(parts):
        raise ValueError(f"DC augmentation {strategy!r}: expected 'dc:' and distinct families among "
                         f"{', '.join(DC_FAMILIES)} joined with '_', e.g. 'dc:crop_scale_rotate'")
    return parts


class DCAugmenter:
    """DC's per-image augmentation (see the module docstring); not differentiable, for evaluation."""

    def __init__(self, strategy: str, *, crop: int = 4, scale: float = 0.2, rotate: int = 45,
                 noise: float = 0.001) -> None:
        self.families = _families(strategy)
        self.strategy = PREFIX + "_".join(self.families)
        self.crop, self.scale, self.rotate, self.noise = int(crop), float(scale), int(rotate), float(noise)

    def __repr__(self) -> str:
        return f"DCAugmenter({self.strategy!r})"

    @torch.no_grad()
    def __call__(self, x: Tensor, generator: torch.Generator, siamese: bool = False) -> Tensor:
        """Augment every image of ``x`` [N, C, H, W] with one family each; returns a new tensor."""
        if siamese:
            raise ValueError("DC augmentation is per image; it has no siamese mode (use a DSA strategy)")
        n, c, h, w = x.shape
        out = x.clone()
        mean = x.mean(dim=(0, 2, 3))  # the batch's per-channel mean, as the reference
        choice = torch.randint(len(self.families), (n,), generator=generator)
        for i in range(n):
            family = self.families[int(choice[i])]
            if family == "crop":
                padded = mean.view(c, 1, 1).expand(c, h + 2 * self.crop, w + 2 * self.crop).clone()
                padded[:, self.crop : self.crop + h, self.crop : self.crop + w] = x[i]
                r, s = (int(v) for v in torch.randint(2 * self.crop, (2,), generator=generator))
                out[i] = padded[:, r : r + h, s : s + w]
            elif family == "scale":
                u = torch.rand(2, generator=generator) * (2 * self.scale) + (1 - self.scale)
                sh, sw = int(float(u[0]) * h), int(float(u[1]) * h)
                resized = F.interpolate(x[i : i + 1], [sh, sw])[0]
                side = max(sh, sw, h, w)
                canvas = x.new_zeros(c, side, side)
                r, s = (side - sh) // 2, (side - sw) // 2
                canvas[:, r : r + sh, s : s + sw] = resized
                r, s = (side - h) // 2, (side - w) // 2
                out[i] = canvas[:, r : r + h, s : s + w]
            elif family == "rotate":
                angle = int(torch.randint(-self.rotate, self.rotate, (1,), generator=generator))
                out[i] = _rotate(x[i], angle, float(mean.mean()))
            else:  # noise
                out[i] = x[i] + self.noise * torch.randn(x[i].shape, generator=generator).to(x.device, x.dtype)
        return out


def _rotate(image: Tensor, degrees: int, fill: float) -> Tensor:
    """``image`` [C, H, W] rotated by ``degrees`` about its centre, the outside set to ``fill``."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                         dtype=image.dtype, device=image.device).unsqueeze(0)
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    shifted = F.grid_sample((image - fill).unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return shifted[0] + fill


def check_strategy(strategy: str) -> None:
    """ValueError naming the problem unless ``strategy`` is a valid DC or DSA strategy."""
    if strategy.startswith(PREFIX):
        _families(strategy)
    else:
        parse_strategy(strategy)


def make_augmenter(strategy: str | None) -> Augmenter | DCAugmenter | None:
    """The augmenter a strategy names: None for ``none``/empty, DC's for ``dc:...``, else DSA's."""
    if not strategy or strategy == "none":
        return None
    return DCAugmenter(strategy) if strategy.startswith(PREFIX) else Augmenter(strategy)
