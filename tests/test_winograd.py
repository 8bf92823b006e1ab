"""Winograd F(4x4, 3x3) in CHWN layout: the transforms by hand, the convolution and every ConvNet's embedding."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import builders.realbranch as realbranch
from builders import winograd
from builders.networks import build_network


def _mat(rows):
    return [[Fraction(v) for v in row] for row in rows]


def _apply(m, v):
    return [sum(a * b for a, b in zip(row, v)) for row in m]


@pytest.mark.parametrize("seed", range(5))
def test_one_dimensional_f43_is_exact_correlation_in_rational_arithmetic(seed):
    # y = A^T [(G g) * (B^T d)] must equal y_i = sum_k d[i + k] g[k] exactly, for integer d and g.
    g_rng = torch.Generator().manual_seed(seed)
    d = [Fraction(int(v)) for v in torch.randint(-9, 10, (6,), generator=g_rng)]
    g = [Fraction(int(v)) for v in torch.randint(-9, 10, (3,), generator=g_rng)]
    product = [a * b for a, b in zip(_apply(_mat(winograd._G), g), _apply(_mat(winograd._BT), d))]
    assert _apply(_mat(winograd._AT), product) == [sum(d[i + k] * g[k] for k in range(3)) for i in range(4)]


def test_the_tile_transforms_are_the_kronecker_products_by_hand():
    kin, kout = winograd.INPUT_TRANSFORM, winograd.OUTPUT_TRANSFORM
    assert kin.shape == (36, 36) and kout.shape == (16, 36)
    # row (i, k), column (a, b) of kron(B^T, B^T) is B^T[i][a] * B^T[k][b]
    assert kin[1 * 6 + 5, 2 * 6 + 3].item() == winograd._BT[1][2] * winograd._BT[5][3] == -4 * -5
    assert kout[3 * 4 + 2, 4 * 6 + 1].item() == winograd._AT[3][4] * winograd._AT[2][1] == -8 * 1


@pytest.mark.parametrize("size, pad", [((16, 16), 1), ((8, 12), 1), ((7, 5), 1), ((9, 9), 0), ((6, 10), 2)])
def test_winograd_convolution_equals_direct_convolution_in_float64(size, pad):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, *size, dtype=torch.float64, generator=g)  # [N, C, H, W]
    w = torch.randn(5, 16, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    transforms = (winograd.INPUT_TRANSFORM.double(), winograd.OUTPUT_TRANSFORM.double())
    y = winograd._conv_winograd(x.permute(1, 2, 3, 0), winograd.winograd_weights(w), b, pad, transforms)
    torch.testing.assert_close(y.permute(3, 0, 1, 2), F.conv2d(x, w, b, padding=pad), rtol=1e-10, atol=1e-10)


def test_im2col_convolution_equals_direct_convolution():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64, generator=g)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=g)
    y = winograd._conv_im2col(x.permute(1, 2, 3, 0), w, None, 3)
    torch.testing.assert_close(y.permute(3, 0, 1, 2), F.conv2d(x, w, padding=3), rtol=1e-10, atol=1e-10)


def _planned(net):
    spec, weights = realbranch._functional_layers(net)
    return winograd.plan(spec, weights)


@pytest.mark.parametrize("model, channels, size", [
    ("ConvNet", 1, 28), ("ConvNet", 3, 32), ("ConvNetW32", 1, 12), ("ConvNetD1", 3, 9), ("ConvNetD4", 3, 32),
    ("ConvNetAS", 1, 12), ("ConvNetAL", 1, 12), ("ConvNetASwish", 3, 12), ("ConvNetNN", 3, 12),
    ("ConvNetLN", 3, 20), ("ConvNetGN", 3, 17), ("ConvNetNP", 3, 10), ("ConvNetMP", 1, 28),
])
def test_chwn_embedding_is_the_networks_embedding(model, channels, size):
    # In float64 the only difference from net.embed is rounding: Winograd is exact arithmetic.
    net = build_network(model, channels, 10, (size, size), seed=0).double()
    steps, weights = _planned(net)
    assert any(step[0] == "winograd" for step in steps) or model == "ConvNetD1"
    x = torch.randn(6, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    transforms = (winograd.INPUT_TRANSFORM.double(), winograd.OUTPUT_TRANSFORM.double())
    with torch.no_grad():
        torch.testing.assert_close(winograd.embed_chwn(x, weights, steps, transforms), net.embed(x),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block_rows", [2, 4, 6])
@pytest.mark.parametrize("model, size", [("ConvNet", 28), ("ConvNetNP", 9), ("ConvNetMP", 11), ("ConvNetAL", 13)])
def test_instance_norm_blocks_equal_the_networks_first_block(monkeypatch, block_rows, model, size):
    # Statistics from the patches' covariance, outputs in row blocks: the same as the first block of net.
    monkeypatch.setattr(winograd, "BLOCK_ROWS", block_rows)
    net = build_network(model, 1, 10, (size, size), seed=0).double()
    steps, weights = _planned(net)
    assert steps[0][0] == "conv_instance_norm"
    x = torch.rand(4, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    transforms = (winograd.INPUT_TRANSFORM.double(), winograd.OUTPUT_TRANSFORM.double())
    block_layers = 4 if model != "ConvNetNP" else 3
    with torch.no_grad():
        out = winograd.embed_chwn(x, weights[:1], steps[:1], transforms)
        torch.testing.assert_close(out, net.features[:block_layers](x).flatten(1), rtol=1e-9, atol=1e-9)


def test_group_norm_with_fewer_groups_than_channels_is_not_merged():
    steps, _ = _planned(build_network("ConvNetGN", 3, 10, (12, 12), seed=0))
    assert steps[0][0] == "im2col" and steps[1][0] == "group_norm"


def test_float32_embedding_stays_within_1e_5_of_the_networks():
    net = build_network("ConvNet", 1, 10, (28, 28), seed=0)
    steps, weights = _planned(net)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = winograd.embed_chwn(x, weights, steps, (winograd.INPUT_TRANSFORM, winograd.OUTPUT_TRANSFORM))
        torch.testing.assert_close(out, net.embed(x), rtol=1e-5, atol=1e-5 * net.embed(x).abs().max().item())


@pytest.mark.parametrize("layer", [
    ("conv", (2, 2), (1, 1), (1, 1), 1),  # stride 2
    ("conv", (1, 1), (1, 1), (2, 2), 1),  # dilation
    ("conv", (1, 1), (1, 1), (1, 1), 2),  # groups
    ("conv", (1, 1), (1, 0), (1, 1), 1),  # unequal padding
    ("avg_pool", 3, 2, 0, False, True),
    ("max_pool", 2, 2, 0, 1, True),  # ceil mode
    ("layer_norm", (16,), 1e-5),  # over channels only
    ("batch_norm",),
])
def test_plan_refuses_what_it_cannot_run(layer):
    weight = torch.zeros(16, 16, 3, 3)
    spec = (("conv", (1, 1), (1, 1), (1, 1), 1), layer)
    weights = [(weight, None), (weight, None) if layer[0] == "conv" else (None, None)]
    assert winograd.plan(spec, weights) is None


def test_plan_refuses_kernels_other_than_3x3():
    assert winograd.plan((("conv", (1, 1), (2, 2), (1, 1), 1),), [(torch.zeros(4, 16, 5, 5), None)]) is None


def test_compiled_cpu_route_is_winograd_only_for_per_class_float32_passes():
    net = build_network("ConvNetW32", 1, 10, (12, 12), seed=0)
    assert realbranch._embedder(net, True, True)[1] == realbranch.WINOGRAD_CHUNK
    assert realbranch._embedder(net, True, False)[1] == realbranch.COMPILED_CHUNK
    assert realbranch._embedder(net, False, True)[1] == realbranch.CHUNK
