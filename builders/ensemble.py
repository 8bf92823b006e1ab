"""Many same-shaped networks trained together: stacked parameters, one step for all.

Evaluation runs, random baselines and architecture-search proxies train many networks of one shape on
small sets. :func:`train_together` stacks their parameters and takes each SGD step for all of them at
once (one optimiser over the stacked tensors: SGD acts elementwise, so each network gets its own
update). Every network keeps its own generator, so its batch order and augmentation draws are those it would get
trained alone with :func:`builders.evaluate.train_network`, and it follows the same trajectory up to
float rounding.

Two forms of the step (:func:`together_mode` says which a network gets):

- ``"wide"``: ConvNets (any width, depth, activation, pooling; instance, group, layer or no norm) run as
  ONE wide network (:mod:`builders.wide_convnet`: grouped convolutions over ``[B, N*C, H, W]``) with
  plain autograd, so a step of N networks dispatches about as many operators as one network's step
  (``train_together(..., wide_form=...)`` picks one of :data:`builders.wide_convnet.FORMS`: the same maths
  laid out otherwise, for measuring which is fastest on a GPU);
- ``"vmap"``: any other network: ``vmap`` of the gradient of ``functional_call`` over the stacked
  parameters.

Either way the N networks' augmentation is one pass of fixed operators
(:meth:`builders.augment.Augmenter.apply_packed`): each network draws its per-sample parameters from its own
generator, the draws are packed into one tensor on the host, and every family runs on all images, each
image getting its own. The GPU work of a step is one function of device tensors (:func:`make_device_step`),
with no host synchronisation, so it can be captured in a CUDA graph. On GPUs, where small networks leave the
device idle between kernel launches, this is the point; on a small CPU it is not faster (both cores are
already busy with one network), so :func:`use_together` turns it on for CUDA only.

Networks with BatchNorm are refused unless they are ConvNets (``ConvNetBN``), whose wide form keeps each
network's running statistics apart and updates them as training alone does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.profiler import record_function

from builders.augment import Augmenter
from builders.graphed_step import GraphedStep
from builders.networks import uses_batch_statistics
from builders.train_settings import TrainSettings
from builders.transfer import to_device
from builders.wide_convnet import WideConvNet, check_form, widens

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: What a GPU allocation failure says when it does not come as ``torch.OutOfMemoryError``: cuDNN's or cuBLAS's
#: workspace, or the driver at a kernel launch ("CUDA error: out of memory").
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def ran_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the GPU running out of memory: ``torch.OutOfMemoryError`` (the caching allocator's),
    or a RuntimeError from cuDNN, cuBLAS or the driver saying so. Training many networks at once falls back to
    one by one on these."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_MESSAGES)


def use_together(device: torch.device, nets_per_call: int) -> bool:
    """The default: train together on CUDA when there is more than one network."""
    return device.type == "cuda" and nets_per_call > 1


def can_train_together(net: nn.Module, settings: TrainSettings) -> bool:
    """Whether networks like ``net`` can be trained together under ``settings``: no BatchNorm outside the
    ConvNet, no replayed per-step learning rates, and no augmentation or DSA's (whose draws pack into one
    pass)."""
    return _refusal(net, settings) is None


def _refusal(net: nn.Module, settings: TrainSettings) -> str | None:
    """Why networks like ``net`` cannot be trained together under ``settings`` (None: they can)."""
    if settings.step_lrs is not None:
        return "replaying learned per-step lrs is not supported; use train_network"
    if settings.augmenter is not None and not isinstance(settings.augmenter, Augmenter):
        return (f"{settings.augmenter!r} is not DSA's Augmenter (its draws cannot be packed for one pass over "
                "the N networks); train these networks with train_network")
    if uses_batch_statistics(net) and not widens(net):  # the wide ConvNet keeps each network's statistics apart
        return ("networks with BatchNorm other than the ConvNet update running statistics in place under vmap; "
                "train them one by one with train_network")
    return None


def together_mode(net: nn.Module) -> str:
    """The step :func:`train_together` takes for networks like ``net``: ``"wide"`` or ``"vmap"``."""
    return "wide" if widens(net) else "vmap"


def _check(nets: Sequence[nn.Module], generators: Sequence[torch.Generator], settings: TrainSettings) -> None:
    if not nets or len(nets) != len(generators):
        raise ValueError(f"train_together: {len(nets)} networks need as many generators, got {len(generators)}")
    shapes = [[(k, tuple(v.shape)) for k, v in net.state_dict().items()] for net in nets]
    if any(s != shapes[0] for s in shapes[1:]) or any(type(n) is not type(nets[0]) for n in nets):
        raise ValueError("train_together: the networks must have the same class and parameter shapes")
    if any(repr(n) != repr(nets[0]) for n in nets):  # e.g. ConvNet vs ConvNetAS: same shapes, other layers
        raise ValueError("train_together: the networks must have the same layers (one architecture)")
    refusal = _refusal(nets[0], settings)  # the networks share one architecture (checked above)
    if refusal is not None:
        raise ValueError(f"train_together: {refusal}")


def train_together(
    nets: Sequence[nn.Module],
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    generators: Sequence[torch.Generator],
    loss_fn: LossFn,
    on_epoch: Callable[[], Any] | None = None,
    *,
    wide_form: str = "grouped",
    wide_compile: bool = False,
    on_epoch_end: Callable[[int, torch.Tensor], Any] | None = None,
) -> list[nn.Module]:
    """Train every ``nets[i]`` in place with ``generators[i]``, as ``train_network`` would alone; returns them.

    The networks must share class and parameter shapes and have no BatchNorm outside a ConvNet; ``images`` and
    ``targets`` are shared (same device as the networks); ``loss_fn(logits, targets)`` is the training
    loss of one network's batch (``builders.evaluate.label_loss`` for the evaluation protocol; a mean
    over rows, as that one is, is taken in one call for all networks, any other loss is vmapped).
    ``on_epoch`` is called after each epoch. ``on_epoch_end(epoch, correct)``, when given, is called after
    each epoch (1-based) with the networks holding their parameters of that moment and ``correct`` (CPU int64
    [N]) counting, per network, the epoch's training rows whose logits (before that step's update, on the
    augmented images) put the target class first; ``targets`` must then be class indices. It costs one
    host synchronisation per epoch. :func:`together_mode` says which step runs. ``wide_form`` is the form of
    the wide step (``builders.wide_convnet.FORMS``: ``"grouped"``, ``"channels_last"`` or ``"split"``; the
    same maths, for choosing the fastest by measurement); an unknown name is refused (``ValueError``)
    whichever step runs, and a valid one is ignored by the vmap step, which has no wide network.
    ``wide_compile``: the wide network's forward and backward go through ``torch.compile`` (compiled at the
    first step, about 40 s on a 2-core CPU; inductor fuses each norm, activation and pooling; the same maths up to
    float rounding); a compilation that fails warns and the step runs uncompiled. Off by default: on an H100
    five ConvNets trained 4.41x faster than one after another compiled (2.60x uncompiled), but the first call
    took 16.6 s, repaid only after about 6,000 steps of one batch shape in one process
    (``benchmarks/results/ensemble_forms_5xConvNet_cuda_2026-11-26_2.json``).
    Example::

        nets = [build_network("ConvNet", 1, 10, (28, 28), seed=s) for s in seeds]
        train_together(nets, images, labels, TrainSettings(epochs=300), [Generator().manual_seed(s) for s in seeds],
                       label_loss)
    """
    _check(nets, generators, settings)
    if on_epoch_end is not None and targets.dtype != torch.int64:
        raise ValueError("train_together: on_epoch_end counts correct rows, which needs class-index targets "
                         f"(int64), got {targets.dtype}")
    check_form(wide_form)
    step = (_WideStep(nets, loss_fn, wide_form, wide_compile) if together_mode(nets[0]) == "wide"
            else _VmapStep(nets, loss_fn))
    opt = torch.optim.SGD(step.leaves, lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    n, augmenter, device = images.shape[0], settings.augmenter, images.device
    correct = torch.zeros(len(nets), dtype=torch.int64, device=device) if on_epoch_end is not None else None
    # on a GPU the step is captured once as a CUDA graph and replayed: one launch instead of hundreds
    device_step = GraphedStep(make_device_step(step, opt, images, targets, augmenter, correct),
                              enabled=device.type == "cuda")
    for net in nets:
        net.train()
    for epoch in range(settings.epochs):
        if settings.decays_at(epoch):
            for group in opt.param_groups:
                group["lr"] = settings.lr * 0.1
            device_step.invalidate()  # a captured step holds the learning rate it was captured with
        orders = torch.stack([torch.randperm(n, generator=g) for g in generators])  # CPU, each network its own
        for start in range(0, n, settings.batch):
            idx = orders[:, start : start + settings.batch]  # [N, B]: each network's own batch
            inputs = [idx]
            if augmenter is not None:  # each network's own draw from its own generator, in train_network's order
                inputs.append(augmenter.pack([augmenter.sample(g, idx.shape[1]) for g in generators]))
            device_step(*(to_device(t, device) for t in inputs))  # queued: the host goes on to the next step
        if on_epoch is not None:
            on_epoch()
        if on_epoch_end is not None:
            assert correct is not None
            step.write_back(nets)
            counts = correct.to("cpu", copy=True)  # a copy: the counter is zeroed next (on a CPU .cpu() is itself)
            correct.zero_()
            on_epoch_end(epoch + 1, counts)
    step.write_back(nets)
    return list(nets)


DeviceStep = Callable[..., None]  # (idx) or (idx, packed): device tensors only
#: The label of :func:`make_device_step`'s work in a ``torch.profiler`` trace.
DEVICE_STEP = "train_together.device_step"


def make_device_step(step: "_WideStep | _VmapStep", opt: torch.optim.Optimizer, images: torch.Tensor,
                     targets: torch.Tensor, augmenter: Augmenter | None,
                     correct: torch.Tensor | None = None) -> DeviceStep:
    """The GPU work of one training step of the N networks, from device tensors only:
    ``device_step(idx, packed)`` with ``idx`` [N, B] (each network's batch, indices into ``images``) and
    ``packed`` [N*B, PACK_WIDTH] (:meth:`Augmenter.pack` of the N draws; left out without augmentation), both
    on ``images``' device, gathers the batches, augments them, and takes the SGD step. With ``correct`` (int64
    [N] on that device), each network's rows whose logits put the (class-index) target first are added to it.

    One fixed sequence of operators for a given batch size, with no host synchronisation (after the first
    call of a wide step, which checks whether the loss is a mean over rows): fit for capture in a CUDA graph.
    Everything host-side (batch orders, draws, packing, the learning-rate drop) is the caller's.
    """
    def device_step(idx: torch.Tensor, packed: torch.Tensor | None = None) -> None:
        with record_function(DEVICE_STEP):  # a profiler's label for the step's device work
            x = images[idx]  # [N, B, C, H, W]
            if packed is not None:
                x = augmenter.apply_packed(x.flatten(0, 1), packed).view(x.shape)  # type: ignore[union-attr]
            opt.zero_grad(set_to_none=True)
            y = targets[idx]
            logits = step.backward(x, y)  # [N, B, classes], detached
            if correct is not None:
                correct.add_((logits.argmax(-1) == y).sum(-1))
            opt.step()

    return device_step


class _WideStep:
    """ConvNets as one wide network; the summed loss of the N networks, backward by autograd."""

    def __init__(self, nets: Sequence[nn.Module], loss_fn: LossFn, form: str = "grouped",
                 compiled: bool = False) -> None:
        self.wide = WideConvNet(nets, form, compiled)
        self.leaves = self.wide.parameters()
        self.loss_fn, self.count = loss_fn, len(nets)
        self.losses = vmap(loss_fn)
        self.row_mean: bool | None = None  # is loss_fn a mean over its rows? decided on the first batch
        self.write_back = self.wide.write_back

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Set every leaf's ``.grad`` for the batches ``x`` [N, B, C, H, W], targets ``y`` [N, B, ...]; returns
        the logits [N, B, classes] (detached)."""
        logits = self.wide(self.wide.inputs(x))  # [N, B, classes]
        if self.row_mean is None:
            self.row_mean = self._is_row_mean(logits, y)
        if self.row_mean:  # the N networks' losses summed = N x the mean over all N*B rows: one call, no vmap
            loss = self.loss_fn(logits.flatten(0, 1), y.flatten(0, 1)) * self.count
        else:
            loss = self.losses(logits, y).sum()
        loss.backward()
        return logits.detach()

    @torch.no_grad()
    def _is_row_mean(self, logits: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether ``loss_fn`` over the N batches joined is the mean of its N values (as for a mean over
        rows, like ``label_loss``); the vmapped loss (several times the host time) serves any other."""
        each = self.losses(logits, y)
        joined = self.loss_fn(logits.flatten(0, 1), y.flatten(0, 1))
        return bool(torch.isclose(joined, each.mean(), rtol=1e-5, atol=1e-7))


class _VmapStep:
    """Any same-shaped networks: ``vmap`` of the per-network gradient over the stacked parameters."""

    def __init__(self, nets: Sequence[nn.Module], loss_fn: LossFn) -> None:
        params, self.buffers = stack_module_state(list(nets))
        self.params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
        self.leaves = list(self.params.values())
        base = nets[0]

        def loss_of(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            logits = functional_call(base, (p, b), (x,))
            return loss_fn(logits, y), logits.detach()

        self.grads = vmap(grad(loss_of, has_aux=True))

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Set every leaf's ``.grad`` for the batches ``x`` [N, B, ...], targets ``y`` [N, B, ...]; returns the
        logits [N, B, classes] (detached)."""
        grads, logits = self.grads(self.params, self.buffers, x, y)
        for leaf, name in zip(self.leaves, self.params):
            leaf.grad = grads[name]
        return logits

    @torch.no_grad()
    def write_back(self, nets: Sequence[nn.Module]) -> None:
        """Copy network ``i``'s stacked parameters into ``nets[i]``."""
        for i, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(self.params[name][i])
