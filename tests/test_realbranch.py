"""DM's real branch: the per-class fast path against the plain per-class computation."""

import warnings

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import builders.methods.dm as dm_module
import builders.realbranch as realbranch
from builders import compiling
from builders.build import build, recipe_from_dict
from builders.data import RealData
from builders.errors import BuildError, CompileError, RecipeError
from builders.methods.base import BuildContext
from builders.methods.dm import DistributionMatching
from builders.networks import build_network
from builders.realbranch import CHUNK, _avg_pool_2x2, class_mean_embeddings
from condensed_datasets.sources import get_source


def _context(model: str, precision: str = "fp32", per_class: int = 12, size: int = 12,
             compile: bool | str = False) -> BuildContext:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10 * per_class, 1, size, size), generator=g, dtype=torch.uint8)
    real = RealData(images, torch.arange(10).repeat_interleave(per_class), get_source("fashionmnist"))
    recipe = recipe_from_dict({"source": "fashionmnist", "method": "dm", "ipc": 2, "model": model,
                               "augment": "color_crop_cutout_flip_scale_rotate",
                               "params": {"batch_real": 8, "precision": precision, "compile": compile}})
    return BuildContext(recipe, real, torch.device("cpu"), torch.Generator().manual_seed(1), augmenter=None)


def _spy(ctx: BuildContext) -> tuple[list, list]:
    """Record the networks ``ctx`` draws and each class's augmented (real, synthetic) batch pair."""
    nets, pairs = [], []
    new_network, apply = ctx.new_network, ctx.apply_siamese_draws
    ctx.new_network = lambda name=None: nets.append(new_network(name)) or nets[-1]

    def spy(draws, *batch_lists):
        out = apply(draws, *batch_lists)
        pairs.extend(zip(*out))
        return out

    ctx.apply_siamese_draws = spy
    return nets, pairs


def _loss_and_plain_loss(model: str, precision: str = "fp32", compile: bool = False):
    """DM's loss, and the loss computed class by class with ``net.embed``, on the same net and draws."""
    from builders.augment import Augmenter

    ctx = _context(model, precision, compile=compile)
    ctx.augmenter = Augmenter(ctx.recipe.augment)
    nets, draws = _spy(ctx)
    method = DistributionMatching(ctx)
    state = method.initial_state()
    loss = next(iter(method.losses(state, 0)))
    net = nets[0]
    plain = sum(((net.embed(real).detach().mean(0) - net.embed(syn).mean(0)) ** 2).sum() for real, syn in draws)
    return loss, plain, state["images"]


@pytest.mark.parametrize("model, compile", [("ConvNetW32", False), ("ConvNetD2", False), ("ConvNetMP", False),
                                            ("ConvNetW32", True)])
def test_fast_path_loss_and_image_gradient_equal_the_plain_per_class_computation(model, compile):
    loss, plain, images = _loss_and_plain_loss(model, compile=compile)
    # the shared augmentation graph is kept for the second pass; a compiled backward runs once (as in a build)
    (plain_grad,) = torch.autograd.grad(plain, images, retain_graph=True)
    (grad,) = torch.autograd.grad(loss, images)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0


def test_bf16_real_branch_stays_close_to_fp32():
    loss, plain, images = _loss_and_plain_loss("ConvNetW32", precision="bf16-real")
    (grad,) = torch.autograd.grad(loss, images, retain_graph=True)
    (plain_grad,) = torch.autograd.grad(plain, images)
    torch.testing.assert_close(loss, plain, rtol=5e-2, atol=1e-3)
    assert torch.nn.functional.cosine_similarity(grad.flatten(), plain_grad.flatten(), dim=0) > 0.99


def test_batchnorm_networks_are_refused_by_the_per_class_path():
    net = build_network("ConvNetBN", 1, 10, (12, 12), seed=0)
    with pytest.raises(ValueError, match="BatchNorm"):
        class_mean_embeddings(net, [torch.zeros(2, 1, 12, 12)])


def test_batchnorm_dm_loss_is_the_concatenated_computation():
    ctx = _context("ConvNetBN")
    nets, draws = _spy(ctx)
    method = DistributionMatching(ctx)
    loss = next(iter(method.losses(method.initial_state(), 0)))
    net = nets[0]
    real = net.embed(torch.cat([r for r, _ in draws])).detach().view(10, 8, -1).mean(1)
    syn = net.embed(torch.cat([s for _, s in draws])).view(10, 2, -1).mean(1)
    torch.testing.assert_close(loss, ((real - syn) ** 2).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_view_pooling_equals_average_pooling(size):
    x = torch.randn(3, 4, *size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_avg_pool_2x2(x.clone()), nn.AvgPool2d(2, 2)(x))



def test_class_means_over_several_chunks_equal_the_plain_means():
    net = build_network("ConvNetW32", 1, 10, (12, 12), seed=0)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(CHUNK + 7, 1, 12, 12, generator=g), torch.randn(3, 1, 12, 12, generator=g)]
    with torch.no_grad():
        plain = torch.stack([net.embed(b).mean(0) for b in batches])
    torch.testing.assert_close(class_mean_embeddings(net, batches), plain, rtol=1e-5, atol=1e-6)


def test_concatenated_passes_give_the_plain_class_means(monkeypatch):
    # The GPU route (one pass over all classes' batches, in GPU_CHUNK pieces), forced on the CPU; a small
    # GPU_CHUNK makes the pieces cut across class boundaries.
    monkeypatch.setattr(realbranch, "GPU_CHUNK", 5)
    net = build_network("ConvNetW32", 1, 10, (12, 12), seed=0)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 1, 12, 12, generator=g) for n in (7, 3, 11)]
    with torch.no_grad():
        plain = torch.stack([net.embed(b).mean(0) for b in batches])
    torch.testing.assert_close(class_mean_embeddings(net, batches, concatenate=True), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["ConvNetD1", "ConvNetAS", "ConvNetAL", "ConvNetASwish", "ConvNetNN", "ConvNetLN",
                                   "ConvNetGN", "ConvNetNP", "ConvNetMP"])
def test_the_weights_function_is_the_networks_embedding(model):
    # The function compiled by params.compile, run uncompiled: every ConvNet variant's layers translate.
    net = build_network(model, 1, 10, (12, 12), seed=0)
    spec, weights = realbranch._functional_layers(net)
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(realbranch._embed_from_weights(x, weights, spec), net.embed(x), rtol=1e-5, atol=1e-6)


def test_only_convnets_without_batch_statistics_are_compilable():
    assert realbranch.compilable(build_network("ConvNetW32", 1, 10, (12, 12), seed=0))
    assert not realbranch.compilable(build_network("ConvNetBN", 1, 10, (12, 12), seed=0))
    assert not realbranch.compilable(build_network("MLP", 1, 10, (12, 12), seed=0))


def test_compiled_class_means_equal_the_plain_means_and_a_fresh_network_does_not_recompile():
    # The one compiling test (inductor compiles C++ kernels: tens of seconds with a cold cache). Shapes
    # are those of _context's DM builds, so a DM build with params.compile in this process reuses them.
    g = torch.Generator().manual_seed(7)

    def check(seed: int) -> None:
        net = build_network("ConvNetW32", 1, 10, (12, 12), seed=seed)
        batches = [torch.randn(8, 1, 12, 12, generator=g) for _ in range(3)]
        with torch.no_grad():
            plain = torch.stack([net.embed(b).mean(0) for b in batches])
        torch.testing.assert_close(class_mean_embeddings(net, batches, compiled=True), plain, rtol=1e-5, atol=1e-6)

    check(seed=0)  # compiles (or finds this shape compiled by an earlier test)
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(seed=1)  # DM draws a fresh network every iteration: it must reuse the compiled code


def test_dm_with_compile_warns_and_runs_uncompiled_for_batchnorm_networks():
    ctx = _context("ConvNetBN", compile=True)
    method = DistributionMatching(ctx)
    state = method.initial_state()
    with pytest.warns(UserWarning, match="params.compile: model 'ConvNetBN'"):
        loss = next(iter(method.losses(state, 0)))
    assert torch.isfinite(loss)


def test_a_failed_compilation_is_a_build_error_that_names_the_fix():
    # No C++ compiler for inductor (a shape no other test compiles, and no cache to fall back on).
    net = build_network("ConvNetW32", 1, 10, (13, 13), seed=0)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/bin/c++",), "fx_graph_cache": False}):
        with pytest.raises(BuildError, match="params.compile: torch.compile could not compile.*params.compile: false"):
            class_mean_embeddings(net, [torch.rand(7, 1, 13, 13)], compiled=True)


@pytest.mark.parametrize("sizes", [[3, 3, 3], [1, 4, 2], [5], [2, 0, 2]])
def test_group_means_are_the_means_of_consecutive_groups(sizes):
    rows = torch.randn(sum(sizes), 4, 2, generator=torch.Generator().manual_seed(len(sizes)))
    means = realbranch.group_means(rows, sizes)
    start = 0
    for i, size in enumerate(sizes):
        assert torch.allclose(means[i], rows[start:start + size].mean(0), atol=1e-6, equal_nan=True)
        start += size
    assert means.shape == (len(sizes), 4, 2)


def test_picked_class_positions_hold_that_class_and_give_sample_class_images():
    real = _context("ConvNetW32").real
    picked = real.pick_class(3, 5, torch.Generator().manual_seed(7))
    assert len(set(picked.tolist())) == 5 and (real.labels[picked] == 3).all()
    assert torch.equal(real.rows(picked), real.sample_class(3, 5, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_compile_takes_true_false_or_auto(value):
    assert _context("ConvNetW32", compile=value).recipe.params["compile"] == value


@pytest.mark.parametrize("value", ["yes", 1, "on", None])
def test_compile_refuses_anything_else_and_names_the_choices(value):
    with pytest.raises(RecipeError, match="params.compile: .*(valid: false, true, auto|expected a string)"):
        _context("ConvNetW32", compile=value)


def test_compile_auto_does_not_compile_on_a_cpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("compiled on a CPU under params.compile: auto")

    monkeypatch.setattr(realbranch, "_compiled_embed", refuse)
    monkeypatch.setattr(realbranch, "_compiled_winograd", refuse)
    ctx = _context("ConvNetW32", compile="auto")
    method = DistributionMatching(ctx)
    assert torch.isfinite(next(iter(method.losses(method.initial_state(), 0))))


@pytest.mark.parametrize("device, iterations, compiles", [
    ("cuda", dm_module.AUTO_COMPILE_MIN_ITERATIONS, True),
    ("cuda:1", 20000, True),
    ("cuda", dm_module.AUTO_COMPILE_MIN_ITERATIONS - 1, False),
    ("cuda", 200, False),  # the quickstart's length
    ("cpu", 20000, True),
    ("cpu", dm_module.AUTO_COMPILE_MIN_ITERATIONS_CPU, True),
    ("cpu", dm_module.AUTO_COMPILE_MIN_ITERATIONS_CPU - 1, False),
    ("cpu", 200, False),  # the quickstart
    ("meta", 20000, False),  # no other device
])
def test_compile_auto_compiles_long_builds(device, iterations, compiles):
    assert dm_module.auto_compiles(torch.device(device), iterations) is compiles


def test_compile_auto_decides_on_the_recipes_iterations(monkeypatch):
    asked = []
    monkeypatch.setattr(dm_module, "auto_compiles", lambda device, iterations: asked.append(iterations) or False)
    ctx = _context("ConvNetW32", compile="auto")
    method = DistributionMatching(ctx)
    next(iter(method.losses(method.initial_state(), 7)))  # a resumed build: the recipe's count all the same
    assert asked and set(asked) == {ctx.recipe.iterations}


def test_compile_auto_falls_back_to_uncompiled_with_a_warning_when_compilation_fails(monkeypatch):
    # auto compiling here (as on a GPU), with no C++ compiler for inductor and a shape no other test compiles
    monkeypatch.setattr(dm_module, "auto_compiles", lambda device, iterations: True)
    ctx = _context("ConvNetW32", compile="auto", size=11)
    nets, pairs = _spy(ctx)
    method = DistributionMatching(ctx)
    state = method.initial_state()
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/bin/c++",), "fx_graph_cache": False}):
        with pytest.warns(UserWarning, match="could not compile.*This build runs uncompiled"):
            loss = next(iter(method.losses(state, 0)))
        plain = sum(((nets[0].embed(real).mean(0) - nets[0].embed(syn).mean(0)) ** 2).sum() for real, syn in pairs)
        torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
        assert not method.compile.compiles(nets[0])  # the rest of the build runs uncompiled, without trying again


# torch versions without the switch compile a backward pass at its first .backward(), outside the fallback (the
# pinned torch has it; the GPU machine's may not)
NEEDS_EAGER_BACKWARD_LOWERING = pytest.mark.skipif(
    not hasattr(compiling.functorch_config, compiling.SWITCH),
    reason="this torch compiles backward passes lazily only (no force_non_lazy_backward_lowering)")


def _backward_fails_to_compile(monkeypatch) -> list[int]:
    """DM's compiled functions through a backend whose forward compiles (as it is) and whose backward fails to,
    as inductor's does without a working compiler for the backward kernels; returns the list of failed tries."""
    failures: list[int] = []

    def forward(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def backward(gm, example_inputs):
        failures.append(1)
        raise RuntimeError("no compiler for the backward kernels")

    backend = aot_autograd(fw_compiler=forward, bw_compiler=backward)

    # functions of this test's own (dynamo keeps compiled code per function): other tests' compiled code is left alone
    def embed(x, weights, spec):
        return realbranch._embed_from_weights(x, weights, spec)

    def embed_winograd(x, prepared, steps, transforms):
        return realbranch.winograd.embed_chwn(x, prepared, steps, transforms)

    compiled = torch.compile(embed, dynamic=False, backend=backend)
    compiled_winograd = torch.compile(embed_winograd, dynamic=False, backend=backend)
    monkeypatch.setattr(realbranch, "_compiled_embed", lambda device_type: compiled)
    monkeypatch.setattr(realbranch, "_compiled_winograd", lambda: compiled_winograd)
    return failures


@NEEDS_EAGER_BACKWARD_LOWERING
def test_compile_auto_falls_back_when_the_backward_pass_fails_to_compile(fashion_mnist_root, tmp_path, monkeypatch):
    # torch.compile compiles a backward pass at its first .backward(), outside DM's fallback: it must be compiled
    # with the forward pass, so that "auto" redoes the iteration uncompiled and builds the uncompiled set
    recipe = {"source": "fashionmnist", "method": "dm", "ipc": 1, "model": "ConvNetW32", "seed": 4, "iterations": 2,
              "checkpoint_every": 0, "augment": "none", "real_per_class": 8, "params": {"batch_real": 8}}
    plain = build(recipe_from_dict(recipe, [("params.compile", False)]), out_root=tmp_path / "plain",
                  data_root=fashion_mnist_root, device="cpu", evaluate=False, progress=False)
    monkeypatch.setattr(dm_module, "auto_compiles", lambda device, iterations: True)  # auto compiles here, as on a GPU
    failures = _backward_fails_to_compile(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = build(recipe_from_dict(recipe, [("params.compile", "auto")]), out_root=tmp_path / "auto",
                     data_root=fashion_mnist_root, device="cpu", evaluate=False, progress=False)
    fallbacks = [w for w in caught if "This build runs uncompiled" in str(w.message)]
    assert len(fallbacks) == 1 and "no compiler for the backward kernels" in str(fallbacks[0].message)
    assert failures == [1]  # the later iteration ran uncompiled without trying again
    assert torch.equal(auto.images, plain.images)


@NEEDS_EAGER_BACKWARD_LOWERING
def test_compile_true_stops_when_the_backward_pass_fails_to_compile(monkeypatch):
    _backward_fails_to_compile(monkeypatch)
    ctx = _context("ConvNetW32", compile=True, size=10)
    method = DistributionMatching(ctx)
    with pytest.raises(CompileError, match="could not compile the network.*params.compile: false"):
        next(iter(method.losses(method.initial_state(), 0)))
