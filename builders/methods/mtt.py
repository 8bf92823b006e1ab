"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022).

Each iteration picks an expert (uniformly) and a start epoch ``s`` in ``[0, max_start_epoch)`` with the
build's generator, and starts a *student* at the expert's parameters after epoch ``s``. The student
takes ``syn_steps`` plain gradient steps on batches of ``batch_syn`` synthetic images (random order,
reshuffled whenever the images run out; per-sample DSA) with the learnable step size ``syn_lr``.
The loss is the normalised parameter distance

    ||theta_student_end - theta_expert[s + M]||^2 / ||theta_expert[s] - theta_expert[s + M]||^2,

``M = expert_epochs``. Backpropagating it reaches the images and ``syn_lr`` through every student step.
Images and ``syn_lr`` are optimised by SGD with momentum 0.5 (``lr_img``, ``lr_lr``).

Students are functional: parameters are one flat vector, split into the network's shapes
(:class:`builders.experts.ParamLayout`) and applied with :func:`torch.func.functional_call`; the
network module only supplies the architecture. Networks with BatchNorm work (their batch statistics
are used; running statistics are ignored), as in the reference.

The step size is positive by construction. The state holds ``syn_lr_raw`` and the step size is

    syn_lr = floor + softplus_beta(syn_lr_raw),  floor = 1e-4 * lr_teacher,  beta = 100 / lr_teacher,

``softplus_beta(r) = log(1 + exp(beta r)) / beta``. Torch's softplus is exactly linear for
``beta r > 20``, so for step sizes above ``0.2 lr_teacher + floor`` the raw value is the step size
minus the floor: the papers' ``lr_lr`` keeps its meaning (a step on the raw value is the same step on
syn_lr). Below that the map bends smoothly toward ``floor``; no gradient step, however large, can make
the step size zero or negative. It starts at ``lr_teacher``. The set stores the final value as ``lr``.

Memory (``params.memory``): ``unrolled`` keeps every student step's graph (memory grows with
``syn_steps``); ``constant`` computes the same gradients with one step's graph alive at a time
(:mod:`builders.methods.tesla`). Both draw the same batches and augmentations.

Under torchrun with N processes (``gradient_split = "batches"``, DATM and TESLA alike) every rank draws
the iteration's expert, start epoch and plan in the same order and runs the same student; rank r
computes each student step's gradient on its block ``[r*B//N, (r+1)*B//N)`` of the step's ``B``
images (weighted ``len(block) / B``, so the blocks' gradients sum to the batch mean's), and the ranks'
gradients are summed before the step, so every rank holds the same student. Backpropagating the
(identical) loss leaves on each rank its share of the gradients of the images, the step size and the
soft labels; the engine sums them over ranks before the optimisers step, so every rank applies the same
update. The result equals one process's within float rounding (the same terms summed in another order).
Not with batch norm (its batch statistics couple a step's images): every rank then computes the whole
build. Each step's batch needs at least N images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch

from builders.errors import ExpertStoreError
from builders.experts import ExpertStore, ParamLayout, build_command, expert_dir, open_for_recipe
from builders.gsam import EXPERT_OPTIMIZERS
from builders.methods.base import BuildContext, Method, SetContents, check_init
from builders.methods.teacher_labels import STATE_KEY as TEACHER_KEY
from builders.methods.teacher_labels import check_teacher_label, initial_teacher_labels, teacher_logits
from builders.methods.tesla import constant_memory_matching_loss
from builders.methods.trajectory import (
    LR_BETA,
    LR_FLOOR,
    StudentTrajectory,
    make_plan,
    raw_from_syn_lr,
    syn_lr_from_raw,
    unrolled_matching_loss,
)
from builders.networks import build_network
from builders.recipe import check_at_least, check_choice
from builders.registry import register

if TYPE_CHECKING:
    from builders.recipe import Recipe

MEMORY_MODES: tuple[str, ...] = ("unrolled", "constant")


def matching_loss(
    traj: StudentTrajectory, images: torch.Tensor, lr: torch.Tensor, labels: torch.Tensor, memory: str = "unrolled"
) -> torch.Tensor:
    """The matching loss whose ``.backward()`` fills the gradients of images, lr and (float) labels;
    ``memory`` 'unrolled' or 'constant' (same gradients, see :mod:`builders.methods.tesla`)."""
    if memory == "unrolled":
        return unrolled_matching_loss(traj, images, lr, labels)
    if memory == "constant":
        return constant_memory_matching_loss(traj, images, lr, labels)
    raise ValueError(f"memory: unknown {memory!r}; valid: {', '.join(MEMORY_MODES)}")


# --------------------------------------------------------------------------------------------------
# the method


@register
class TrajectoryMatching(Method):
    """MTT: learn images and a step size so that student training on them follows the experts."""

    name: ClassVar[str] = "mtt"
    defaults: ClassVar[dict[str, Any]] = {
        "syn_steps": 20,
        "expert_epochs": 3,
        "max_start_epoch": 20,
        "lr_img": 1000.0,
        "lr_lr": 1e-05,
        "lr_teacher": 0.01,
        "batch_syn": 0,  # 0: all synthetic images in every step
        "memory": "unrolled",
        "zca": False,
        "expert_dir": "",  # "" -> OUT_ROOT/experts/{source}/{model}/{zca|plain}[_gsam]
        "init": "real",
        "expert_optimizer": "sgd",  # the experts' optimiser: sgd (MTT), gsam (FTD's, DATM's buffers)
        "teacher_label": False,  # TESLA's labels from the target expert (builders/methods/teacher_labels.py)
    }
    momentum: ClassVar[float] = 0.5
    gradient_split: ClassVar[str] = "batches"  # torchrun: each student step's batch split across ranks

    @classmethod
    def check_recipe(cls, recipe: "Recipe") -> None:
        p = recipe.params
        check_choice("memory", p["memory"], MEMORY_MODES)
        check_at_least(p, ("syn_steps", "expert_epochs", "max_start_epoch"), 1)
        check_at_least(p, ("batch_syn",), 0, meaning="0: all images")
        check_at_least(p, ("lr_img", "lr_lr"), 0)
        check_at_least(p, ("lr_teacher",), 0, strict=True)
        check_choice("expert_optimizer", p["expert_optimizer"], EXPERT_OPTIMIZERS)
        check_teacher_label(recipe)
        cls._check_init(p)

    @classmethod
    def _check_init(cls, params: dict[str, Any]) -> None:
        check_init(params["init"])

    # -- what the experts must provide ---------------------------------------------------------
    def start_window(self, iteration: int) -> tuple[int, int]:
        """Start epochs are drawn in ``[low, high)`` at ``iteration``."""
        return 0, self.params["max_start_epoch"]

    def max_epoch_needed(self) -> int:
        """The latest expert epoch a student's target can be."""
        return self.params["max_start_epoch"] - 1 + self.params["expert_epochs"]

    def store_path(self) -> Path:
        """params.expert_dir, else ``OUT_ROOT/experts/{source}/{model}/{zca|plain}``."""
        if self.params["expert_dir"]:
            return Path(self.params["expert_dir"]).expanduser()
        r = self.ctx.recipe
        return expert_dir(self.ctx.out_root, r.source, r.model, self.params["zca"], self.params["expert_optimizer"])

    def _open_store(self) -> ExpertStore:
        r, p = self.ctx.recipe, self.params
        hint = build_command(r.source, r.model, p["zca"], self.max_epoch_needed(), self.ctx.out_root,
                             optimizer=p["expert_optimizer"])
        if p["expert_dir"]:
            hint += f" --set params.expert_dir={p['expert_dir']}"
        store = open_for_recipe(self.store_path(), source=r.source, model=r.model, zca=p["zca"],
                                parameter_count=self.layout.numel, min_epochs=self.max_epoch_needed(),
                                build_hint=hint, optimizer=p["expert_optimizer"])
        if store.index.get("parameters") != self.layout.describe():
            raise ExpertStoreError(f"the expert trajectories at {store.path} were trained on a network whose parameter "
                               f"names/shapes differ from {r.model}'s; rebuild them with `{hint}`")
        return store

    # -- engine interface ----------------------------------------------------------------------
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        c, h, w = ctx.real.image_shape
        # The student's architecture; its own weights are never used (students start at expert snapshots).
        self.net = build_network(ctx.recipe.model, c, ctx.num_classes, (h, w), seed=0).to(ctx.device)
        self.net.train()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.layout = ParamLayout.of(self.net)
        self.store = self._open_store()
        if self.params["zca"]:
            ctx.real.set_zca(self.store.load_zca())
        self.labels = ctx.hard_labels()

    def initial_state(self) -> dict[str, torch.Tensor]:
        images, self.init_rows = self.ctx.initial_images(self.params["init"])
        state = self.initial_state_with(images)
        if self.params["teacher_label"]:
            state[TEACHER_KEY] = initial_teacher_labels(images.shape[0], self.ctx.num_classes, self.ctx.device)
        return state

    def initial_state_with(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state for starting images ``images`` (a leaf that requires grad): step size lr_teacher."""
        raw = raw_from_syn_lr(self.params["lr_teacher"], self.params["lr_teacher"]).to(self.ctx.device)
        return {"images": images, "syn_lr_raw": raw.requires_grad_(True)}

    def optimizers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
        p = self.params
        return {
            "images": torch.optim.SGD([state["images"]], lr=p["lr_img"], momentum=self.momentum),
            "syn_lr": torch.optim.SGD([state["syn_lr_raw"]], lr=p["lr_lr"], momentum=self.momentum),
        }

    def syn_lr(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The current (positive) student step size, differentiable in ``syn_lr_raw``."""
        return syn_lr_from_raw(state["syn_lr_raw"], self.params["lr_teacher"])

    def student(self, state: dict[str, torch.Tensor], iteration: int) -> StudentTrajectory:
        """Draw this iteration's expert, start epoch and plan (all from the build's generator)."""
        ctx, p = self.ctx, self.params
        expert = int(torch.randint(self.store.num_experts, (1,), generator=ctx.generator))
        low, high = self.start_window(iteration)
        start_epoch = int(torch.randint(low, high, (1,), generator=ctx.generator))
        rows = self.store.snapshots(expert, [start_epoch, start_epoch + p["expert_epochs"]]).to(ctx.device)
        plan = make_plan(state["images"].shape[0], p["syn_steps"], p["batch_syn"], ctx.generator, ctx.augmenter)
        return StudentTrajectory(self.net, self.layout, rows[0], rows[1], plan, ctx.augmenter,
                                 extra={"expert": expert, "start_epoch": start_epoch}, shard=ctx.batch_shard)

    def targets(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The labels the student trains with: class indices (MTT)."""
        return self.labels

    def losses(self, state: dict[str, torch.Tensor], iteration: int) -> Iterator[torch.Tensor]:
        traj = self.student(state, iteration)
        labels = self.targets(state)
        if TEACHER_KEY in state:  # TESLA: this iteration's labels from the target expert
            state[TEACHER_KEY].copy_(teacher_logits(traj, state["images"]))
            labels = state[TEACHER_KEY]
        yield matching_loss(traj, state["images"], self.syn_lr(state), labels, self.params["memory"])

    def finalize(self, state: dict[str, torch.Tensor]) -> SetContents:
        lr = self.syn_lr(state).detach().to("cpu", torch.float32).reshape(())
        contents = SetContents(images=state["images"].detach(), lr=lr, metadata=self.build_metadata(state))
        if TEACHER_KEY in state:
            contents.soft_labels = state[TEACHER_KEY].detach().to("cpu", torch.float32).clone()
            contents.metadata["soft_labels"] = "TESLA teacher labels: the last iteration's target expert's logits"
        return contents

    def build_metadata(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What the set records about this build beyond the recipe."""
        accs = [e["test_accuracy"] for e in self.store.experts]
        return {
            "init": self.params["init"],
            "memory": self.params["memory"],
            "syn_lr": float(self.syn_lr(state).detach()),
            "syn_lr_parametrisation": (f"syn_lr = {LR_FLOOR:g}*lr_teacher + softplus(raw, beta={LR_BETA:g}/lr_teacher)"),
            "experts": {
                "dir": str(self.store.path),
                "num_experts": self.store.num_experts,
                "epochs": self.store.epochs,
                "zca": self.store.zca_enabled,
                "test_accuracy_mean": round(sum(accs) / len(accs), 4) if accs else None,
            },
        }
