"""The papers' training protocol for a network on a (small) set: optimiser, schedule, batch, augmentation.

Shared by the evaluation (:mod:`builders.evaluate`) and the many-networks trainer (:mod:`builders.ensemble`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from builders.augment import Augmenter


@dataclass
class TrainSettings:
    """The papers' training protocol for a network on a (small) set."""

    epochs: int
    lr: float = 0.01
    batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augmenter: Augmenter | None = None
    step_lrs: tuple[float, ...] | None = None  # learned per-step lrs: replay them instead (see module doc)
    ipc: int = 1  # images per class of the set; picks each replayed step's images
    lr_decay: bool = True  # the papers' x0.1 after half the epochs; False: constant (as expert training)

    @property
    def drops(self) -> bool:
        """Whether the lr drops tenfold during training: with ``lr_decay`` and more than one epoch."""
        return self.lr_decay and self.epochs > 1

    def decays_at(self, epoch: int) -> bool:
        """Whether the lr drops tenfold before epoch ``epoch`` (0-based): at half the epochs, with ``lr_decay``."""
        return self.drops and epoch == self.epochs // 2

    def describe(self) -> dict[str, Any]:
        if self.step_lrs is not None:
            return {
                "optimizer": "SGD",
                "steps": len(self.step_lrs),
                "lr": "learned per step",
                "lrs": [round(v, 8) for v in self.step_lrs],
                "lr_schedule": "replay of the set's per-step lrs, in order, once",
                "batch": "step t: image (t mod ipc) of every class",
                "momentum": 0.0,
                "weight_decay": 0.0,
                "augment": self.augmenter.strategy if self.augmenter else "none",
            }
        return {
            "optimizer": "SGD",
            "epochs": self.epochs,
            "lr": self.lr,
            "lr_schedule": f"x0.1 after epoch {self.epochs // 2}" if self.drops else "constant",
            "batch": self.batch,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "augment": self.augmenter.strategy if self.augmenter else "none",
        }
