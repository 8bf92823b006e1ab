"""DC and DSA: the gradient distances by hand, the loop schedule, the matching loss, BatchNorm, builds."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from builders import realbranch, wide_convnet
from builders.build import load_recipe, recipe_from_dict
from builders.data import RealData
from builders.engine import Engine
from builders.errors import CompileError
from builders.methods import dc as dc_module
from builders.methods.base import BuildContext
from builders.methods.dc import GradientMatching, SiameseGradientMatching, class_gradient, class_matching_loss
from builders.methods.matching import (
    freeze_batch_norm,
    gradient_distance,
    layerwise_distance,
    outer_inner_loops,
    stacked_gradient_distance,
)
from builders.networks import build_network, mixes_samples
from builders.recipe import RecipeError
from condensed_datasets.sources import get_source

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DSA = "color_crop_cutout_flip_scale_rotate"



# -- the distances by hand -------------------------------------------------------------------------


def test_layerwise_distance_of_a_2x2_weight_is_one_minus_cos_per_row_summed():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    syn = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # row 0: cos = 1 / (1 * sqrt 2); row 1: cos = 2 / (1 * 2) = 1
    expected = (1 - 1 / (math.sqrt(2) + 1e-6)) + (1 - 2 / (2 + 1e-6))
    assert math.isclose(layerwise_distance(real, syn).item(), expected, rel_tol=1e-6)
    # a conv kernel [out, in, k, k] is compared row by output channel: [2,1,1,2] is the same 2x2 case
    assert math.isclose(layerwise_distance(real.view(2, 1, 1, 2), syn.view(2, 1, 1, 2)).item(), expected, rel_tol=1e-6)


def test_biases_and_other_1d_tensors_are_ignored_by_the_layerwise_distance():
    w_real, w_syn = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    b_real, b_syn = torch.tensor([1.0, -5.0]), torch.tensor([-7.0, 3.0])
    assert layerwise_distance(b_real, b_syn).item() == 0.0
    with_bias = gradient_distance([w_real, b_real], [w_syn, b_syn], "ours")
    assert with_bias.item() == layerwise_distance(w_real, w_syn).item()


def test_mse_and_cos_compare_all_gradients_as_one_vector():
    real = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    syn = [torch.tensor([0.0, 2.0]), torch.tensor([[5.0]])]
    assert gradient_distance(real, syn, "mse").item() == 1.0 + 0.0 + 4.0
    # (1,2,3).(0,2,5) = 19, norms sqrt 14 and sqrt 29; biases count here
    expected = 1 - 19 / (math.sqrt(14 * 29) + 1e-6)
    assert math.isclose(gradient_distance(real, syn, "cos").item(), expected, abs_tol=1e-6)
    with pytest.raises(ValueError, match="valid: ours, mse, cos"):
        gradient_distance(real, syn, "l1")


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_the_stacked_distance_is_the_sum_of_each_rows_distance(metric):
    g = torch.Generator().manual_seed(2)
    shapes = [(4, 3, 3, 3), (4,), (5, 4, 2), (7, 5), ()]  # a kernel, a bias, a layer-norm weight, a linear, a scalar
    real = [torch.randn(3, *shape, generator=g, dtype=torch.float64) for shape in shapes]
    syn = [torch.randn(3, *shape, generator=g, dtype=torch.float64) for shape in shapes]
    want = sum(gradient_distance([t[i] for t in real], [t[i] for t in syn], metric) for i in range(3))
    assert torch.allclose(stacked_gradient_distance(real, syn, metric), want, rtol=1e-13, atol=0)


def test_the_stacked_distance_refuses_mismatched_or_unstacked_gradients():
    with pytest.raises(ValueError, match="1 real gradients but 2"):
        stacked_gradient_distance([torch.zeros(2, 3)], [torch.zeros(2, 3)] * 2)
    with pytest.raises(ValueError, match="differ or have no stack dimension"):
        stacked_gradient_distance([torch.zeros(2, 3)], [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="no stack dimension"):
        stacked_gradient_distance([torch.zeros(())], [torch.zeros(())])
    with pytest.raises(ValueError, match="unknown gradient distance"):
        stacked_gradient_distance([torch.zeros(2, 3)], [torch.zeros(2, 3)], "l1")


@pytest.mark.parametrize("ipc, loops", [(1, (1, 1)), (10, (10, 50)), (20, (20, 25)), (30, (30, 20)),
                                        (40, (40, 15)), (50, (50, 10))])
def test_outer_inner_loops_of_the_listed_ipcs_are_the_papers(ipc, loops):
    assert outer_inner_loops(ipc) == loops


@pytest.mark.parametrize("ipc, like", [(2, 1), (5, 1), (9, 1), (11, 10), (19, 10), (25, 20), (49, 40), (51, 50),
                                       (1000, 50)])
def test_outer_inner_loops_of_other_ipcs_take_the_nearest_listed_ipc_below(ipc, like):
    assert outer_inner_loops(ipc) == outer_inner_loops(like)


def test_outer_inner_loops_refuses_ipc_below_one():
    with pytest.raises(ValueError):
        outer_inner_loops(0)


# -- the method on a tiny context ------------------------------------------------------------------


def _tiny_context(method="dc", ipc=2, per_class=3, augment="none", model="ConvNetW32", size=8, iterations=0,
                  **params):
    info = get_source("fashionmnist")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10 * per_class, 1, size, size), generator=g, dtype=torch.uint8)
    real = RealData(images, torch.arange(10).repeat_interleave(per_class), info)
    recipe = recipe_from_dict({"source": "fashionmnist", "method": method, "ipc": ipc, "augment": augment,
                               "model": model, "iterations": iterations, "params": params})
    return BuildContext(recipe, real, torch.device("cpu"), torch.Generator().manual_seed(1)), real


def test_dc_loss_is_the_sum_over_classes_of_the_gradient_distance():
    ctx, real = _tiny_context(batch_real=256)
    net = build_network("ConvNetW32", 1, 10, (8, 8), seed=5)
    ctx.new_network = lambda name=None: net
    method = GradientMatching(ctx)
    state = method.initial_state()
    loss = next(iter(method.losses(state, 0)))
    # batch_real 256 > 3 per class: each class's real batch is all its images (order does not matter)
    params = list(net.parameters())
    expected = 0.0
    for c in range(10):
        g_real = class_gradient(net, params, real.rows(real.class_indices[c]), c, create_graph=False)
        g_syn = class_gradient(net, params, state["images"].detach()[2 * c : 2 * c + 2], c, create_graph=False)
        expected += gradient_distance(g_real, g_syn).item()
    assert math.isclose(loss.item(), expected, rel_tol=1e-4)
    loss.backward()
    assert (state["images"].grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("distance", ["ours", "mse", "cos"])
def test_dc_gradients_reach_every_synthetic_image(distance):
    ctx, _ = _tiny_context(distance=distance)
    method = GradientMatching(ctx)
    state = method.initial_state()
    loss = next(iter(method.losses(state, 0)))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert (state["images"].grad.flatten(1).abs().sum(1) > 0).all()


def test_dsa_augments_siamese_while_matching_and_per_sample_while_training():
    ctx, _ = _tiny_context(method="dsa", augment=DSA, outer_loop=2, inner_loop=3)
    siamese, each = [], []
    real_siamese, real_each = ctx.apply_siamese_draws, ctx.augment_each
    ctx.apply_siamese_draws = lambda draws, *lists: siamese.append(
        (len(draws), [[len(b) for b in batches] for batches in lists])) or real_siamese(draws, *lists)
    ctx.augment_each = lambda b: each.append(b.shape[0]) or real_each(b)
    method = SiameseGradientMatching(ctx)
    state = method.initial_state()
    assert method.params["init"] == "real"
    for loss in method.losses(state, 0):
        state["images"].grad = None
        loss.backward()
        assert (state["images"].grad.flatten(1).abs().sum(1) > 0).all()
    # per outer step, one draw per class for its real and its synthetic batch, every class's applied together
    assert siamese == [(10, [[3] * 10, [2] * 10])] * 2
    assert each == [20] * 3  # the inner training between the two outer steps: 3 epochs of one batch


def test_the_network_trains_between_matching_steps_and_not_after_the_last():
    ctx, _ = _tiny_context(outer_loop=3, inner_loop=2)
    net = build_network("ConvNetW32", 1, 10, (8, 8), seed=5)
    ctx.new_network = lambda name=None: net
    method = GradientMatching(ctx)
    state = method.initial_state()
    snapshots = []
    for loss in method.losses(state, 0):
        snapshots.append([p.detach().clone() for p in net.parameters()])
        loss.backward()
    snapshots.append([p.detach().clone() for p in net.parameters()])
    changed = [any(not torch.equal(a, b) for a, b in zip(s, t)) for s, t in zip(snapshots, snapshots[1:])]
    assert changed == [True, True, False]


def test_freeze_batch_norm_uses_the_real_batch_statistics_and_eval_mode():
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    net.train()
    real = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 3 + 1
    freeze_batch_norm(net, real)
    bn = net[1]
    with torch.no_grad():
        feats = net[0](real)
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, feats.var((0, 2, 3), unbiased=True))
    assert not bn.training and net[0].training and bn.momentum == 0.1
    net.train()
    assert bn.training


def test_dc_with_batch_norm_matches_with_frozen_statistics():
    ctx, _ = _tiny_context(model="ConvNetBN", ipc=1)
    seen = []
    net = build_network("ConvNetBN", 1, 10, (8, 8), seed=5)
    ctx.new_network = lambda name=None: net
    method = GradientMatching(ctx)
    state = method.initial_state()
    for loss in method.losses(state, 0):
        seen.append([m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
        loss.backward()
    assert seen == [[False, False, False]]
    assert (state["images"].grad.flatten(1).abs().sum(1) > 0).all()


# -- recipes -----------------------------------------------------------------------------------------


def test_dsa_without_augmentation_is_a_recipe_error():
    with pytest.raises(RecipeError, match="dsa needs a DSA strategy"):
        recipe_from_dict({"source": "fashionmnist", "method": "dsa", "ipc": 1, "augment": "none"})


def test_dc_refuses_augmentation_and_unknown_choices():
    with pytest.raises(RecipeError, match="method dsa"):
        recipe_from_dict({"source": "fashionmnist", "method": "dc", "ipc": 1, "augment": DSA})
    with pytest.raises(RecipeError, match="params.distance"):
        recipe_from_dict({"source": "fashionmnist", "method": "dc", "ipc": 1, "params": {"distance": "l1"}})
    with pytest.raises(RecipeError, match="params.init"):
        recipe_from_dict({"source": "fashionmnist", "method": "dsa", "ipc": 1, "augment": DSA,
                          "params": {"init": "zeros"}})


@pytest.mark.parametrize("path", sorted(RECIPES.glob("d[cds]*_*.yaml")), ids=lambda p: p.name)
def test_every_dc_dsa_dd_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.method in ("dc", "dsa", "dd") and path.name == f"{recipe.method}_{recipe.source}.yaml"
    assert recipe.iterations > 0 and "Evaluation protocol" in path.read_text()


def test_recipes_exist_for_every_source():
    for method in ("dc", "dsa", "dd"):
        for source in ("mnist", "fashionmnist", "svhn", "cifar10", "cifar100", "tinyimagenet"):
            assert (RECIPES / f"{method}_{source}.yaml").is_file()


# -- tiny builds on Fashion-MNIST ---------------------------------------------------------------------


def _fixed_matching_loss(images: torch.Tensor, real: RealData, ipc: int) -> float:
    """The matching loss of ``images`` on one fixed network and fixed real batches (all real images)."""
    net = build_network("ConvNetW32", 1, 10, (28, 28), seed=12345)
    real_batches = [real.rows(real.class_indices[c]) for c in range(10)]
    syn_batches = [images[c * ipc : (c + 1) * ipc] for c in range(10)]
    return class_matching_loss(net, real_batches, syn_batches).item()


@pytest.mark.parametrize("method, augment", [("dc", "none"), ("dsa", DSA)])
def test_a_tiny_build_lowers_the_matching_loss(method, augment, fashion_mnist_root, tmp_path):
    recipe = {"source": "fashionmnist", "method": method, "ipc": 1, "model": "ConvNetW32", "seed": 0,
              "augment": augment, "real_per_class": 10, "params": {"batch_real": 10, "init": "noise"}}
    sets = {}
    for iterations in (0, 12):
        engine = Engine(recipe_from_dict({**recipe, "iterations": iterations}), out_root=tmp_path / str(iterations),
                        data_root=fashion_mnist_root, device="cpu", evaluate=False, progress=False)
        sets[iterations] = engine.run()
    assert sets[12].images.shape == (10, 1, 28, 28) and sets[12].method == method
    assert not torch.equal(sets[0].images, sets[12].images)
    real = RealData.from_source("fashionmnist", fashion_mnist_root, per_class=10)
    before, after = (_fixed_matching_loss(sets[i].images, real, 1) for i in (0, 12))
    assert after < before, (before, after)


# -- the compiled real gradient (params.compile) ------------------------------------------------------


def _float64_gradient(net: nn.Module, images: torch.Tensor, label: int) -> list[torch.Tensor]:
    """The plain computation in float64: a reference for float32 routes."""
    wide = build_network("ConvNetW32", 1, 10, tuple(images.shape[-2:]))
    wide.load_state_dict(net.state_dict())
    wide = wide.double()
    return [g.float() for g in class_gradient(wide, list(wide.parameters()), images.double(), label, False)]


@pytest.mark.parametrize("compiled", [False, True])
def test_the_real_gradient_equals_the_plain_one_in_float64_compiled_or_not(compiled):
    # compiled on a CPU: the Winograd route (its 32-channel layers are >= WINOGRAD_MIN_CHANNELS), backward included
    net = build_network("ConvNetW32", 1, 10, (12, 12), seed=3)
    images = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    got = class_gradient(net, list(net.parameters()), images, 6, create_graph=False, compiled=compiled)
    want = _float64_gradient(net, images, 6)
    scale = max(float(w.norm()) for w in want)
    for (name, _), g, w in zip(net.named_parameters(), got, want):
        # a convolution's bias before instance norm has no effect: its true gradient is 0, float noise each way
        assert float((g - w).norm()) <= 1e-3 * float(w.norm()) + 1e-6 * scale, name


def _plain_gradient(net: nn.Module, images: torch.Tensor, label: int) -> list[torch.Tensor]:
    """The obviously-correct computation: one pass, the mean cross-entropy's gradient."""
    targets = torch.full((images.shape[0],), label, dtype=torch.int64)
    return list(torch.autograd.grad(F.cross_entropy(net(images), targets), list(net.parameters())))


def test_the_real_gradient_in_passes_is_the_one_pass_gradient(monkeypatch):
    # 14 images in passes of 4, 4, 4, 2: each pass's gradient weighted by its share of the images
    monkeypatch.setattr(realbranch, "GRADIENT_PASS", 4)
    calls = []
    plain_class_loss = realbranch.class_loss
    monkeypatch.setattr(realbranch, "class_loss", lambda net, part, *a: calls.append(part.shape[0]) or
                        plain_class_loss(net, part, *a))
    net = build_network("ConvNetW32", 1, 10, (12, 12), seed=3)
    images = torch.randn(14, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    got = class_gradient(net, list(net.parameters()), images, 6, create_graph=False)
    assert calls == [4, 4, 4, 2]
    want64 = _plain_gradient(net.double(), images.double(), 6)
    want32 = _plain_gradient(net.float(), images, 6)
    scale = max(float(w.norm()) for w in want64)
    for (name, _), g, w64, w32 in zip(net.named_parameters(), got, want64, want32):
        assert g.dtype == torch.float32
        # float32 rounding only: as close to the float64 gradient as the one-pass float32 computation is
        assert float((g.double() - w64).norm()) <= 1e-5 * float(w64.norm()) + 1e-7 * scale, name
        assert float((w32.double() - w64).norm()) <= 1e-5 * float(w64.norm()) + 1e-7 * scale, name


def test_the_real_gradient_of_a_network_in_batchnorm_training_takes_one_pass(monkeypatch):
    # its samples mix (batch statistics): passes would change the gradient, so there is one
    monkeypatch.setattr(realbranch, "GRADIENT_PASS", 4)
    net = build_network("ConvNetBN", 1, 10, (8, 8), seed=5).train()
    images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    got = class_gradient(net, list(net.parameters()), images, 2, create_graph=False)
    for g, w in zip(got, _plain_gradient(net, images, 2)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)
    # frozen (eval mode), each sample is normalised on its own: passes again, the same gradient
    net.eval()
    got = class_gradient(net, list(net.parameters()), images, 2, create_graph=False)
    for g, w in zip(got, _plain_gradient(net, images, 2)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_mixes_samples_only_for_batchnorm_in_training_mode():
    assert not mixes_samples(build_network("ConvNet", 1, 10, (8, 8)))
    bn = build_network("ConvNetBN", 1, 10, (8, 8))
    assert mixes_samples(bn.train()) and not mixes_samples(bn.eval())


def test_dc_compile_true_matches_the_uncompiled_loss_and_image_gradient():
    losses, grads = [], []
    for compiled in (False, True):
        ctx, _ = _tiny_context(method="dsa", augment=DSA, compile=compiled, batch_real=8)
        ctx.new_network = lambda name=None: build_network("ConvNetW32", 1, 10, (8, 8), seed=5)
        method = SiameseGradientMatching(ctx)
        state = method.initial_state()
        loss = next(iter(method.losses(state, 0)))
        loss.backward()
        losses.append(loss.detach())
        grads.append(state["images"].grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-3 * float(grads[0].abs().max()))


def test_a_compiled_gradient_refuses_to_keep_its_graph():
    net = build_network("ConvNetW32", 1, 10, (8, 8), seed=3)
    with pytest.raises(ValueError, match="create_graph"):
        class_gradient(net, list(net.parameters()), torch.zeros(2, 1, 8, 8), 0, create_graph=True, compiled=True)


@pytest.mark.parametrize("value", ["yes", 1, None, "true"])
def test_dc_compile_takes_true_false_or_auto_only(value):
    for ok in (True, False, "auto"):
        recipe_from_dict({"source": "fashionmnist", "method": "dc", "ipc": 1, "params": {"compile": ok}})
    with pytest.raises(RecipeError, match="params.compile"):
        recipe_from_dict({"source": "fashionmnist", "method": "dc", "ipc": 1, "params": {"compile": value}})


@pytest.mark.parametrize("device, real_gradients, compiles", [
    ("cpu", dc_module.AUTO_COMPILE_MIN_REAL_GRADIENTS, True),
    ("cpu", 1000 * 10 * 10, True),  # the paper recipes: 1000 iterations x 10 matching steps x 10 classes
    ("cpu", dc_module.AUTO_COMPILE_MIN_REAL_GRADIENTS - 1, False),
    ("cpu", 12 * 1 * 10, False),  # a tiny test build
    ("cuda", 1000 * 10 * 10, False),  # not measured on GPUs yet
])
def test_dc_compile_auto_compiles_long_builds_on_cpus_only(device, real_gradients, compiles):
    assert dc_module.auto_compiles(torch.device(device), real_gradients) is compiles


@pytest.mark.parametrize("method, ipc, outer", [("dc", 1, 1), ("dsa", 10, 10)])
def test_dc_compile_auto_decides_on_the_whole_builds_real_gradients(method, ipc, outer, monkeypatch):
    asked = []
    monkeypatch.setattr(dc_module, "auto_compiles", lambda device, n: asked.append((device.type, n)) or False)
    ctx, _ = _tiny_context(method=method, ipc=ipc, augment=DSA if method == "dsa" else "none", iterations=7)
    (SiameseGradientMatching if method == "dsa" else GradientMatching)(ctx)
    assert asked == [("cpu", 7 * outer * 10)]


def test_dc_compile_true_warns_once_and_runs_uncompiled_for_batchnorm_networks():
    ctx, _ = _tiny_context(model="ConvNetBN", compile=True, outer_loop=3, inner_loop=1, batch_real=4)
    method = GradientMatching(ctx)
    with pytest.warns(UserWarning, match="params.compile: model 'ConvNetBN'") as caught:
        losses = [loss.item() for loss in method.losses(method.initial_state(), 0)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert sum("params.compile" in str(w.message) for w in caught) == 1


def _first_loss_and_image_gradient(compile, size, new_network):
    ctx, _ = _tiny_context(compile=compile, size=size, batch_real=8)
    ctx.new_network = new_network
    method = GradientMatching(ctx)
    state = method.initial_state()
    loss = next(iter(method.losses(state, 0)))
    loss.backward()
    return method, loss.detach(), state["images"].grad


# no C++ compiler for inductor, at image sizes no other test compiles (a failed compilation is not cached)
NO_COMPILER = {"cpp.cxx": ("/nonexistent/bin/c++",), "fx_graph_cache": False}


def test_dc_compile_auto_falls_back_to_the_uncompiled_gradient_with_a_warning_when_compilation_fails(monkeypatch):
    def new_network(name=None):
        return build_network("ConvNetW32", 1, 10, (9, 9), seed=5)

    _, plain_loss, plain_grad = _first_loss_and_image_gradient(False, 9, new_network)
    monkeypatch.setattr(dc_module, "auto_compiles", lambda device, n: True)  # "auto" compiles this build
    with torch._inductor.config.patch(NO_COMPILER):
        with pytest.warns(UserWarning, match="could not compile the network.*This build runs uncompiled"):
            method, loss, grad = _first_loss_and_image_gradient("auto", 9, new_network)
    assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad)  # the same computation, uncompiled
    assert method.compile.failed and not method.compile.compiles(new_network())


def test_dc_compile_true_stops_when_compilation_fails():
    with torch._inductor.config.patch(NO_COMPILER):
        with pytest.raises(CompileError, match="could not compile the network.*params.compile: false"):
            _first_loss_and_image_gradient(True, 10, lambda name=None: build_network("ConvNetW32", 1, 10, (10, 10)))


def test_dc_inner_training_compiled_follows_the_uncompiled_trajectory(monkeypatch):
    # a sigmoid ConvNet: with ReLU the gradient jumps where a unit's input crosses 0, so float rounding alone (of
    # either route) can flip a unit and move a step's gradient by a few 1e-3 of its norm (measured on 28x28
    # inputs); smooth activations make the two trajectories comparable to float rounding
    asked = []

    def recording_loss(net, images, targets, compiled=False):
        asked.append(compiled)
        return realbranch.classifier_loss(net, images, targets, compiled)

    monkeypatch.setattr(dc_module, "classifier_loss", recording_loss)
    start = build_network("ConvNetAS", 1, 10, (12, 12), seed=3)
    trained = {}
    for compiled in (False, True):  # 80 synthetic images in batches of 16, 2 epochs: 10 steps
        ctx, _ = _tiny_context(ipc=8, size=12, model="ConvNetAS", batch_train=16, inner_loop=2, compile=compiled)
        method = GradientMatching(ctx)
        images = method.initial_state()["images"]
        net = build_network("ConvNetAS", 1, 10, (12, 12))
        net.load_state_dict(start.state_dict())
        method.train_inner(net, torch.optim.SGD(net.parameters(), lr=0.05), images)
        trained[compiled] = {name: param.detach().clone() for name, param in net.named_parameters()}
    assert asked == [False] * 10 + [True] * 10
    for name, plain in trained[False].items():
        moved = float((plain - start.state_dict()[name]).norm())
        assert moved > 0 or name.endswith("bias"), name  # the steps train the network
        # a convolution's bias before instance norm has no effect: its gradient is float noise either way
        assert float((trained[True][name] - plain).norm()) <= 1e-4 * moved + 1e-6, name


# -- params.batch_classes: every class's gradients in one pass -------------------------------------


def _per_class_and_wide(model, metric, classes, dtype=torch.float64):
    """The matching loss and its image gradient, class by class and in one pass, on the same batches."""
    net = build_network(model, 1, 10, (12, 12), seed=3).to(dtype)
    g = torch.Generator().manual_seed(4)
    real = [torch.randn(5, 1, 12, 12, generator=g, dtype=dtype) for _ in classes]
    images = torch.randn(2 * len(classes), 1, 12, 12, generator=g, dtype=dtype, requires_grad=True)
    syn = [images[2 * i : 2 * i + 2] for i in range(len(classes))]
    out = []
    for loss_fn in (class_matching_loss, dc_module.wide_class_matching_loss):
        loss = loss_fn(net, real, syn, metric, classes=classes)
        out.append((loss.detach(), torch.autograd.grad(loss, images)[0]))
    return out


@pytest.mark.parametrize("gpu_paths", [False, True])
@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
@pytest.mark.parametrize("model", ["ConvNet", "ConvNetAS", "ConvNetLN", "ConvNetNN", "ConvNetGN", "ConvNetMP"])
def test_matching_all_classes_in_one_pass_is_the_per_class_sum_in_float64(model, metric, gpu_paths, monkeypatch):
    if gpu_paths:  # the wide network's paths off the CPU (dense one-channel first layer, AvgPool2x2), here on it
        monkeypatch.setattr(wide_convnet, "_off_cpu", lambda x: True)
    (plain, plain_grad), (wide, wide_grad) = _per_class_and_wide(model, metric, classes=(0, 3, 4, 9))
    assert torch.allclose(wide, plain, rtol=1e-12, atol=0)
    assert torch.allclose(wide_grad, plain_grad, rtol=1e-9, atol=1e-12 * plain_grad.abs().max().item())


def test_matching_in_one_pass_in_float32_is_within_1e_5_of_the_per_class_computation():
    (plain, plain_grad), (wide, wide_grad) = _per_class_and_wide("ConvNet", "ours", tuple(range(10)), torch.float32)
    assert abs(wide.item() - plain.item()) <= 1e-5 * abs(plain.item())
    assert (wide_grad - plain_grad).norm() <= 1e-5 * plain_grad.norm()


@pytest.mark.parametrize("setting, device, batches", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("auto", "meta", True),
    (True, "cpu", True), (False, "cuda", False),
])
def test_batch_classes_auto_batches_off_the_cpu_only(setting, device, batches):
    assert dc_module.batches_classes(setting, torch.device(device)) is batches


@pytest.mark.parametrize("value", ["yes", 1, None, "true"])
def test_batch_classes_takes_true_false_or_auto_only(value):
    with pytest.raises(RecipeError, match="batch_classes"):
        _tiny_context(batch_classes=value)


def _build_images(batch_classes, model, **params):
    """The DSA images at the start and after 2 iterations of the engine's loop (tiny context)."""
    ctx, _ = _tiny_context(method="dsa", augment=DSA, model=model, batch_classes=batch_classes, batch_real=3,
                           **params)
    method = SiameseGradientMatching(ctx)
    state = method.initial_state()
    start = state["images"].detach().clone()
    optimizer = method.optimizers(state)["images"]
    for iteration in range(2):
        for loss in method.losses(state, iteration):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return start, state["images"].detach()


def test_a_dsa_build_matched_in_one_pass_follows_the_per_class_build():
    """Same random numbers, same steps: after 2 iterations of 2 matching steps, with inner training between
    them, the images part by float rounding alone. The float32 image gradient of either way errs by 2e-5 to
    4e-5 of its norm against float64 here, and the steps compound it (measured: 1e-4 of the images' movement);
    a sigmoid ConvNet, since with ReLU a unit within rounding of 0 may switch sides and the builds part more."""
    start, one_pass = _build_images(True, "ConvNetAS", outer_loop=2, inner_loop=2)
    _, per_class = _build_images(False, "ConvNetAS", outer_loop=2, inner_loop=2)
    moved = (per_class - start).norm()
    assert moved > 1.0
    assert (one_pass - per_class).norm() <= 1e-3 * moved


def test_batch_classes_true_warns_once_and_matches_class_by_class_for_batchnorm_networks(monkeypatch):
    ctx, _ = _tiny_context(model="ConvNetBN", batch_classes=True, outer_loop=3, inner_loop=1, batch_real=4)
    method = GradientMatching(ctx)
    called = []
    monkeypatch.setattr(dc_module, "wide_class_matching_loss", lambda *a, **k: called.append(1))
    with pytest.warns(UserWarning, match="params.batch_classes: model 'ConvNetBN'") as caught:
        losses = [loss.item() for loss in method.losses(method.initial_state(), 0)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and called == []
    assert sum("params.batch_classes" in str(w.message) for w in caught) == 1


def test_classes_with_fewer_real_images_than_batch_real_are_matched_class_by_class():
    ctx, real = _tiny_context(batch_classes=True, batch_real=3)
    method = GradientMatching(ctx)
    net = build_network("ConvNetW32", 1, 10, (8, 8), seed=5)
    same = [torch.zeros(3, 1, 8, 8)] * 10
    assert method.matches_in_one_pass(net, False, same)
    assert not method.matches_in_one_pass(net, False, [*same[:9], torch.zeros(2, 1, 8, 8)])
    assert not GradientMatching(_tiny_context(batch_classes="auto")[0]).matches_in_one_pass(net, False, same)


@pytest.mark.parametrize("count, per_class, sizes", [
    (10, 256, [10]), (100, 256, [10] * 10), (7, 1000, [2, 2, 2, 1]), (3, 5000, [1, 1, 1]), (4, 0, [4]),
])
def test_classes_are_matched_in_groups_of_at_most_2560_real_images(count, per_class, sizes):
    groups = dc_module.class_groups(count, per_class)
    assert [len(g) for g in groups] == sizes
    assert [i for g in groups for i in g] == list(range(count))


def test_a_build_of_more_classes_than_one_pass_takes_sums_every_group(monkeypatch):
    """At most 12 real images a pass and 3 a class: groups of 4 classes, and the loss is the per-class sum."""
    ctx, _ = _tiny_context(batch_classes=True, batch_real=3, outer_loop=1)
    net = build_network("ConvNetW32", 1, 10, (8, 8), seed=5)
    ctx.new_network = lambda name=None: net
    method = GradientMatching(ctx)
    state = method.initial_state()
    monkeypatch.setattr(dc_module, "ONE_PASS_MAX_REAL_IMAGES", 12)
    groups = []
    wide = dc_module.wide_class_matching_loss
    monkeypatch.setattr(dc_module, "wide_class_matching_loss",
                        lambda *a, classes, **k: groups.append(list(classes)) or wide(*a, classes=classes, **k))
    grouped = next(iter(method.losses(state, 0)))
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ctx2, _ = _tiny_context(batch_classes=False, batch_real=3, outer_loop=1)
    ctx2.new_network = lambda name=None: net
    plain_method = GradientMatching(ctx2)
    plain = next(iter(plain_method.losses(plain_method.initial_state(), 0)))
    assert torch.allclose(grouped, plain, rtol=1e-5)
