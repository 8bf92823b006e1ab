"""MTT: the matching loss by hand, the positive step size, constant-memory = unrolled gradients, builds."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_EXPERTS, assert_resume_is_identical
from torch import nn

from builders.augment import Augmenter
from builders.build import build, recipe_from_dict
from builders.engine import Engine
from builders.experts import ExpertStoreError, ParamLayout, flat_parameters
from builders.methods.mtt import matching_loss
from builders.methods.trajectory import (
    InnerPlan,
    StudentTrajectory,
    make_plan,
    raw_from_syn_lr,
    syn_lr_from_raw,
    unrolled_matching_loss,
)
from builders.networks import build_network
from builders.recipe import RecipeError
from condensed_datasets.format import CondensedSet

# -- the loss by hand ------------------------------------------------------------------------------


def test_matching_loss_of_a_linear_student_equals_the_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False)).double()
    layout = ParamLayout.of(net)
    w0 = torch.randn(3, 4, dtype=torch.float64)
    target = torch.randn(3, 4, dtype=torch.float64)
    images = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    plan = InnerPlan([torch.tensor([0, 1, 2]), torch.tensor([3, 4])], [None, None])
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    traj = StudentTrajectory(net, layout, w0.reshape(-1), target.reshape(-1), plan)
    loss = unrolled_matching_loss(traj, images, lr, labels)

    def ce_gradient(w, idx):  # d/dW mean cross-entropy of a linear model, written out
        x = images[idx].reshape(len(idx), -1)
        p = torch.softmax(x @ w.T, dim=1)
        return (p - F.one_hot(labels[idx], 3).double()).T @ x / len(idx)

    w1 = w0 - 0.3 * ce_gradient(w0, plan.batches[0])
    w2 = w1 - 0.3 * ce_gradient(w1, plan.batches[1])
    expected = ((w2 - target) ** 2).sum() / ((w0 - target) ** 2).sum()
    torch.testing.assert_close(loss, expected)

    # One step: dL/dlr = -2 <w1 - target, g0> / ||w0 - target||^2.
    one = StudentTrajectory(net, layout, w0.reshape(-1), target.reshape(-1), InnerPlan(plan.batches[:1], [None]))
    (grad,) = torch.autograd.grad(unrolled_matching_loss(one, images, lr, labels), lr)
    g0 = ce_gradient(w0, plan.batches[0])
    torch.testing.assert_close(grad, -2 * ((w1 - target) * g0).sum() / ((w0 - target) ** 2).sum())


def test_plan_covers_every_image_once_per_pass_and_is_reproducible():
    plan = make_plan(10, 5, 4, torch.Generator().manual_seed(1), Augmenter("flip_crop"))
    assert [len(b) for b in plan.batches] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat(plan.batches[:3]).tolist()) == list(range(10))
    assert all(d is not None and d.batch_size == len(b) for d, b in zip(plan.draws, plan.batches))
    again = make_plan(10, 5, 4, torch.Generator().manual_seed(1), Augmenter("flip_crop"))
    assert all(torch.equal(a, b) for a, b in zip(plan.batches, again.batches))
    assert [len(b) for b in make_plan(10, 2, 0, torch.Generator()).batches] == [10, 10]  # 0: all images


# -- the step size ---------------------------------------------------------------------------------


def test_step_size_starts_at_lr_teacher_and_moves_like_the_papers_there():
    raw = raw_from_syn_lr(0.01, 0.01).requires_grad_(True)
    lr = syn_lr_from_raw(raw, 0.01)
    torch.testing.assert_close(lr, torch.tensor(0.01))
    lr.backward()
    assert raw.grad.item() == 1.0  # linear region: a step on raw is the same step on syn_lr


def test_step_size_stays_positive_after_a_huge_gradient_step():
    raw = raw_from_syn_lr(0.01, 0.01).requires_grad_(True)
    opt = torch.optim.SGD([raw], lr=1e-5, momentum=0.5)
    for _ in range(3):
        opt.zero_grad()
        (syn_lr_from_raw(raw, 0.01) * 1e12).backward()  # pushes the step size far below zero
        opt.step()
    lr = syn_lr_from_raw(raw, 0.01)
    assert torch.isfinite(lr) and lr.item() > 0
    assert raw.item() < -1e6  # a direct parametrisation would now be hugely negative
    assert syn_lr_from_raw(torch.tensor(-1e30), 0.01).item() == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="floor"):
        raw_from_syn_lr(0.0, 0.01)


# -- constant memory -------------------------------------------------------------------------------


def _problem(model, shape, n=6, steps=5, batch=4, soft=False, augment=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = build_network(model, shape[0], 3, shape[1:], seed=seed).double()
    layout = ParamLayout.of(net)
    start = flat_parameters(net)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    labels = (torch.randn(n, 3, generator=g, dtype=torch.float64) if soft
              else torch.randint(0, 3, (n,), generator=g))
    augmenter = Augmenter("color_crop_cutout_flip_scale_rotate") if augment else None
    plan = make_plan(n, steps, batch, g, augmenter)
    return StudentTrajectory(net, layout, start, target, plan, augmenter), images, labels


def _grads(traj, images, labels, memory):
    images = images.clone().requires_grad_(True)
    raw = raw_from_syn_lr(0.05, 0.05).double().requires_grad_(True)
    labels = labels.clone().requires_grad_(True) if labels.is_floating_point() else labels
    loss = matching_loss(traj, images, syn_lr_from_raw(raw, 0.05), labels, memory)
    loss.backward()
    return loss.detach(), images.grad, raw.grad, labels.grad if labels.is_floating_point() else None


@pytest.mark.parametrize("soft", [False, True])
def test_constant_memory_gradients_equal_unrolled_on_an_mlp(soft):
    traj, images, labels = _problem("MLP", (1, 4, 4), soft=soft)
    unrolled = _grads(traj, images, labels, "unrolled")
    constant = _grads(traj, images, labels, "constant")
    for a, b in zip(unrolled, constant):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert unrolled[1].abs().sum() > 0 and unrolled[2].abs() > 0


def test_constant_memory_gradients_equal_unrolled_on_a_convnet_with_dsa():
    traj, images, labels = _problem("ConvNetW32", (1, 16, 16), n=4, steps=3, batch=3, soft=True)
    for a, b in zip(_grads(traj, images, labels, "unrolled"), _grads(traj, images, labels, "constant")):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-11)


# -- builds through the engine ---------------------------------------------------------------------

MTT = {
    "source": "fashionmnist", "method": "mtt", "ipc": 2, "model": "ConvNetW32", "seed": 2,
    "real_per_class": 10, "iterations": 4, "checkpoint_every": 2,
    "augment": "color_crop_cutout_flip_scale_rotate",
    "params": {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 1, "batch_syn": 10, "lr_img": 10.0,
               "lr_lr": 1e-6},
    "eval": {"runs": 1, "epochs": 2, "test_per_class": 10},
}


def mtt_engine(root, out, store, evaluate=False, **params):
    recipe = recipe_from_dict({**MTT, "params": {**MTT["params"], "expert_dir": str(store.path), **params}})
    return Engine(recipe, out_root=out, data_root=root, device="cpu", progress=False, evaluate=evaluate)


def test_mtt_build_writes_a_set_with_its_learned_lr(fashion_mnist_root, tmp_path, expert_store):
    e = mtt_engine(fashion_mnist_root, tmp_path, expert_store)
    cset = e.run()
    loaded = CondensedSet.load(e.paths.set)
    assert loaded.images.shape == (20, 1, 28, 28) and loaded.soft_labels is None
    assert loaded.lr.shape == () and loaded.lr.dtype == torch.float32 and loaded.lr.item() > 0
    assert loaded.lr.item() == pytest.approx(loaded.metadata["build"]["method"]["syn_lr"])
    assert loaded.metadata["build"]["method"]["experts"]["num_experts"] == 2
    assert loaded.zca is None and torch.equal(cset.images, loaded.images)
    losses = [json.loads(l)["loss"] for l in e.paths.log.read_text().splitlines()]
    assert len(losses) == 4 and all(0 < v < float("inf") for v in losses)


def test_constant_memory_build_follows_the_unrolled_one(fashion_mnist_root, tmp_path, expert_store):
    a = mtt_engine(fashion_mnist_root, tmp_path / "a", expert_store, memory="unrolled")
    b = mtt_engine(fashion_mnist_root, tmp_path / "b", expert_store, memory="constant")
    sa, sb = a.run(), b.run()
    la = [json.loads(l)["loss"] for l in a.paths.log.read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in b.paths.log.read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-3)
    torch.testing.assert_close(sb.images, sa.images, rtol=1e-3, atol=1e-3)


def test_a_killed_mtt_build_resumes_to_the_same_bytes(fashion_mnist_root, tmp_path, expert_store, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert_resume_is_identical(lambda out: mtt_engine(fashion_mnist_root, out, expert_store), tmp_path, 3)


def test_a_zca_build_carries_the_experts_whitening_into_the_set(fashion_mnist_root, tmp_path):
    experts = {**TINY_EXPERTS, "params": {**TINY_EXPERTS["params"], "num_experts": 1, "zca": True}}
    store = build(recipe_from_dict(experts), out_root=tmp_path, data_root=fashion_mnist_root, device="cpu",
                  progress=False)
    e = mtt_engine(fashion_mnist_root, tmp_path, store, evaluate=True, zca=True)
    cset = e.run()
    zca = store.load_zca()
    assert cset.metadata["zca"]["eps"] == 0.1 and "accuracy_mean" in cset.metadata["evaluation"]
    torch.testing.assert_close(CondensedSet.load(e.paths.set).zca.transform, zca.transform)
    (tmp_path / "FashionMNIST").symlink_to(fashion_mnist_root / "FashionMNIST", target_is_directory=True)
    from condensed_datasets import CondensedFashionMNIST
    from condensed_datasets.sources import load_split

    x, _ = CondensedFashionMNIST(tmp_path, method="mtt", ipc=2).real_test_set()[0]
    raw, _ = load_split("fashionmnist", fashion_mnist_root, train=False)
    # The references' ZCA space: whitened raw [0, 1] pixels, no normalisation (the set records the identity).
    torch.testing.assert_close(x, zca(raw[0].float() / 255), atol=1e-4, rtol=1e-4)
    assert cset.metadata["normalization"] == {"mean": [0.0], "std": [1.0]}
    real = e._context().real  # the experts' whitening was fitted on the raw pixels of the split they trained on
    torch.testing.assert_close(zca.mean, (real.images.float() / 255).reshape(len(real), -1).mean(0), atol=1e-6, rtol=0)


def test_missing_or_unfit_experts_say_which_recipe_builds_them(fashion_mnist_root, tmp_path, expert_store):
    recipe = recipe_from_dict(MTT)
    e = Engine(recipe, out_root=tmp_path, data_root=fashion_mnist_root, device="cpu", progress=False,
               evaluate=False)
    with pytest.raises(ExpertStoreError, match=r"no expert trajectories at .*condensed-build "
                                               r"recipes/experts_fashionmnist\.yaml --set model=ConvNetW32"):
        e.run()
    with pytest.raises(ExpertStoreError, match="reaches epoch 4.*condensed-build recipes/experts_fashionmnist"):
        mtt_engine(fashion_mnist_root, tmp_path, expert_store, max_start_epoch=3, expert_epochs=2).run()
    with pytest.raises(ExpertStoreError, match="zca off, the recipe needs it on"):
        mtt_engine(fashion_mnist_root, tmp_path, expert_store, zca=True).run()
    with pytest.raises(RecipeError, match="params.memory"):
        recipe_from_dict({**MTT, "params": {"memory": "tiny"}})


# -- shipped recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["experts", "mtt", "datm"])
@pytest.mark.parametrize("source", ["mnist", "fashionmnist", "svhn", "cifar10", "cifar100", "tinyimagenet"])
def test_shipped_recipes_load_at_every_ipc_they_tune(method, source):
    from builders.build import load_recipe
    from builders.recipe import RECIPES_DIR, load_recipe_data

    path = RECIPES_DIR / f"{method}_{source}.yaml"
    for ipc in [1, 10, 50] if method != "experts" else [1]:
        r = load_recipe(path, [("ipc", ipc)])
        assert r.method == method and r.source == source
        if method == "experts":
            assert r.params["lr_teacher"] == 0.01 and r.params["batch"] == 256 and r.params["num_experts"] == 100
        else:
            assert r.params["max_start_epoch"] - 1 + r.params["expert_epochs"] < (100 if source in ("cifar100", "tinyimagenet") else 50)
    assert sorted(load_recipe_data(path).get("ipc_overrides", {})) in ([1, 50], [])


def test_shipped_recipes_carry_the_papers_settings():
    from builders.build import load_recipe
    from builders.recipe import RECIPES_DIR

    r = load_recipe(RECIPES_DIR / "mtt_cifar10.yaml", [("ipc", 1)])
    assert (r.params["syn_steps"], r.params["max_start_epoch"], r.params["lr_img"], r.params["zca"]) == (50, 2, 100.0, True)
    r = load_recipe(RECIPES_DIR / "mtt_cifar100.yaml", [("ipc", 50)])
    assert (r.params["syn_steps"], r.params["batch_syn"], r.params["zca"]) == (80, 125, True)
    r = load_recipe(RECIPES_DIR / "datm_cifar10.yaml", [("ipc", 10)])
    assert (r.params["current_max_start_epoch"], r.params["max_start_epoch"], r.params["expansion_end_epoch"],
            r.params["sequential_generation"], r.params["lr_y"], r.eval.batch) == (10, 20, 1000, True, 2.0, 128)
    r = load_recipe(RECIPES_DIR / "datm_tinyimagenet.yaml", [("ipc", 50)])
    assert (r.model, r.params["min_start_epoch"], r.params["max_start_epoch"], r.params["sequential_generation"]) == (
        "ConvNetD4", 40, 70, False)
    for name in ("experts_fashionmnist_quick.yaml", "mtt_fashionmnist_quick.yaml", "datm_fashionmnist_quick.yaml"):
        load_recipe(RECIPES_DIR / name)
