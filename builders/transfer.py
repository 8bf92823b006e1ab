"""Host-to-GPU copies that do not make the host wait for the GPU.

A copy from ordinary (pageable) host memory to a CUDA device waits for the GPU: the CUDA runtime
synchronises the stream before such a copy starts, whatever ``non_blocking`` says (CUDA Runtime API,
"API synchronization behavior": "For transfers from pageable host memory to device memory, a stream
sync is performed before the copy is initiated"). A training step whose batch positions or
augmentation parameters are drawn on the host and copied over therefore cannot prepare the next step
while the GPU runs this one. Staged in pinned (page-locked) memory first, the copy is queued and the
host goes on; PyTorch's caching host allocator keeps the pinned block alive until the copy has run.

Meant for the small tensors a step draws on the host (positions, parameters, a fresh network's
weights); a large tensor copied once (a dataset) gains nothing from the extra host-side copy.
:data:`PIN_HOST_COPIES` (True) is the switch benchmarks turn off to measure what the pinning saves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PIN_HOST_COPIES", "module_to_device", "to_device"]

#: Stage host tensors in pinned memory before copying them to a GPU (benchmarks set it False to compare).
PIN_HOST_COPIES: bool = True


def _pins(tensor: Tensor, device: torch.device) -> bool:
    """Whether a copy of ``tensor`` to ``device`` goes through pinned memory."""
    return PIN_HOST_COPIES and device.type == "cuda" and tensor.device.type == "cpu"


def to_device(tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``tensor.to(device, dtype)``, queued without waiting for the GPU's earlier work when ``tensor`` is on
    the host and ``device`` is a GPU; ``tensor`` itself when it is already there with that dtype."""
    device = torch.device(device)
    if dtype is not None and tensor.dtype != dtype and tensor.device.type == "cpu":
        tensor = tensor.to(dtype)  # converted on the host: the (small) tensor crosses once, in its final dtype
    if _pins(tensor, device):
        # pin_memory keeps a slice's strides, gaps included (a batch's columns of train_together's orders), and
        # such a copy to the GPU goes through a pageable contiguous temporary: the wait this module avoids
        if not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.preserve_format)  # dense: gaps closed, a dense layout kept
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


def module_to_device(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)`` (in place; returns ``module``) with its host parameters and buffers staged in
    pinned memory first, as :func:`to_device` does: a fresh network's weights, drawn on the host, reach the GPU
    without the host waiting for the GPU's queued work. Tied parameters stay tied."""
    device = torch.device(device)
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if _pins(tensor, device):
                tensor.data = tensor.data.pin_memory()  # the same Parameter object, now page-locked
    return module.to(device, non_blocking=True)
