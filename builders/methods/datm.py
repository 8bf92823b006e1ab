"""DATM: Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching (Guo et al., ICLR 2024).

MTT (:mod:`builders.methods.mtt`) with three changes:

- **Difficulty-aligned window.** Start epochs are drawn in ``[min_start_epoch, upper)``. With
  ``sequential_generation`` the upper bound rises linearly from ``current_max_start_epoch`` to
  ``max_start_epoch`` over the first ``expansion_end_epoch`` iterations
  (``upper = min(max, current_max + floor((max - current_max) * iteration / expansion_end))``);
  without it the bound is ``max_start_epoch`` throughout (:func:`start_epoch_window`).
- **Initial images the experts get right** (``init: correct``): per class, real images in a random
  order (build generator), kept when the final-epoch parameters of the first expert classify them
  correctly; a class with too few such images continues with the next expert, and so on; should
  every expert be exhausted the class is filled with its remaining images in the same order (the
  number is recorded in the set's metadata). ``init: real`` / ``noise`` behave as in MTT.
- **Learned soft labels.** How they start (``label_init``) follows the reference (``distill/DATM.py``):
  with ``init: correct`` (its ``pix_init: samples_predicted_correctly``) each image's label is the
  average logit vector of the experts (final epoch, its ``Label_Model_Timestamp = -1``; the first
  ``label_experts``, 0 = all) that classify it correctly, or of all of them when none does (the
  reference divides by zero there) (:func:`average_correct_logits`); with ``init: real`` (its
  ``pix_init: real``) and ``noise`` they are the logits of one expert's final parameters (expert 0 here;
  the reference's ``buffer[0][-1]``, the first trajectory of a randomly chosen buffer file).
  ``label_init: average_correct`` or ``one_expert`` forces either scheme. The labels are a learnable state tensor
  (``soft_labels``, logits) trained with their own optimiser (SGD, ``lr_y``, momentum 0.9) through
  the student's inner steps, which use soft cross-entropy against ``softmax(soft_labels)``. The set
  stores them as ``soft_labels`` next to the learned ``lr``.

As in the reference, an iteration whose matching loss exceeds ``threshold`` (when > 0) takes no
optimiser step at all (its loss is logged as 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
from torch.func import functional_call

from builders.errors import RecipeError
from builders.methods.base import INITS, SetContents
from builders.methods.mtt import TrajectoryMatching, matching_loss
from builders.recipe import check_at_least, check_choice
from builders.registry import register

if TYPE_CHECKING:
    from builders.recipe import Recipe

DATM_INITS: tuple[str, ...] = ("correct", *INITS)  # correct: real images the experts classify right
LABEL_INITS: tuple[str, ...] = ("auto", "average_correct", "one_expert")


# --------------------------------------------------------------------------------------------------
# pure pieces


def start_epoch_window(
    iteration: int,
    *,
    min_start_epoch: int,
    max_start_epoch: int,
    current_max_start_epoch: int,
    expansion_end_epoch: int,
    sequential_generation: bool,
) -> tuple[int, int]:
    """``(low, high)``: the start epoch of ``iteration`` (0-based) is drawn in ``[low, high)``."""
    if not sequential_generation:
        return min_start_epoch, max_start_epoch
    grown = current_max_start_epoch + int((max_start_epoch - current_max_start_epoch) * iteration / expansion_end_epoch)
    return min_start_epoch, min(grown, max_start_epoch)


def average_correct_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the mean logit vector over the experts that classify it correctly.

    ``logits`` [E, N, K] (expert, image, class), ``labels`` [N]. An image no expert gets right takes
    the mean over all experts (never a division by zero).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[1:2]:
        raise ValueError(f"expected logits [E, N, K] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    correct = (logits.argmax(2) == labels.view(1, -1)).to(logits.dtype)  # [E, N]
    count = correct.sum(0)  # [N]
    summed = (logits * correct.unsqueeze(2)).sum(0)  # [N, K]
    fallback = logits.mean(0)
    return torch.where((count > 0).unsqueeze(1), summed / count.clamp_min(1).unsqueeze(1), fallback)


def pick_correct(order: torch.Tensor, correct: torch.Tensor, wanted: int, taken: set[int]) -> list[int]:
    """Up to ``wanted`` entries of ``order`` (in order) whose ``correct`` flag is set and that are not in ``taken``."""
    out = []
    for pos, ok in zip(order.tolist(), correct.tolist()):
        if len(out) == wanted:
            break
        if ok and pos not in taken:
            out.append(pos)
    return out


# --------------------------------------------------------------------------------------------------
# the method


@register
class DifficultyAlignedTrajectoryMatching(TrajectoryMatching):
    """DATM: MTT with a difficulty-aligned start window, correct-image init and learned soft labels."""

    name: ClassVar[str] = "datm"
    defaults: ClassVar[dict[str, Any]] = {
        **TrajectoryMatching.defaults,
        "syn_steps": 80,
        "expert_epochs": 2,
        "max_start_epoch": 25,
        "min_start_epoch": 0,
        "current_max_start_epoch": 20,
        "expansion_end_epoch": 3000,
        "sequential_generation": True,
        "lr_y": 2.0,
        "threshold": 0.0,  # > 0: skip the iteration's step when the loss exceeds it (reference: 1.0)
        "label_experts": 0,  # experts whose logits initialise the soft labels; 0: all
        "init": "correct",
        "label_init": "auto",  # auto (the reference's per init), average_correct, one_expert
        "expert_optimizer": "gsam",  # DATM's buffers are FTD's (buffer/buffer_FTD.py, GSAM)
    }
    momentum_y: ClassVar[float] = 0.9
    selection_batch: ClassVar[int] = 256

    @classmethod
    def check_recipe(cls, recipe: "Recipe") -> None:
        super().check_recipe(recipe)
        p = recipe.params
        if not 0 <= p["min_start_epoch"] < p["max_start_epoch"]:
            raise RecipeError(f"params.min_start_epoch: must be in [0, max_start_epoch={p['max_start_epoch']}), "
                              f"got {p['min_start_epoch']}")
        if p["sequential_generation"]:
            if not p["min_start_epoch"] < p["current_max_start_epoch"] <= p["max_start_epoch"]:
                raise RecipeError(
                    "params.current_max_start_epoch: with sequential_generation it must lie in "
                    f"(min_start_epoch={p['min_start_epoch']}, max_start_epoch={p['max_start_epoch']}], "
                    f"got {p['current_max_start_epoch']}")
            check_at_least(p, ("expansion_end_epoch",), 1)
        check_at_least(p, ("lr_y", "threshold"), 0)
        check_at_least(p, ("label_experts",), 0, meaning="0: all")
        check_choice("label_init", p["label_init"], LABEL_INITS)

    @classmethod
    def _check_init(cls, params: dict[str, Any]) -> None:
        check_choice("init", params["init"], DATM_INITS)

    def start_window(self, iteration: int) -> tuple[int, int]:
        p = self.params
        return start_epoch_window(
            iteration, min_start_epoch=p["min_start_epoch"], max_start_epoch=p["max_start_epoch"],
            current_max_start_epoch=p["current_max_start_epoch"], expansion_end_epoch=p["expansion_end_epoch"],
            sequential_generation=p["sequential_generation"])

    # -- the experts' verdicts -------------------------------------------------------------------
    def _label_experts(self) -> list[int]:
        n = self.store.num_experts
        k = self.params["label_experts"]
        return list(range(min(k, n) if k > 0 else n))

    def _final_params(self, expert: int) -> torch.Tensor:
        return self.store.snapshots(expert, [self.store.epochs])[0].to(self.ctx.device)

    @torch.no_grad()
    def _logits(self, theta: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        params = self.layout.unflatten(theta)
        parts = [functional_call(self.net, params, (images[s : s + self.selection_batch],))
                 for s in range(0, images.shape[0], self.selection_batch)]
        return torch.cat(parts)

    def _select_correct(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Positions (class-contiguous) of real images the experts classify correctly; the source rows;
        how many positions had to be filled without a correct verdict."""
        ctx, ipc = self.ctx, self.ctx.ipc
        experts = self._label_experts()
        finals = {}
        picks, filled = [], 0
        for c, pool in enumerate(ctx.real.class_indices):
            if len(pool) < ipc:
                raise RecipeError(f"class {c} has {len(pool)} real images, fewer than ipc {ipc}; lower ipc")
            order = pool[torch.randperm(len(pool), generator=ctx.generator)]
            chosen: list[int] = []
            for e in experts:
                if e not in finals:
                    finals[e] = self._final_params(e)
                for s in range(0, len(order), self.selection_batch):
                    if len(chosen) == ipc:
                        break
                    chunk = order[s : s + self.selection_batch]
                    pred = self._logits(finals[e], ctx.real.rows(chunk)).argmax(1).cpu()
                    chosen += pick_correct(chunk, pred == c, ipc - len(chosen), set(chosen))
                if len(chosen) == ipc:
                    break
            if len(chosen) < ipc:
                rest = [p for p in order.tolist() if p not in set(chosen)][: ipc - len(chosen)]
                filled += len(rest)
                chosen += rest
            picks.append(torch.tensor(chosen, dtype=torch.int64))
        pos = torch.cat(picks)
        return pos, ctx.real.source_rows[pos], filled

    def label_scheme(self) -> str:
        """``average_correct`` or ``one_expert`` (``auto``: the reference's pairing with ``init``)."""
        scheme = self.params["label_init"]
        if scheme == "auto":
            return "average_correct" if self.params["init"] == "correct" else "one_expert"
        return scheme

    def initial_soft_labels(self, images: torch.Tensor) -> torch.Tensor:
        """[N, K] logits: the average over the label experts that classify each image correctly, or
        expert 0's (see :meth:`label_scheme`)."""
        if self.label_scheme() == "one_expert":
            return self._logits(self._final_params(0), images).float()
        logits = torch.stack([self._logits(self._final_params(e), images) for e in self._label_experts()])
        return average_correct_logits(logits.float(), self.labels)

    # -- engine interface ----------------------------------------------------------------------
    def initial_state(self) -> dict[str, torch.Tensor]:
        self.filled_without_correct = 0
        if self.params["init"] == "correct":
            pos, self.init_rows, self.filled_without_correct = self._select_correct()
            images = self.ctx.real.rows(pos).detach().clone().requires_grad_(True)
            state = super().initial_state_with(images)
        else:
            state = super().initial_state()
        soft = self.initial_soft_labels(state["images"].detach())
        state["soft_labels"] = soft.detach().clone().requires_grad_(True)
        return state

    def optimizers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
        opts = super().optimizers(state)
        opts["soft_labels"] = torch.optim.SGD([state["soft_labels"]], lr=self.params["lr_y"], momentum=self.momentum_y)
        return opts

    def targets(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["soft_labels"]

    def losses(self, state: dict[str, torch.Tensor], iteration: int) -> Iterator[torch.Tensor]:
        traj = self.student(state, iteration)
        loss = matching_loss(traj, state["images"], self.syn_lr(state), self.targets(state), self.params["memory"])
        threshold = self.params["threshold"]
        if threshold > 0 and float(loss.detach()) > threshold:
            return  # the reference takes no step on such an iteration
        yield loss

    def finalize(self, state: dict[str, torch.Tensor]) -> SetContents:
        contents = super().finalize(state)
        contents.soft_labels = state["soft_labels"].detach().to("cpu", torch.float32)
        contents.metadata["soft_labels"] = "learned logits (softmax gives the targets)"
        contents.metadata["label_init"] = self.label_scheme()
        contents.metadata["initial_images_without_correct_verdict"] = getattr(self, "filled_without_correct", 0)
        return contents
