"""Constant-memory trajectory matching: the exact MTT gradient with one student step's graph at a time.

The idea is TESLA's (Cui et al., ICML 2023): do not keep the autograd graph of every student step.
The scheme here is NOT TESLA's: it is the exact reverse-mode (adjoint) recursion, so the gradients
equal the unrolled ones (up to floating-point rounding), including every second-order path through
earlier steps. TESLA's reference (justincui03/tesla, ``distill.py``) approximates: its student steps
use detached gradients, and each step's image gradient is taken from the closed form of the first
term of the expansion (``single_term + square_term`` against that step's gradient at fixed
parameters), which drops the Hessian terms that couple a step to the later ones. The two therefore
give different image updates for the same draw; this module follows the unrolled MTT gradient.
TESLA's other contribution, soft labels from the target expert (its ``--teacher_label``), is
``params.teacher_label`` of MTT (:mod:`builders.methods.teacher_labels`).

Student steps ``theta_{i+1} = theta_i - a * g_i``, ``g_i = grad_theta loss(theta_i; X_i, Y_i)``, ``i < N``,
and ``L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2``.

Forward (no graph kept): run the N steps, each computing ``g_i`` with a graph that is freed at once;
keep ``theta_i`` (one parameter vector per step; on the CPU when the build runs on a GPU, so GPU
memory does not grow with N).

Backward, with ``lam = dL/dtheta_N = 2 (theta_N - theta*) / ||theta_0 - theta*||^2``, for i = N-1..0:
recompute step i's graph from ``theta_i`` and the same batch and augmentation draw, then

    dL/da      += -<lam, g_i>
    dL/dX_i    += -a * (d g_i / d X_i)^T lam        (vector-Jacobian product, through the DSA draw)
    dL/dY_i    += -a * (d g_i / d Y_i)^T lam        (soft labels, when they are learned)
    lam         = lam - a * (d g_i / d theta_i)^T lam   (a Hessian-vector product)

and free the graph. Peak memory: one step's double-backward graph plus the N parameter vectors;
the unrolled version keeps N such graphs. Cost: about one extra forward/backward per step.

Under a torchrun batch split (:mod:`builders.methods.mtt`) each rank computes ``g_i`` and the three
vector-Jacobian products on its share of step i's batch; the shares of ``g_i`` (forward) and of the
Hessian-vector product (backward) are summed over ranks, so ``theta_i`` and ``lam`` stay identical on
every rank, while the gradients of the images, ``a`` and the labels stay per rank (the engine sums them).

It is a :class:`torch.autograd.Function`: the loss it returns carries the true loss value, and the
engine's ``loss.backward()`` runs the recursion above and leaves the gradients on the images, the
step size (and through it on ``syn_lr_raw``) and the soft labels.
"""

from __future__ import annotations

from typing import Any

import torch

from builders.methods.trajectory import StudentTrajectory
from builders.transfer import to_device

__all__ = ["constant_memory_matching_loss"]


def _differentiable_labels(labels: torch.Tensor) -> bool:
    return labels.dtype.is_floating_point


class _ConstantMemoryMatching(torch.autograd.Function):
    """Inputs: images [N,...], lr (0-d), labels (int64 [N] or float logits [N,K]), the trajectory."""

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor, lr: torch.Tensor, labels: torch.Tensor,
                traj: StudentTrajectory) -> torch.Tensor:
        store_on = torch.device("cpu") if images.device.type == "cuda" else images.device
        thetas: list[torch.Tensor] = []
        theta = traj.start.detach().clone()
        step_size = lr.detach()
        for step in range(len(traj.plan)):
            thetas.append(theta.to(store_on, copy=True) if store_on != theta.device else theta)
            with torch.enable_grad():
                leaf = theta.detach().requires_grad_(True)
                if traj.shard is not None:  # this rank's share of the batch; the ranks' gradients summed
                    x, y, weight = traj.batch_share(images.detach(), labels.detach(), step)
                    (grad,) = torch.autograd.grad(weight * traj.step_loss(leaf, x, y), leaf)
                    traj.shard.sum_(grad)
                else:
                    x, y = traj.batch(images.detach(), labels.detach(), step)
                    (grad,) = torch.autograd.grad(traj.step_loss(leaf, x, y), leaf)
            theta = theta - step_size * grad
        ctx.save_for_backward(images, lr, labels)
        ctx.traj = traj
        ctx.thetas = thetas
        ctx.end = theta
        return traj.distance(theta)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        images, lr, labels = ctx.saved_tensors
        traj: StudentTrajectory = ctx.traj
        want_images = ctx.needs_input_grad[0]
        want_lr = ctx.needs_input_grad[1]
        want_labels = ctx.needs_input_grad[2] and _differentiable_labels(labels)
        step_size = lr.detach()
        denom = ((traj.start - traj.target) ** 2).sum()
        lam = grad_output * 2.0 * (ctx.end - traj.target) / denom
        grad_images = torch.zeros_like(images) if want_images else None
        grad_labels = torch.zeros_like(labels) if want_labels else None
        grad_lr = torch.zeros_like(lr)
        for step in reversed(range(len(traj.plan))):
            positions, draw, weight = (traj.plan.batches[step], traj.plan.draws[step], None) if traj.shard is None \
                else traj.share_of(step)  # a batch split: this rank's share, its terms summed below
            idx = to_device(positions, images.device)
            with torch.enable_grad():
                theta = to_device(ctx.thetas[step], images.device).detach().requires_grad_(True)
                x_leaf = images[idx].detach().requires_grad_(want_images)
                x = traj.augmenter.apply(x_leaf, draw) if draw is not None else x_leaf
                y_leaf = labels[idx].detach()
                if want_labels:
                    y_leaf.requires_grad_(True)
                step_loss = traj.step_loss(theta, x, y_leaf)
                if weight is not None:
                    step_loss = weight * step_loss
                (grad,) = torch.autograd.grad(step_loss, theta, create_graph=True)
                inputs = [theta] + ([x_leaf] if want_images else []) + ([y_leaf] if want_labels else [])
                vjps = torch.autograd.grad(grad, inputs, grad_outputs=lam, allow_unused=True)
            if want_lr:
                grad_lr = grad_lr - (grad.detach() * lam).sum()
            vjp_theta = vjps[0] if vjps[0] is not None else torch.zeros_like(lam)
            if traj.shard is not None:  # the Hessian-vector product of the whole batch: every rank's share summed
                traj.shard.sum_(vjp_theta)
            rest = list(vjps[1:])
            if want_images:
                vjp_x = rest.pop(0)
                if vjp_x is not None:
                    grad_images.index_add_(0, idx, -step_size * vjp_x)
            if want_labels:
                vjp_y = rest.pop(0)
                if vjp_y is not None:
                    grad_labels.index_add_(0, idx, -step_size * vjp_y)
            lam = lam - step_size * vjp_theta.detach()
            del grad, vjps, theta, x, x_leaf, y_leaf
        ctx.thetas = None  # release the stored parameter vectors
        return grad_images, grad_lr if want_lr else None, grad_labels, None


def constant_memory_matching_loss(
    traj: StudentTrajectory, images: torch.Tensor, lr: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The normalised matching loss of ``traj`` whose backward computes the exact gradients for
    ``images``, ``lr`` and float ``labels`` with one student step's graph in memory at a time."""
    if lr.dim() != 0:
        raise ValueError(f"constant-memory matching learns one scalar step size, got lr of shape {tuple(lr.shape)}")
    return _ConstantMemoryMatching.apply(images, lr, labels, traj)
