"""Coreset baselines: real images chosen per class at random, by herding, or by k-center."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from builders.errors import RecipeError
from builders.evaluate import TrainSettings, train_network
from builders.methods.base import Method, SetContents
from builders.networks import available_networks
from builders.registry import register


def herding_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding: each step adds the point that brings the running mean closest to the full mean."""
    n = features.shape[0]
    if k > n:
        raise ValueError(f"cannot select {k} of {n} points")
    target = features.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    for step in range(k):
        candidate_means = (total.unsqueeze(0) + features) / (step + 1)
        dist = ((candidate_means - target) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(torch.argmin(dist))
        chosen.append(i)
        available[i] = False
        total = total + features[i]
    return torch.tensor(chosen, dtype=torch.int64)


def kcenter_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center: start at the point nearest the mean, then repeatedly add the farthest point."""
    n = features.shape[0]
    if k > n:
        raise ValueError(f"cannot select {k} of {n} points")
    first = int(torch.argmin(((features - features.mean(0)) ** 2).sum(1)))
    chosen = [first]
    nearest = ((features - features[first]) ** 2).sum(1)
    for _ in range(k - 1):
        i = int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, ((features - features[i]) ** 2).sum(1))
    return torch.tensor(chosen, dtype=torch.int64)


class _Coreset(Method):
    """Shared frame of the coresets: per class, pick ``ipc`` rows of the real split."""

    iterative: ClassVar[bool] = False

    def pick(self, class_positions: torch.Tensor, k: int) -> torch.Tensor:
        """Positions (into ``class_positions``) of the ``k`` chosen images of one class."""
        raise NotImplementedError

    def select(self) -> SetContents:
        ctx = self.ctx
        picks = []
        for c in range(ctx.num_classes):
            pool = ctx.real.class_indices[c]
            if len(pool) < ctx.ipc:
                raise RecipeError(f"class {c} has {len(pool)} real images, fewer than ipc {ctx.ipc}; lower ipc")
            picks.append(pool[self.pick(pool, ctx.ipc).cpu()])
        positions = torch.cat(picks)
        return SetContents(
            images=ctx.real.rows(positions).cpu(),
            indices=ctx.real.source_rows[positions],
            metadata=self.selection_metadata(),
        )

    def selection_metadata(self) -> dict[str, Any]:
        return {}


@register
class RandomCoreset(_Coreset):
    """Random real images per class."""

    name: ClassVar[str] = "random"
    defaults: ClassVar[dict[str, Any]] = {}

    def pick(self, class_positions: torch.Tensor, k: int) -> torch.Tensor:
        return torch.randperm(len(class_positions), generator=self.ctx.generator)[:k]


class _FeatureCoreset(_Coreset):
    """Coresets that choose in a feature space: raw pixels or a network's embedding."""

    defaults: ClassVar[dict[str, Any]] = {
        "features": "network",  # "network": embed(x) of `feature_model`; "pixels": normalised pixels
        "feature_model": "",  # empty: the recipe's model
        "feature_epochs": 0,  # train the feature network this many epochs on the real split first
        "feature_lr": 0.01,
    }
    _features: torch.Tensor | None = None

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.params["features"] not in ("network", "pixels"):
            raise RecipeError(f"params.features: unknown {recipe.params['features']!r}; valid: network, pixels")
        if recipe.params["feature_epochs"] < 0:
            raise RecipeError("params.feature_epochs: must be >= 0")
        if recipe.params["feature_lr"] < 0:
            raise RecipeError(f"params.feature_lr: must be >= 0, got {recipe.params['feature_lr']}")
        model = recipe.params["feature_model"]
        if model and model not in available_networks():
            raise RecipeError(f"params.feature_model: unknown network {model!r}; valid: {', '.join(available_networks())} "
                              "(or empty: the recipe's model)")

    def features(self) -> torch.Tensor:
        """Features of every image of the real split (computed once)."""
        if self._features is None:
            self._features = self._compute_features()
        return self._features

    def _compute_features(self) -> torch.Tensor:
        ctx, p = self.ctx, self.params
        positions = torch.arange(len(ctx.real))
        if p["features"] == "pixels":
            return torch.cat([ctx.real.rows(chunk).flatten(1) for chunk in positions.split(1024)])
        net = ctx.new_network(p["feature_model"] or None)
        if p["feature_epochs"] > 0:
            settings = TrainSettings(epochs=p["feature_epochs"], lr=p["feature_lr"])
            train_network(net, ctx.real.rows(positions), ctx.real.labels, settings, ctx.generator)
        net.eval()
        with torch.no_grad():
            return torch.cat([net.embed(ctx.real.rows(chunk)) for chunk in positions.split(1024)])

    def selection_metadata(self) -> dict[str, Any]:
        p = self.params
        model = p["feature_model"] or self.ctx.recipe.model
        return {"feature_extractor": "pixels" if p["features"] == "pixels" else
                f"{model} embed(), trained {p['feature_epochs']} epochs on the real split"}


@register
class HerdingCoreset(_FeatureCoreset):
    """Herding (greedy feature-mean matching) per class."""

    name: ClassVar[str] = "herding"

    def pick(self, class_positions: torch.Tensor, k: int) -> torch.Tensor:
        return herding_select(self.features()[class_positions.to(self.ctx.device)], k)


@register
class KCenterCoreset(_FeatureCoreset):
    """Greedy k-center (farthest point) per class."""

    name: ClassVar[str] = "kcenter"

    def pick(self, class_positions: torch.Tensor, k: int) -> torch.Tensor:
        return kcenter_select(self.features()[class_positions.to(self.ctx.device)], k)
