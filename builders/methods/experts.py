"""Recipe method ``experts``: train expert trajectories for MTT / DATM (see :mod:`builders.experts`).

It produces no condensed set: the engine sees ``produces_set = False`` and calls :meth:`run` with
itself, which trains the experts the store still lacks and returns the store.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm.auto import tqdm

import condensed_datasets
from builders.evaluate import test_accuracy
from builders.experts import (
    STORE_VERSION,
    ZCA_NAME,
    ExpertSettings,
    ExpertStore,
    ParamLayout,
    derive_seed,
    expert_dir,
    fit_split_zca,
    train_expert,
)
from builders.gsam import EXPERT_OPTIMIZERS, GSAMSettings
from builders.methods.base import Method, check_at_least, check_choice
from builders.networks import build_network
from condensed_datasets.zca import DEFAULT_EPS

if TYPE_CHECKING:
    from builders.engine import Engine
    from builders.recipe import Recipe


class ExpertTrajectories(Method):
    """Recipe method ``experts``: train ``num_experts`` experts on the real data and store their
    trajectories (no condensed set is produced). ``condensed-build recipes/experts_{source}.yaml``."""

    name: ClassVar[str] = "experts"
    produces_set: ClassVar[bool] = False
    iterative: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {
        "num_experts": 100,
        "epochs": 50,
        "lr_teacher": 0.01,
        "batch": 256,
        "zca": False,
        "expert_dir": "",  # "" -> OUT_ROOT/experts/{source}/{model}/{zca|plain}[_gsam]
        # sgd, or gsam: FTD's GSAM (builders/gsam.py) with the FTD/DATM buffer command's settings below
        "optimizer": "sgd",
        "rho_max": 0.01,
        "rho_min": 0.01,
        "alpha": 0.3,
        "adaptive": True,
    }

    @classmethod
    def check_recipe(cls, recipe: "Recipe") -> None:
        p = recipe.params
        check_at_least(p, ("num_experts", "epochs", "batch"), 1)
        check_at_least(p, ("lr_teacher",), 0, strict=True)
        check_choice("optimizer", p["optimizer"], EXPERT_OPTIMIZERS)
        check_at_least(p, ("rho_max", "rho_min", "alpha"), 0)
        if p["rho_min"] != p["rho_max"]:
            from builders.recipe import RecipeError

            raise RecipeError(f"params.rho_min ({p['rho_min']}) must equal params.rho_max ({p['rho_max']}): the "
                              "experts' lr is constant, and GSAM's rho follows the lr (as the reference asserts)")

    def select(self):  # pragma: no cover - the engine dispatches on produces_set first
        raise NotImplementedError("expert training produces trajectories, not a set; Engine.run calls run()")

    def store_path(self, out_root: str | os.PathLike) -> Path:
        """Where this recipe's store goes: params.expert_dir, else under ``out_root``."""
        r = self.ctx.recipe
        if self.params["expert_dir"]:
            return Path(self.params["expert_dir"]).expanduser()
        return expert_dir(out_root, r.source, r.model, self.params["zca"], self.params["optimizer"])

    def header(self, layout: ParamLayout, settings: ExpertSettings) -> dict[str, Any]:
        """What every expert of the store shares (compared when a store is extended)."""
        r = self.ctx.recipe
        return {
            "format_version": STORE_VERSION,
            "kind": "expert_trajectories",
            "source": r.source,
            "model": r.model,
            "zca": bool(self.params["zca"]),
            "zca_eps": DEFAULT_EPS if self.params["zca"] else None,
            "epochs": settings.epochs,
            "parameter_count": layout.numel,
            "parameters": layout.describe(),
            "training": {**settings.describe(), "real_per_class": r.real_per_class},
            "recipe_seed": r.seed,
        }

    def run(self, engine: "Engine") -> ExpertStore:
        """Train the missing experts of the store; return it."""
        ctx, r, p = self.ctx, self.ctx.recipe, self.params
        gsam = (GSAMSettings(rho_max=p["rho_max"], rho_min=p["rho_min"], alpha=p["alpha"], adaptive=p["adaptive"])
                if p["optimizer"] == "gsam" else None)
        settings = ExpertSettings(epochs=p["epochs"], lr=p["lr_teacher"], batch=p["batch"], augmenter=ctx.augmenter,
                                  gsam=gsam)
        c, h, w = ctx.real.image_shape
        layout = ParamLayout.of(build_network(r.model, c, ctx.num_classes, (h, w), seed=0))
        store = ExpertStore.create_or_extend(self.store_path(engine.out_root), self.header(layout, settings))
        if p["zca"]:
            zca = store.load_zca() if (store.path / ZCA_NAME).is_file() else None
            if zca is None:
                zca = fit_split_zca(ctx.real)
                store.save_zca(zca, fitted_on=f"{r.source} train split, {len(ctx.real)} images, raw [0, 1] pixels")
            ctx.real.set_zca(zca)
        test = engine._test_split()
        test.set_zca(ctx.real.zca)
        todo = [k for k in range(p["num_experts"]) if not store.has(k)]
        bar = tqdm(todo, disable=not engine.progress, desc=f"experts {r.source} {r.model}", unit="expert",
                   dynamic_ncols=True)
        for k in bar:
            init_seed, train_seed = derive_seed(r.seed, k, "init"), derive_seed(r.seed, k, "train")
            net = build_network(r.model, c, ctx.num_classes, (h, w), seed=init_seed).to(ctx.device)
            generator = torch.Generator().manual_seed(train_seed)

            def report(epoch: int, acc: float, k: int = k) -> None:
                bar.set_postfix(expert=k, epoch=f"{epoch}/{settings.epochs}", train_acc=f"{acc:.1f}")

            trajectory, train_acc = train_expert(net, ctx.real, settings, generator, on_epoch=report)
            test_acc = test_accuracy(net, test)
            store.add(k, trajectory, {
                "init_seed": init_seed, "train_seed": train_seed, "test_accuracy": round(test_acc, 4),
                "train_accuracy": round(train_acc, 4), "test_split": f"{test.info.name} test, {len(test)} images",
                "versions": {"condensed_datasets": condensed_datasets.__version__, "torch": torch.__version__,
                             "python": platform.python_version()},
                "device": ctx.device.type,
            })
            bar.set_postfix(expert=k, test_acc=f"{test_acc:.2f}")
        bar.close()
        return store
