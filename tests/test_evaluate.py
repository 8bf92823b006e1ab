"""The evaluation protocol: label losses by hand, the schedule, and a real tiny evaluation."""

import io
import math
import sys

import pytest
import torch

import builders.evaluate
from builders.augment import Augmenter
from builders.compile_setting import COMPILING_NOTE, CompileSetting
from builders.data import RealData
from builders.ensemble import ran_out_of_memory
from builders.evaluate import TrainSettings, evaluate_set, label_loss, run_seeds, train_network, train_runs
from builders.networks import build_network
from condensed_datasets.sources import get_source


def test_label_loss_hard_and_soft_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = (1/4, 3/4)
    assert math.isclose(label_loss(logits, torch.tensor([1])).item(), -math.log(0.75), rel_tol=1e-6)
    soft = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert math.isclose(label_loss(logits, soft).item(), expected, rel_tol=1e-6)


def test_lr_drops_tenfold_at_half_the_epochs():
    seen = []
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    images, targets = torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,))
    settings = TrainSettings(epochs=4, lr=0.1, batch=8)
    orig_step = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    torch.optim.SGD.step = step
    try:
        train_network(net, images, targets, settings, torch.Generator().manual_seed(0))
    finally:
        torch.optim.SGD.step = orig_step
    assert [round(x, 6) for x in seen] == [0.1, 0.1, 0.01, 0.01]


def test_a_one_epoch_training_records_the_constant_lr_it_ran_with():
    # decays_at never fires for one epoch (the reference's drop comes after its last epoch), so no drop is recorded
    assert TrainSettings(epochs=1).describe()["lr_schedule"] == "constant"
    assert TrainSettings(epochs=2).describe()["lr_schedule"] == "x0.1 after epoch 1"


def _sgd_by_hand(net, images, targets, epochs, lr, batch, generator, reset_momentum_at_drop):
    """The protocol written out: SGD (momentum 0.9, weight decay 5e-4, no dampening), x0.1 before epoch
    epochs // 2, a fresh permutation per epoch; the reference (DC utils.py evaluate_synset) builds a new
    optimiser at its drop, which starts the momentum from zero."""
    params = list(net.parameters())
    buffers = [None] * len(params)
    net.train()
    for epoch in range(epochs):
        rate = lr * 0.1 if epoch >= epochs // 2 else lr
        if epoch == epochs // 2 and reset_momentum_at_drop:
            buffers = [None] * len(params)
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(targets), batch):
            idx = order[start:start + batch]
            grads = torch.autograd.grad(label_loss(net(images[idx]), targets[idx]), params)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    d = g + 5e-4 * p
                    buffers[i] = d.clone() if buffers[i] is None else 0.9 * buffers[i] + d
                    p -= rate * buffers[i]
    return net


def test_train_network_is_plain_sgd_by_hand_with_the_momentum_kept_across_the_drop():
    # 4 images, batches of 3 (a partial last batch), 4 epochs: the lr drops before epoch 2, and the momentum
    # buffer carries over it (docs/fidelity.md, Schedule: the reference restarts it from zero there)
    g = torch.Generator().manual_seed(2)
    images, targets = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 0, 1])
    settings = TrainSettings(epochs=4, lr=0.05, batch=3)
    trained = train_network(build_network("ConvNetW32", 1, 2, (8, 8), seed=3), images, targets, settings,
                            torch.Generator().manual_seed(11))
    kept, reset = (_sgd_by_hand(build_network("ConvNetW32", 1, 2, (8, 8), seed=3), images, targets, 4, 0.05, 3,
                                torch.Generator().manual_seed(11), reset_momentum_at_drop=flag)
                   for flag in (False, True))
    for a, b in zip(trained.parameters(), kept.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(trained.parameters(), reset.parameters()))


def test_the_std_is_the_population_std_the_references_report():
    # DC main.py, MTT distill.py and DATM print np.std over the runs: the population std (1.0 here, not sqrt(2))
    summary = builders.evaluate._summary([80.0, 82.0])
    assert summary["accuracy_mean"] == 81.0 and summary["accuracy_std"] == 1.0


def test_seeds_come_from_the_recipe_seed():
    assert run_seeds(3, 2) == run_seeds(3, 2) and run_seeds(3, 2) != run_seeds(4, 2)


def _separable_data(n_per_class, seed):
    """Two classes of 8x8 images that differ in brightness: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    info = get_source("mnist")
    dark = torch.randint(0, 60, (n_per_class, 1, 8, 8), generator=g, dtype=torch.uint8)
    light = torch.randint(190, 256, (n_per_class, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0] * n_per_class + [1] * n_per_class)
    return torch.cat([dark, light]), labels, info


def test_evaluate_set_reports_the_protocol_and_the_random_baseline(monkeypatch):
    images, labels, info = _separable_data(20, 0)
    two = info.__class__("mnist", 1, 8, ("dark", "light"), info.mean, info.std)
    train = RealData(images, labels, two)
    test = RealData(*_separable_data(30, 1)[:2], two)
    syn = train.rows(train.random_class_balanced(2, torch.Generator().manual_seed(5)))
    result = evaluate_set(
        syn, torch.tensor([0, 0, 1, 1]), soft_labels=None, lr=None, ipc=2, model="MLP", models=["ConvNetW32"], runs=2, epochs=20, default_lr=0.01, batch=256,
        augment="none", seed=0, train=train, test=test,
    )
    for key in ("model", "runs", "epochs", "accuracies", "accuracy_mean", "accuracy_std",
                "random_accuracy_mean", "improvement_over_random", "seeds", "protocol"):
        assert key in result
    assert len(result["accuracies"]) == 2 and result["accuracy_mean"] > 90.0
    assert result["protocol"]["lr"] == 0.01 and result["protocol"]["momentum"] == 0.9
    assert result["protocol"]["weight_decay"] == 5e-4 and result["protocol"]["batch"] == 256
    assert "ConvNetW32" in result["cross_architecture"]
    assert math.isclose(result["improvement_over_random"],
                        result["accuracy_mean"] - result["random_accuracy_mean"], abs_tol=1e-3)


def test_a_learned_lr_is_used_and_soft_labels_train_with_soft_loss():
    images, labels, info = _separable_data(20, 0)
    two = info.__class__("mnist", 1, 8, ("dark", "light"), info.mean, info.std)
    train = RealData(images, labels, two)
    syn = train.rows(train.random_class_balanced(1, torch.Generator().manual_seed(5)))
    result = evaluate_set(
        syn, torch.tensor([0, 1]), soft_labels=torch.tensor([[2.0, -2.0], [-2.0, 2.0]]), lr=torch.tensor(0.05),
        ipc=1, model="MLP", models=[], runs=1, epochs=5, default_lr=0.01, batch=256, augment="none",
        seed=0, train=train, test=train, random_baseline=False,
    )
    assert result["protocol"]["lr"] == pytest.approx(0.05) and "learned" in result["protocol"]["lr_source"]
    assert "soft" in result["protocol"]["label_loss"]
    assert "random_accuracy_mean" not in result


def test_the_random_baseline_trains_at_the_fixed_lr_on_hard_labels(monkeypatch):
    # README, evaluation protocol: a set's learned lr and soft labels are its own; random real images get eval.lr
    images, labels, info = _separable_data(20, 0)
    two = info.__class__("mnist", 1, 8, ("dark", "light"), info.mean, info.std)
    train = RealData(images, labels, two)
    calls = []

    def record(images, targets, *, settings, seeds, **kwargs):
        calls.append((settings, targets))
        return [50.0] * len(seeds)

    monkeypatch.setattr(builders.evaluate, "evaluate_images", record)
    evaluate_set(train.rows(torch.tensor([0, 20])), torch.tensor([0, 1]),
                 soft_labels=torch.tensor([[2.0, -2.0], [-2.0, 2.0]]), lr=torch.tensor(0.05), ipc=1, model="MLP",
                 models=[], runs=2, epochs=3, default_lr=0.01, batch=256, augment="none", seed=0, train=train,
                 test=train)
    (on_set, set_targets), (baseline, baseline_targets) = calls[0], calls[1]
    assert on_set.lr == pytest.approx(0.05) and set_targets.dtype == torch.float32
    assert baseline.lr == 0.01 and baseline.epochs == 3 and baseline_targets.dtype == torch.int64


def test_the_random_baselines_real_images_are_reproducible_from_the_recorded_seeds(monkeypatch):
    images, labels, info = _separable_data(20, 0)
    two = info.__class__("mnist", 1, 8, ("dark", "light"), info.mean, info.std)
    train = RealData(images, labels, two)
    trained_on = []

    def record(images, targets, *, seeds, **kwargs):
        trained_on.append(images)
        return [50.0] * len(seeds)

    monkeypatch.setattr(builders.evaluate, "evaluate_images", record)
    result = evaluate_set(train.rows(torch.tensor([0, 20])), torch.tensor([0, 1]), soft_labels=None, lr=None, ipc=2,
                          model="MLP", models=[], runs=2, epochs=1, default_lr=0.01, batch=256, augment="none",
                          seed=3, train=train, test=train)
    assert result["random_subset_seeds"] == [s + 7919 for s in result["seeds"]]
    for images_of_run, subset_seed in zip(trained_on[1:], result["random_subset_seeds"]):  # [0]: the set's own
        drawn = train.random_class_balanced(2, torch.Generator().manual_seed(subset_seed))
        assert torch.equal(images_of_run, train.rows(drawn))


def _tiny_runs():
    g = torch.Generator().manual_seed(4)
    images, targets = torch.randn(12, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(4)
    settings = TrainSettings(epochs=3, lr=0.01, batch=5, augmenter=Augmenter("crop_flip"))
    return images, targets, settings, [7, 8]


def _nets(seeds):
    return [build_network("ConvNetW32", 1, 3, (8, 8), seed=s) for s in seeds]


def test_train_runs_one_by_one_is_train_network_per_seed():
    images, targets, settings, seeds = _tiny_runs()
    epochs, trained = [], []
    nets = train_runs(_nets(seeds), images, targets, settings, seeds, together=False,
                      on_epoch=epochs.append, on_trained=trained.append)
    assert trained == nets and epochs == [1] * (len(seeds) * settings.epochs)
    for net, alone in zip(nets, _nets(seeds)):
        train_network(alone, images, targets, settings, torch.Generator().manual_seed(seeds[nets.index(net)]))
        for (name, a), b in zip(net.state_dict().items(), alone.state_dict().values()):
            assert torch.equal(a, b), name


def test_train_runs_together_follows_the_same_trajectories():
    images, targets, settings, seeds = _tiny_runs()
    epochs, trained = [], []
    together = train_runs(_nets(seeds), images, targets, settings, seeds, together=True,
                          on_epoch=epochs.append, on_trained=trained.append)
    assert trained == together and epochs == [len(seeds)] * settings.epochs
    alone = train_runs(_nets(seeds), images, targets, settings, seeds, together=False)
    for a, b in zip(together, alone):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_train_runs_needs_a_seed_per_network():
    images, targets, settings, _ = _tiny_runs()
    with pytest.raises(ValueError, match="2 networks need as many seeds, got 1"):
        train_runs(_nets([1, 2]), images, targets, settings, [1])


def test_train_runs_out_of_gpu_memory_at_once_trains_one_by_one(monkeypatch):
    # a real out-of-memory needs a GPU: here train_together raises the error CUDA's allocator raises
    images, targets, settings, seeds = _tiny_runs()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(builders.evaluate, "train_together", out_of_memory)
    monkeypatch.setattr(builders.evaluate, "use_together", lambda device, count: True)  # None: together here
    with pytest.warns(UserWarning, match="2 networks at once ran out of GPU memory; they train one by one"):
        fallback = train_runs(_nets(seeds), images, targets, settings, seeds)
    plain = train_runs(_nets(seeds), images, targets, settings, seeds, together=False)
    for a, b in zip(fallback, plain):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train_runs(_nets(seeds), images, targets, settings, seeds, together=True)


@pytest.mark.parametrize("message", ["CUDA error: out of memory", "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
                                     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"])
def test_evaluation_falls_back_on_an_out_of_memory_that_is_not_the_allocators(monkeypatch, message):
    # cuDNN, cuBLAS and the driver report running out of memory as a plain RuntimeError
    images, targets, settings, seeds = _tiny_runs()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(builders.evaluate, "train_together", out_of_memory)
    monkeypatch.setattr(builders.evaluate, "use_together", lambda device, count: True)
    with pytest.warns(UserWarning, match="ran out of GPU memory; they train one by one"):
        train_runs(_nets(seeds), images, targets, settings, seeds)


def test_evaluation_does_not_hide_other_errors_of_training_together(monkeypatch):
    images, targets, settings, seeds = _tiny_runs()

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(builders.evaluate, "train_together", broken)
    monkeypatch.setattr(builders.evaluate, "use_together", lambda device, count: True)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train_runs(_nets(seeds), images, targets, settings, seeds)


def test_what_counts_as_running_out_of_gpu_memory():
    assert ran_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert ran_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not ran_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not ran_out_of_memory(ValueError("out of memory"))  # not an error torch raises for it


# -- eval.compile ---------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("device, steps, compiles", [
    ("cpu", builders.evaluate.AUTO_COMPILE_MIN_STEPS, True),
    ("cpu", builders.evaluate.AUTO_COMPILE_MIN_STEPS - 1, False),
    ("cpu", 10 * 1000 * 1, True),  # the papers' evaluation: 5 runs and 5 baseline runs x 1000 epochs, one batch
    ("cuda", 10**6, False),  # compiling this step did not pay on a GPU
])
def test_eval_compile_auto_compiles_long_evaluations_on_cpus(device, steps, compiles):
    assert builders.evaluate.evaluation_compiles(torch.device(device), steps) is compiles


def test_a_compile_setting_that_does_not_compile_trains_bit_for_bit_as_before():
    images, targets, settings, seeds = _tiny_runs()
    plain, same = _nets(seeds[:1]), _nets(seeds[:1])
    train_network(plain[0], images, targets, settings, torch.Generator().manual_seed(3))
    off = CompileSetting(False, True, "ConvNetW32", key="eval.compile")
    train_network(same[0], images, targets, settings, torch.Generator().manual_seed(3), compile=off)
    for (name, a), b in zip(plain[0].state_dict().items(), same[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert not off.used


def test_compiled_training_follows_the_plain_trajectory_and_the_protocol_says_so(monkeypatch):
    """The same augmentation draws and steps, the loss compiled: parameters within float rounding after the
    epochs; evaluate_set records that the training ran compiled (one batch shape throughout: one compilation)."""
    data, labels, info = _separable_data(6, 0)
    two = info.__class__("mnist", 1, 8, ("dark", "light"), info.mean, info.std)
    train = RealData(data, labels, two)
    syn, syn_labels = train.rows(train.random_class_balanced(2, torch.Generator().manual_seed(5))), torch.tensor(
        [0, 0, 1, 1])
    settings = TrainSettings(epochs=4, lr=0.01, batch=5, augmenter=Augmenter("crop_flip"))
    plain, compiled = (build_network("ConvNetW32", 1, 2, (8, 8), seed=9) for _ in range(2))
    train_network(plain, syn, syn_labels, settings, torch.Generator().manual_seed(3))
    setting = CompileSetting(True, False, "ConvNetW32", key="eval.compile")
    train_network(compiled, syn, syn_labels, settings, torch.Generator().manual_seed(3), compile=setting)
    assert setting.used
    for (name, a), b in zip(plain.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    common = dict(soft_labels=None, lr=None, ipc=2, model="ConvNetW32", models=[], runs=1, epochs=2,
                  default_lr=0.01, batch=5, augment="crop_flip", seed=0, train=train, test=train)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # progress bars show on a terminal
    assert evaluate_set(syn, syn_labels, compile=True, progress=True, **common)["protocol"]["compiled"] is True
    assert COMPILING_NOTE in terminal.getvalue()  # the evaluation's bar says that it compiles
    assert evaluate_set(syn, syn_labels, **common)["protocol"]["compiled"] is False  # auto: a short evaluation
    soft = dict(common, soft_labels=torch.tensor([[2.0, -2.0]] * 2 + [[-2.0, 2.0]] * 2), random_baseline=False)
    assert evaluate_set(syn, syn_labels, compile=True, **soft)["protocol"]["compiled"] is False


def test_compile_needs_class_index_targets():
    images, _, settings, seeds = _tiny_runs()
    soft = torch.softmax(torch.randn(len(images), 3), dim=1)
    with pytest.raises(ValueError, match="class-index"):
        train_network(_nets(seeds[:1])[0], images, soft, settings, torch.Generator().manual_seed(0),
                      compile=CompileSetting(True, True, "ConvNetW32", key="eval.compile"))
