"""N same-shaped ConvNets as one wide network: activations ``[B, N*C, H, W]``, grouped convolutions.

Network ``i`` owns channels ``[i*C, (i+1)*C)`` of every feature map. Each layer of the papers'
ConvNet acts on its own network's channels alone in the wide form:

- a convolution is one ``conv2d`` with ``groups = N`` (times its own groups), the N weights stacked
  along the output channels;
- instance norm (``GroupNorm(C, C)``) and group norm (``GroupNorm(G, C)``) are ``GroupNorm(N*G, N*C)``:
  the same statistics over the same channels; layer norm over ``[C, H, W]`` is ``GroupNorm(N, N*C)``
  followed by each network's elementwise affine;
- activations and 2x2 pooling act per channel and are unchanged;
- the linear head is one batched matmul of each network's flattened features with its own weights.

So one step of N networks dispatches about as many operators as one network's, which is what a
launch-bound GPU pays for. Parameters are stacked ``[N, ...]`` tensors (the layout of
``torch.func.stack_module_state``); plain autograd gives their gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from builders.networks import ConvNet

__all__ = ["WideConvNet", "widens", "widen_inputs"]

_PER_CHANNEL = (nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, nn.AvgPool2d, nn.MaxPool2d)


def widens(net: nn.Module) -> bool:
    """True when ``net`` is a ConvNet the wide form covers: any width, depth, activation and pooling,
    instance / group / layer / no norm (BatchNorm, with its running statistics, is not covered)."""
    if type(net) is not ConvNet or any(True for _ in net.buffers()):
        return False
    for layer in net.features:
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                return False
        elif isinstance(layer, nn.LayerNorm):
            if len(layer.normalized_shape) != 3:
                return False
        elif not isinstance(layer, (nn.GroupNorm, *_PER_CHANNEL)):
            return False
    return True


def widen_inputs(x: Tensor) -> Tensor:
    """Each network's own batch ``[N, B, C, H, W]`` as the wide network's input ``[B, N*C, H, W]``."""
    n, b, c, h, w = x.shape
    return x.transpose(0, 1).reshape(b, n * c, h, w)


class WideConvNet:
    """The ConvNets ``nets`` (same shapes, :func:`widens`) as one network over stacked parameters.

    ``params`` maps each parameter name of the ConvNet to a leaf tensor holding the N networks'
    values (a copy, in the wide layout: a feature layer's ``[N*C, ...]``, the head's weight
    ``[N, features, classes]`` and bias ``[N, 1, classes]``; :meth:`write_back` copies them into
    the networks). Example::

        wide = WideConvNet(nets)
        logits = wide(widen_inputs(torch.stack(batches)))  # [N, B, num_classes]
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        if not nets or not all(widens(net) for net in nets):
            raise ValueError("WideConvNet: every network must be a ConvNet without BatchNorm (see widens)")
        self.template: ConvNet = nets[0]  # type: ignore[assignment]
        self.count = len(nets)
        named = [dict(net.named_parameters()) for net in nets]
        self.params: dict[str, Tensor] = {  # kept in the layout the wide forward reads (no views per step)
            name: _to_wide(name, torch.stack([p[name].detach() for p in named])).requires_grad_(True)
            for name in named[0]
        }

    def parameters(self) -> list[Tensor]:
        """The stacked leaf tensors, for an optimiser (SGD acts elementwise: the layout does not matter)."""
        return list(self.params.values())

    def __call__(self, x: Tensor) -> Tensor:
        """Logits ``[N, B, num_classes]`` of the wide input ``x`` ``[B, N*C, H, W]``."""
        n, p = self.count, self.params
        for i, layer in enumerate(self.template.features):
            weight, bias = p.get(f"features.{i}.weight"), p.get(f"features.{i}.bias")
            if isinstance(layer, nn.Conv2d):
                assert weight is not None
                x = F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups * n)
            elif isinstance(layer, nn.GroupNorm):
                x = F.group_norm(x, layer.num_groups * n, weight, bias, layer.eps)
            elif isinstance(layer, nn.LayerNorm):
                x = F.group_norm(x, n, eps=layer.eps)
                if weight is not None:
                    x = x * weight
                if bias is not None:
                    x = x + bias
            else:  # per-channel activation or pooling
                x = layer(x)
        features = x.reshape(x.shape[0], n, -1).transpose(0, 1)  # [N, B, C*h*w], ConvNet's flatten order
        return torch.baddbmm(p["classifier.bias"], features, p["classifier.weight"])

    @torch.no_grad()
    def write_back(self, nets: Sequence[nn.Module]) -> None:
        """Copy network ``i``'s parameters into ``nets[i]``."""
        for i, net in enumerate(nets):
            for name, param in net.named_parameters():
                param.copy_(_from_wide(name, self.params[name], self.count)[i])


def _to_wide(name: str, stacked: Tensor) -> Tensor:
    """A stacked ``[N, ...]`` parameter in the wide layout: features' along channels, the head's for baddbmm."""
    if name == "classifier.weight":
        return stacked.transpose(1, 2).contiguous()  # [N, features, classes]
    if name == "classifier.bias":
        return stacked.unsqueeze(1)  # [N, 1, classes]
    return stacked.flatten(0, 1).contiguous()  # [N*C, ...]


def _from_wide(name: str, wide: Tensor, count: int) -> Tensor:
    """The inverse of :func:`_to_wide`: ``[N, ...]`` as the networks hold it."""
    if name == "classifier.weight":
        return wide.transpose(1, 2)
    if name == "classifier.bias":
        return wide.squeeze(1)
    return wide.unflatten(0, (count, -1))
