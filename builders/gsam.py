"""GSAM, the optimiser of FTD's experts (flat trajectory distillation; Du et al., CVPR 2023), which DATM's
buffers use too.

FTD's and DATM's ``buffer/buffer_FTD.py`` train each expert with ``gsam.GSAM`` (Zhuang et al., ICLR 2022)
over plain SGD. One step on a batch (the same augmented batch for both passes), with ``w`` the weights:

1. ``g = grad L(w)``;
2. ``e = rho * g * w^2 / (|| |w| * g || + eps)`` (``adaptive``, the script's default ``--adaptive True``;
   ``e = rho * g / (||g|| + eps)`` without it), ``eps = 1e-12``;
3. ``h = grad L(w + e)`` (BatchNorm running statistics are left untouched by this pass);
4. ``cos = <g, h> / (||h|| ||g|| + eps)``, ``v = g - cos ||g|| h / (||h|| + eps)`` (the part of ``g``
   orthogonal to ``h``), and the update direction is ``h - alpha * v``;
5. the base SGD step at ``w`` (the perturbation is removed first) with that direction as the gradient.

Norms run over all parameters together. ``rho`` follows the lr: ``ProportionScheduler`` maps
``lr`` in ``[lr_min, lr_max]`` linearly onto ``[rho_min, rho_max]``; with the constant lr the experts
use here (and FTD's ``StepLR(gamma=1)``), ``rho = rho_max`` and the reference requires
``rho_min == rho_max``.

The reference settings (DATM ``README.md``, buffer command; FTD ``buffer/run_buffer.sh``):
``--rho_max=0.01 --rho_min=0.01 --alpha=0.3``, SGD ``--lr_teacher=0.01 --mom=0``, batch 256, and
``--train_epochs=100`` in DATM's command (50 in FTD's script).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from builders.evaluate import label_loss

if TYPE_CHECKING:
    from builders.augment import Augmenter

__all__ = ["EXPERT_OPTIMIZERS", "FTD_EPOCHS", "GSAMSettings", "decompose", "gsam_train_step", "perturbation"]

EXPERT_OPTIMIZERS: tuple[str, ...] = ("sgd", "gsam")
#: Epochs per expert of DATM's buffer command (README.md: ``buffer_FTD.py ... --train_epochs=100``).
FTD_EPOCHS = 100
_EPS = 1e-12  # GSAM's perturb_eps


@dataclass(frozen=True)
class GSAMSettings:
    """GSAM's hyperparameters (defaults: the FTD/DATM buffer command's)."""

    rho_max: float = 0.01
    rho_min: float = 0.01
    alpha: float = 0.3
    adaptive: bool = True

    def rho(self, lr: float, lr_max: float, lr_min: float) -> float:
        """``ProportionScheduler``: ``rho`` proportional to where ``lr`` lies in ``[lr_min, lr_max]``."""
        if lr_max > lr_min:
            return self.rho_min + (self.rho_max - self.rho_min) * (lr - lr_min) / (lr_max - lr_min)
        return self.rho_max

    def describe(self) -> dict[str, Any]:
        return {"optimizer": "GSAM", "base_optimizer": "SGD", "rho_max": self.rho_max, "rho_min": self.rho_min,
                "alpha": self.alpha, "adaptive": self.adaptive}


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def perturbation(params: list[torch.Tensor], grads: list[torch.Tensor], rho: float,
                 adaptive: bool = True) -> list[torch.Tensor]:
    """Step 2 of the module docstring: the ascent ``e`` per parameter."""
    if adaptive:
        scale = rho / (_norm([p.abs() * g for p, g in zip(params, grads)]) + _EPS)
        return [g * scale * p.pow(2) for p, g in zip(params, grads)]
    scale = rho / (_norm(grads) + _EPS)
    return [g * scale for g in grads]


def decompose(grads: list[torch.Tensor], perturbed: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """Step 4 of the module docstring: ``h - alpha * v`` per parameter (``g`` = grads, ``h`` = perturbed)."""
    inner = sum((g * h).sum() for g, h in zip(grads, perturbed))
    g_norm, h_norm = _norm(grads), _norm(perturbed)
    cosine = inner / (h_norm * g_norm + _EPS)
    return [h - alpha * (g - cosine * g_norm * h / (h_norm + _EPS)) for g, h in zip(grads, perturbed)]


def _set_bn_momentum(net: nn.Module, saved: dict[nn.Module, Any] | None) -> dict[nn.Module, Any]:
    """Freeze BatchNorm running statistics (momentum 0) and return the old momenta; restore with them."""
    out = {}
    for module in net.modules():
        if isinstance(module, _BatchNorm):
            out[module] = module.momentum
            module.momentum = 0.0 if saved is None else saved[module]
    return out


def gsam_train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor,
                    augmenter: Augmenter | None, generator: torch.Generator, settings: GSAMSettings,
                    rho: float) -> torch.Tensor:
    """One GSAM step of ``opt`` (an SGD over ``net``'s parameters) on a batch (per-sample augmentation
    drawn once for both passes); returns the detached logits of the first pass."""
    if augmenter is not None:
        x = augmenter(x, generator)
    params = [p for p in net.parameters() if p.requires_grad]
    logits = net(x)
    grads = list(torch.autograd.grad(label_loss(logits, targets), params))
    with torch.no_grad():
        shift = perturbation([p.detach() for p in params], grads, rho, settings.adaptive)
        for p, e in zip(params, shift):
            p.add_(e)
    saved = _set_bn_momentum(net, None)
    try:
        perturbed = list(torch.autograd.grad(label_loss(net(x), targets), params))
    finally:
        _set_bn_momentum(net, saved)
    with torch.no_grad():
        for p, e in zip(params, shift):
            p.sub_(e)
        direction = decompose(grads, perturbed, settings.alpha)
    opt.zero_grad(set_to_none=True)
    for p, d in zip(params, direction):
        p.grad = d
    opt.step()
    return logits.detach()
