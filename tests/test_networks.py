"""Tests for builders.networks: shapes at every source size, the ConvNet by hand, seeding, the API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from builders.networks import available_networks, build_network, uses_batch_statistics

SHAPES = [(1, 28), (3, 32), (3, 64)]  # (channels, image size): MNIST family, CIFAR/SVHN, Tiny ImageNet

# Expected embed width per network at 28 (single channel), 32 and 64 pixels, worked out by hand.
# ConvNet family: width * (side / 2**depth)**2, where 28x28 grey inputs behave as 32x32 (first conv
# padded by 3); no pooling keeps the full side. AlexNet: 192 x (side/8)^2. VGG11: 512 x (side/32)^2.
# ResNet18(BN): global average pool -> 512. ResNet18BN_AP: 512 x (side/8)^2 with 28 -> 14 -> 7 -> 3.
EXPECTED_FEATURES: dict[str, tuple[int, int, int]] = {
    "ConvNet": (128 * 4 * 4, 128 * 4 * 4, 128 * 8 * 8),
    "ConvNetD1": (128 * 16 * 16, 128 * 16 * 16, 128 * 32 * 32),
    "ConvNetD2": (128 * 8 * 8, 128 * 8 * 8, 128 * 16 * 16),
    "ConvNetD3": (128 * 4 * 4, 128 * 4 * 4, 128 * 8 * 8),
    "ConvNetD4": (128 * 2 * 2, 128 * 2 * 2, 128 * 4 * 4),
    "ConvNetD5": (128 * 1 * 1, 128 * 1 * 1, 128 * 2 * 2),
    "ConvNetW32": (32 * 16, 32 * 16, 32 * 64),
    "ConvNetW64": (64 * 16, 64 * 16, 64 * 64),
    "ConvNetW128": (128 * 16, 128 * 16, 128 * 64),
    "ConvNetW256": (256 * 16, 256 * 16, 256 * 64),
    "ConvNetAS": (2048, 2048, 8192),
    "ConvNetAR": (2048, 2048, 8192),
    "ConvNetAL": (2048, 2048, 8192),
    "ConvNetASwish": (2048, 2048, 8192),
    "ConvNetNN": (2048, 2048, 8192),
    "ConvNetBN": (2048, 2048, 8192),
    "ConvNetLN": (2048, 2048, 8192),
    "ConvNetIN": (2048, 2048, 8192),
    "ConvNetGN": (2048, 2048, 8192),
    "ConvNetNP": (128 * 32 * 32, 128 * 32 * 32, 128 * 64 * 64),
    "ConvNetMP": (2048, 2048, 8192),
    "ConvNetAP": (2048, 2048, 8192),
    "MLP": (128, 128, 128),
    "LeNet": (84, 84, 84),
    "AlexNet": (192 * 4 * 4, 192 * 4 * 4, 192 * 8 * 8),
    "AlexNetBN": (192 * 4 * 4, 192 * 4 * 4, 192 * 8 * 8),
    "AlexCifarNet": (192, 192, 192),  # embed: the 192 features in front of its last linear layer
    "VGG11": (512, 512, 512 * 2 * 2),
    "VGG11BN": (512, 512, 512 * 2 * 2),
    "ResNet18": (512, 512, 512),
    "ResNet18BN": (512, 512, 512),
    "ResNet18BN_AP": (512 * 3 * 3, 512 * 4 * 4, 512 * 8 * 8),
}

BATCHNORM_NETS = {"ConvNetBN", "AlexNetBN", "VGG11BN", "ResNet18BN", "ResNet18BN_AP"}



def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_registry_lists_every_name_in_the_brief() -> None:
    assert available_networks() == list(EXPECTED_FEATURES)


@pytest.mark.parametrize("name", list(EXPECTED_FEATURES))
def test_every_network_builds_for_every_source_shape(name: str) -> None:
    for (channels, side), features in zip(SHAPES, EXPECTED_FEATURES[name]):
        net = build_network(name, channels, 7, side, seed=0)
        x = torch.randn(2, channels, side, side)
        with torch.no_grad():
            emb = net.embed(x)
            logits = net(x)
        assert net.feature_dim == features, (name, side)
        assert emb.shape == (2, features), (name, side)
        assert logits.shape == (2, 7), (name, side)
        assert torch.isfinite(logits).all()
        # forward is the classifier applied to the embedding
        torch.testing.assert_close(logits, net.classifier(emb))


def test_convnet_parameter_count_for_cifar10_by_hand() -> None:
    net = build_network("ConvNet", 3, 10, 32, seed=0)
    conv1 = 3 * 128 * 3 * 3 + 128  # 3456 weights + 128 biases = 3584
    conv2 = 128 * 128 * 3 * 3 + 128  # 147456 + 128 = 147584
    conv3 = conv2  # 147584
    norms = 3 * (128 + 128)  # GroupNorm(128, 128) affine: weight + bias per channel, 3 blocks = 768
    classifier = (128 * 4 * 4) * 10 + 10  # 32 -> 16 -> 8 -> 4: 2048 features x 10 classes + 10 = 20490
    expected = conv1 + conv2 + conv3 + norms + classifier
    assert expected == 320010
    assert _n_params(net) == expected


def test_convnet_single_channel_28_behaves_as_32() -> None:
    net = build_network("ConvNet", 1, 10, (28, 28), seed=0)
    assert net.feature_dim == 2048
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(3, 3), (1, 1), (1, 1)]  # 28 + 2*3 - 2 = 32
    with torch.no_grad():
        assert net.features[:3](torch.randn(1, 1, 28, 28)).shape == (1, 128, 32, 32)
    # 1x128x9 + 128 first conv, the rest as for CIFAR-10
    assert _n_params(net) == 320010 - (3 * 128 * 9 + 128) + (1 * 128 * 9 + 128)
    # a 32x32 RGB input keeps padding 1 everywhere
    rgb = build_network("ConvNet", 3, 10, 32, seed=0)
    assert [m.padding for m in rgb.modules() if isinstance(m, nn.Conv2d)] == [(1, 1)] * 3


def test_convnet_block_order_and_variants() -> None:
    net = build_network("ConvNet", 3, 10, 32, seed=0)
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 3
    assert isinstance(net.classifier, nn.Linear) and net.classifier.in_features == 2048

    def layers(name: str) -> list[nn.Module]:
        return list(build_network(name, 3, 10, 32, seed=0).features)

    assert sum(isinstance(m, nn.Conv2d) for m in layers("ConvNetD5")) == 5
    assert all(m.out_channels == 32 for m in layers("ConvNetW32") if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, nn.Sigmoid) for m in layers("ConvNetAS")) == 3
    leaky = [m for m in layers("ConvNetAL") if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 3 and all(m.negative_slope == 0.01 for m in leaky)
    assert sum(isinstance(m, nn.SiLU) for m in layers("ConvNetASwish")) == 3
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)) for m in layers("ConvNetNN"))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers("ConvNetBN")) == 3
    ln = [m for m in layers("ConvNetLN") if isinstance(m, nn.LayerNorm)]
    assert [m.normalized_shape for m in ln] == [(128, 32, 32), (128, 16, 16), (128, 8, 8)]  # over C, H, W
    gn = [m for m in layers("ConvNetGN") if isinstance(m, nn.GroupNorm)]
    assert len(gn) == 3 and all(m.num_groups == 4 and m.num_channels == 128 for m in gn)
    assert not any(isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) for m in layers("ConvNetNP"))
    assert sum(isinstance(m, nn.MaxPool2d) for m in layers("ConvNetMP")) == 3
    assert sum(isinstance(m, nn.AvgPool2d) for m in layers("ConvNetAP")) == 3


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetIN", "VGG11", "ResNet18"])
def test_instance_norm_is_groupnorm_with_one_group_per_channel(name: str) -> None:
    net = build_network(name, 3, 10, 32, seed=0)
    norms = [m for m in net.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d))]
    assert norms and all(type(m) is nn.GroupNorm for m in norms)
    assert all(m.num_groups == m.num_channels and m.affine for m in norms)
    # and it normalises each sample and channel over its own pixels, like instance norm
    gn = norms[0]
    x = torch.randn(2, gn.num_channels, 5, 5) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(gn(x), nn.functional.instance_norm(x, weight=gn.weight, bias=gn.bias, eps=gn.eps))


def test_image_size_int_or_pair_and_non_square() -> None:
    a = build_network("ConvNet", 3, 10, 32, seed=3)
    b = build_network("ConvNet", 3, 10, (32, 32), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    wide = build_network("ConvNetLN", 3, 10, (32, 48), seed=0)
    assert wide.feature_dim == 128 * 4 * 6
    with torch.no_grad():
        assert wide.embed(torch.randn(1, 3, 32, 48)).shape == (1, 128 * 4 * 6)


def test_too_small_image_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_network("ConvNetD5", 3, 10, 16)  # 16 -> 8 -> 4 -> 2 -> 1 -> cannot pool again


def test_same_seed_same_parameters_different_seed_different() -> None:
    torch.manual_seed(1)
    a = build_network("ConvNet", 3, 10, 32, seed=5)
    torch.manual_seed(2)  # the global RNG state plays no part
    b = build_network("ConvNet", 3, 10, 32, seed=5)
    c = build_network("ConvNet", 3, 10, 32, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["features.0.weight"], sc["features.0.weight"])
    assert not torch.equal(sa["classifier.weight"], sc["classifier.weight"])


def test_seeded_build_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected_next = torch.rand(4)
    torch.set_rng_state(state)
    build_network("ResNet18BN", 3, 10, 32, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected_next)
    # unseeded builds do draw from the global RNG (so the check above is meaningful)
    torch.set_rng_state(state)
    build_network("ConvNet", 3, 10, 32)
    assert not torch.equal(torch.get_rng_state(), state)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        build_network("ConvNetX", 3, 10, 32)
    message = str(info.value)
    assert "ConvNetX" in message
    for name in available_networks():
        assert name in message


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetIN", "ConvNetLN", "ConvNetGN", "ConvNetNN", "MLP", "LeNet",
                                  "AlexNet", "VGG11", "ResNet18", *sorted(BATCHNORM_NETS)])
def test_uses_batch_statistics(name: str) -> None:
    net = build_network(name, 1, 10, 28, seed=0)
    assert uses_batch_statistics(net) is (name in BATCHNORM_NETS)


def test_batchnorm_flag_matters_a_batch_norm_net_mixes_samples() -> None:
    """Why the flag exists: in training mode a BN net's output for a sample depends on its batch mates."""
    x = torch.randn(4, 3, 32, 32)
    for name, mixes in (("ConvNetBN", True), ("ConvNet", False)):
        net = build_network(name, 3, 10, 32, seed=0).train()
        with torch.no_grad():
            alone = net.embed(x[:2])
            together = net.embed(x)[:2]
        assert torch.allclose(alone, together, atol=1e-5) is not mixes, name


@pytest.mark.parametrize("name", ["ConvNet", "ResNet18BN_AP"])
def test_functional_call_matches_the_module(name: str) -> None:
    net = build_network(name, 1, 10, 28, seed=0).eval()
    x = torch.randn(2, 1, 28, 28)
    params = dict(net.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(functional_call(net, params, (x,)), net(x))
        torch.testing.assert_close(functional_call(net, params, (x,), strict=False), net(x))

    # other parameters given to functional_call are the ones used, through embed() too
    g = torch.Generator().manual_seed(0)
    shifted = {k: v.detach() + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    twin = copy.deepcopy(net)
    twin.load_state_dict({**net.state_dict(), **shifted})
    with torch.no_grad():
        torch.testing.assert_close(functional_call(net, shifted, (x,)), twin(x))
        assert not torch.allclose(functional_call(net, shifted, (x,)), net(x))

    # gradients flow to the supplied tensors and the module's own parameters are left alone
    leaves = {k: v.clone().requires_grad_(True) for k, v in shifted.items()}
    functional_call(net, leaves, (x,)).square().sum().backward()
    assert all(v.grad is not None for v in leaves.values())
    assert all(p.grad is None for p in net.parameters())
