"""Regularised ZCA whitening: fit on training images, apply to any images of that shape.

The maths, written here from its definition. The trajectory-matching references (MTT's and DATM's
``utils.get_dataset`` with ``--zca``) fit kornia's ``ZCAWhitening(eps=0.1)`` on the raw [0, 1] pixels
(``ToTensor()`` images, no mean/std normalisation), and so do the builders here: a set built in ZCA
space records the identity as its ``normalization`` and maps a real image ``x`` (uint8) to
``(x / 255 - mu) @ W``. (Sets written before this rule record the source's mean/std, which are then
applied before the whitening; :class:`~condensed_datasets.datasets.SetSpace` honours either.)

- flatten each image to a vector of ``D = C*H*W`` values; ``mu`` is the mean vector of the fitting set;
- ``Sigma = (X - mu)^T (X - mu) / (N - 1)`` (the unbiased covariance);
- ``Sigma = U diag(S) U^T`` (symmetric eigendecomposition);
- ``W = U diag(1 / sqrt(S + eps)) U^T``, a symmetric matrix;
- whitening maps ``x -> (x - mu) @ W`` (``W`` is symmetric, so row or column convention agree).

The whitened fitting set has covariance ``U diag(S / (S + eps)) U^T``: the identity up to ``eps``.
Accumulation and the eigendecomposition run in float64; the stored mean and transform are float32.

This module belongs to the consumer package because a set built in ZCA space carries its ``mu``
and ``W`` (tensors ``zca_mean`` and ``zca_transform`` of the file format), and mapping a real test
image into the set's space needs them without ``builders``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

__all__ = ["ZCA", "fit_zca", "DEFAULT_EPS"]

#: The regularisation the trajectory-matching papers use.
DEFAULT_EPS = 0.1


@dataclass(frozen=True)
class ZCA:
    """A fitted whitening: ``mean`` float32 [D], ``transform`` float32 [D, D] (symmetric), ``eps``."""

    mean: torch.Tensor
    transform: torch.Tensor
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        if self.mean.dim() != 1:
            raise ValueError(f"ZCA mean must be 1-D [D], got shape {tuple(self.mean.shape)}")
        d = self.mean.shape[0]
        if tuple(self.transform.shape) != (d, d):
            raise ValueError(f"ZCA transform must be [D, D] = [{d}, {d}], got {tuple(self.transform.shape)}")

    @property
    def dim(self) -> int:
        """``D``, the number of values per image."""
        return int(self.mean.shape[0])

    def to(self, device: torch.device | str) -> "ZCA":
        """The same whitening with its tensors on ``device``."""
        return ZCA(self.mean.to(device), self.transform.to(device), self.eps)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten float images [N, C, H, W] or [C, H, W] (C*H*W == D); same shape and dtype out."""
        return self.apply(images)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten float images [N, C, H, W] or [C, H, W] (C*H*W == D); same shape and dtype out."""
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        flat = batch.reshape(batch.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"images have {flat.shape[1]} values each, the ZCA was fitted on {self.dim}")
        mean = self.mean.to(flat.device, flat.dtype)
        transform = self.transform.to(flat.device, flat.dtype)
        out = ((flat - mean) @ transform).reshape(batch.shape)
        return out[0] if single else out

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Map whitened images back to the space the whitening was fitted in (for pictures): ``x @ W^-1 + mu``."""
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        flat = batch.reshape(batch.shape[0], -1).to(torch.float64)
        transform = self.transform.to(flat.device, torch.float64)
        # x W^-1 == solve(W, x^T)^T because W is symmetric.
        restored = torch.linalg.solve(transform, flat.T).T + self.mean.to(flat.device, torch.float64)
        out = restored.to(images.dtype).reshape(batch.shape)
        return out[0] if single else out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as the file format stores them (float32, CPU, contiguous)."""
        return {
            "zca_mean": self.mean.detach().to("cpu", torch.float32).contiguous(),
            "zca_transform": self.transform.detach().to("cpu", torch.float32).contiguous(),
        }

    @classmethod
    def from_tensors(cls, mean: torch.Tensor, transform: torch.Tensor, eps: float = DEFAULT_EPS) -> "ZCA":
        """Rebuild from stored tensors."""
        return cls(mean.to(torch.float32), transform.to(torch.float32), float(eps))


def fit_zca(
    images: torch.Tensor | Iterable[torch.Tensor],
    eps: float = DEFAULT_EPS,
    *,
    device: torch.device | str | None = None,
) -> ZCA:
    """Fit the whitening on float images [N, C, H, W] (or an iterable of such batches, e.g. chunks of a
    large split, so the whole split never needs to be float at once). Needs at least two images."""
    if not eps > 0:
        raise ValueError(f"ZCA eps must be > 0 (it regularises zero-variance directions), got {eps}")
    batches = [images] if isinstance(images, torch.Tensor) else images
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    count = 0
    shift: torch.Tensor | None = None
    for batch in batches:
        flat = batch.reshape(batch.shape[0], -1)
        if device is not None:
            flat = flat.to(device)
        flat = flat.to(torch.float64)
        if shift is None:
            # Centre on the first image to keep the one-pass sums well conditioned.
            shift = flat[0].clone()
            total = torch.zeros_like(shift)
            outer = torch.zeros(shift.shape[0], shift.shape[0], dtype=torch.float64, device=flat.device)
        centred = flat - shift
        total += centred.sum(0)
        outer += centred.T @ centred
        count += flat.shape[0]
    if shift is None or count < 2 or total is None or outer is None:
        raise ValueError(f"ZCA needs at least 2 images to fit, got {count}")
    mean_c = total / count
    cov = (outer - count * torch.outer(mean_c, mean_c)) / (count - 1)
    cov = (cov + cov.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals = eigvals.clamp_min(0.0)  # round-off can make the smallest ones slightly negative
    scale = (eigvals + eps).rsqrt()
    transform = (eigvecs * scale) @ eigvecs.T
    transform = (transform + transform.T) / 2
    mean = mean_c + shift
    return ZCA(mean.to("cpu", torch.float32), transform.to("cpu", torch.float32), float(eps))
