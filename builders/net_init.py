"""Weight initialisation schemes other than PyTorch's defaults (a leaf: imports torch only).

``xavier``: the Dataset Distillation reference's ``init_weights`` (SsnL/dataset-distillation,
``networks/utils.py``, with its defaults ``--init xavier --init_param 1``): every convolution and linear
layer gets Xavier-normal weights (gain 1: ``N(0, 2 / (fan_in + fan_out))``) and zero biases; every
normalisation layer with affine parameters gets weight 1 and bias 0.
``default``: leave PyTorch's initialisation (Kaiming-uniform for convolutions and linear layers).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NET_INITS", "init_network_"]

NET_INITS: tuple[str, ...] = ("default", "xavier")


@torch.no_grad()
def init_network_(net: nn.Module, scheme: str, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialise ``net`` in place with ``scheme`` (see the module docstring); returns it. Draws come
    from ``generator`` (a CPU generator; the global RNG when None)."""
    if scheme not in NET_INITS:
        raise ValueError(f"unknown network init {scheme!r}; valid: {', '.join(NET_INITS)}")
    if scheme == "default":
        return net
    for module in net.modules():
        kind = type(module).__name__
        if kind.startswith("Conv") or isinstance(module, nn.Linear):
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            weight = module.weight
            receptive = weight[0][0].numel() if weight.dim() > 2 else 1
            std = (2.0 / (weight.shape[1] * receptive + weight.shape[0] * receptive)) ** 0.5
            # Drawn on the CPU (a CPU generator serves every device), then copied.
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        elif "Norm" in kind:
            if getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return net
