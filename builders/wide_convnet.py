"""N same-shaped ConvNets as one wide network: activations ``[B, N*C, H, W]``, grouped convolutions.

Network ``i`` owns channels ``[i*C, (i+1)*C)`` of every feature map. Each layer of the papers'
ConvNet acts on its own network's channels alone in the wide form:

- a convolution is one ``conv2d`` with ``groups = N`` (times its own groups), the N weights stacked
  along the output channels; except, off the CPU, where each group would read one input channel (a
  one-channel image's first layer), which the GPU runs through a slow depthwise kernel (18 % of the wide
  step in ``benchmarks/results/ensemble_profile_forms_5xConvNet_cuda_2026-11-26.json``): there N dense
  calls whose outputs are concatenated along the channels;
- instance norm (``GroupNorm(C, C)``) and group norm (``GroupNorm(G, C)``) are ``GroupNorm(N*G, N*C)``:
  the same statistics over the same channels; layer norm over ``[C, H, W]`` is ``GroupNorm(N, N*C)``
  followed by each network's elementwise affine;
- activations and 2x2 pooling act per channel and are unchanged (off the CPU, 2x2 average pooling
  through :class:`AvgPool2x2`: the same values with a backward that is faster on GPUs);
- the linear head is one batched matmul of each network's flattened features with its own weights.

So one step of N networks dispatches about as many operators as one network's, which is what a
launch-bound GPU pays for. Parameters are stacked ``[N, ...]`` tensors (the layout of
``torch.func.stack_module_state``); plain autograd gives their gradients.

The same maths runs in one of :data:`FORMS` (``WideConvNet(nets, form=...)``), to be picked by measuring
on the GPU (``benchmarks/ensemble_speed.py --forms``):

- ``"grouped"`` (the default): as above, activations ``[B, N*C, H, W]`` in the default (NCHW) layout;
- ``"channels_last"``: the grouped form with the input and the convolution weights in
  ``torch.channels_last`` (NHWC), where cuDNN's grouped convolutions may use tensor-core kernels
  (PyTorch's CUDA ``group_norm`` reads NCHW, so a norm may copy its input out of NHWC and the next
  convolution back: a profile tells what that costs);
- ``"split"``: network-major activations ``[N*B, C, H, W]`` (network ``i``'s batch is rows
  ``[i*B, (i+1)*B)``): each convolution is N dense ``conv2d`` calls, one per network on its own rows;
  the norms' statistics are per image, so they run once over all rows without affine, followed by each
  network's own affine.

Every form holds the parameters in the same stacked layout (:func:`_to_wide`), so the optimiser and
:meth:`WideConvNet.write_back` do not depend on the form.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from builders.compiling import call_compiled, compile_static
from builders.errors import CompileError
from builders.networks import ConvNet, is_avg_pool_2x2

__all__ = ["FORMS", "AvgPool2x2", "WideConvNet", "check_form", "widens", "widen_inputs"]

#: The forms of the wide network (module docstring), the default first.
FORMS = ("grouped", "channels_last", "split")

_PER_CHANNEL = (nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, nn.AvgPool2d, nn.MaxPool2d)


def widens(net: nn.Module) -> bool:
    """True when ``net`` is a ConvNet the wide form covers: any width, depth, activation and pooling,
    instance / group / layer / batch / no norm (BatchNorm with affine weights, running statistics and a
    fixed momentum, as ``nn.BatchNorm2d``'s defaults: each channel's statistics are its own network's)."""
    if type(net) is not ConvNet:
        return False
    for layer in net.features:
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                return False
        elif isinstance(layer, nn.BatchNorm2d):
            if not (layer.affine and layer.track_running_stats and layer.momentum is not None):
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


def check_form(form: str) -> str:
    """``form`` when it is one of :data:`FORMS`; a ``ValueError`` naming the valid ones otherwise."""
    if form not in FORMS:
        raise ValueError(f"unknown wide form {form!r}; choose one of {', '.join(map(repr, FORMS))}")
    return form


class WideConvNet:
    """The ConvNets ``nets`` (same shapes, :func:`widens`) as one network over stacked parameters.

    ``params`` maps each parameter name of the ConvNet to a leaf tensor holding the N networks'
    values (a copy, in the wide layout: a feature layer's ``[N*C, ...]``, the head's weight
    ``[N, features, classes]`` and bias ``[N, 1, classes]``; :meth:`write_back` copies them into
    the networks). ``form`` is one of :data:`FORMS` (module docstring): the same logits, computed
    another way; :meth:`inputs` lays the N batches out as the form reads them. Example::

        wide = WideConvNet(nets, form="split")
        logits = wide(wide.inputs(torch.stack(batches)))  # [N, B, num_classes]
    """

    def __init__(self, nets: Sequence[nn.Module], form: str = "grouped", compiled: bool = False) -> None:
        if not nets or not all(widens(net) for net in nets):
            raise ValueError("WideConvNet: every network must be a ConvNet the wide form covers (see widens)")
        self.form = check_form(form)
        self.template: ConvNet = nets[0]  # type: ignore[assignment]
        self.count = len(nets)
        named = [dict(net.named_parameters()) for net in nets]
        self.params: dict[str, Tensor] = {  # kept in the layout the wide forward reads (no views per step)
            name: _to_wide(name, torch.stack([p[name].detach() for p in named]), form).requires_grad_(True)
            for name in named[0]
        }
        # compiled: the forward (and its backward) through torch.compile, created here, compiled at the first call
        device = self.template.classifier.weight.device
        self._compiled: Callable[[Tensor], Tensor] | None = compile_static(self._logits, device) if compiled else None
        buffers = [dict(net.named_buffers()) for net in nets]
        self.buffers: dict[str, Tensor] = {  # BatchNorm's running statistics, [N*C]; updated in place by training
            name: torch.stack([b[name].detach() for b in buffers]).reshape(-1) for name in buffers[0]
        }

    def parameters(self) -> list[Tensor]:
        """The stacked leaf tensors, for an optimiser (SGD acts elementwise: the layout does not matter)."""
        return list(self.params.values())

    def per_network(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``tensors`` laid out as :attr:`params` and in their order (their gradients, say) as ``[N, ...]``:
        row ``i`` is network ``i``'s, shaped as the ConvNet's own parameter (views where the layout allows)."""
        if len(tensors) != len(self.params):
            raise ValueError(f"per_network: {len(self.params)} parameters, got {len(tensors)} tensors")
        return [_from_wide(name, t, self.count) for name, t in zip(self.params, tensors)]

    def inputs(self, x: Tensor) -> Tensor:
        """Each network's own batch ``[N, B, C, H, W]`` laid out as this form's input: ``[B, N*C, H, W]``
        (:func:`widen_inputs`; channels-last strides for ``"channels_last"``) or ``[N*B, C, H, W]`` (``"split"``)."""
        if self.form == "split":
            return x.flatten(0, 1)
        wide = widen_inputs(x)
        return wide.contiguous(memory_format=torch.channels_last) if self.form == "channels_last" else wide

    @property
    def compiled(self) -> bool:
        """Whether the forward goes through ``torch.compile`` (asked for, and not given up after a failure)."""
        return self._compiled is not None

    def __call__(self, x: Tensor) -> Tensor:
        """Logits ``[N, B, num_classes]`` of ``x`` laid out by :meth:`inputs`; through ``torch.compile`` when
        built ``compiled=True``: a compilation that fails warns once and this network runs uncompiled from then on."""
        if self._compiled is not None:
            try:
                return call_compiled(self._compiled, x, setting="wide_compile", turn_off="pass wide_compile=False")
            except CompileError as error:
                self._compiled = None
                warnings.warn(f"{error} The networks train on uncompiled.", stacklevel=2)
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        """The forward pass (uncompiled)."""
        n, p = self.count, self.params
        for i, layer in enumerate(self.template.features):
            weight, bias = p.get(f"features.{i}.weight"), p.get(f"features.{i}.bias")
            if isinstance(layer, nn.Conv2d):
                assert weight is not None
                x = self._conv(x, layer, weight, bias)
            elif isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
                x = self._norm(x, layer, weight, bias)
            elif isinstance(layer, nn.BatchNorm2d):
                x = self._batch_norm(x, layer, f"features.{i}", weight, bias)
            elif is_avg_pool_2x2(layer) and _off_cpu(x):  # on CPUs avg_pool2d's own backward is the faster
                x = AvgPool2x2.apply(x)
            else:  # per-channel activation or pooling
                x = layer(x)
        if self.form == "split":  # features [N, B, C*h*w], in ConvNet's flatten order
            features = x.reshape(n, x.shape[0] // n, -1)
        else:
            features = x.reshape(x.shape[0], n, -1).transpose(0, 1)
        return torch.baddbmm(p["classifier.bias"], features, p["classifier.weight"])

    def _conv(self, x: Tensor, layer: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The N networks' convolution: one grouped call, or one call per network (``"split"``: on its rows; off
        the CPU, a layer reading one input channel a group: on its channels, concatenated)."""
        args = (layer.stride, layer.padding, layer.dilation)
        biases = [None] * self.count if bias is None else bias.chunk(self.count)
        if self.form == "split":
            return torch.cat([F.conv2d(rows, w, b, *args, layer.groups)
                              for rows, w, b in zip(x.chunk(self.count), weight.chunk(self.count), biases)])
        if layer.in_channels == layer.groups and _off_cpu(x):  # one input channel a group: depthwise on GPUs
            return torch.cat([F.conv2d(channels, w, b, *args, layer.groups) for channels, w, b
                              in zip(x.chunk(self.count, dim=1), weight.chunk(self.count), biases)], dim=1)
        return F.conv2d(x, weight, bias, *args, layer.groups * self.count)

    def _norm(self, x: Tensor, layer: nn.GroupNorm | nn.LayerNorm, weight: Tensor | None,
              bias: Tensor | None) -> Tensor:
        """Group, instance or layer norm (over ``[C, H, W]``: one group) of each image, then each network's affine."""
        groups = layer.num_groups if isinstance(layer, nn.GroupNorm) else 1
        if self.form == "split":  # statistics per image: one call over all rows; the affine per network
            n = self.count
            x = F.group_norm(x, groups, eps=layer.eps)
            each = [None if t is None else _per_network(t, n) for t in (weight, bias)]
            return _affine(x.view(n, -1, *x.shape[1:]), *each).view(x.shape)
        if isinstance(layer, nn.GroupNorm):
            return F.group_norm(x, groups * self.count, weight, bias, layer.eps)
        return _affine(F.group_norm(x, self.count, eps=layer.eps), weight, bias)

    def _batch_norm(self, x: Tensor, layer: nn.BatchNorm2d, prefix: str, weight: Tensor | None,
                    bias: Tensor | None) -> Tensor:
        """Training-mode BatchNorm: each channel normalised by its batch statistics, its running statistics
        updated in place (``num_batches_tracked`` counted), as ``nn.BatchNorm2d`` does for each network; in
        the split form one call per network on its own rows and its slice of the statistics."""
        mean, var = self.buffers[f"{prefix}.running_mean"], self.buffers[f"{prefix}.running_var"]
        with torch.no_grad():
            self.buffers[f"{prefix}.num_batches_tracked"].add_(1)
        args = (True, layer.momentum, layer.eps)
        if self.form != "split":
            return F.batch_norm(x, mean, var, weight, bias, *args)
        n = self.count
        return torch.cat([F.batch_norm(rows, m, v, w, b, *args) for rows, m, v, w, b
                          in zip(x.chunk(n), mean.chunk(n), var.chunk(n), weight.chunk(n), bias.chunk(n))])

    @torch.no_grad()
    def write_back(self, nets: Sequence[nn.Module]) -> None:
        """Copy network ``i``'s parameters and BatchNorm statistics into ``nets[i]``."""
        for i, net in enumerate(nets):
            for name, param in net.named_parameters():
                param.copy_(_from_wide(name, self.params[name], self.count)[i])
            for name, buffer in net.named_buffers():
                buffer.copy_(self.buffers[name].view(self.count, -1)[i].view(buffer.shape))


def _off_cpu(x: Tensor) -> bool:
    """Whether ``x`` lives off the CPU, where the GPU kernels that :class:`AvgPool2x2` and the one-channel first
    layer's dense calls avoid would run. On a CPU both replacements were slower (5 ConvNets' wide step, 100
    one-channel 28x28 images, forward and backward: 4.55 s against 3.70 s with neither, interleaved), so
    there the plain calls stay."""
    return x.device.type != "cpu"


class AvgPool2x2(torch.autograd.Function):
    """2x2, stride-2 average pooling (``F.avg_pool2d(x, 2)``) whose backward spreads each output's gradient
    over its four inputs by nearest upsampling: the same values (each a quarter, exactly) as
    ``avg_pool2d``'s own backward, which the GPU profile of the wide step found reading ~15x below the
    memory bandwidth (``benchmarks/results/ensemble_profile_forms_5xConvNet_cuda_2026-11-26.json``: 19 %
    of the step). An odd last row or column, which the pooling drops, gets a zero gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        ctx.size = inputs[0].shape[-2:]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        spread = F.interpolate(grad * 0.25, scale_factor=2.0, mode="nearest")
        rows, cols = ctx.size[0] - spread.shape[-2], ctx.size[1] - spread.shape[-1]
        return F.pad(spread, (0, cols, 0, rows)) if rows or cols else spread


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``x * weight + bias``, either left out when absent."""
    if weight is not None:
        x = x * weight
    if bias is not None:
        x = x + bias
    return x


def _per_network(param: Tensor, count: int) -> Tensor:
    """A norm's ``[N*C]`` or ``[N*C, H, W]`` parameter as ``[N, 1, C, 1, 1]`` or ``[N, 1, C, H, W]``: network
    ``i``'s values broadcast over its rows of a ``[N, B, C, H, W]`` view."""
    each = param.view(count, 1, -1, *param.shape[1:])
    return each.view(*each.shape, *[1] * (5 - each.dim()))


def _to_wide(name: str, stacked: Tensor, form: str = "grouped") -> Tensor:
    """A stacked ``[N, ...]`` parameter in the wide layout: features' along channels, the head's for baddbmm;
    the convolution weights of ``"channels_last"`` in that memory format (the same values and shape)."""
    if name == "classifier.weight":
        return stacked.transpose(1, 2).contiguous()  # [N, features, classes]
    if name == "classifier.bias":
        return stacked.unsqueeze(1)  # [N, 1, classes]
    wide = stacked.flatten(0, 1).contiguous()  # [N*C, ...]
    if form == "channels_last" and wide.dim() == 4:  # a convolution's [N*C_out, C_in, k, k]
        return wide.contiguous(memory_format=torch.channels_last)
    return wide


def _from_wide(name: str, wide: Tensor, count: int) -> Tensor:
    """The inverse of :func:`_to_wide`: ``[N, ...]`` as the networks hold it."""
    if name == "classifier.weight":
        return wide.transpose(1, 2)
    if name == "classifier.bias":
        return wide.squeeze(1)
    return wide.unflatten(0, (count, -1))
