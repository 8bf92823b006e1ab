"""Many same-shaped networks trained together: stacked parameters, one vectorised step for all.

Evaluation runs, random baselines and architecture-search proxies train many networks of one shape on
small sets. :func:`train_together` stacks their parameters (``torch.func.stack_module_state``) and
takes each SGD step for all of them at once (``vmap`` of the gradient of ``functional_call``). Every
network keeps its own generator, so its batch order and augmentation draws are those it would get
trained alone with :func:`builders.evaluate.train_network`, and it follows the same trajectory up to
float rounding. On GPUs, where small networks leave the device idle between kernel launches, this is
several times faster than one network after another; on a small CPU it is not (both cores are already
busy with one network), so :func:`use_together` turns it on for CUDA only.

Networks with BatchNorm (running statistics updated in place) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from builders.networks import uses_batch_statistics
from builders.train_settings import TrainSettings

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def use_together(device: torch.device, nets_per_call: int) -> bool:
    """The default: train together on CUDA when there is more than one network."""
    return device.type == "cuda" and nets_per_call > 1


def _check(nets: Sequence[nn.Module], generators: Sequence[torch.Generator], settings: TrainSettings) -> None:
    if not nets or len(nets) != len(generators):
        raise ValueError(f"train_together: {len(nets)} networks need as many generators, got {len(generators)}")
    if settings.step_lrs is not None:
        raise ValueError("train_together: replaying learned per-step lrs is not supported; use train_network")
    shapes = [[(k, tuple(v.shape)) for k, v in net.state_dict().items()] for net in nets]
    if any(s != shapes[0] for s in shapes[1:]) or any(type(n) is not type(nets[0]) for n in nets):
        raise ValueError("train_together: the networks must have the same class and parameter shapes")
    if any(uses_batch_statistics(n) for n in nets):
        raise ValueError("train_together: networks with BatchNorm update running statistics in place; "
                         "train them one by one with train_network")


def train_together(
    nets: Sequence[nn.Module],
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    generators: Sequence[torch.Generator],
    loss_fn: LossFn,
    on_epoch: Callable[[], Any] | None = None,
) -> list[nn.Module]:
    """Train every ``nets[i]`` in place with ``generators[i]``, as ``train_network`` would alone; returns them.

    The networks must share class and parameter shapes and have no BatchNorm; ``images`` and
    ``targets`` are shared (same device as the networks); ``loss_fn(logits, targets)`` is the training
    loss (``builders.evaluate.label_loss`` for the evaluation protocol). ``on_epoch`` is called after
    each epoch. Example::

        nets = [build_network("ConvNet", 1, 10, (28, 28), seed=s) for s in seeds]
        train_together(nets, images, labels, TrainSettings(epochs=300), [Generator().manual_seed(s) for s in seeds],
                       label_loss)
    """
    _check(nets, generators, settings)
    params, buffers = stack_module_state(list(nets))
    params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
    base = nets[0]

    def loss_of(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        return loss_fn(functional_call(base, (p, b), (x,)), y)

    step_grads = vmap(grad(loss_of))
    leaves = list(params.values())
    opt = torch.optim.SGD(leaves, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    n = images.shape[0]
    for net in nets:
        net.train()
    for epoch in range(settings.epochs):
        if epoch == settings.epochs // 2 and settings.epochs > 1:
            for group in opt.param_groups:
                group["lr"] = settings.lr * 0.1
        orders = [torch.randperm(n, generator=g).to(images.device) for g in generators]
        for start in range(0, n, settings.batch):
            idx = [order[start : start + settings.batch] for order in orders]
            xs = [images[i] for i in idx]
            if settings.augmenter is not None:
                xs = [settings.augmenter(x, g) for x, g in zip(xs, generators)]
            grads = step_grads(params, buffers, torch.stack(xs), torch.stack([targets[i] for i in idx]))
            for leaf, name in zip(leaves, params):
                leaf.grad = grads[name]
            opt.step()
        if on_epoch is not None:
            on_epoch()
    with torch.no_grad():
        for i, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(params[name][i])
    return list(nets)
