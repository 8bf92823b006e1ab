"""The real branch of distribution matching: per-class mean embeddings of real batches, no gradient.

The real images only enter the loss through each class's mean embedding, so for a network without
batch statistics (every sample normalised on its own) each class batch can go through the network on
its own, in chunks of :data:`CHUNK` images whose embedding sums add up to the class mean: the
activations of one chunk are all that is alive at a time. On a GPU, where many small passes cost more
in kernel launches than in arithmetic, the class batches are concatenated and sent through in passes of
up to :data:`GPU_CHUNK` images (per-sample norms make this the same maths). ``ConvNet`` family networks take a faster
route with the same arithmetic: in-place activations (nothing needs the pre-activation values without
a gradient) and 2x2 average pooling as a sum of four strided views (the pooling kernel is the slow
part of the network after the convolutions on CPUs).
A network with BatchNorm must see the whole concatenated batch, as the papers' code does;
:func:`class_mean_embeddings` refuses it.

``precision="bf16-real"`` runs the real branch under bfloat16 autocast (CPU or CUDA); the synthetic
branch, which carries the gradient, always stays in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from builders.networks import ConvNet, uses_batch_statistics

PRECISIONS = ("fp32", "bf16-real")
CHUNK = 64  # real images per forward pass on a CPU: bounds activation memory; the class mean is unchanged
GPU_CHUNK = 4096  # on a GPU, all classes' batches go through together (small passes are launch-bound)


def _avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``AvgPool2d(2, 2)`` as the sum of four strided views (faster on CPUs than the pooling kernel)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    out = x[..., 0::2, 0::2] + x[..., 0::2, 1::2]
    return out.add_(x[..., 1::2, 0::2]).add_(x[..., 1::2, 1::2]).mul_(0.25)


def _fast_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` without a gradient: ReLU in place, 2x2 average pooling by strided views on a CPU (on a
    GPU the pooling kernel is faster: the views' in-place adds were a fifth of a DM iteration's GPU time)."""
    if type(layer) is nn.ReLU:
        return x.relu_()
    if x.device.type == "cpu" and type(layer) is nn.AvgPool2d and layer.kernel_size in (2, (2, 2)) and layer.stride in (2, (2, 2)) \
            and layer.padding in (0, (0, 0)) and not layer.ceil_mode:
        return _avg_pool_2x2(x)
    return layer(x)


def _convnet_embed_no_grad(net: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """``net.embed(x)`` with in-place activations and view-based pooling (no gradient)."""
    for layer in net.features:
        x = _fast_layer(layer, x)
    return x.flatten(1)


def embed_no_grad(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net.embed(x)`` without a gradient, by the fastest route known for ``net``."""
    with torch.no_grad():
        if type(net) is ConvNet:
            return _convnet_embed_no_grad(net, x)
        return net.embed(x)


def class_mean_embeddings(net: nn.Module, batches: Sequence[torch.Tensor], precision: str = "fp32",
                          concatenate: bool | None = None) -> torch.Tensor:
    """``[len(batches), feature_dim]``: the mean embedding of each class batch.

    Forward passes of at most :data:`CHUNK` images of one batch, or (``concatenate``, the default on a
    GPU) of up to :data:`GPU_CHUNK` images of the concatenated batches. ``net`` must have no batch statistics (ValueError otherwise: concatenate the batches instead).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown {precision!r}; valid: {', '.join(PRECISIONS)}")
    if uses_batch_statistics(net):
        raise ValueError("a network with BatchNorm mixes the samples of a batch: its real branch must see "
                         "the concatenated batch, not one class at a time")
    if concatenate is None:  # by device: concatenated passes on a GPU, per-class chunks elsewhere
        concatenate = bool(batches) and batches[0].device.type == "cuda"
    if concatenate:
        return _concatenated_means(net, batches, precision)
    means = []
    for batch in batches:
        total = None
        for part in batch.split(CHUNK):
            with torch.autocast(part.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-real"):
                emb = embed_no_grad(net, part)
            part_sum = emb.float().sum(0)
            total = part_sum if total is None else total.add_(part_sum)
        means.append(total / batch.shape[0])
    return torch.stack(means)


def _concatenated_means(net: nn.Module, batches: Sequence[torch.Tensor], precision: str) -> torch.Tensor:
    """Per-batch mean embeddings from passes over the concatenated batches (:data:`GPU_CHUNK` images each)."""
    sizes = [batch.shape[0] for batch in batches]
    parts = []
    for part in torch.cat(list(batches)).split(GPU_CHUNK):
        with torch.autocast(part.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-real"):
            parts.append(embed_no_grad(net, part).float())
    return torch.stack([emb.mean(0) for emb in torch.cat(parts).split(sizes)])
