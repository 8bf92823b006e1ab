"""A ConvNet's embedding without gradient on CPUs: Winograd F(4x4, 3x3) convolutions in CHWN layout.

DM's real branch is bound by the 3x3 convolutions of its 128-channel layers, which a CPU already runs
near its GEMM peak; only fewer multiplications make it faster. Winograd's F(4x4, 3x3) algorithm (Lavin
and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes each 4x4 output tile from
a 6x6 input tile with 36 products per input/output channel pair instead of 144: the convolution becomes
36 matrix products ``U[p] @ V[p]`` (``U``: the transformed weights, ``[36, C_out, C_in]``; ``V``: the
transformed input tiles, ``[36, C_in, tiles x batch]``), 4x fewer multiply-adds than direct convolution.
The tile transforms are products with the constant matrices ``kron(B^T, B^T)`` and ``kron(A^T, A^T)``.
Exact in real arithmetic; in float32 a layer's output differs from direct convolution by a few 1e-6
relative (tests compare embeddings within 1e-5).

Activations are kept as ``[channels, height, width, batch]``: tile extraction, norms, activations and
pooling then all run along the contiguous batch dimension (inductor vectorises them), and every
transform is one large matrix product. Layers with few input channels (the first) use a plain im2col
product. Written for :func:`torch.compile` (see :mod:`builders.realbranch`); run eagerly it is slower
than ``net.embed``.

The network comes as the layer description of ``builders.realbranch._functional_layers``: a tuple of
``(kind, constant arguments...)`` entries with their weight tensors; :func:`plan` accepts the ones this
module can run and prepares their weights.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

BLOCK_ROWS = 4  # output rows per product in a first layer followed by instance norm; even, so that 2x2 pooling
# windows never straddle two blocks (value chosen here: 256
# 28x28 images through ConvNet, compiled, interleaved in one process on the 2-core CPU, 2026-11-26: median 303 / 320
# / 327 ms with blocks of 4 / 8 / 32 rows; 282-316 ms against 320-328 ms with the unmerged im2col + norm steps)
WINOGRAD_MIN_CHANNELS = 16  # input channels from which a 3x3 layer uses Winograd (value chosen here: the first
# layers of the papers' ConvNets, 1 or 3 channels, have too few for the transforms to pay; the 128-channel ones do)

_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # input transform B^T, 6x6
_G = ((Fraction(1, 4), 0, 0), (Fraction(-1, 6), Fraction(-1, 6), Fraction(-1, 6)),
      (Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)), (Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)),
      (Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)), (0, 0, 1))  # weight transform G, 6x3
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))  # output transform A^T


Step = tuple[Any, ...]  # this module's layer description: (kind, constant arguments...), hashable
ACTIVATIONS = ("relu", "sigmoid", "silu", "leaky_relu")


def _activate(x: torch.Tensor, step: Step) -> torch.Tensor:
    """The activation ``step`` (one of :data:`ACTIVATIONS`, with its arguments) applied to ``x``."""
    kind = step[0]
    if kind == "relu":
        return F.relu(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "silu":
        return F.silu(x)
    return F.leaky_relu(x, step[1])


def _matrix(rows: tuple[tuple[Any, ...], ...]) -> torch.Tensor:
    """A constant matrix as a float64 tensor."""
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


def _tile_transforms() -> tuple[torch.Tensor, torch.Tensor]:
    """``kron(B^T, B^T)`` ``[36, 36]`` and ``kron(A^T, A^T)`` ``[16, 36]``, float32: tiles flattened row-major."""
    bt, at = _matrix(_BT), _matrix(_AT)
    return torch.kron(bt, bt).float(), torch.kron(at, at).float()


INPUT_TRANSFORM, OUTPUT_TRANSFORM = _tile_transforms()


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in, 3, 3]`` -> ``G w G^T`` as ``[36, C_out, C_in]`` (computed in float64; differentiable, so
    that a gradient through the Winograd weights reaches ``weight``)."""
    g = _matrix(_G).to(weight.device)
    u = torch.einsum("ia,ocab,jb->ijoc", g, weight.double(), g)
    return u.reshape(36, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def _conv_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: int) -> torch.Tensor:
    """3x3, stride-1 convolution of ``x`` ``[C, H, W, N]`` as one matrix product with its patches."""
    patches = _patches(x, pad)
    k, out_h, out_w, n = patches.shape
    y = (weight.reshape(weight.shape[0], k) @ patches.reshape(k, -1)).view(-1, out_h, out_w, n)
    return y if bias is None else y + bias.view(-1, 1, 1, 1)


def _patches(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``[C, H, W, N]`` -> its 3x3 patches ``[C x 9, H', W', N]`` (zero padding ``pad``)."""
    channels, height, width, n = x.shape
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    patches = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # [C, H', W', N, 3, 3]
    return patches.permute(0, 4, 5, 1, 2, 3).reshape(channels * 9, height + 2 * pad - 2, width + 2 * pad - 2, n)


def _conv_instance_norm_block(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor | None,
                              beta: torch.Tensor | None, pad: int, eps: float, activation: Step,
                              pool: str | None) -> torch.Tensor:
    """pool(activation(instance_norm(conv3x3(x)))) of a ``[C, H, W, N]`` map, the convolution by im2col.

    Each channel's mean and variance over the map come from the patches' means and covariance (the
    convolution is linear: ``mean = w . E[p]``, ``var = w^T Cov[p] w``; the bias cancels), so no pass
    over the convolution's output is needed for them; the output is produced :data:`BLOCK_ROWS` rows at
    a time.
    """
    patches = _patches(x, pad)  # [K, H', W', N]
    k, out_h, out_w, n = patches.shape
    w = weight.reshape(weight.shape[0], k)
    patch_mean = patches.mean(dim=(1, 2))  # [K, N]
    centred = (patches - patch_mean.view(k, 1, 1, n)).view(k, out_h * out_w, n).permute(2, 0, 1)
    covariance = torch.bmm(centred, centred.transpose(1, 2)) / (out_h * out_w)  # [N, K, K]
    var = (w.unsqueeze(2) * w.unsqueeze(1)).reshape(w.shape[0], k * k) @ covariance.reshape(n, k * k).t()
    scale = torch.rsqrt(var.clamp_min(0) + eps)  # [C, N]
    if gamma is not None:
        scale = scale * gamma.view(-1, 1)
    shift = -(w @ patch_mean) * scale
    if beta is not None:
        shift = shift + beta.view(-1, 1)
    scale, shift = scale.view(-1, 1, 1, n), shift.view(-1, 1, 1, n)
    blocks = []
    for top in range(0, out_h, BLOCK_ROWS):  # even block heights: 2x2 pooling windows never straddle blocks
        rows = min(BLOCK_ROWS, out_h - top)
        y = _activate((w @ patches[:, top:top + rows].reshape(k, -1)).view(-1, rows, out_w, n) * scale + shift,
                      activation)
        blocks.append(y if pool is None else _pool_2x2(y, pool))
    return torch.cat(blocks, dim=1)


def _conv_winograd(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, pad: int,
                   transforms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """3x3, stride-1 convolution of ``x`` ``[C, H, W, N]`` with Winograd weights ``u`` ``[36, C_out, C]``."""
    channels, height, width, n = x.shape
    out_h, out_w = height + 2 * pad - 2, width + 2 * pad - 2
    tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
    padded = F.pad(x, (0, 0, pad, pad + 4 * tiles_w - out_w, pad, pad + 4 * tiles_h - out_h))
    tiles = padded.unfold(1, 6, 4).unfold(2, 6, 4)  # [C, tiles_h, tiles_w, N, 6, 6], overlapping
    kin, kout = transforms
    v = (kin @ tiles.permute(4, 5, 0, 1, 2, 3).reshape(36, -1)).view(36, channels, -1)
    m = torch.bmm(u, v)  # [36, C_out, tiles x N]
    y = (kout @ m.view(36, -1)).view(4, 4, -1, tiles_h, tiles_w, n)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(-1, 4 * tiles_h, 4 * tiles_w, n)[:, :out_h, :out_w]
    return y if bias is None else y + bias.view(-1, 1, 1, 1)


def _group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
    """``F.group_norm`` of a ``[C, H, W, N]`` map."""
    channels, height, width, n = x.shape
    grouped = x.view(groups, channels // groups, height, width, n)
    mean = grouped.mean(dim=(1, 2, 3), keepdim=True)
    centred = grouped - mean
    var = centred.square().mean(dim=(1, 2, 3), keepdim=True)
    y = (centred * torch.rsqrt(var + eps)).view(channels, height, width, n)
    if weight is not None:
        y = y * weight.view(-1, 1, 1, 1)
    return y if bias is None else y + bias.view(-1, 1, 1, 1)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over ``[C, H, W]`` of a ``[C, H, W, N]`` map: one group, a weight per position."""
    y = _group_norm(x, 1, None, None, eps)
    if weight is not None:
        y = y * weight.unsqueeze(-1)
    return y if bias is None else y + bias.unsqueeze(-1)


def _pool_2x2(x: torch.Tensor, kind: str) -> torch.Tensor:
    """2x2, stride-2 average or max pooling of a ``[C, H, W, N]`` map (an odd last row/column dropped)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    corners = [x[:, i:h:2, j:w:2] for i in (0, 1) for j in (0, 1)]
    if kind == "avg":
        return (corners[0] + corners[1] + corners[2] + corners[3]) * 0.25
    return torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))


def _is_plain_3x3(args: tuple[Any, ...], weight: torch.Tensor) -> bool:
    """A convolution this module runs: 3x3, stride 1, no dilation, one group, equal zero padding each side."""
    stride, padding, dilation, groups = args
    return (tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and len(set(padding)) == 1)


def _is_2x2_pool(kind: str, args: tuple[Any, ...]) -> bool:
    """A pooling this module runs: kernel 2, stride 2, no padding, floor mode (and no dilation for max)."""
    kernel, stride, padding, *rest = args
    ceil_mode = rest[0] if kind == "avg_pool" else rest[1]
    dilation_ok = kind == "avg_pool" or rest[0] in (1, (1, 1))
    return (kernel in (2, (2, 2)) and stride in (2, (2, 2)) and padding in (0, (0, 0)) and not ceil_mode
            and dilation_ok)


def plan(spec: tuple[Step, ...], weights: list[tuple[torch.Tensor | None, ...]]
         ) -> tuple[tuple[Step, ...], list[tuple[torch.Tensor | None, ...]]] | None:
    """This module's description and weights for a layer description, or None if a layer is not supported.

    Convolutions with at least :data:`WINOGRAD_MIN_CHANNELS` input channels get their Winograd weights
    (one ``[36, C_out, C_in]`` product per call: call once per network, not per batch).
    """
    steps: list[Step] = []
    prepared: list[tuple[torch.Tensor | None, ...]] = []
    for (kind, *args), w in zip(spec, weights):
        if kind == "conv":
            if not _is_plain_3x3(tuple(args), w[0]):
                return None
            pad = int(args[1][0])
            if w[0].shape[1] >= WINOGRAD_MIN_CHANNELS:
                steps.append(("winograd", pad))
                prepared.append((winograd_weights(w[0]), w[1]))
            else:
                steps.append(("im2col", pad))
                prepared.append(w)
        elif kind in ("avg_pool", "max_pool"):
            if not _is_2x2_pool(kind, tuple(args)):
                return None
            steps.append(("pool", kind.split("_")[0]))
            prepared.append(())
        elif kind == "layer_norm" and len(args[0]) != 3:  # over [C, H, W] only
            return None
        elif kind in ("group_norm", "layer_norm", *ACTIVATIONS):
            steps.append((kind, *args))
            prepared.append(w)
        else:
            return None
    return _merge_instance_norm_blocks(tuple(steps), prepared)


def _merge_instance_norm_blocks(steps: tuple[Step, ...], weights: list[tuple[torch.Tensor | None, ...]]
                                ) -> tuple[tuple[Step, ...], list[tuple[torch.Tensor | None, ...]]]:
    """Each im2col convolution followed by instance norm (a group per channel) and an activation, and
    optionally a 2x2 pooling, as one ``conv_instance_norm`` step."""
    merged: list[Step] = []
    prepared: list[tuple[torch.Tensor | None, ...]] = []
    i = 0
    while i < len(steps):
        conv_w = weights[i]
        following = steps[i + 1:i + 4]
        if (steps[i][0] == "im2col" and len(following) >= 2 and following[0][0] == "group_norm"
                and following[0][1] == conv_w[0].shape[0] and following[1][0] in ACTIVATIONS):
            pool = following[2][1] if len(following) == 3 and following[2][0] == "pool" else None
            merged.append(("conv_instance_norm", steps[i][1], following[0][2], following[1], pool))
            prepared.append((conv_w[0], *weights[i + 1]))
            i += 3 if pool is None else 4
        else:
            merged.append(steps[i])
            prepared.append(weights[i])
            i += 1
    return tuple(merged), prepared


def embed_chwn(x: torch.Tensor, weights: list[tuple[torch.Tensor | None, ...]], steps: tuple[Step, ...],
               transforms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[N, C, H, W]`` images -> ``[N, feature_dim]`` embeddings, for a description from :func:`plan`.

    ``transforms``: ``(INPUT_TRANSFORM, OUTPUT_TRANSFORM)`` on ``x``'s device (an argument, so that a
    compiled copy of this function takes them as inputs rather than baking constants into its code).
    """
    x = x.permute(1, 2, 3, 0)
    for (kind, *args), w in zip(steps, weights):
        if kind == "winograd":
            x = _conv_winograd(x, w[0], w[1], args[0], transforms)
        elif kind == "im2col":
            x = _conv_im2col(x, w[0], w[1], args[0])
        elif kind == "conv_instance_norm":
            x = _conv_instance_norm_block(x, w[0], w[1], w[2], args[0], args[1], args[2], args[3])
        elif kind == "group_norm":
            x = _group_norm(x, args[0], w[0], w[1], args[1])
        elif kind == "layer_norm":
            x = _layer_norm(x, w[0], w[1], args[1])
        elif kind in ACTIVATIONS:
            x = _activate(x, (kind, *args))
        else:  # pool
            x = _pool_2x2(x, args[0])
    return x.permute(3, 0, 1, 2).flatten(1)
