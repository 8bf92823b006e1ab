"""The evaluation protocol: train fresh networks on a set, test them on the real test split.

Nothing is selected on the test split: each run trains for a fixed schedule and is tested once.

A set whose ``lr`` is one value (a scalar, or one element) is trained with the fixed protocol at that
lr. A set whose ``lr`` is 1-D with several values (one per unrolled step, as Dataset Distillation
learns them) is evaluated as that paper does, by replaying its steps: ``len(lr)`` plain gradient steps
(no momentum, no weight decay, no lr decay; ``epochs`` and ``batch`` do not apply), step ``t`` on the
images whose within-class index is ``t mod ipc`` (one image per class of the class-contiguous set) with
learning rate ``lr[t]``; per-sample augmentation applies when the protocol has one.

``eval.compile`` sends each training step's loss of a set with class-index labels through ``torch.compile``
(:func:`builders.realbranch.classifier_loss`: a ConvNet without batch statistics, by the Winograd route on a
CPU): the same trajectory up to float rounding, each step about 1.4x faster on a CPU.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from builders import distributed
from builders.augment import Augmenter
from builders.compile_setting import CompileSetting
from builders.data import RealData
from builders.dc_augment import make_augmenter
from builders.ensemble import can_train_together, ran_out_of_memory, train_together, use_together
from builders.networks import build_network
from builders.progress import progress_bar
from builders.realbranch import classifier_loss
from builders.recipe import AUTO
from builders.train_settings import TrainSettings
from builders.transfer import to_device

#: The fewest training steps (every network of an evaluation, the random baseline's included) for which
#: ``eval.compile: auto`` compiles, on a CPU (value chosen here). On the project's 2-core CPU a ConvNet's step on
#: 100 Fashion-MNIST-shaped images with DSA took 0.426 s compiled against 0.618 plain (1.45x), and the first
#: compiled step 73 s with an empty inductor cache: repaid after 378 steps (benchmarks/results/
#: eval_compile_cpu_2026-11-26.json). 1000 leaves a margin; the papers' evaluations (5 + 5 runs x 1000 epochs)
#: and the quickstart's (2 + 2 runs x 300) are above it, test-sized ones below.
AUTO_COMPILE_MIN_STEPS = 1000


def evaluation_compiles(device: torch.device, steps: int) -> bool:
    """Whether ``eval.compile: auto`` compiles an evaluation of ``steps`` training steps on ``device``: on CPUs for
    at least :data:`AUTO_COMPILE_MIN_STEPS`; never on GPUs, where compiling this step did not pay (DC/DSA's
    inner training, ``dsa_vs_reference_cuda_fashionmnist_ipc1_compile-{true,false}_2026-11-26.json``)."""
    return device.type == "cpu" and steps >= AUTO_COMPILE_MIN_STEPS


def label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices (int64) or probability vectors (float)."""
    if targets.dtype == torch.int64:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def train_network(
    net: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    on_epoch: Callable[[], Any] | None = None,
    compile: CompileSetting | None = None,
) -> nn.Module:
    """Train ``net`` in place on ``images``/``targets`` (same device) with ``settings``; returns it.
    ``on_epoch`` is called after each epoch (progress); ``compile`` (class-index ``targets`` only): each step's
    loss through :func:`builders.realbranch.classifier_loss` as the setting says."""
    if settings.step_lrs is not None:
        return replay_steps(net, images, targets, settings, generator)
    if compile is not None and targets.dtype != torch.int64:
        raise ValueError("train_network: compile needs class-index (int64) targets")
    opt = torch.optim.SGD(
        net.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    n = images.shape[0]
    net.train()
    for epoch in range(settings.epochs):
        if settings.decays_at(epoch):
            for group in opt.param_groups:
                group["lr"] = settings.lr * 0.1
        order = to_device(torch.randperm(n, generator=generator), images.device)
        for start in range(0, n, settings.batch):
            idx = order[start : start + settings.batch]
            if compile is None:
                train_step(net, opt, images[idx], targets[idx], settings.augmenter, generator)
            else:
                compiled_train_step(net, opt, images[idx], targets[idx], settings.augmenter, generator, compile)
        if on_epoch is not None:
            on_epoch()
    return net


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor,
               augmenter: Augmenter | None, generator: torch.Generator) -> torch.Tensor:
    """One optimiser step on a batch (per-sample augmentation when given); returns the detached logits."""
    if augmenter is not None:
        x = augmenter(x, generator)
    logits = net(x)
    step_on(opt, label_loss(logits, targets))
    return logits.detach()


def compiled_train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor,
                        augmenter: Augmenter | None, generator: torch.Generator, compile: CompileSetting) -> None:
    """:func:`train_step` on class-index ``targets`` with the loss computed as ``compile`` says (the same
    augmentation draws; the same step up to float rounding)."""
    if augmenter is not None:
        x = augmenter(x, generator)
    step_on(opt, compile.run(net, lambda compiled: classifier_loss(net, x, targets, compiled)))


def step_on(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step down ``loss``'s gradient (the gradients it finds are replaced, not added to)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def replay_steps(
    net: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
) -> nn.Module:
    """Train ``net`` in place by replaying learned per-step lrs: step ``t`` is one plain gradient step
    with lr ``settings.step_lrs[t]`` on image ``t mod ipc`` of every class (class-contiguous set)."""
    assert settings.step_lrs is not None
    ipc = settings.ipc
    if images.shape[0] % ipc:
        raise ValueError(f"{images.shape[0]} images are not a class-contiguous set of ipc {ipc}")
    first = torch.arange(0, images.shape[0], ipc, device=images.device)
    opt = torch.optim.SGD(net.parameters(), lr=settings.step_lrs[0], momentum=0.0, weight_decay=0.0)
    net.train()
    for t, lr in enumerate(settings.step_lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        rows = first + t % ipc
        train_step(net, opt, images[rows], targets[rows], settings.augmenter, generator)
    return net


@torch.no_grad()
def test_accuracy(net: nn.Module, test: RealData, batch: int = 1024) -> float:
    """Top-1 accuracy (percent) of ``net`` on a real split."""
    net.eval()
    correct = 0
    for start in range(0, len(test), batch):
        pos = torch.arange(start, min(start + batch, len(test)))
        pred = net(test.rows(pos)).argmax(1)
        correct += int((pred == test.labels[to_device(pos, test.device)]).sum())
    return 100.0 * correct / len(test)


def _summary(accuracies: list[float]) -> dict[str, Any]:
    return {
        "accuracies": [round(a, 4) for a in accuracies],
        "accuracy_mean": round(statistics.fmean(accuracies), 4),
        "accuracy_std": round(statistics.pstdev(accuracies), 4) if len(accuracies) > 1 else 0.0,
    }


#: The random baseline's run with seed s trains on the class-balanced real images drawn with seed s + this
#: (recorded in the evaluation as ``random_subset_seeds``).
RANDOM_SUBSET_SEED_OFFSET = 7919


def run_seeds(seed: int, runs: int) -> list[int]:
    """The evaluation seeds of a build: recorded, derived from the recipe seed, never the clock."""
    return [seed * 1000 + 17 + r for r in range(runs)]


def evaluate_images(
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    model: str,
    settings: TrainSettings,
    test: RealData,
    seeds: list[int],
    progress: bool | str = False,
    together: bool | None = None,
    compile: CompileSetting | None = None,
) -> list[float]:
    """Accuracy (percent) of one freshly initialised ``model`` per seed, trained on ``images``.
    ``compile``: see :func:`train_network` (the bar says when it compiles).

    ``progress``: a bar over runs x epochs (a string names it; quiet when output is not a terminal).
    ``together``: train the runs' networks together (:mod:`builders.ensemble`, the same trajectories up
    to float rounding); None: on CUDA only. Sets with per-step lrs and BatchNorm networks other than ConvNets train one by one.
    """
    c, h, w = test.image_shape
    per_run = 1 if settings.step_lrs is not None else settings.epochs
    bar = progress_bar(len(seeds) * per_run, progress if isinstance(progress, str) else f"eval {model}",
                       enabled=bool(progress), unit="run" if per_run == 1 else "epoch")
    if compile is not None:
        compile.announce = bar.set_postfix_str
    if distributed.current().active:  # under torchrun: runs split across ranks, gathered in order

        def one_run(seed: int) -> float:
            net = build_network(model, c, test.num_classes, (h, w), seed=seed).to(test.device)
            train_network(net, images.to(test.device), targets.to(test.device), settings,
                          torch.Generator().manual_seed(seed), compile=compile)
            return test_accuracy(net, test)

        accuracies = distributed.map_items(seeds, one_run)
        bar.close()
        return accuracies
    nets = [build_network(model, c, test.num_classes, (h, w), seed=seed).to(test.device) for seed in seeds]
    accuracies: list[float] = []

    def trained(net: nn.Module) -> None:
        accuracies.append(test_accuracy(net, test))
        if per_run == 1:
            bar.update(1)
        bar.set_postfix(acc=f"{accuracies[-1]:.2f}")

    train_runs(nets, images.to(test.device), targets.to(test.device), settings, seeds, together=together,
               on_epoch=None if per_run == 1 else bar.update, on_trained=trained, compile=compile)
    bar.close()
    return accuracies


def train_runs(
    nets: list[nn.Module],
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    seeds: list[int],
    *,
    together: bool | None = None,
    on_epoch: Callable[[int], Any] | None = None,
    on_trained: Callable[[nn.Module], Any] | None = None,
    compile: CompileSetting | None = None,
) -> list[nn.Module]:
    """Train each ``nets[i]`` in place as ``train_network`` would with a generator seeded ``seeds[i]``; returns
    them. ``together``: train them at once (:mod:`builders.ensemble`, the same trajectories up to float
    rounding) where the networks and ``settings`` allow it (else one by one); None: on CUDA only.

    ``on_epoch(k)`` is called each time ``k`` networks have trained one more epoch (progress);
    ``on_trained(net)`` once per network when it is trained, in order; ``compile``: as :func:`train_network`
    (one by one only: networks trained together take the ensemble's own step).
    """
    if len(nets) != len(seeds):
        raise ValueError(f"train_runs: {len(nets)} networks need as many seeds, got {len(seeds)}")
    if not nets:
        return []
    chosen = together
    if together is None:
        together = use_together(images.device, len(nets))
    if together and can_train_together(nets[0], settings):
        try:
            train_together(nets, images, targets, settings, [torch.Generator().manual_seed(s) for s in seeds],
                           label_loss, on_epoch=None if on_epoch is None else lambda: on_epoch(len(nets)))
        except RuntimeError as error:
            if chosen is not None or not ran_out_of_memory(error):  # asked for explicitly: the caller decides
                raise
            # the networks are as they were (train_together writes its parameters back only at the end)
            warnings.warn(f"{len(nets)} networks at once ran out of GPU memory; they train one by one",
                          stacklevel=2)
            torch.cuda.empty_cache()
        else:
            for net in nets:
                if on_trained is not None:
                    on_trained(net)
            return nets
    for seed, net in zip(seeds, nets):
        train_network(net, images, targets, settings, torch.Generator().manual_seed(seed),
                      on_epoch=None if on_epoch is None else lambda: on_epoch(1), compile=compile)
        if on_trained is not None:
            on_trained(net)
    return nets


def evaluate_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    soft_labels: torch.Tensor | None,
    lr: torch.Tensor | None,
    ipc: int,
    model: str,
    models: list[str],
    runs: int,
    epochs: int,
    default_lr: float,
    batch: int,
    augment: str,
    seed: int,
    train: RealData,
    test: RealData,
    random_baseline: bool = True,
    progress: bool = False,
    together: bool | None = None,
    compile: bool | str = AUTO,
) -> dict[str, Any]:
    """The ``evaluation`` block of a set's metadata: per-run, mean and std accuracy, the random
    real baseline of the same ipc under the same protocol, and cross-architecture results.
    ``progress``: one bar per phase (quiet when output is not a terminal); ``together``: train the
    runs on the set together (see :func:`evaluate_images`; None: on CUDA only); ``compile``: ``eval.compile``
    (true, false or "auto": :func:`evaluation_compiles`) for sets with class-index labels and one lr; the
    protocol records whether the training ran compiled."""
    augmenter = make_augmenter(augment)  # DSA's, or DC's own for "dc:..." strategies
    learned_lr = lr is not None and lr.numel() == 1
    per_step = lr is not None and lr.dim() == 1 and lr.numel() > 1
    settings = TrainSettings(epochs=epochs, lr=float(lr) if learned_lr else default_lr, batch=batch,
                             augmenter=augmenter, ipc=ipc,
                             step_lrs=tuple(float(v) for v in lr.tolist()) if per_step else None)
    targets = torch.softmax(soft_labels, dim=1) if soft_labels is not None else labels
    seeds = run_seeds(seed, runs)
    compiling: dict[str, CompileSetting] = {}  # one per model, made only where the set allows it

    def compile_for(name: str) -> CompileSetting | None:
        if soft_labels is not None or per_step:
            return None
        if name not in compiling:
            steps_each = epochs * math.ceil(len(images) / batch)
            steps = runs * steps_each * (1 + len(models) + (1 if random_baseline else 0))
            compiling[name] = CompileSetting(compile, evaluation_compiles(test.device, steps), name,
                                             key="eval.compile")
        return compiling[name]

    result: dict[str, Any] = {
        "model": model,
        "runs": runs,
        "epochs": epochs,
        "seeds": seeds,
        "protocol": {
            **settings.describe(),
            "lr_source": ("learned per step (replayed)" if per_step else "learned (set's lr)" if learned_lr
                          else "fixed"),
            "label_loss": "soft cross-entropy on softmax(soft_labels)" if soft_labels is not None else "cross-entropy",
            "test_split": f"{test.info.name} test, {len(test)} images",
        },
        **_summary(evaluate_images(images, targets, model=model, settings=settings, test=test, seeds=seeds,
                                   progress=progress and f"eval {model}", together=together,
                                   compile=compile_for(model))),
    }
    if random_baseline:
        baseline = TrainSettings(epochs=epochs, lr=default_lr, batch=batch, augmenter=augmenter)
        bar = progress_bar(len(seeds) * epochs, f"random real {model}", enabled=progress, unit="epoch")

        def random_run(s: int) -> float:
            pos = train.random_class_balanced(ipc, torch.Generator().manual_seed(s + RANDOM_SUBSET_SEED_OFFSET))
            accuracy = evaluate_images(train.rows(pos), train.labels[pos.to(train.device)], model=model,
                                       settings=baseline, test=test, seeds=[s], progress=False,
                                       compile=compile_for(model))[0]
            bar.update(epochs)
            return accuracy

        rand_acc = distributed.map_items(seeds, random_run)  # under torchrun: split across ranks
        bar.close()
        rand = _summary(rand_acc)
        result["random_accuracies"] = rand["accuracies"]
        result["random_subset_seeds"] = [s + RANDOM_SUBSET_SEED_OFFSET for s in seeds]  # run r's real images
        result["random_accuracy_mean"] = rand["accuracy_mean"]
        result["random_accuracy_std"] = rand["accuracy_std"]
        result["improvement_over_random"] = round(result["accuracy_mean"] - rand["accuracy_mean"], 4)
    if models:
        result["cross_architecture"] = {
            name: _summary(evaluate_images(images, targets, model=name, settings=settings, test=test, seeds=seeds,
                                           progress=progress and f"cross-architecture {name}",
                                           together=together, compile=compile_for(name)))
            for name in models
        }
    result["protocol"]["compiled"] = any(setting.used for setting in compiling.values())
    if any(setting.failed for setting in compiling.values()):
        result["protocol"]["compile_fell_back"] = True
    return result
