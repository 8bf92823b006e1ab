"""Networks of the dataset-condensation papers: the ConvNet family and the cross-architecture set.

Architectures follow the public reference of Zhao et al. (DC / DSA / DM), re-written here:

- ``ConvNet``: ``depth`` blocks of conv3x3 -> norm -> activation -> pooling (2x2, stride 2), then a
  linear classifier on the flattened feature map. Defaults: width 128, depth 3, instance norm (as
  ``GroupNorm(C, C, affine=True)``), ReLU, average pooling. Variants by name change one setting.
- ``MLP``, ``LeNet``, ``AlexNet``/``AlexNetBN``, ``VGG11``/``VGG11BN``, ``ResNet18``/``ResNet18BN``
  and ``ResNet18BN_AP`` (strided convolutions replaced by stride 1 + 2x2 average pooling).
- ``AlexCifarNet``: Dataset Distillation's own small CIFAR AlexNet, with that reference's
  Xavier-normal / zero-bias initialisation.

Every network is a :class:`ClassifierNet`: ``embed(x)`` gives the ``[B, feature_dim]`` features in
front of the final linear layer and ``forward(x) == classifier(embed(x))``. Feature sizes are
computed from ``image_size`` by arithmetic, so any size the sources use (28, 32, 64) and others work.

For 28x28 single-channel inputs (MNIST family) the first layer gets two extra pixels of padding, as
in the reference, so that the feature maps behave as for 32x32 inputs (ConvNet, AlexNet and VGG see
32x32 after the first convolution; LeNet keeps 28x28).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from builders.net_init import init_network_

__all__ = [
    "AlexCifarNet",
    "AlexNet",
    "ClassifierNet",
    "ConvNet",
    "LeNet",
    "MLP",
    "ResNet18",
    "VGG11",
    "available_networks",
    "build_network",
    "is_avg_pool_2x2",
    "uses_batch_statistics",
    "mixes_samples",
]

Size = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# small helpers


def _as_size(image_size: int | tuple[int, int] | list[int]) -> Size:
    """``32`` -> ``(32, 32)``; a pair is checked and returned as a tuple."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or an (height, width) pair, got {image_size!r}")
    return size  # type: ignore[return-value]


def _conv_out(size: Size, kernel: int, stride: int = 1, padding: int = 0) -> Size:
    """Spatial size after a square convolution (or pooling) with the given kernel, stride and padding."""
    out = tuple((n + 2 * padding - kernel) // stride + 1 for n in size)
    if min(out) < 1:
        raise ValueError(f"image too small for this network: a {size[0]}x{size[1]} map cannot shrink further")
    return out  # type: ignore[return-value]


def _halve(size: Size) -> Size:
    """Spatial size after 2x2 pooling with stride 2."""
    return _conv_out(size, 2, 2)


def _mnist_padding(channels: int, size: Size) -> int:
    """Extra first-layer padding: 2 for 28x28 single-channel inputs (lifts them to 32x32), else 0."""
    return 2 if channels == 1 and size == (28, 28) else 0


def _instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm as in the reference: one group per channel, with a learned affine."""
    return nn.GroupNorm(channels, channels, affine=True)


def _norm2d(kind: str, channels: int, size: Size) -> nn.Module | None:
    """The normalisation layer named ``kind`` for a ``channels x size`` feature map (None for 'none')."""
    if kind == "instancenorm":
        return _instance_norm(channels)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.LayerNorm([channels, size[0], size[1]], elementwise_affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; valid: batchnorm, groupnorm, instancenorm, layernorm, none")


def _activation(kind: str) -> nn.Module:
    """The activation named ``kind`` (never in place, so autograd and torch.func stay simple)."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    if kind == "swish":
        return nn.SiLU()  # x * sigmoid(x)
    raise ValueError(f"unknown activation {kind!r}; valid: leakyrelu, relu, sigmoid, swish")


def _pooling(kind: str) -> nn.Module | None:
    """The 2x2, stride-2 pooling named ``kind`` (None for 'none')."""
    if kind == "avgpooling":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if kind == "maxpooling":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    if kind == "none":
        return None
    raise ValueError(f"unknown pooling {kind!r}; valid: avgpooling, maxpooling, none")


# --------------------------------------------------------------------------------------------------
# the common interface


class ClassifierNet(nn.Module):
    """A feature extractor followed by one linear layer: ``forward(x) = classifier(embed(x))``."""

    feature_dim: int
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features in front of the final classifier, shape ``[B, feature_dim]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape ``[B, num_classes]``."""
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------------------------------
# ConvNet


class ConvNet(ClassifierNet):
    """The papers' ConvNet: ``depth`` x (conv3x3 -> norm -> activation -> pool), then a linear layer."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int | tuple[int, int],
        *,
        width: int = 128,
        depth: int = 3,
        act: str = "relu",
        norm: str = "instancenorm",
        pooling: str = "avgpooling",
    ) -> None:
        super().__init__()
        size = _as_size(image_size)
        layers: list[nn.Module] = []
        in_channels = channels
        for d in range(depth):
            pad = 1 + (_mnist_padding(channels, size) if d == 0 else 0)
            layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=pad))
            size = _conv_out(size, 3, 1, pad)
            norm_layer = _norm2d(norm, width, size)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(_activation(act))
            pool = _pooling(pooling)
            if pool is not None:
                layers.append(pool)
                size = _halve(size)
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.feature_shape: tuple[int, int, int] = (width, size[0], size[1])
        self.feature_dim = width * size[0] * size[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened output of the last block."""
        return self.features(x).flatten(1)


# --------------------------------------------------------------------------------------------------
# MLP, LeNet, AlexNet


class MLP(ClassifierNet):
    """Two hidden ReLU layers of 128 units on the flattened image."""

    def __init__(self, channels: int, num_classes: int, image_size: int | tuple[int, int], hidden: int = 128) -> None:
        super().__init__()
        h, w = _as_size(image_size)
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * h * w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Second hidden layer's activations."""
        return self.features(x)


class LeNet(ClassifierNet):
    """LeNet-5: two conv5x5 + ReLU + max-pool stages, then 120- and 84-unit ReLU layers."""

    def __init__(self, channels: int, num_classes: int, image_size: int | tuple[int, int]) -> None:
        super().__init__()
        size = _as_size(image_size)
        pad = _mnist_padding(channels, size)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
        )
        size = _halve(_conv_out(_halve(_conv_out(size, 5, 1, pad)), 5))
        self.head = nn.Sequential(
            nn.Linear(16 * size[0] * size[1], 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the 84-unit layer."""
        return self.head(self.features(x))


class AlexNet(ClassifierNet):
    """The papers' small AlexNet: five convolutions (128-192-256-192-192), three max-pools."""

    def __init__(
        self, channels: int, num_classes: int, image_size: int | tuple[int, int], *, batchnorm: bool = False
    ) -> None:
        super().__init__()
        size = _as_size(image_size)
        pad = 2 + _mnist_padding(channels, size)
        # (out_channels, kernel, padding, pool after)
        plan = [(128, 5, pad, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True)]
        layers: list[nn.Module] = []
        in_channels = channels
        for out_channels, kernel, padding, pool in plan:
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=padding))
            size = _conv_out(size, kernel, 1, padding)
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU())
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size = _halve(size)
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_channels * size[0] * size[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened output of the last max-pool."""
        return self.features(x).flatten(1)


class AlexCifarNet(ClassifierNet):
    """Dataset Distillation's own small AlexNet for CIFAR (SsnL/dataset-distillation,
    ``networks/networks.py`` ``AlexCifarNet``), with that reference's initialisation built in.

    conv5x5(64, pad 2) -> ReLU -> maxpool(3, stride 2, pad 1) -> LRN(4, alpha 0.001/9, beta 0.75, k 1)
    -> conv5x5(64, pad 2) -> ReLU -> LRN -> maxpool(3, 2, pad 1) -> linear 384 -> ReLU -> linear 192 ->
    ReLU -> linear ``num_classes`` (4096 flattened features for 32x32 inputs). Weights Xavier-normal,
    biases zero (:func:`builders.net_init.init_network_` ``xavier``, the reference's ``init_weights``).
    """

    def __init__(self, channels: int, num_classes: int, image_size: int | tuple[int, int]) -> None:
        super().__init__()
        size = _as_size(image_size)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 64, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
            nn.Conv2d(64, 64, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        for _ in range(2):
            size = _conv_out(size, 3, 2, 1)
        self.hidden = nn.Sequential(nn.Linear(64 * size[0] * size[1], 384), nn.ReLU(), nn.Linear(384, 192), nn.ReLU())
        self.feature_dim = 192
        self.classifier = nn.Linear(192, num_classes)
        init_network_(self, "xavier")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 192 features in front of the last linear layer."""
        return self.hidden(self.features(x).flatten(1))


# --------------------------------------------------------------------------------------------------
# VGG


_VGG11_PLAN: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(ClassifierNet):
    """VGG-11 with conv3x3 -> norm -> ReLU units (instance norm by default, batch norm for VGG11BN)."""

    def __init__(
        self, channels: int, num_classes: int, image_size: int | tuple[int, int], *, norm: str = "instancenorm"
    ) -> None:
        super().__init__()
        size = _as_size(image_size)
        first_pad = 1 + _mnist_padding(channels, size)
        layers: list[nn.Module] = []
        in_channels = channels
        for i, item in enumerate(_VGG11_PLAN):
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size = _halve(size)
                continue
            assert isinstance(item, int)
            pad = first_pad if i == 0 else 1
            layers.append(nn.Conv2d(in_channels, item, kernel_size=3, padding=pad))
            size = _conv_out(size, 3, 1, pad)
            norm_layer = _norm2d(norm, item, size)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(nn.ReLU())
            in_channels = item
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_channels * size[0] * size[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened output of the last max-pool (512 features at 32x32)."""
        return self.features(x).flatten(1)


# --------------------------------------------------------------------------------------------------
# ResNet-18


def _resnet_norm(kind: str, channels: int) -> nn.Module:
    """Instance norm (GroupNorm(C, C)) or batch norm for the ResNets."""
    if kind == "instancenorm":
        return _instance_norm(channels)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown ResNet norm {kind!r}; valid: batchnorm, instancenorm")


class _BasicBlock(nn.Module):
    """Two conv3x3 + norm layers with an identity or 1x1-projection shortcut.

    With ``avgpool_downsample`` (the "_AP" variant) every convolution has stride 1 and downsampling
    is a 2x2 average pool: after the first unit on the main path, after the 1x1 conv on the shortcut.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, avgpool_downsample: bool) -> None:
        super().__init__()
        conv_stride = 1 if avgpool_downsample else stride
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.norm1 = _resnet_norm(norm, planes)
        self.act = nn.ReLU()
        self.down: nn.Module = nn.AvgPool2d(2, 2) if avgpool_downsample and stride != 1 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = _resnet_norm(norm, planes)
        shortcut: list[nn.Module] = []
        if stride != 1 or in_planes != planes:
            shortcut.append(nn.Conv2d(in_planes, planes, kernel_size=1, stride=conv_stride, bias=False))
            if avgpool_downsample and stride != 1:
                shortcut.append(nn.AvgPool2d(2, 2))
            shortcut.append(_resnet_norm(norm, planes))
        self.shortcut = nn.Sequential(*shortcut)  # empty Sequential is the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(main(x) + shortcut(x))."""
        out = self.down(self.act(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))

    @staticmethod
    def out_size(size: Size, stride: int, avgpool_downsample: bool) -> Size:
        """Spatial size after the block."""
        if stride == 1:
            return size
        if avgpool_downsample:
            return _halve(size)
        return _conv_out(size, 3, stride, 1)


class ResNet18(ClassifierNet):
    """ResNet-18 for small images (conv3x3 stem, no stem pooling).

    ``ResNet18`` / ``ResNet18BN``: strided convolutions, then global average pooling -> 512 features
    (the reference's 4x4 pooling at 28 and 32 pixels, generalised to any size).
    ``ResNet18BN_AP`` (``avgpool_downsample=True``): stride-1 convolutions and 2x2 average pooling,
    no global pooling; the classifier sees the flattened 512 x h x w map.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int | tuple[int, int],
        *,
        norm: str = "instancenorm",
        avgpool_downsample: bool = False,
    ) -> None:
        super().__init__()
        size = _as_size(image_size)
        self.avgpool_downsample = avgpool_downsample
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
            _resnet_norm(norm, 64),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks = [
                _BasicBlock(in_planes, planes, stride, norm, avgpool_downsample),
                _BasicBlock(planes, planes, 1, norm, avgpool_downsample),
            ]
            size = _BasicBlock.out_size(size, stride, avgpool_downsample)
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.feature_dim = in_planes * size[0] * size[1] if avgpool_downsample else in_planes
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (or, for the _AP variant, flattened) output of the last stage."""
        out = self.layers(self.stem(x))
        if self.avgpool_downsample:
            return out.flatten(1)
        return out.mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------------
# the registry


Factory = Callable[[int, int, Size], ClassifierNet]


def _convnet(**settings: object) -> Factory:
    return functools.partial(ConvNet, **settings)  # type: ignore[arg-type]


_REGISTRY: dict[str, Factory] = {
    "ConvNet": _convnet(),
    **{f"ConvNetD{d}": _convnet(depth=d) for d in (1, 2, 3, 4, 5)},
    **{f"ConvNetW{w}": _convnet(width=w) for w in (32, 64, 128, 256)},
    "ConvNetAS": _convnet(act="sigmoid"),
    "ConvNetAR": _convnet(act="relu"),
    "ConvNetAL": _convnet(act="leakyrelu"),
    "ConvNetASwish": _convnet(act="swish"),
    "ConvNetNN": _convnet(norm="none"),
    "ConvNetBN": _convnet(norm="batchnorm"),
    "ConvNetLN": _convnet(norm="layernorm"),
    "ConvNetIN": _convnet(norm="instancenorm"),
    "ConvNetGN": _convnet(norm="groupnorm"),
    "ConvNetNP": _convnet(pooling="none"),
    "ConvNetMP": _convnet(pooling="maxpooling"),
    "ConvNetAP": _convnet(pooling="avgpooling"),
    "MLP": MLP,
    "LeNet": LeNet,
    "AlexNet": AlexNet,
    "AlexNetBN": functools.partial(AlexNet, batchnorm=True),
    "AlexCifarNet": AlexCifarNet,
    "VGG11": VGG11,
    "VGG11BN": functools.partial(VGG11, norm="batchnorm"),
    "ResNet18": ResNet18,
    "ResNet18BN": functools.partial(ResNet18, norm="batchnorm"),
    "ResNet18BN_AP": functools.partial(ResNet18, norm="batchnorm", avgpool_downsample=True),
}


def available_networks() -> list[str]:
    """Names accepted by :func:`build_network`, the ConvNet family first."""
    return list(_REGISTRY)


def build_network(
    name: str,
    channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    *,
    seed: int | None = None,
) -> nn.Module:
    """A freshly initialised network ``name`` for ``channels x image_size`` inputs and ``num_classes``.

    With ``seed`` the initialisation is deterministic (built on the CPU from that seed alone) and the
    global RNG state is left untouched; without it the global RNG is used. Move the result to a device
    with ``.to(device)``. Unknown names raise ``ValueError`` listing the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; valid: {', '.join(_REGISTRY)}")
    if channels < 1 or num_classes < 1:
        raise ValueError(f"channels and num_classes must be >= 1, got {channels} and {num_classes}")
    size = _as_size(image_size)
    factory = _REGISTRY[name]
    if seed is None:
        return factory(channels, num_classes, size)
    # Only the CPU generator is forked and seeded (torch.manual_seed would also reseed CUDA's), and
    # construction is pinned to the CPU so a given seed yields the same weights on every machine.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(int(seed))
        return factory(channels, num_classes, size)


def uses_batch_statistics(net: nn.Module) -> bool:
    """True when ``net`` holds a BatchNorm layer, whose training-mode output mixes the samples of a batch.

    Such nets must see one class per forward pass during distribution matching.
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def mixes_samples(net: nn.Module) -> bool:
    """True when ``net``'s output for one sample depends on the other samples of its batch as it is now: a
    BatchNorm layer in training mode (frozen ones, in eval mode, normalise each sample on its own)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def is_avg_pool_2x2(layer: nn.Module) -> bool:
    """Whether ``layer`` is plain 2x2, stride-2 average pooling (``nn.AvgPool2d`` itself, no subclass; no padding,
    floor mode, the usual divisor): what ConvNet's ``avgpooling`` builds, and what faster equivalents of it
    compute."""
    return (type(layer) is nn.AvgPool2d and _pair(layer.kernel_size) == (2, 2) and _pair(layer.stride) == (2, 2)
            and _pair(layer.padding) == (0, 0) and not layer.ceil_mode and layer.divisor_override is None)


def _pair(value: int | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    """A pooling argument as a tuple (an int ``k`` as ``(k, k)``), None kept."""
    return (value, value) if isinstance(value, int) else None if value is None else tuple(value)
