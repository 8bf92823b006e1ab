"""The registry of condensation methods by name."""

from __future__ import annotations

from builders.methods.base import BuildContext, Method, SetContents
from builders.methods.coreset import HerdingCoreset, KCenterCoreset, RandomCoreset
from builders.methods.dc import GradientMatching, SiameseGradientMatching
from builders.methods.dd import DatasetDistillation
from builders.methods.datm import DifficultyAlignedTrajectoryMatching
from builders.methods.dm import DistributionMatching
from builders.methods.dq import DatasetQuantization
from builders.methods.experts import ExpertTrajectories
from builders.methods.mtt import TrajectoryMatching

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        RandomCoreset, HerdingCoreset, KCenterCoreset, DistributionMatching,
        GradientMatching, SiameseGradientMatching, DatasetDistillation,
        TrajectoryMatching, DifficultyAlignedTrajectoryMatching, ExpertTrajectories,
    )
}
METHODS[DatasetQuantization.name] = DatasetQuantization


def get_method(name: str) -> type[Method]:
    """The method class for ``name``; ValueError lists the methods this package can build."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; buildable methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["BuildContext", "Method", "SetContents", "METHODS", "get_method"]
