"""Dataset Distillation's network and initialisation (SsnL/dataset-distillation networks/)."""

import torch
from torch import nn

from builders.build import load_recipe
from builders.net_init import init_network_
from builders.networks import build_network
from builders.recipe import RECIPES_DIR


def test_xavier_init_has_the_references_statistics_and_zero_biases():
    net = nn.Sequential(nn.Conv2d(16, 32, 5), nn.GroupNorm(32, 32), nn.Linear(400, 300))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
        net[1].bias.fill_(2.0)
    init_network_(net, "xavier", torch.Generator().manual_seed(0))
    # Xavier-normal, gain 1: std = sqrt(2 / (fan_in + fan_out)); conv fan_in = 16*25, fan_out = 32*25.
    for layer, fan_in, fan_out in ((net[0], 16 * 25, 32 * 25), (net[2], 400, 300)):
        w = layer.weight.detach()
        expected = (2.0 / (fan_in + fan_out)) ** 0.5
        assert abs(w.std().item() / expected - 1) < 0.03 and abs(w.mean().item()) < 0.05 * expected
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.equal(net[1].weight, torch.ones(32)) and torch.count_nonzero(net[1].bias) == 0
    a = init_network_(nn.Linear(4, 3), "xavier", torch.Generator().manual_seed(1)).weight
    b = init_network_(nn.Linear(4, 3), "xavier", torch.Generator().manual_seed(1)).weight
    assert torch.equal(a, b)


def test_alex_cifar_net_is_the_references_network():
    net = build_network("AlexCifarNet", 3, 10, 32, seed=0)
    shapes = [tuple(p.shape) for p in net.parameters()]
    # The reference's layers: conv 3->64 5x5, conv 64->64 5x5, linear 4096->384->192->10.
    assert shapes == [(64, 3, 5, 5), (64,), (64, 64, 5, 5), (64,), (384, 4096), (384,), (192, 384), (192,),
                      (10, 192), (10,)]
    # 4864 + 102464 + 1573248 + 73920 + 1930 parameters, counted by hand from those shapes.
    assert sum(p.numel() for p in net.parameters()) == 1756426
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10) and net.embed(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    assert sum(int(torch.count_nonzero(m.bias)) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))) == 0
    lrn = [m for m in net.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrn) == 2 and (lrn[0].size, lrn[0].alpha, lrn[0].beta, lrn[0].k) == (4, 0.001 / 9.0, 0.75, 1.0)


def test_dd_recipes_use_the_references_network_and_init():
    for source in ("cifar10", "cifar100", "svhn"):
        r = load_recipe(RECIPES_DIR / f"dd_{source}.yaml")
        assert (r.model, r.eval_model, r.params["net_init"]) == ("AlexCifarNet", "AlexCifarNet", "xavier")
    for source in ("mnist", "fashionmnist", "tinyimagenet"):
        assert load_recipe(RECIPES_DIR / f"dd_{source}.yaml").params["net_init"] == "xavier"


def test_dd_draws_its_networks_with_the_references_init_when_asked():
    from test_dd import _tiny_context

    from builders.methods.dd import DatasetDistillation

    for scheme in ("xavier", "default"):
        ctx, _ = _tiny_context(batch_real=12, distill_epochs=2, net_init=scheme)
        drawn = []
        original = ctx.new_network

        def spy(name=None, original=original):
            drawn.append(original(name))
            return drawn[-1]

        ctx.new_network = spy
        method = DatasetDistillation(ctx)
        state = method.initial_state()
        method.optimizers(state)
        next(iter(method.losses(state, 0)))
        biases = [m.bias for m in drawn[0].modules() if isinstance(m, nn.Linear)]
        assert all(torch.count_nonzero(b) == 0 for b in biases) == (scheme == "xavier")
