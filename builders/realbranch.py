"""The real branch of distribution matching: per-class mean embeddings of real batches, no gradient
(and, compiled, its synthetic branch: :func:`embed_with_gradient`).

The real images only enter the loss through each class's mean embedding, so for a network without
batch statistics (every sample normalised on its own) each class batch can go through the network on
its own, in chunks of :data:`CHUNK` images whose embedding sums add up to the class mean: the
activations of one chunk are all that is alive at a time. On a GPU, where many small passes cost more
in kernel launches than in arithmetic, the class batches are concatenated and sent through in passes
of up to :data:`GPU_CHUNK` images (per-sample norms make this the same maths). ``ConvNet`` family
networks take a faster route with the same arithmetic: in-place activations (nothing needs the
pre-activation values without a gradient) and, on CPUs, 2x2 average pooling as a sum of four strided
views (the pooling kernel is the slow part of the network after the convolutions there).
A network with BatchNorm must see the whole concatenated batch, as the papers' code does;
:func:`class_mean_embeddings` refuses it.

``precision="bf16-real"`` runs the real branch under bfloat16 autocast (CPU or CUDA); the synthetic
branch, which carries the gradient, always stays in float32.

``compiled=True`` sends a ``ConvNet``'s passes through ``torch.compile`` (inductor fuses norm,
activation and pooling). On a CPU in float32, per-class passes of a ConvNet whose layers
:func:`builders.winograd.plan` accepts (3x3 convolutions, 2x2 pooling: every ConvNet variant without
BatchNorm) go through :func:`builders.winograd.embed_chwn` instead, compiled: Winograd convolutions
with 4x fewer multiply-adds in the wide layers, in passes of :data:`WINOGRAD_CHUNK` images. The
compiled function takes the network's weights as arguments, so the fresh network DM draws every
iteration reuses the compiled code: it compiles once per process for each distinct pass size (with
DM's fixed ``batch_real``, one or two), not once per network. Other networks,
and ConvNets holding a layer not listed in :func:`_functional_layers`, run the uncompiled route
(silently here: :func:`compilable` tells the caller).

Gradient matching (DC, DSA) has a real branch too: each class batch's gradient of the network's
cross-entropy with respect to its parameters, a fixed target (:func:`real_class_gradient`, its loss
:func:`class_loss`), and the training of its network between matching steps (:func:`classifier_loss`, any
labels). Compiled, they take the same routes, the backward pass compiled with the forward: on a CPU in float32
the Winograd one, whose backward is again products in the Winograd domain (4x fewer multiply-adds in the wide
layers). On a CPU the real gradient is summed over passes of :data:`GRADIENT_PASS` images, as the real branch of
distribution matching is chunked: one pass's activations alive at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from builders import winograd
from builders.compiling import call_compiled, compile_static
from builders.networks import ConvNet, is_avg_pool_2x2, mixes_samples, uses_batch_statistics

PRECISIONS = ("fp32", "bf16-real")
CHUNK = 64  # real images per forward pass on a CPU: bounds activation memory; the class mean is unchanged
# compiled CPU passes (value chosen here): fused norm/activation/pooling keep fewer activations alive. ConvNet
# 28x28 real branch: 256 took 0.75x the CPU time of 64 in a scratch run under heavy load, but within 4% of
# 64 and 128 in the recorded one (benchmarks/results/dm_compiled_chunk_cpu_2026-11-26.json); kept at 256,
# which every recorded end-to-end figure used
COMPILED_CHUNK = 256
# compiled Winograd passes on a CPU (value chosen here): the real branch alone, 10 classes x 256 28x28 images through
# ConvNet, took a median 6.46 / 6.07 / 7.21 CPU-s in passes of 16 / 32 / 64 images (uncompiled: 11.64; compiled
# direct route: 9.80; benchmarks/results/dm_compiled_chunk_cpu_2026-11-26_2.json)
WINOGRAD_CHUNK = 32
#: real images per pass of a gradient matching real gradient on a CPU (:func:`real_class_gradient`; value chosen
#: here). One class's gradient on 256 28x28 images through ConvNet, median of 2 interleaved rounds x 4, CPU-s and peak
#: RSS above the process's before it, in passes of 256 / 64 / 32: uncompiled 3.12 / 3.28 / 2.53 s, 550 / 196 / 118
#: MiB; compiled (Winograd) 2.12 / 1.72 / 1.78 s, 538 / 83 / 46 MiB
#: (benchmarks/results/real_gradient_passes_cpu_2026-11-26.json)
GRADIENT_PASS = 32
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
    if x.device.type == "cpu" and is_avg_pool_2x2(layer):
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


Layer = tuple[Any, ...]  # (kind, constant arguments...): hashable, so dynamo guards on it as a constant


def _functional_layers(net: nn.Module) -> tuple[tuple[Layer, ...], list[tuple[torch.Tensor | None, ...]]] | None:
    """A ``ConvNet``'s feature layers as (constant description, weight tensors) pairs; None if not expressible."""
    if type(net) is not ConvNet:
        return None
    spec: list[Layer] = []
    weights: list[tuple[torch.Tensor | None, ...]] = []
    for layer in net.features:
        kind = type(layer)
        if kind is nn.Conv2d and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple):
            spec.append(("conv", layer.stride, layer.padding, layer.dilation, layer.groups))
            weights.append((layer.weight, layer.bias))
        elif kind is nn.GroupNorm:
            spec.append(("group_norm", layer.num_groups, layer.eps))
            weights.append((layer.weight, layer.bias))
        elif kind is nn.LayerNorm:
            spec.append(("layer_norm", tuple(layer.normalized_shape), layer.eps))
            weights.append((layer.weight, layer.bias))
        elif kind in (nn.ReLU, nn.Sigmoid, nn.SiLU):
            spec.append(({nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}[kind],))
            weights.append(())
        elif kind is nn.LeakyReLU:
            spec.append(("leaky_relu", layer.negative_slope))
            weights.append(())
        elif kind is nn.AvgPool2d and layer.divisor_override is None:
            spec.append(("avg_pool", layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                         layer.count_include_pad))
            weights.append(())
        elif kind is nn.MaxPool2d and not layer.return_indices:
            spec.append(("max_pool", layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode))
            weights.append(())
        else:
            return None
    return tuple(spec), weights


def compilable(net: nn.Module) -> bool:
    """True when ``class_mean_embeddings(net, ..., compiled=True)`` takes the compiled route for ``net``."""
    return _functional_layers(net) is not None and not uses_batch_statistics(net)


def _embed_from_weights(x: torch.Tensor, weights: list[tuple[torch.Tensor | None, ...]],
                        spec: tuple[Layer, ...]) -> torch.Tensor:
    """A ``ConvNet``'s ``embed(x)`` from its layer description and weight tensors (the function compiled)."""
    for (kind, *args), w in zip(spec, weights):
        if kind == "conv":
            x = F.conv2d(x, w[0], w[1], *args)
        elif kind == "group_norm":
            x = F.group_norm(x, args[0], w[0], w[1], args[1])
        elif kind == "layer_norm":
            x = F.layer_norm(x, args[0], w[0], w[1], args[1])
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "sigmoid":
            x = torch.sigmoid(x)
        elif kind == "silu":
            x = F.silu(x)
        elif kind == "leaky_relu":
            x = F.leaky_relu(x, args[0])
        elif kind == "avg_pool":
            x = F.avg_pool2d(x, *args)
        else:  # max_pool
            x = F.max_pool2d(x, *args)
    return x.flatten(1)


@functools.cache
def _compiled_embed(device_type: str) -> Callable[..., torch.Tensor]:
    """:func:`_embed_from_weights` compiled for inputs on ``device_type`` (:func:`compile_static`; created on
    first use)."""
    return compile_static(_embed_from_weights, device_type)


def _compiled_layers(net: nn.Module, compiled: bool
                     ) -> tuple[tuple[Layer, ...], list[tuple[torch.Tensor | None, ...]]] | None:
    """``net``'s layer description for a compiled route, or None when ``compiled`` is off or ``net`` is not
    :func:`compilable`."""
    return _functional_layers(net) if compiled and not uses_batch_statistics(net) else None


@functools.cache
def _compiled_winograd() -> Callable[..., torch.Tensor]:
    """:func:`builders.winograd.embed_chwn` compiled for the CPU, its only route (:func:`compile_static`; created
    on first use)."""
    return compile_static(winograd.embed_chwn, "cpu")


def _embedder(net: nn.Module, compiled: bool, cpu_fp32_classes: bool = False
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``x -> net.embed(x)`` without a gradient (compiled when asked and ``net`` allows it), and its CPU pass size.

    ``cpu_fp32_classes``: the passes are per-class float32 passes on a CPU, where the compiled route is
    the Winograd one when :func:`builders.winograd.plan` accepts ``net``.
    """
    layers = _compiled_layers(net, compiled)
    if layers is None:
        return functools.partial(embed_no_grad, net), CHUNK
    spec, weights = layers
    planned = winograd.plan(spec, weights) if cpu_fp32_classes else None
    if planned is not None:
        steps, prepared = planned
        transforms = (winograd.INPUT_TRANSFORM, winograd.OUTPUT_TRANSFORM)
        function, args, chunk = _compiled_winograd(), (prepared, steps, transforms), WINOGRAD_CHUNK
    else:
        function, args, chunk = _compiled_embed(next(net.parameters()).device.type), (weights, spec), COMPILED_CHUNK

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return call_compiled(function, x, *args)
    return embed, chunk


def embed_with_gradient(net: nn.Module, x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """``net.embed(x)`` with autograd (DM's synthetic branch); through ``torch.compile`` when ``compiled`` and
    :func:`compilable` (the direct route: the network's own convolutions, inductor fusing norm, activation
    and pooling and their backward; not Winograd, whose rounding would reach the images' gradient)."""
    layers = _compiled_layers(net, compiled)
    if layers is None:
        return net.embed(x)
    spec, weights = layers
    return call_compiled(_compiled_embed(x.device.type), x, weights, spec)


def class_mean_embeddings(net: nn.Module, batches: Sequence[torch.Tensor], precision: str = "fp32",
                          concatenate: bool | None = None, compiled: bool = False) -> torch.Tensor:
    """``[len(batches), feature_dim]``: the mean embedding of each class batch.

    Forward passes of at most :data:`CHUNK` (compiled: :data:`COMPILED_CHUNK`, or :data:`WINOGRAD_CHUNK` on
    the Winograd route) images of one batch, or
    (``concatenate``, the default on a GPU) of up to :data:`GPU_CHUNK` images of the concatenated batches.
    ``net`` must have no batch statistics (ValueError otherwise: concatenate the batches instead).
    ``compiled``: the passes go through ``torch.compile`` where :func:`compilable` (uncompiled otherwise).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown {precision!r}; valid: {', '.join(PRECISIONS)}")
    if uses_batch_statistics(net):
        raise ValueError("a network with BatchNorm mixes the samples of a batch: its real branch must see "
                         "the concatenated batch, not one class at a time")
    if concatenate is None:  # by device: concatenated passes on a GPU, per-class chunks elsewhere
        concatenate = bool(batches) and batches[0].device.type == "cuda"
    cpu_fp32_classes = not concatenate and precision == "fp32" and bool(batches) and batches[0].device.type == "cpu"
    embed, chunk = _embedder(net, compiled, cpu_fp32_classes)
    if concatenate:
        return _concatenated_means(net, batches, precision, embed)
    means = []
    for batch in batches:
        total = None
        for part in batch.split(chunk):
            with torch.autocast(part.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-real"):
                emb = embed(part)
            part_sum = emb.float().sum(0)
            total = part_sum if total is None else total.add_(part_sum)
        means.append(total / batch.shape[0])
    return torch.stack(means)


def _concatenated_means(net: nn.Module, batches: Sequence[torch.Tensor], precision: str,
                        embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-batch mean embeddings from passes over the concatenated batches (:data:`GPU_CHUNK` images each).

    ``embed``: the no-gradient embedding to use (default :func:`embed_no_grad` of ``net``).
    """
    embed = embed or functools.partial(embed_no_grad, net)
    sizes = [batch.shape[0] for batch in batches]
    parts = []
    for part in torch.cat(list(batches)).split(GPU_CHUNK):
        with torch.autocast(part.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-real"):
            parts.append(embed(part).float())
    return group_means(torch.cat(parts), sizes)


def group_means(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``[len(sizes), ...]``: the mean of each group of consecutive ``rows`` (group ``i`` has ``sizes[i]`` rows).

    Groups of one size are averaged in one reduction (on a GPU, one launch instead of one per group).
    """
    if sizes and all(size == sizes[0] for size in sizes) and sizes[0] > 0 and sum(sizes) == rows.shape[0]:
        return rows.reshape(len(sizes), sizes[0], *rows.shape[1:]).mean(1)
    return torch.stack([part.mean(0) for part in rows.split(list(sizes))])


def _classifier_loss(x: torch.Tensor, weights: list[tuple[torch.Tensor | None, ...]], spec: tuple[Layer, ...],
                     classifier_weight: torch.Tensor, classifier_bias: torch.Tensor | None,
                     targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a ConvNet's logits (``classifier(embed(x))``) from its weights."""
    logits = F.linear(_embed_from_weights(x, weights, spec), classifier_weight, classifier_bias)
    return F.cross_entropy(logits, targets)


def _classifier_loss_winograd(x: torch.Tensor, prepared: list[tuple[torch.Tensor | None, ...]],
                              steps: tuple[winograd.Step, ...], transforms: tuple[torch.Tensor, torch.Tensor],
                              classifier_weight: torch.Tensor, classifier_bias: torch.Tensor | None,
                              targets: torch.Tensor) -> torch.Tensor:
    """:func:`_classifier_loss` with the embedding of :func:`builders.winograd.embed_chwn`."""
    logits = F.linear(winograd.embed_chwn(x, prepared, steps, transforms), classifier_weight, classifier_bias)
    return F.cross_entropy(logits, targets)


@functools.cache
def _compiled_classifier_loss(device_type: str) -> Callable[..., torch.Tensor]:
    """:func:`_classifier_loss` compiled for inputs on ``device_type`` (created on first use)."""
    return compile_static(_classifier_loss, device_type)


@functools.cache
def _compiled_classifier_loss_winograd() -> Callable[..., torch.Tensor]:
    """:func:`_classifier_loss_winograd` compiled for the CPU, its only route (created on first use)."""
    return compile_static(_classifier_loss_winograd, "cpu")


def class_loss(net: nn.Module, images: torch.Tensor, label: int, compiled: bool = False) -> torch.Tensor:
    """The mean cross-entropy of ``net`` on ``images``, all of class ``label``: what gradient matching
    differentiates (its real branch: the target gradient of each class); see :func:`classifier_loss`."""
    targets = torch.full((images.shape[0],), label, dtype=torch.int64, device=images.device)
    return classifier_loss(net, images, targets, compiled)


def classifier_loss(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, compiled: bool = False
                    ) -> torch.Tensor:
    """The mean cross-entropy of ``net`` on ``images`` against class indices ``targets`` (int64).

    ``compiled``: through ``torch.compile`` where :func:`compilable` (a ConvNet without batch statistics), on a
    CPU in float32 by the Winograd route when :func:`builders.winograd.plan` accepts the network, its backward
    compiled with it (so it cannot be differentiated twice); the same loss and gradients up to float rounding
    (tests: gradients within 1e-3 of their norm against a float64 computation). It compiles once per process
    for each batch shape. A failed compilation is a :class:`builders.errors.CompileError`.
    """
    layers = _compiled_layers(net, compiled)
    if layers is None:
        return F.cross_entropy(net(images), targets)
    spec, weights = layers
    classifier = net.classifier
    planned = (winograd.plan(spec, weights) if images.device.type == "cpu" and images.dtype == torch.float32
               else None)
    if planned is None:
        return call_compiled(_compiled_classifier_loss(images.device.type), images, weights, spec,
                             classifier.weight, classifier.bias, targets)
    steps, prepared = planned
    transforms = (winograd.INPUT_TRANSFORM, winograd.OUTPUT_TRANSFORM)
    return call_compiled(_compiled_classifier_loss_winograd(), images, prepared, steps, transforms,
                         classifier.weight, classifier.bias, targets)


def real_class_gradient(net: nn.Module, params: Sequence[torch.Tensor], images: torch.Tensor, label: int,
                        compiled: bool = False) -> tuple[torch.Tensor, ...]:
    """The gradient w.r.t. ``params`` of the mean cross-entropy of ``net`` on ``images``, all of class ``label``
    (:func:`class_loss`), without a graph: gradient matching's target for the class.

    On a CPU, for a network whose samples do not mix (:func:`builders.networks.mixes_samples`), it is the sum
    over passes of at most :data:`GRADIENT_PASS` images of each pass's gradient weighted by its share of the
    images: the same gradient up to float rounding, with one pass's activations alive at a time instead of the
    whole batch's. A parameter the loss does not reach gets a zero gradient.
    """
    params = list(params)
    passes = (images.split(GRADIENT_PASS) if images.device.type == "cpu" and not mixes_samples(net)
              and images.shape[0] > 0 else (images,))
    total: list[torch.Tensor] = []
    for part in passes:
        loss = class_loss(net, part, label, compiled)
        if len(passes) > 1:
            loss = loss * (part.shape[0] / images.shape[0])
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        total = [t.add_(g) for t, g in zip(total, grads)] if total else list(grads)
    return tuple(total)
