"""DD: positive per-step lrs, the unrolled loss's gradients against finite differences, recipe checks,
a tiny build, and the evaluation's replay of a 1-D learned lr."""

import copy

import pytest
import torch
import torch.nn.functional as F

import builders.evaluate as evaluate
from builders.build import recipe_from_dict
from builders.data import RealData
from builders.engine import Engine
from builders.evaluate import TrainSettings, evaluate_set, train_network
from builders.methods.base import BuildContext
from builders.methods.dd import DatasetDistillation, lrs_from_raw, raw_from_lr, step_rows, unrolled_loss
from builders.networks import MLP, build_network
from builders.recipe import RecipeError
from condensed_datasets.sources import get_source


def _tiny_problem(ipc=2, classes=2, seed=0):
    """A double-precision MLP on 1x4x4 images, a class-contiguous synthetic set and a real batch."""
    g = torch.Generator().manual_seed(seed)
    net = MLP(1, classes, 4, hidden=6).double()
    images = torch.randn(classes * ipc, 1, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(ipc)
    real_x = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    real_y = torch.randint(0, classes, (8,), generator=g)
    return net, images, labels, real_x, real_y


# -- learning rates ---------------------------------------------------------------------------------


def test_lrs_are_softplus_of_raw_start_at_lr_init_and_stay_positive():
    raw = raw_from_lr(0.02, 4)
    assert raw.shape == (4,) and raw.dtype == torch.float32
    torch.testing.assert_close(lrs_from_raw(raw), torch.full((4,), 0.02))
    extreme = lrs_from_raw(torch.tensor([-60.0, -5.0, 0.0, 40.0], dtype=torch.float64))
    assert (extreme > 0).all()
    with pytest.raises(ValueError):
        raw_from_lr(0.0, 2)


def test_step_t_trains_on_image_t_mod_ipc_of_every_class():
    assert step_rows(3, 2, 0).tolist() == [0, 3]
    assert step_rows(3, 2, 4).tolist() == [1, 4]


# -- gradients against finite differences -----------------------------------------------------------


def test_unrolled_loss_gradients_match_finite_differences():
    net, images, labels, real_x, real_y = _tiny_problem()
    lrs = torch.tensor([0.3, 0.2, 0.4], dtype=torch.float64, requires_grad=True)  # 3 steps over ipc 2
    images.requires_grad_(True)

    def loss(lrs, images):
        return unrolled_loss(net, images, labels, lrs, real_x, real_y, ipc=2)

    assert torch.autograd.gradcheck(loss, (lrs, images), eps=1e-6, atol=1e-5)


def test_gradient_through_the_softplus_parametrisation_matches_finite_differences():
    net, images, labels, real_x, real_y = _tiny_problem(seed=1)
    raw = raw_from_lr(0.5, 4, dtype=torch.float64).requires_grad_(True)
    def loss(raw):
        return unrolled_loss(net, images, labels, lrs_from_raw(raw), real_x, real_y, ipc=2)

    assert torch.autograd.gradcheck(loss, (raw,), eps=1e-6, atol=1e-5)


def test_unrolled_loss_equals_hand_written_gradient_descent():
    net, images, labels, real_x, real_y = _tiny_problem(seed=2)
    lrs = torch.tensor([0.5, 0.25, 0.1], dtype=torch.float64)
    manual = copy.deepcopy(net)
    for t, lr in enumerate(lrs):
        rows = step_rows(2, 2, t)
        manual.zero_grad()
        F.cross_entropy(manual(images[rows]), labels[rows]).backward()
        with torch.no_grad():
            for p in manual.parameters():
                p -= lr * p.grad
    expected = F.cross_entropy(manual(real_x), real_y)
    before = [p.detach().clone() for p in net.parameters()]
    torch.testing.assert_close(unrolled_loss(net, images, labels, lrs, real_x, real_y, ipc=2), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the network is not changed


# -- the method ---------------------------------------------------------------------------------------


def _tiny_context(ipc=2, per_class=3, **params):
    info = get_source("fashionmnist")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10 * per_class, 1, 4, 4), generator=g, dtype=torch.uint8)
    real = RealData(images, torch.arange(10).repeat_interleave(per_class), info)
    recipe = recipe_from_dict({"source": "fashionmnist", "method": "dd", "ipc": ipc, "model": "MLP", "params": params})
    return BuildContext(recipe, real, torch.device("cpu"), torch.Generator().manual_seed(1)), real


def test_dd_iteration_yields_the_unrolled_loss_and_reaches_images_and_lrs():
    ctx, _ = _tiny_context(batch_real=12, distill_epochs=2)
    net = MLP(1, 10, 4, hidden=8)
    ctx.new_network = lambda name=None: net
    method = DatasetDistillation(ctx)
    state = method.initial_state()
    method.optimizers(state)
    assert state["raw_lrs"].shape == (4,) and state["raw_lrs"].is_leaf and state["images"].is_leaf
    rng = ctx.generator.get_state()
    loss = next(iter(method.losses(state, 0)))
    ctx.generator.set_state(rng)
    real_x, real_y = method.real_batch()
    expected = unrolled_loss(net, state["images"], ctx.hard_labels(), lrs_from_raw(state["raw_lrs"]), real_x, real_y, 2)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (state["images"].grad.flatten(1).abs().sum(1) > 0).all()
    assert (state["raw_lrs"].grad != 0).all()


def test_dd_adam_learning_rates_decay_every_n_iterations():
    ctx, _ = _tiny_context(decay_every=2, decay_factor=0.5, lr_img=0.04, lr_lr=0.02)
    method = DatasetDistillation(ctx)
    state = method.initial_state()
    opt = method.optimizers(state)["synthetic"]
    assert opt.defaults["betas"] == (0.5, 0.999)
    next(iter(method.losses(state, 5)))
    assert [g["lr"] for g in opt.param_groups] == [0.04 * 0.25, 0.02 * 0.25]


def test_dd_refuses_batch_norm_networks_by_name():
    with pytest.raises(RecipeError, match="ConvNetBN"):
        recipe_from_dict({"source": "fashionmnist", "method": "dd", "ipc": 2, "model": "ConvNetBN"})


def test_dd_refuses_augmentation_and_a_single_step():
    with pytest.raises(RecipeError, match="augment"):
        recipe_from_dict({"source": "fashionmnist", "method": "dd", "ipc": 2, "augment": "crop"})
    with pytest.raises(RecipeError, match="at least 2 unrolled steps"):
        recipe_from_dict({"source": "fashionmnist", "method": "dd", "ipc": 1, "params": {"distill_epochs": 1}})


def test_a_tiny_dd_build_lowers_its_loss_and_stores_positive_per_step_lrs(fashion_mnist_root, tmp_path):
    recipe = {"source": "fashionmnist", "method": "dd", "ipc": 2, "model": "ConvNetW32", "seed": 0,
              "real_per_class": 10, "params": {"batch_real": 50, "distill_epochs": 1, "lr_img": 0.1, "lr_lr": 0.1}}
    sets = {}
    for iterations in (0, 8):
        engine = Engine(recipe_from_dict({**recipe, "iterations": iterations}), out_root=tmp_path / str(iterations),
                        data_root=fashion_mnist_root, device="cpu", evaluate=False, progress=False)
        sets[iterations] = engine.run()
    built = sets[8]
    assert built.lr is not None and built.lr.dtype == torch.float32 and built.lr.shape == (2,)
    assert (built.lr > 0).all() and not torch.equal(built.lr, sets[0].lr)
    real = RealData.from_source("fashionmnist", fashion_mnist_root, per_class=10)
    everything = torch.arange(len(real))
    net = build_network("ConvNetW32", 1, 10, (28, 28), seed=12345)
    labels = torch.arange(10).repeat_interleave(2)

    def fixed_loss(cset):
        return unrolled_loss(net, cset.images, labels, cset.lr, real.rows(everything), real.labels, ipc=2).item()

    before, after = fixed_loss(sets[0]), fixed_loss(built)
    assert after < before, (before, after)


# -- evaluation of a 1-D learned lr ---------------------------------------------------------------------


def test_training_with_per_step_lrs_replays_them_as_plain_gradient_steps():
    net, images, labels, _, _ = _tiny_problem(ipc=2, seed=3)
    lrs = (0.5, 0.2, 0.3)
    manual = copy.deepcopy(net)
    for t, lr in enumerate(lrs):
        rows = torch.tensor([t % 2, 2 + t % 2])
        manual.zero_grad()
        F.cross_entropy(manual(images[rows]), labels[rows]).backward()
        with torch.no_grad():
            for p in manual.parameters():
                p -= lr * p.grad
    settings = TrainSettings(epochs=50, lr=0.01, batch=256, step_lrs=lrs, ipc=2)
    train_network(net, images, labels, settings, torch.Generator().manual_seed(0))
    for a, b in zip(net.parameters(), manual.parameters()):
        torch.testing.assert_close(a, b)
    assert settings.describe()["steps"] == 3 and settings.describe()["lrs"] == [0.5, 0.2, 0.3]


def test_evaluate_set_uses_a_1d_lr_per_step_and_a_single_lr_as_before(monkeypatch):
    info = get_source("mnist")
    two = info.__class__("mnist", 1, 8, ("dark", "light"), info.mean, info.std)
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.randint(0, 60, (10, 1, 8, 8), generator=g, dtype=torch.uint8),
                        torch.randint(190, 256, (10, 1, 8, 8), generator=g, dtype=torch.uint8)])
    real = RealData(images, torch.tensor([0] * 10 + [1] * 10), two)
    syn = real.rows(real.random_class_balanced(2, torch.Generator().manual_seed(5)))
    replayed = []
    original = evaluate.replay_steps
    def recording(net, x, y, settings, generator):
        replayed.append(settings.step_lrs)
        return original(net, x, y, settings, generator)

    monkeypatch.setattr(evaluate, "replay_steps", recording)

    def run(lr):
        return evaluate_set(syn, torch.tensor([0, 0, 1, 1]), soft_labels=None, lr=lr, ipc=2, model="MLP", models=[],
                            runs=1, epochs=2, default_lr=0.01, batch=256, augment="none", seed=0, train=real,
                            test=real, random_baseline=False)

    per_step = run(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert replayed == [pytest.approx((0.1, 0.2, 0.3, 0.4))]
    assert per_step["protocol"]["lr_source"] == "learned per step (replayed)" and per_step["protocol"]["steps"] == 4
    single = run(torch.tensor(0.05))
    assert len(replayed) == 1 and single["protocol"]["lr"] == pytest.approx(0.05)
