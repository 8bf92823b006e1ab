"""Networks trained together follow the trajectories they follow trained alone."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from builders import wide_convnet
from builders.augment import Augmenter
from builders.dc_augment import make_augmenter
from builders.ensemble import _VmapStep, _WideStep, make_device_step, together_mode, train_together, use_together
from builders.evaluate import TrainSettings, label_loss, train_network, train_step
from builders.networks import build_network
from builders.wide_convnet import FORMS, AvgPool2x2, WideConvNet, _from_wide, widen_inputs, widens

DSA = "color_crop_cutout_flip_scale_rotate"


def _data(n=16, size=12):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 10


def _assert_same_trajectories(model, count, augment, targets=None, epochs=3, device="cpu", form="grouped",
                              compiled=False):
    images, labels = (t.to(device) for t in _data())
    targets = labels if targets is None else targets
    settings = TrainSettings(epochs=epochs, lr=0.01, batch=8, augmenter=Augmenter(augment) if augment else None)
    seeds = [11 + i for i in range(count)]
    nets = [build_network(model, 1, 10, (12, 12), seed=s).to(device) for s in seeds]
    alone = [copy.deepcopy(n) for n in nets]
    train_together(nets, images, targets, settings, [torch.Generator().manual_seed(s) for s in seeds], label_loss,
                   wide_form=form, wide_compile=compiled)
    for net, single, s in zip(nets, alone, seeds):
        before = copy.deepcopy(single.state_dict())
        train_network(single, images, targets, settings, torch.Generator().manual_seed(s))
        moved = max((single.state_dict()[k] - before[k]).abs().max().item() for k in before)
        assert moved > 1e-3  # the steps changed the weights: the comparison below is not vacuous
        for (name, got), want in zip(net.state_dict().items(), single.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("model, count, augment", [
    ("ConvNetW32", 1, DSA),  # N = 1: the wide form is the network itself
    ("ConvNetW32", 3, DSA),
    ("ConvNetW32", 4, None),
    ("ConvNetD2", 3, DSA),  # width 128, depth 2
    ("ConvNetLN", 2, "crop_scale"),  # layer norm: GroupNorm(N, N*C) and the elementwise affine
    ("ConvNetBN", 3, DSA),  # batch norm: each network's running statistics (compared too) and batch counts
])
def test_a_convnet_trained_wide_follows_its_trajectory_alone(model, count, augment, form):
    assert together_mode(build_network(model, 1, 10, (12, 12))) == "wide"
    _assert_same_trajectories(model, count, augment, epochs=4, form=form)  # 8 steps, lr x0.1 after epoch 2


def test_a_compiled_wide_network_follows_the_trajectories_alone():
    # torch.compile (inductor's C++ kernels here, Triton on a GPU) of the wide forward and its backward: the same
    # maths up to float rounding, through the learning-rate drop; about 20 s of compilation on a CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_same_trajectories("ConvNetW32", 3, DSA, epochs=4, compiled=True)
    assert not [w for w in caught if "wide_compile" in str(w.message)]  # compiled: not the uncompiled fallback


def test_a_wide_compilation_that_fails_warns_once_and_trains_uncompiled(monkeypatch):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(wide_convnet, "compile_static",
                        lambda function, device: torch.compile(function, backend=no_compiler))
    images, labels = _data()
    settings = TrainSettings(epochs=2, lr=0.01, batch=8, augmenter=Augmenter(DSA))
    trained = {}
    for compiled in (True, False):
        nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s) for s in (1, 2)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_together(nets, images, labels, settings, [torch.Generator().manual_seed(s) for s in (1, 2)],
                           label_loss, wide_compile=compiled)
        trained[compiled] = (nets, [str(w.message) for w in caught])
    said = [m for m in trained[True][1] if "wide_compile" in m]
    assert len(said) == 1 and "no compiler here" in said[0] and "pass wide_compile=False" in said[0]
    assert not trained[False][1]
    for fell_back, plain in zip(*(trained[c][0] for c in (True, False))):
        for (name, got), want in zip(fell_back.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(got, want), name  # the uncompiled steps, bit for bit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_compiled_step_captured_as_a_cuda_graph_follows_the_trajectories_alone(monkeypatch):
    # Triton's kernels compiled in the eager warm-up, then captured and replayed
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_same_trajectories("ConvNetW32", 3, DSA, epochs=4, device="cuda", compiled=True)
    fallbacks = [str(w.message) for w in caught if "GraphedStep" in str(w.message) or "wide_compile" in str(w.message)]
    assert not fallbacks  # neither the capture nor the compilation was given up (torch's own advice may be said)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("model", ["ConvNetW32", "ConvNetBN"])  # BatchNorm: running statistics updated in the graph
def test_on_a_gpu_the_step_replayed_as_a_cuda_graph_follows_the_trajectories_alone(monkeypatch, form, model):
    # 8 steps: 2 eager (warm-up), then captured, captured again after the learning-rate drop; float32 products
    # (no TF32) so that the grouped and the separate convolutions round alike
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture (eager fallback) would warn: fail instead
        _assert_same_trajectories(model, 3, DSA, epochs=4, device="cuda", form=form)


def test_soft_targets_train_wide_as_alone():
    probs = torch.softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(4)), 1)
    _assert_same_trajectories("ConvNetW32", 3, None, targets=probs)


def test_a_loss_that_is_not_a_mean_over_rows_trains_wide_as_alone():
    def summed(logits, targets):  # a sum over rows: the N networks' losses cannot be one call's mean
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    images, targets = _data()
    settings = TrainSettings(epochs=2, lr=0.001, batch=8)
    nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s) for s in (1, 2, 3)]
    alone = [copy.deepcopy(n) for n in nets]
    train_together(nets, images, targets, settings, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], summed)
    for net, single, s in zip(nets, alone, (1, 2, 3)):
        train_together([single], images, targets, settings, [torch.Generator().manual_seed(s)], summed)
        for got, want in zip(net.parameters(), single.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_other_networks_train_by_vmap_as_alone():
    assert together_mode(build_network("MLP", 1, 10, (12, 12))) == "vmap"
    _assert_same_trajectories("MLP", 3, DSA, form="split")  # a wide form: ignored by the vmap step


@pytest.mark.parametrize("size", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 4, 3, 3)])  # odd: the dropped row/column
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_wide_pooling_gives_avg_pool2d_values_and_gradients_bit_for_bit(size, layout):
    x = torch.randn(size, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    plain, wide = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = F.avg_pool2d(plain, 2), AvgPool2x2.apply(wide)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    want.backward(grad)
    got.backward(grad)
    assert torch.equal(got, want) and torch.equal(wide.grad, plain.grad)
    assert wide.grad.is_contiguous(memory_format=layout) or size[-1] % 2  # the layout kept (odd sizes: padded)
    assert wide.grad[..., -1].abs().sum() == 0 if size[-1] % 2 else True


def test_the_wide_pooling_differentiates_twice():
    """Gradient matching differentiates the network's gradient (create_graph) through AvgPool2x2's backward."""
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(AvgPool2x2.apply, (x,))


@pytest.mark.parametrize("form", FORMS)
def test_per_network_gives_each_networks_own_parameter_shapes_and_values(form):
    nets = [build_network("ConvNetLN", 1, 7, (12, 12), seed=s) for s in (1, 2, 3)]
    wide = WideConvNet(nets, form=form)
    rows = wide.per_network(wide.parameters())
    for i, net in enumerate(nets):
        for (name, param), stacked in zip(net.named_parameters(), rows):
            assert stacked[i].shape == param.shape and torch.equal(stacked[i], param), name
    with pytest.raises(ValueError, match="per_network"):
        wide.per_network(wide.parameters()[:-1])


@pytest.mark.parametrize("form", ["grouped", "channels_last"])
@pytest.mark.parametrize("device", ["meta", "cpu"])  # meta: shapes alone, standing in for a GPU
def test_off_the_cpu_one_channel_images_and_pooling_avoid_the_slow_gpu_kernels(monkeypatch, form, device):
    calls, conv2d, pools = [], F.conv2d, []

    def recording(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        calls.append((weight.shape[1], groups))
        return conv2d(x, weight, bias, stride, padding, dilation, groups)

    nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s).to(device) for s in (1, 2, 3)]
    wide = WideConvNet(nets, form=form)
    monkeypatch.setattr(F, "conv2d", recording)
    monkeypatch.setattr(AvgPool2x2, "apply", lambda x: pools.append(1) or F.avg_pool2d(x, 2))
    wide(wide.inputs(torch.randn(3, 4, 1, 12, 12, device=device)))
    if device == "cpu":  # the plain calls, faster there
        assert len(calls) == 3 and calls[0] == (1, 3) and not pools
    else:
        assert calls and all(per_group > 1 or groups == 1 for per_group, groups in calls)  # no grouped 1-channel call
        assert len(calls) == 3 + 2 and len(pools) == 3  # the first layer as 3 dense calls, the other two grouped


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("channels, side", [(3, 16), (1, 12)])  # one channel: the first layer's own path
@pytest.mark.parametrize("model", ["ConvNet", "ConvNetD1", "ConvNetW32", "ConvNetNN", "ConvNetGN", "ConvNetLN",
                                   "ConvNetMP", "ConvNetNP", "ConvNetAS", "ConvNetAL", "ConvNetASwish"])
def test_each_wide_form_gives_the_separate_logits_and_gradients(model, channels, side, form):
    _assert_wide_is_separate(model, channels, side, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("model", ["ConvNet", "ConvNetD1", "ConvNetNP", "ConvNetMP"])
def test_the_gpus_paths_give_the_separate_logits_and_gradients_too(monkeypatch, model, form):
    # the dense first-layer calls and AvgPool2x2, which run off the CPU, here on it
    monkeypatch.setattr(wide_convnet, "_off_cpu", lambda x: True)
    _assert_wide_is_separate(model, 1, 12, form)


def _assert_wide_is_separate(model, channels, side, form):
    # float64: in float32 the forms' rounding differs by ~1e-6, enough to flip a ReLU's mask where a norm's
    # output is that close to 0 (seen: ConvNetNP, one channel), which moves a gradient by its full value
    nets = [build_network(model, channels, 7, (side, side), seed=s).double() for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    batches = torch.randn(3, 5, channels, side, side, generator=g, dtype=torch.float64)  # each network its own
    weights = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)  # a gradient of its own for every logit
    wide = WideConvNet(nets, form=form)
    got = wide(wide.inputs(batches))
    (got * weights).sum().backward()
    want = torch.stack([net(x) for net, x in zip(nets, batches)])
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, leaf in wide.params.items():
        for i, net in enumerate(nets):
            torch.testing.assert_close(_from_wide(name, leaf.grad, 3)[i], net.get_parameter(name).grad,
                                       rtol=1e-10, atol=1e-10, msg=f"{name} of network {i}")  # grads up to ~10


def test_an_unknown_wide_form_is_refused_with_the_valid_ones():
    nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s) for s in (1, 2)]
    with pytest.raises(ValueError, match="'grouped', 'channels_last', 'split'"):
        WideConvNet(nets, form="nhwc")
    images, targets = _data()
    with pytest.raises(ValueError, match="unknown wide form 'nhwc'"):
        train_together(nets, images, targets, TrainSettings(epochs=1), [torch.Generator() for _ in nets], label_loss,
                       wide_form="nhwc")


def test_the_wide_form_covers_convnets_only():
    assert widens(build_network("ConvNet", 3, 10, (32, 32))) and widens(build_network("ConvNetBN", 3, 10, (32, 32)))
    cumulative = build_network("ConvNetBN", 3, 10, (32, 32))
    next(m for m in cumulative.modules() if isinstance(m, torch.nn.BatchNorm2d)).momentum = None
    assert not widens(cumulative)  # a cumulative average reads its batch count on the host each step
    for model in ("MLP", "LeNet", "AlexNet", "AlexNetBN"):
        assert not widens(build_network(model, 3, 10, (32, 32)))
    with pytest.raises(ValueError, match="ConvNet"):
        WideConvNet([build_network("MLP", 3, 10, (32, 32))])


def test_widened_inputs_put_network_i_on_channels_i_times_c():
    x = torch.arange(2 * 3 * 4 * 1 * 1.0).view(2, 3, 4, 1, 1)  # N=2 networks, B=3, C=4
    wide = widen_inputs(x)
    assert wide.shape == (3, 8, 1, 1)
    assert torch.equal(wide[:, 4:], x[1]) and torch.equal(wide[:, :4], x[0])


def test_each_form_lays_network_i_out_on_its_own_channels_or_rows():
    x = torch.arange(2 * 3 * 4 * 8 * 8.0).view(2, 3, 4, 8, 8)  # N=2 networks, B=3, C=4
    nets = [build_network("ConvNetW32", 4, 10, (8, 8), seed=s) for s in (1, 2)]
    grouped, last, split = (WideConvNet(nets, form=f).inputs(x) for f in ("grouped", "channels_last", "split"))
    assert torch.equal(grouped, widen_inputs(x)) and torch.equal(last, grouped)
    assert last.is_contiguous(memory_format=torch.channels_last) and not grouped.is_contiguous(
        memory_format=torch.channels_last)
    assert split.shape == (6, 4, 8, 8) and torch.equal(split[3:], x[1]) and torch.equal(split[:3], x[0])


@pytest.mark.parametrize("form", FORMS)
def test_write_back_restores_each_networks_parameters(form):
    nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s) for s in (1, 2)]
    copies = [copy.deepcopy(n) for n in nets]
    with torch.no_grad():
        for n in nets:
            for p in n.parameters():
                p.zero_()
    WideConvNet(copies, form=form).write_back(nets)
    for net, original in zip(nets, copies):
        for got, want in zip(net.parameters(), original.parameters()):
            assert torch.equal(got, want)


def test_apply_many_gives_each_batch_what_apply_gives_it():
    augmenter = Augmenter(DSA)
    batches = torch.rand(8, 4, 3, 10, 10, generator=torch.Generator().manual_seed(1)).unbind()
    draws = [augmenter.sample(torch.Generator().manual_seed(s), 4) for s in range(7)] + [augmenter.sample(
        torch.Generator().manual_seed(9), None)]  # per-sample draws of several families, and one siamese
    assert len({d.family for d in draws}) < len(draws)  # some families are shared: the joined path runs
    want = torch.cat([augmenter.apply(b, d) for b, d in zip(batches, draws)])
    torch.testing.assert_close(augmenter.apply_many(batches, draws), want, rtol=1e-6, atol=1e-6)


def test_batchnorm_networks_other_than_the_convnet_are_refused():
    images, targets = _data()
    nets = [torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(400, 10)) for _ in range(2)]
    with pytest.raises(ValueError, match="BatchNorm"):
        train_together(nets, images, targets, TrainSettings(epochs=1), [torch.Generator() for _ in nets], label_loss)


def test_networks_of_other_layers_are_refused():
    images, targets = _data()
    nets = [build_network(model, 1, 10, (12, 12), seed=1) for model in ("ConvNet", "ConvNetAS")]  # same shapes
    with pytest.raises(ValueError, match="same layers"):
        train_together(nets, images, targets, TrainSettings(epochs=1), [torch.Generator() for _ in nets], label_loss)


def test_together_is_the_default_on_cuda_only():
    assert use_together(torch.device("cuda"), 5) and not use_together(torch.device("cpu"), 5)
    assert not use_together(torch.device("cuda"), 1)



def test_evaluation_trained_together_gives_the_accuracies_of_one_by_one():
    from builders.data import RealData
    from builders.evaluate import evaluate_images
    from condensed_datasets.sources import get_source

    g = torch.Generator().manual_seed(5)
    test = RealData(torch.randint(0, 256, (30, 1, 12, 12), generator=g, dtype=torch.uint8),
                    torch.arange(30) % 10, get_source("fashionmnist"))
    images, targets = _data()
    settings = TrainSettings(epochs=2, batch=8)
    args = {"model": "ConvNetW32", "settings": settings, "test": test, "seeds": [1, 2]}
    assert evaluate_images(images, targets, together=True, **args) == evaluate_images(images, targets,
                                                                                      together=False, **args)


@pytest.mark.parametrize("form", FORMS)
def test_the_device_step_is_fed_device_tensors_and_applies_the_packed_draws(form):
    # make_device_step is the GPU work of train_together's step: one call here is one step of 2 networks
    images, targets = _data()
    augmenter = Augmenter(DSA)
    nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s) for s in (1, 2)]
    alone = [copy.deepcopy(n) for n in nets]
    step = _WideStep(nets, label_loss, form)
    opt = torch.optim.SGD(step.leaves, lr=0.01)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    idx = torch.stack([torch.randperm(16, generator=g)[:8] for g in gens])
    draws = [augmenter.sample(g, 8) for g in gens]
    make_device_step(step, opt, images, targets, augmenter)(idx, augmenter.pack(draws))
    step.write_back(nets)
    for net, single, i, d in zip(nets, alone, idx, draws):
        sgd = torch.optim.SGD(single.parameters(), lr=0.01)
        label_loss(single(augmenter.apply(images[i], d)), targets[i]).backward()
        sgd.step()
        for got, want in zip(net.parameters(), single.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model, form", [*(("ConvNetW32", f) for f in FORMS), *(("ConvNetBN", f) for f in FORMS),
                                         ("MLP", None)])
def test_the_device_step_reads_no_tensor_value_on_the_host(model, form):
    # what a CUDA graph capture needs, checked without a GPU: on the meta device (shapes, no values) an operation that
    # reads values on the host (.item(), bool(), .cpu(), nonzero, a boolean mask) raises
    meta = torch.device("meta")
    nets = [build_network(model, 1, 10, (12, 12), seed=s).to(meta) for s in (1, 2, 3)]
    step = _WideStep(nets, label_loss, form) if form else _VmapStep(nets, label_loss)
    if form:
        step.row_mean = True  # decided by the first call, which synchronises once (it runs eagerly, not captured)
    opt = torch.optim.SGD(step.leaves, lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, targets = torch.empty(16, 1, 12, 12, device=meta), torch.empty(16, dtype=torch.int64, device=meta)
    device_step = make_device_step(step, opt, images, targets, Augmenter(DSA),
                                   torch.empty(3, dtype=torch.int64, device=meta))
    for _ in range(2):  # the first call creates the momentum buffers
        device_step(torch.empty(3, 8, dtype=torch.int64, device=meta), torch.empty(24, 12, device=meta))
    assert all(p.device == meta for p in step.leaves)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", FORMS)
def test_the_device_step_never_waits_for_the_gpu(form):
    # what a CUDA graph needs: after the first call (which checks once whether the loss is a mean over rows),
    # a step launches its work and returns without synchronising with the device
    dev = torch.device("cuda")
    images, targets = (t.to(dev) for t in _data())
    augmenter = Augmenter(DSA)
    step = _WideStep([build_network("ConvNetW32", 1, 10, (12, 12), seed=s).to(dev) for s in (1, 2, 3)], label_loss,
                     form)
    device_step = make_device_step(step, torch.optim.SGD(step.leaves, lr=0.01, momentum=0.9), images, targets,
                                   augmenter)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]

    def inputs():
        idx = torch.stack([torch.randperm(16, generator=g)[:8] for g in gens])
        packed = augmenter.pack([augmenter.sample(g, 8) for g in gens])
        return idx.pin_memory().to(dev, non_blocking=True), packed.pin_memory().to(dev, non_blocking=True)

    device_step(*inputs())
    ready = [inputs() for _ in range(12)]  # enough draws that most families occur
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx, packed in ready:
            device_step(idx, packed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in step.wide.parameters())


def test_an_augmentation_other_than_dsas_is_refused_with_the_way_out():
    images, targets = _data()
    settings = TrainSettings(epochs=1, augmenter=make_augmenter("dc:crop_scale_rotate"))
    nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s) for s in (1, 2)]
    with pytest.raises(ValueError, match="train_network"):
        train_together(nets, images, targets, settings, [torch.Generator() for _ in nets], label_loss)


@pytest.mark.parametrize("model", ["ConvNetW32", "MLP"])  # the wide step, and the vmapped one
def test_on_epoch_end_counts_each_networks_correct_rows_as_a_plain_loop_does(model):
    images, labels = _data()
    settings = TrainSettings(epochs=3, lr=0.05, batch=6, augmenter=Augmenter("crop_flip"), lr_decay=False)
    seeds = [5, 6]
    nets = [build_network(model, 1, 10, (12, 12), seed=s) for s in seeds]
    alone = [copy.deepcopy(n) for n in nets]
    seen = []
    train_together(nets, images, labels, settings, [torch.Generator().manual_seed(s) for s in seeds], label_loss,
                   on_epoch_end=lambda epoch, correct: seen.append((epoch, correct.tolist())))
    plain = []  # per network and epoch: rows whose pre-step logits put the label first, as train_expert counts
    for net, s in zip(alone, seeds):
        g, counts = torch.Generator().manual_seed(s), []
        opt = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum,
                              weight_decay=settings.weight_decay)
        for _ in range(settings.epochs):
            order, correct = torch.randperm(len(labels), generator=g), 0
            for start in range(0, len(labels), settings.batch):
                idx = order[start:start + settings.batch]
                logits = train_step(net, opt, images[idx], labels[idx], settings.augmenter, g)
                correct += int((logits.argmax(1) == labels[idx]).sum())
            counts.append(correct)
        plain.append(counts)
    assert [epoch for epoch, _ in seen] == [1, 2, 3]
    assert [counts for _, counts in seen] == [list(c) for c in zip(*plain)]
    assert any(c > 0 for _, counts in seen for c in counts)


def test_on_epoch_end_needs_class_index_targets():
    images, labels = _data()
    soft = torch.nn.functional.one_hot(labels, 10).float()
    nets = [build_network("ConvNetW32", 1, 10, (12, 12), seed=s) for s in (1, 2)]
    with pytest.raises(ValueError, match="class-index targets"):
        train_together(nets, images, soft, TrainSettings(epochs=1), [torch.Generator() for _ in nets], label_loss,
                       on_epoch_end=lambda epoch, correct: None)


def test_a_constant_lr_never_drops():
    assert [TrainSettings(epochs=4).decays_at(e) for e in range(4)] == [False, False, True, False]
    assert not any(TrainSettings(epochs=4, lr_decay=False).decays_at(e) for e in range(4))
    assert TrainSettings(epochs=4, lr_decay=False).describe()["lr_schedule"] == "constant"
    assert not TrainSettings(epochs=1).decays_at(0)
