"""Gradient matching (Zhao et al., ICLR 2021): the gradient distances, the loop schedule, BatchNorm handling.

The distances compare, parameter tensor by parameter tensor, the gradient of a network's loss on a
real batch with the gradient of its loss on the synthetic images of the same class:

- ``ours`` (the paper's layer-wise distance): every weight tensor of two or more dimensions is
  viewed as a matrix with one row per output unit (a 4-D convolution kernel ``[out, in, k, k]`` as
  ``[out, in*k*k]``, a 3-D layer-norm weight ``[C, H, W]`` as ``[C, H*W]``, a linear weight as it
  is) and contributes ``sum over rows of (1 - cos(real row, synthetic row))``. One-dimensional
  tensors (biases, normalisation scales and shifts) contribute nothing, as in the paper.
- ``mse``: the squared Euclidean distance between all gradients flattened and concatenated.
- ``cos``: ``1 - cos`` between all gradients flattened and concatenated.

Cosines use ``dot / (|a| |b| + 1e-6)``, the paper's guard against zero rows.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: The gradient distances by name; ``ours`` is the paper's.
DISTANCES: tuple[str, ...] = ("ours", "mse", "cos")

#: The outer/inner loop counts the paper lists, by images per class.
PAPER_LOOPS: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}

_EPS = 1e-6


def _cosine_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` along the last dimension, with the paper's ``1e-6`` in the denominator."""
    return 1.0 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + _EPS)


def layerwise_distance(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """The paper's distance for one parameter's gradients: sum over output rows of ``1 - cos``.

    Tensors of one dimension or none (biases, norm scales) give 0; others are reshaped to
    ``[shape[0], -1]``.
    """
    if real.shape != syn.shape:
        raise ValueError(f"gradient shapes differ: {tuple(real.shape)} vs {tuple(syn.shape)}")
    if real.dim() <= 1:
        return torch.zeros((), dtype=syn.dtype, device=syn.device)
    rows = real.shape[0]
    return _cosine_gap(real.reshape(rows, -1), syn.reshape(rows, -1)).sum()


def gradient_distance(
    real_grads: Sequence[torch.Tensor], syn_grads: Sequence[torch.Tensor], metric: str = "ours"
) -> torch.Tensor:
    """Distance between two lists of per-parameter gradients (same order and shapes) by ``metric``."""
    if len(real_grads) != len(syn_grads):
        raise ValueError(f"{len(real_grads)} real gradients but {len(syn_grads)} synthetic ones")
    if metric == "ours":
        total = torch.zeros((), dtype=syn_grads[0].dtype, device=syn_grads[0].device)
        for gr, gs in zip(real_grads, syn_grads):
            total = total + layerwise_distance(gr, gs)
        return total
    real_vec = torch.cat([g.reshape(-1) for g in real_grads])
    syn_vec = torch.cat([g.reshape(-1) for g in syn_grads])
    if metric == "mse":
        return ((syn_vec - real_vec) ** 2).sum()
    if metric == "cos":
        return _cosine_gap(real_vec, syn_vec)
    raise ValueError(f"unknown gradient distance {metric!r}; valid: {', '.join(DISTANCES)}")


def stacked_gradient_distance(
    real_grads: Sequence[torch.Tensor], syn_grads: Sequence[torch.Tensor], metric: str = "ours"
) -> torch.Tensor:
    """The sum over ``i`` of :func:`gradient_distance` of ``[g[i] for g in real_grads]`` and ``[g[i] for g in
    syn_grads]``: N pairs of per-parameter gradients at once, every tensor stacked ``[N, ...]`` (row ``i``: the
    gradient of network or class ``i``)."""
    if len(real_grads) != len(syn_grads):
        raise ValueError(f"{len(real_grads)} real gradients but {len(syn_grads)} synthetic ones")
    for real, syn in zip(real_grads, syn_grads):
        if real.shape != syn.shape or real.dim() < 1:
            raise ValueError(f"stacked gradient shapes differ or have no stack dimension: {tuple(real.shape)} vs "
                             f"{tuple(syn.shape)}")
    if metric == "ours":
        total = torch.zeros((), dtype=syn_grads[0].dtype, device=syn_grads[0].device)
        for real, syn in zip(real_grads, syn_grads):
            if real.dim() <= 2:  # each row's tensor has one dimension or none: nothing, as in layerwise_distance
                continue
            rows = real.shape[0] * real.shape[1]
            total = total + _cosine_gap(real.reshape(rows, -1), syn.reshape(rows, -1)).sum()
        return total
    real_vec = torch.cat([g.reshape(g.shape[0], -1) for g in real_grads], dim=1)
    syn_vec = torch.cat([g.reshape(g.shape[0], -1) for g in syn_grads], dim=1)
    if metric == "mse":
        return ((syn_vec - real_vec) ** 2).sum()
    if metric == "cos":
        return _cosine_gap(real_vec, syn_vec).sum()
    raise ValueError(f"unknown gradient distance {metric!r}; valid: {', '.join(DISTANCES)}")


def outer_inner_loops(ipc: int) -> tuple[int, int]:
    """(outer, inner) loop counts for ``ipc`` images per class.

    The paper's values for ipc 1, 10, 20, 30, 40 and 50; any other ipc takes the values of the
    nearest listed ipc at or below it (2..9 -> those of 1, 11..19 -> those of 10, ..., above 50 ->
    those of 50).
    """
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    return PAPER_LOOPS[max(k for k in PAPER_LOOPS if k <= ipc)]


def batch_norm_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``net`` (empty for the instance-norm ConvNet)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def freeze_batch_norm(net: nn.Module, real: torch.Tensor) -> None:
    """Set every BatchNorm layer's running statistics to those of ``real`` and put it in eval mode.

    The paper's remedy for tiny synthetic batches: the statistics come from a real batch of all
    classes and stay fixed while gradients are matched. Here they are exactly that batch's
    statistics (cumulative average over one batch) rather than one momentum update of the previous
    ones. The rest of the network keeps its mode; ``net.train()`` undoes the freeze.
    """
    layers = batch_norm_layers(net)
    if not layers:
        return
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        m.train()
    net(real)
    for m, momentum in zip(layers, saved):
        m.momentum = momentum
        m.eval()
