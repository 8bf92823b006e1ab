"""TESLA's soft labels from the expert (Cui et al., ICML 2023; its ``--teacher_label``).

In the reference (justincui03/tesla, ``distill.py``, ``if args.teacher_label:``) every iteration labels
the synthetic images afresh: the network at the iteration's *target* parameters (the expert after
``start_epoch + expert_epochs`` epochs), in eval mode, classifies the current (detached) synthetic
images, and ``softmax`` of its logits are the targets of the student's soft cross-entropy for that
iteration. The labels are not learned. The set is evaluated with the labels of the last iteration
(its ``eval_labs = label_syn``), so a build stores those logits as the set's ``soft_labels``.

Here the logits ride in the build state as ``teacher_labels`` (float, [N, K], no gradient), so a
checkpoint carries them and a resumed build ends with the same set. The student's loss applies the
softmax (:meth:`builders.methods.mtt.StudentTrajectory.step_loss` treats float labels as logits).
Trajectory matching with learned labels (DATM) cannot use them.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from builders.errors import RecipeError
from builders.methods.trajectory import StudentTrajectory
from builders.recipe import Recipe

__all__ = ["STATE_KEY", "check_teacher_label", "initial_teacher_labels", "teacher_logits"]

STATE_KEY = "teacher_labels"
_BATCH = 256  # images per forward pass (memory only; the logits do not depend on it)


@torch.no_grad()
def teacher_logits(traj: StudentTrajectory, images: torch.Tensor) -> torch.Tensor:
    """[N, K] logits of the network at ``traj.target`` (eval mode) on ``images`` (detached)."""
    net, params = traj.net, traj.layout.unflatten(traj.target)
    was_training = net.training
    net.eval()
    try:
        parts = [functional_call(net, params, (images[s : s + _BATCH].detach(),))
                 for s in range(0, images.shape[0], _BATCH)]
    finally:
        net.train(was_training)
    return torch.cat(parts).float()


def initial_teacher_labels(num_images: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """The state slot before the first iteration fills it (zeros: uniform targets, never trained on)."""
    return torch.zeros(num_images, num_classes, device=device)


def check_teacher_label(recipe: Recipe) -> None:
    """RecipeError when ``params.teacher_label`` is asked of a method that learns its labels."""
    if recipe.params.get("teacher_label") and recipe.method == "datm":
        raise RecipeError("params.teacher_label: DATM learns its own soft labels; TESLA's teacher labels apply to "
                          "mtt only (set teacher_label: false)")
