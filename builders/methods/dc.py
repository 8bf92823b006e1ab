"""DC: Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021), and DSA:
Dataset Condensation with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

One engine iteration draws a freshly initialised network and runs ``outer_loop`` matching steps.
Each matching step yields one loss, the sum over classes of the distance (``params.distance``)
between the gradient of the network's cross-entropy on a real batch of the class (detached) and
on the synthetic images of the class (differentiable, ``create_graph=True``); the engine then steps
the images. Between two matching steps, and not after the last, the network itself is trained for
``inner_loop`` epochs over the (detached) synthetic set with plain SGD (``lr_net``, batches of
``batch_train``; one epoch is one step while the set has at most ``batch_train`` images).

Networks with BatchNorm: before every matching step the BatchNorm statistics are set from a real
batch of ``bn_batch_per_class`` images of every class and frozen (eval mode) while gradients are
matched; the inner training runs in train mode.

DSA is the same loop with one siamese DSA draw per class applied to the real and the synthetic
batch before matching (every class's draws applied together: ``BuildContext.class_batches``), and
per-sample DSA while the inner network trains.

``params.batch_classes`` computes a matching step's per-class gradients in one pass instead of class by
class (:func:`wide_class_matching_loss`): the same sum, with about a fifth of the operators dispatched.

Under torchrun with N processes (``gradient_split = "classes"``) rank r computes the matching terms of
its block of classes ``[r*C//N, (r+1)*C//N)``; every rank draws every random number of the iteration
in the same order (all classes' batches and DSA draws, the inner training's order). The engine sums the
image gradients over ranks before each step, so every rank holds the same images and trains the same
network on them between matching steps: the result equals one process's up to float rounding of that
sum. Batch norm is no obstacle here (its statistics are frozen while gradients are matched).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from builders.compile_setting import COMPILE_CHOICES, CompileSetting
from builders.errors import RecipeError
from builders.evaluate import step_on
from builders.methods.base import Method, SetContents, check_init
from builders.methods.matching import (
    DISTANCES,
    batch_norm_layers,
    freeze_batch_norm,
    gradient_distance,
    outer_inner_loops,
    stacked_gradient_distance,
)
from builders.realbranch import class_loss, classifier_loss, real_class_gradient
from builders.recipe import AUTO, check_at_least, check_choice
from builders.registry import register
from builders.transfer import to_device
from builders.wide_convnet import WideConvNet, widens

if TYPE_CHECKING:
    from builders.methods.base import BuildContext
    from builders.recipe import Recipe


#: The fewest real-batch gradients (iterations x matching steps x classes) for which ``params.compile: auto``
#: compiles a build on a CPU (value chosen here: about three times the break-even). On this project's 2-core CPU
#: (Fashion-MNIST, ConvNet, 256 real images per class) the compiled (Winograd) real gradient took 1.18-1.29 s
#: against 1.68-1.85 s uncompiled (benchmarks/results/real_gradient_routes_cpu_2026-11-26.json), about 0.5 s
#: saved each, and its compilation about 67 s: repaid after about 140 gradients. The paper recipes' builds
#: (1000 iterations at ipc 10: 100,000 gradients) are far above, a test-sized build (a few) far below.
AUTO_COMPILE_MIN_REAL_GRADIENTS = 500


def auto_compiles(device: torch.device, real_gradients: int) -> bool:
    """Whether ``params.compile: auto`` compiles a build that computes ``real_gradients`` real-batch gradients on
    ``device``: on CPUs, for builds of at least :data:`AUTO_COMPILE_MIN_REAL_GRADIENTS`; never on GPUs, where the
    compiled build was the slower (H100, DSA Fashion-MNIST ipc 1: 0.202 s/iteration against 0.161;
    benchmarks/results/dsa_vs_reference_cuda_fashionmnist_ipc1_compile-{true,false}_2026-11-26.json)."""
    return device.type == "cpu" and real_gradients >= AUTO_COMPILE_MIN_REAL_GRADIENTS


def class_gradient(
    net: nn.Module, params: Sequence[torch.Tensor], images: torch.Tensor, label: int, create_graph: bool,
    compiled: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Gradient of the mean cross-entropy of ``net`` on ``images`` (all of class ``label``) w.r.t. ``params``.

    Without ``create_graph`` (a real batch's target): :func:`builders.realbranch.real_class_gradient`, summed over
    passes of a few images on a CPU. ``compiled`` (not with ``create_graph``: a compiled backward is not
    differentiated again): the loss through :func:`builders.realbranch.class_loss`'s compiled routes.
    """
    if compiled and create_graph:
        raise ValueError("class_gradient: a compiled gradient cannot keep its graph (create_graph)")
    if not create_graph:
        return real_class_gradient(net, params, images, label, compiled)
    return torch.autograd.grad(class_loss(net, images, label), list(params), create_graph=True, allow_unused=True,
                               materialize_grads=True)


def class_matching_loss(
    net: nn.Module,
    real_batches: Sequence[torch.Tensor],
    syn_batches: Sequence[torch.Tensor],
    metric: str = "ours",
    classes: Sequence[int] | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Sum over classes ``c`` of the distance between the gradients on ``real_batches[c]`` and ``syn_batches[c]``.

    ``classes``: the class label of each pair of batches (default ``0, 1, ...``). The real gradients are
    detached (``compiled``: through ``torch.compile`` where the network allows; on a CPU in passes; see
    :func:`class_gradient`); the synthetic ones keep their graph, so the result backpropagates into the synthetic
    images.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    labels = range(len(real_batches)) if classes is None else classes

    def distance(c: int, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        g_real = [g.detach() for g in class_gradient(net, params, real, c, False, compiled)]
        return gradient_distance(g_real, class_gradient(net, params, syn, c, create_graph=True), metric)

    return sum_of(distance(c, real, syn) for c, real, syn in zip(labels, real_batches, syn_batches))


#: The most real images one pass of :func:`wide_class_matching_loss` takes (value chosen here: ten classes at the
#: papers' 256 real images each, as DM's real branch sends through a GPU at once). Its activations, and their
#: gradients, are held for all of them together: on this project's CPU a DSA ipc 1 build peaked at 6.3 GB this
#: way against 1.6 GB class by class (benchmarks/results/speed_dsa_fashionmnist_ipc1_cpu_2026-11-26_*.json).
#: Builds of more classes (CIFAR-100) match them in groups of at most this many images.
ONE_PASS_MAX_REAL_IMAGES = 2560


def class_groups(count: int, images_per_class: int, most: int | None = None) -> list[range]:
    """Positions ``0 .. count - 1`` in consecutive groups of at most ``most // images_per_class`` (at least one;
    ``most`` defaults to :data:`ONE_PASS_MAX_REAL_IMAGES`)."""
    size = max(1, (ONE_PASS_MAX_REAL_IMAGES if most is None else most) // max(1, images_per_class))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def batches_classes(setting: bool | str, device: torch.device) -> bool:
    """Whether ``params.batch_classes`` (true, false or auto) matches every class's gradients in one pass
    (:func:`wide_class_matching_loss`) where the network allows: ``auto`` off the CPU. There a launch-bound GPU
    pays per operator, and a DSA ipc 1 iteration dispatches 1,357 of them this way against 7,063 class by class
    (benchmarks/results/profile_dsa_fashionmnist_ipc1_cpu_ops_batch_classes-*_2026-11-26_2.json); the grouped
    ConvNet step ran 2.6x faster than five networks' steps one after another on an H100
    (ensemble_forms_5xConvNet_cuda_2026-11-26_2.json). On an H100 a DSA Fashion-MNIST ipc 1 iteration took
    0.0570 s this way against 0.1406 s class by class
    (dsa_vs_reference_cuda_fashionmnist_ipc1_batch_classes-{true,false}_2026-11-26.json)."""
    return setting is True or (setting == AUTO and device.type != "cpu")


def wide_class_matching_loss(
    net: nn.Module,
    real_batches: Sequence[torch.Tensor],
    syn_batches: Sequence[torch.Tensor],
    metric: str = "ours",
    classes: Sequence[int] | None = None,
) -> torch.Tensor:
    """:func:`class_matching_loss` computed for all classes at once: ``net`` copied once per class as one
    :class:`builders.wide_convnet.WideConvNet`, class ``c``'s batches through copy ``c``, so that each copy's
    gradient is its class's. The same maths up to float rounding; needs a network that
    :func:`builders.wide_convnet.widens` without BatchNorm, and real batches of one size (the synthetic
    ones too)."""
    labels = list(range(len(real_batches))) if classes is None else list(classes)
    wide = WideConvNet([net] * len(labels))
    params = wide.parameters()
    g_real = torch.autograd.grad(_wide_class_loss(wide, real_batches, labels), params)
    g_syn = torch.autograd.grad(_wide_class_loss(wide, syn_batches, labels), params, create_graph=True)
    return stacked_gradient_distance(wide.per_network([g.detach() for g in g_real]), wide.per_network(g_syn),
                                     metric)


def sum_of(losses: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of one or more losses (the first itself when alone)."""
    total = None
    for loss in losses:
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("sum_of: no losses")
    return total


def _wide_class_loss(wide: WideConvNet, batches: Sequence[torch.Tensor], labels: Sequence[int]) -> torch.Tensor:
    """The sum over copies ``c`` of the mean cross-entropy of copy ``c`` on ``batches[c]``, all of class
    ``labels[c]``."""
    logits = wide(wide.inputs(torch.stack(list(batches))))  # [N, B, classes]
    per_copy = logits.shape[1]
    targets = torch.tensor(labels, device=logits.device).repeat_interleave(per_copy)
    return F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum") / per_copy


@register
class GradientMatching(Method):
    """DC: images learned so that a network's gradients on them match its gradients on real data."""

    name: ClassVar[str] = "dc"
    defaults: ClassVar[dict[str, Any]] = {
        "lr_img": 0.1,
        "momentum": 0.5,  # of the images' SGD
        "lr_net": 0.01,
        "batch_real": 256,  # real images per class per matching step
        "batch_train": 256,  # batch of the inner network training
        "init": "noise",
        "distance": "ours",
        "outer_loop": 0,  # 0: by ipc, see outer_inner_loops
        "inner_loop": 0,  # 0: by ipc
        "bn_batch_per_class": 16,  # real images per class that set BatchNorm statistics
        # the real gradients and the inner training's steps through torch.compile (ConvNets without BatchNorm;
        # on a CPU the Winograd route):
        # true, false, or "auto": on a CPU for builds of AUTO_COMPILE_MIN_REAL_GRADIENTS or more (a DSA
        # iteration at ipc 1 took 10.6 s against 15.3 there), falling back with a warning if compilation fails
        "compile": AUTO,
        # every class's gradients in one pass through the network copied per class (a ConvNet without BatchNorm,
        # one real batch size): true, false, or "auto": off the CPU (see batches_classes)
        "batch_classes": AUTO,
    }
    #: DSA: a siamese draw per class while matching, per-sample DSA while the inner net trains.
    augmented: ClassVar[bool] = False
    gradient_split: ClassVar[str] = "classes"  # torchrun: classes' matching terms across ranks, gradients summed
    # no allocator settings: at ipc 10 on this project's 2-core CPU they left the iteration as it was (349.3 against
    # 350.1 s, median of 2 interleaved rounds) and raised peak RSS from 2177 to 2586 MiB
    # (benchmarks/results/allocator_dc_fashionmnist_ipc-10_2026-11-26.json)
    tunes_allocator: ClassVar[bool] = False

    @classmethod
    def check_recipe(cls, recipe: "Recipe") -> None:
        p = recipe.params
        check_init(p["init"])
        check_choice("distance", p["distance"], DISTANCES)
        check_choice("compile", p["compile"], COMPILE_CHOICES)
        check_choice("batch_classes", p["batch_classes"], COMPILE_CHOICES)
        check_at_least(p, ("outer_loop", "inner_loop"), 0, meaning="0: the paper's value for the ipc")
        check_at_least(p, ("batch_real", "batch_train", "bn_batch_per_class"), 1)
        check_at_least(p, ("lr_img", "lr_net", "momentum"), 0)
        if not cls.augmented and recipe.augment != "none":
            raise RecipeError(
                f"augment: method dc matches gradients without augmentation, got {recipe.augment!r}; use "
                "method dsa for differentiable siamese augmentation, or eval.augment to augment the evaluation"
            )

    def __init__(self, ctx: "BuildContext") -> None:
        super().__init__(ctx)
        outer, inner = outer_inner_loops(ctx.ipc)
        self.outer_loop: int = self.params["outer_loop"] or outer
        self.inner_loop: int = self.params["inner_loop"] or inner
        # "auto" decides on the recipe's whole build (every class, every iteration), so that a resumed build and
        # every torchrun rank decide alike
        real_gradients = ctx.recipe.iterations * self.outer_loop * ctx.num_classes
        self.compile = CompileSetting(self.params["compile"], auto_compiles(ctx.device, real_gradients),
                                      ctx.recipe.model, announce=ctx.status)
        self.batch_classes = batches_classes(self.params["batch_classes"], ctx.device)
        self._warned_unbatched = False

    def initial_state(self) -> dict[str, torch.Tensor]:
        images, self.init_rows = self.ctx.initial_images(self.params["init"])
        return {"images": images}

    def optimizers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
        sgd = torch.optim.SGD([state["images"]], lr=self.params["lr_img"], momentum=self.params["momentum"])
        return {"images": sgd}

    # -- pieces ----------------------------------------------------------------------------
    def train_inner(self, net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> None:
        """``inner_loop`` epochs of ``net`` on the detached synthetic set (per-sample DSA for dsa); each step's
        loss through ``torch.compile`` as ``params.compile`` says."""
        ctx = self.ctx
        data, labels = images.detach(), ctx.hard_labels()
        batch = self.params["batch_train"]
        net.train()
        for _ in range(self.inner_loop):
            order = to_device(torch.randperm(data.shape[0], generator=ctx.generator), data.device)
            for start in range(0, data.shape[0], batch):
                idx = order[start : start + batch]
                x = ctx.augment_each(data[idx]) if self.augmented else data[idx]
                step_on(optimizer, self.compile.run(net, lambda compiled: classifier_loss(net, x, labels[idx],
                                                                                         compiled)))

    def matches_in_one_pass(self, net: nn.Module, has_bn: bool, real_batches: Sequence[torch.Tensor]) -> bool:
        """Whether this matching step takes :func:`wide_class_matching_loss` (``params.batch_classes``); with
        ``true``, a network it cannot take warns once. A class with fewer real images than ``batch_real`` (a
        smaller batch) is matched class by class, silently: the same maths."""
        if not self.batch_classes:
            return False
        if has_bn or not widens(net):
            if self.params["batch_classes"] is True and not self._warned_unbatched:
                self._warned_unbatched = True
                warnings.warn(f"params.batch_classes: model {self.ctx.recipe.model!r} is not a ConvNet without "
                              "BatchNorm; its classes are matched one by one", stacklevel=2)
            return False
        return len({batch.shape[0] for batch in real_batches}) == 1

    # -- one iteration ---------------------------------------------------------------------
    def losses(self, state: dict[str, torch.Tensor], iteration: int) -> Iterator[torch.Tensor]:
        ctx = self.ctx
        net = ctx.new_network()
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=self.params["lr_net"])
        has_bn = bool(batch_norm_layers(net))
        for outer in range(self.outer_loop):
            if has_bn:
                n = self.params["bn_batch_per_class"]
                freeze_batch_norm(net, torch.cat([ctx.real.sample_class(c, n, ctx.generator)
                                                  for c in range(ctx.num_classes)]))
            # torchrun class split: every rank draws every class's batches, in order; it matches only its own
            # classes (all of them in one process), and the engine sums the image gradients.
            reals, syns = ctx.class_batches(state["images"], self.params["batch_real"])
            here = ctx.classes_here()
            if self.matches_in_one_pass(net, has_bn, reals):
                yield sum_of(wide_class_matching_loss(net, [reals[i] for i in group], [syns[i] for i in group],
                                                      self.params["distance"], classes=[here[i] for i in group])
                             for group in class_groups(len(here), reals[0].shape[0]))
            else:
                yield self.compile.run(net, lambda compiled: class_matching_loss(
                    net, reals, syns, self.params["distance"], classes=here, compiled=compiled))
            if outer == self.outer_loop - 1:
                break  # the paper does not train the network after the last matching step
            self.train_inner(net, optimizer, state["images"])

    def finalize(self, state: dict[str, torch.Tensor]) -> SetContents:
        return SetContents(
            images=state["images"].detach(),
            metadata={"init": self.params["init"], "distance": self.params["distance"],
                      "outer_loop": self.outer_loop, "inner_loop": self.inner_loop, **self.compile.describe()},
        )


@register
class SiameseGradientMatching(GradientMatching):
    """DSA: DC with differentiable siamese augmentation; needs an augmentation strategy."""

    name: ClassVar[str] = "dsa"
    defaults: ClassVar[dict[str, Any]] = {**GradientMatching.defaults, "init": "real"}
    augmented: ClassVar[bool] = True

    @classmethod
    def check_recipe(cls, recipe: "Recipe") -> None:
        if recipe.augment == "none":
            raise RecipeError(
                "augment: method dsa needs a DSA strategy (e.g. color_crop_cutout_flip_scale_rotate, or "
                "color_crop_cutout_scale_rotate for digits), got 'none'; use method dc for no augmentation"
            )
        super().check_recipe(recipe)

    def finalize(self, state: dict[str, torch.Tensor]) -> SetContents:
        contents = super().finalize(state)
        contents.metadata["augment"] = self.ctx.recipe.augment
        return contents
