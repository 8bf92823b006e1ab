"""DD: Dataset Distillation (Wang, Zhu, Torralba & Efros, 2018).

Learnable synthetic images and one learnable learning rate per unrolled gradient step. Each engine
iteration draws a freshly initialised network (the paper's "unknown init" setting), trains it with
the synthetic data by plain gradient descent unrolled in the autograd graph (parameters passed
functionally with ``torch.func.functional_call``; no hand-written backward), and yields the
cross-entropy of the final parameters on a real batch. Backpropagating it reaches the images and the
learning rates through all unrolled steps; the engine steps both with Adam.

Step layout (the reference's, with ``distilled_images_per_class_per_step = 1``): the set's ``ipc``
images per class are the ``ipc`` data steps; data step ``s`` trains on image ``s`` of every class (one
image per class), and the ``ipc`` data steps are repeated ``distill_epochs`` times, so the network
takes ``T = ipc * distill_epochs`` steps, step ``t`` on within-class image ``t mod ipc`` with learning
rate ``lr[t]``. The evaluation replays exactly this (``builders.evaluate``, 1-D lr).

Learning rates are positive by construction: stored raw, used as ``softplus(raw)``, started at
``lr_init`` (raw = ``log(expm1(lr_init))``), as the reference does.

Outer loss: cross-entropy on ``batch_real`` real images drawn at random from the whole training split
(not class-balanced), as the reference's data loader. Adam with betas (0.5, 0.999), ``lr_img`` for the
images and ``lr_lr`` for the raw learning rates (0.01 each in the reference), both multiplied by
``decay_factor`` every ``decay_every`` iterations (0: never).

Networks: ``net_init: xavier`` initialises each drawn network as the reference does (Xavier-normal
weights, zero biases; :mod:`builders.net_init`); ``default`` keeps PyTorch's. ``AlexCifarNet`` is the
reference's CIFAR network (with that initialisation built in).

Networks with BatchNorm are not supported (their running statistics are not functional parameters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from builders.errors import RecipeError
from builders.methods.base import Method, SetContents, check_init, draw_seed
from builders.methods.matching import batch_norm_layers
from builders.net_init import NET_INITS, init_network_
from builders.networks import build_network
from builders.recipe import check_at_least, check_choice
from builders.registry import register
from builders.transfer import to_device
from condensed_datasets.sources import get_source

if TYPE_CHECKING:
    from builders.recipe import Recipe



def raw_from_lr(lr: float, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw parameters whose softplus is ``lr``, one per step (the inverse softplus ``log(expm1(lr))``)."""
    if lr <= 0:
        raise ValueError(f"a learning rate must be > 0, got {lr}")
    return torch.full((steps,), float(lr), dtype=torch.float64).expm1().log().to(dtype)


def lrs_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """The positive per-step learning rates: ``softplus(raw)``."""
    return F.softplus(raw)


def step_rows(ipc: int, num_classes: int, step: int) -> torch.Tensor:
    """Rows of a class-contiguous set that unrolled step ``step`` trains on: image ``step mod ipc`` of every class."""
    return torch.arange(num_classes) * ipc + step % ipc


def unrolled_loss(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    lrs: torch.Tensor,
    real_images: torch.Tensor,
    real_labels: torch.Tensor,
    ipc: int,
) -> torch.Tensor:
    """Cross-entropy on the real batch of ``net``'s parameters after ``len(lrs)`` unrolled SGD steps.

    Starts from ``net``'s current parameters (which are not changed); step ``t`` descends the
    cross-entropy on the rows :func:`step_rows` picks from the class-contiguous ``images``/``labels``
    with learning rate ``lrs[t]``. Differentiable w.r.t. ``images`` and ``lrs``.
    """
    num_classes = images.shape[0] // ipc
    params = {name: p.detach().requires_grad_(True) for name, p in net.named_parameters()}
    for t in range(lrs.shape[0]):
        rows = to_device(step_rows(ipc, num_classes, t), images.device)
        loss = F.cross_entropy(functional_call(net, params, (images[rows],)), labels[rows])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        params = {name: p - lrs[t] * g for (name, p), g in zip(params.items(), grads)}
    return F.cross_entropy(functional_call(net, params, (real_images,)), real_labels)


@register
class DatasetDistillation(Method):
    """DD: images and per-step learning rates learned through unrolled training of random networks."""

    name: ClassVar[str] = "dd"
    defaults: ClassVar[dict[str, Any]] = {
        "lr_img": 0.01,  # Adam on the images
        "lr_lr": 0.01,  # Adam on the raw learning rates
        "lr_init": 0.02,  # initial per-step learning rate
        "distill_epochs": 3,  # passes over the ipc data steps; T = ipc * distill_epochs
        "batch_real": 1024,  # real images per iteration, drawn from the whole split
        "init": "noise",
        "decay_every": 0,  # iterations between decays of the Adam learning rates (0: never)
        "decay_factor": 0.5,
        # the networks' initialisation: xavier (the reference's init_weights, --init xavier --init_param 1:
        # Xavier-normal weights, zero biases; builders/net_init.py) or default (PyTorch's)
        "net_init": "default",
    }

    @classmethod
    def check_recipe(cls, recipe: "Recipe") -> None:
        p = recipe.params
        check_init(p["init"])
        check_choice("net_init", p["net_init"], NET_INITS)
        check_at_least(p, ("lr_img", "lr_lr", "lr_init", "decay_factor"), 0, strict=True)
        check_at_least(p, ("distill_epochs", "batch_real"), 1)
        check_at_least(p, ("decay_every",), 0, meaning="0: no decay")
        if recipe.ipc * p["distill_epochs"] < 2:
            raise RecipeError(
                f"params.distill_epochs: dd needs at least 2 unrolled steps (ipc x distill_epochs), got "
                f"{recipe.ipc} x {p['distill_epochs']}; a single learned lr would read as a scalar lr"
            )
        if recipe.augment != "none":
            raise RecipeError(
                f"augment: method dd trains without augmentation, got {recipe.augment!r}; "
                "use eval.augment to augment the evaluation"
            )
        info = get_source(recipe.source)
        net = build_network(recipe.model, info.channels, info.num_classes, info.image_size, seed=0)
        if batch_norm_layers(net):
            raise RecipeError(
                f"model: method dd does not support BatchNorm networks, got {recipe.model!r} (its running "
                "statistics are not functional parameters); use a network without BatchNorm, e.g. ConvNet"
            )

    @property
    def num_steps(self) -> int:
        """T, the number of unrolled steps and of learned learning rates."""
        return self.ctx.ipc * self.params["distill_epochs"]

    def initial_state(self) -> dict[str, torch.Tensor]:
        images, self.init_rows = self.ctx.initial_images(self.params["init"])
        raw = raw_from_lr(self.params["lr_init"], self.num_steps).to(self.ctx.device)
        return {"images": images, "raw_lrs": raw.requires_grad_(True)}

    def optimizers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
        self._optimizer = torch.optim.Adam(
            [{"params": [state["images"]], "lr": self.params["lr_img"]},
             {"params": [state["raw_lrs"]], "lr": self.params["lr_lr"]}],
            betas=(0.5, 0.999),
        )
        return {"synthetic": self._optimizer}

    def _apply_decay(self, iteration: int) -> None:
        """Adam learning rates of ``iteration``: the base ones times ``decay_factor ** (iteration // decay_every)``."""
        optimizer = getattr(self, "_optimizer", None)
        if optimizer is None:
            return
        every = self.params["decay_every"]
        factor = self.params["decay_factor"] ** (iteration // every) if every else 1.0
        groups = optimizer.param_groups
        groups[0]["lr"] = self.params["lr_img"] * factor
        groups[1]["lr"] = self.params["lr_lr"] * factor

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_real`` random real images (and labels) from the whole training split."""
        real = self.ctx.real
        pick = torch.randperm(len(real), generator=self.ctx.generator)[: self.params["batch_real"]]
        return real.rows(pick), real.labels[pick.to(real.device)]

    def losses(self, state: dict[str, torch.Tensor], iteration: int) -> Iterator[torch.Tensor]:
        self._apply_decay(iteration)
        net = self.ctx.new_network()
        if self.params["net_init"] != "default":  # its own stream, so 'default' builds keep their bytes
            init_network_(net, self.params["net_init"], torch.Generator().manual_seed(draw_seed(self.ctx.generator)))
        net.train()
        images = state["images"]
        real_x, real_y = self.real_batch()
        yield unrolled_loss(net, images, self.ctx.hard_labels(), lrs_from_raw(state["raw_lrs"]),
                            real_x.to(images.dtype), real_y, self.ctx.ipc)

    def finalize(self, state: dict[str, torch.Tensor]) -> SetContents:
        lrs = lrs_from_raw(state["raw_lrs"].detach()).to(torch.float32)
        return SetContents(
            images=state["images"].detach(),
            lr=lrs,
            metadata={"init": self.params["init"], "unrolled_steps": self.num_steps,
                      "distill_epochs": self.params["distill_epochs"], "lr_parametrisation": "softplus",
                      "step_layout": "step t trains on image (t mod ipc) of every class"},
        )
