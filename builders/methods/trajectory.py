"""What every trajectory-matching method shares: the learnable student step size, the plan of one
student run (batches and augmentation draws), the student itself and the normalised parameter distance.

MTT (:mod:`builders.methods.mtt`), DATM and TESLA's constant-memory gradients
(:mod:`builders.methods.tesla`) build on these; none of them is a method on its own. Under a torchrun
batch split (``StudentTrajectory.shard``) each rank computes its share of every student step's batch and
the shares are summed (see :mod:`builders.methods.mtt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from builders.augment import AugmentDraw, Augmenter
from builders.evaluate import label_loss
from builders.experts import ParamLayout
from builders.transfer import to_device

if TYPE_CHECKING:
    from builders.distributed import BatchShard

LR_FLOOR = 1e-4  # times lr_teacher: the least step size
LR_BETA = 100.0  # divided by lr_teacher: softplus sharpness


# --------------------------------------------------------------------------------------------------
# the learnable step size


def syn_lr_from_raw(raw: torch.Tensor, lr_teacher: float) -> torch.Tensor:
    """The positive step size ``floor + softplus_beta(raw)`` (see the module docstring)."""
    return LR_FLOOR * lr_teacher + F.softplus(raw, beta=LR_BETA / lr_teacher)


def raw_from_syn_lr(lr: float, lr_teacher: float) -> torch.Tensor:
    """The raw value whose step size is ``lr`` (float32 scalar); ``lr`` must exceed the floor."""
    floor, beta = LR_FLOOR * lr_teacher, LR_BETA / lr_teacher
    if not lr > floor:
        raise ValueError(f"a step size must exceed the floor {floor:g}, got {lr}")
    value = torch.tensor(lr - floor, dtype=torch.float64)
    raw = torch.where(value * beta > 20, value, torch.log(torch.expm1(value * beta)) / beta)
    return raw.to(torch.float32)


# --------------------------------------------------------------------------------------------------
# one student trajectory


@dataclass
class InnerPlan:
    """The random choices of one student trajectory, drawn before it runs so that every way of
    computing its gradient (unrolled, constant memory, recomputation) sees the same ones."""

    batches: list[torch.Tensor]  # per step: positions in the synthetic set (CPU int64)
    draws: list[AugmentDraw | None]  # per step: its per-sample augmentation, or None

    def __len__(self) -> int:
        return len(self.batches)


def make_plan(
    num_images: int,
    steps: int,
    batch: int,
    generator: torch.Generator,
    augmenter: Augmenter | None = None,
) -> InnerPlan:
    """``steps`` batches of ``batch`` synthetic positions: a random permutation cut into chunks, a new
    permutation when one runs out; one per-sample augmentation draw per step (as ``ctx.augment_each``)."""
    batch = min(batch, num_images) if batch > 0 else num_images
    batches: list[torch.Tensor] = []
    draws: list[AugmentDraw | None] = []
    chunks: list[torch.Tensor] = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=generator).split(batch))
        idx = chunks.pop(0)
        batches.append(idx)
        draws.append(augmenter.sample(generator, len(idx)) if augmenter is not None else None)
    return InnerPlan(batches, draws)


@dataclass
class StudentTrajectory:
    """One student run: the architecture, the expert's start and target parameters and the plan.

    ``labels`` passed to the methods are int64 class indices (cross-entropy) or float logits (soft
    cross-entropy against their softmax, as DATM's learned soft labels).
    """

    net: nn.Module
    layout: ParamLayout
    start: torch.Tensor  # [P]
    target: torch.Tensor  # [P]
    plan: InnerPlan
    augmenter: Augmenter | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    shard: BatchShard | None = None  # torchrun batch split: this rank computes its share of every step's batch

    def batch(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s (augmented images, labels)."""
        idx = to_device(self.plan.batches[step], images.device)
        x = images[idx]
        draw = self.plan.draws[step]
        if draw is not None:
            assert self.augmenter is not None
            x = self.augmenter.apply(x, draw)
        return x, labels[idx]

    def share_of(self, step: int) -> tuple[torch.Tensor, AugmentDraw | None, float]:
        """Under a batch split, this rank's share of step ``step``: its positions in the set (CPU), its
        augmentation draw and its weight ``len(share) / len(batch)`` (the ranks' weights sum to 1)."""
        assert self.shard is not None, "share_of needs a batch split"
        batch, draw = self.plan.batches[step], self.plan.draws[step]
        part = self.shard.share(len(batch))
        return (batch[part.start:part.stop], draw.rows(part.start, part.stop) if draw is not None else None,
                len(part) / len(batch))

    def batch_share(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's share of step ``step`` (see :meth:`share_of`): augmented images, labels, weight."""
        positions, draw, weight = self.share_of(step)
        idx = to_device(positions, images.device)
        x = images[idx]
        if draw is not None:
            assert self.augmenter is not None
            x = self.augmenter.apply(x, draw)
        return x, labels[idx], weight

    def step_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The student's training loss at flat parameters ``theta`` on the batch (x, y)."""
        logits = functional_call(self.net, self.layout.unflatten(theta), (x,))
        return label_loss(logits, y if y.dtype == torch.int64 else F.softmax(y, dim=1))  # y: soft-label logits

    def distance(self, end: torch.Tensor) -> torch.Tensor:
        """The normalised matching loss of a student that ends at ``end``."""
        return normalised_distance(end, self.start, self.target)


def normalised_distance(end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||end - target||^2 / ||start - target||^2`` (MTT's loss; the papers' division of both by
    the parameter count cancels)."""
    return ((end - target) ** 2).sum() / ((start - target) ** 2).sum()


def unrolled_matching_loss(
    traj: StudentTrajectory, images: torch.Tensor, lr: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The matching loss with every student step kept in the autograd graph (memory grows with steps)."""
    theta = traj.start.detach().clone().requires_grad_(True)
    for step in range(len(traj.plan)):
        if traj.shard is not None:  # this rank's share of the step; the ranks' steps summed
            here = traj.shard.fan_out(theta)
            x, y, weight = traj.batch_share(images, labels, step)
            (grad,) = torch.autograd.grad(weight * traj.step_loss(here, x, y), here, create_graph=True)
            theta = theta - traj.shard.sum(lr * grad)
            continue
        x, y = traj.batch(images, labels, step)
        (grad,) = torch.autograd.grad(traj.step_loss(theta, x, y), theta, create_graph=True)
        theta = theta - lr * grad
    return traj.distance(theta)
