"""What a condensation method is to the engine: its state, its optimisers, the losses of one iteration."""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from builders.networks import build_network
from builders.recipe import check_choice
from builders.transfer import module_to_device

if TYPE_CHECKING:
    from builders.augment import AugmentDraw, Augmenter
    from builders.data import RealData
    from builders.distributed import BatchShard
    from builders.recipe import Recipe


def no_status(text: str) -> None:
    """A build's status line where nothing shows it (no progress bar)."""


def draw_seed(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from ``generator`` (for sub-streams such as a network's initialisation)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


INITS = ("real", "noise")


def check_init(init: str) -> None:
    """RecipeError unless ``init`` names a way to start the synthetic images."""
    check_choice("init", init, INITS)


@dataclass
class BuildContext:
    """Everything a method may use: the recipe, real data, device, the build's one RNG, DSA."""

    recipe: "Recipe"
    real: "RealData"
    device: torch.device
    generator: torch.Generator
    augmenter: "Augmenter | None" = None
    out_root: Path = Path("data")  # where the build writes (expert trajectories live under it)
    owned_classes: tuple[int, ...] | None = None  # under torchrun: the classes this rank computes (None: all)
    batch_shard: BatchShard | None = None  # under torchrun, gradient_split "batches": this rank's share of batches
    #: Where :meth:`status` notes go: the engine points it at its progress bar while the loop runs.
    status_sink: Callable[[str], None] = no_status

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def ipc(self) -> int:
        return self.recipe.ipc

    @property
    def params(self) -> dict[str, Any]:
        return self.recipe.params

    def status(self, text: str) -> None:
        """Show ``text`` beside the build's progress bar until the iteration ends (e.g. that it compiles)."""
        self.status_sink(text)

    def new_network(self, name: str | None = None) -> nn.Module:
        """A freshly initialised network (seeded from the build's RNG) on the build's device."""
        c, h, w = self.real.image_shape
        net = build_network(name or self.recipe.model, c, self.num_classes, (h, w), seed=draw_seed(self.generator))
        # drawn on the host (the same bytes on any device), copied without waiting for the GPU's queued work
        return module_to_device(net, self.device)

    def siamese_draw(self) -> "AugmentDraw | None":
        """One DSA draw for a group of batches (None when the recipe has no augmentation); draws the same
        random numbers as ``Augmenter.siamese``."""
        return None if self.augmenter is None else self.augmenter.sample(self.generator, None)

    def apply_siamese_draws(self, draws: Sequence["AugmentDraw | None"],
                            *batch_lists: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        """``batch_lists[k][i]`` transformed by ``draws[i]``, every list alike: what ``Augmenter.siamese``
        gives group by group, in one pass per augmentation family (see ``Augmenter.apply_each``)."""
        if self.augmenter is None:
            return tuple(list(batches) for batches in batch_lists)
        n = len(draws)
        flat = self.augmenter.apply_each([b for batches in batch_lists for b in batches],
                                         list(draws) * len(batch_lists))
        return tuple(flat[k * n:(k + 1) * n] for k in range(len(batch_lists)))

    def class_batches(self, images: torch.Tensor, batch_real: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For each class of :meth:`classes_here`: a real batch of ``batch_real`` images and the class's rows of
        ``images``, both transformed by one siamese DSA draw of that class (untransformed without augmentation).

        Every class's random numbers are drawn, in class order (its real batch, then its draw), whichever classes
        this process computes; the images are gathered, normalised and transformed together (on a GPU, a few
        launches instead of ten times as many)."""
        picks, draws = [], []
        for c in range(self.num_classes):
            picks.append(self.real.pick_class(c, batch_real, self.generator))
            draws.append(self.siamese_draw())
        reals = list(self.real.rows(torch.cat(picks)).split([len(p) for p in picks]))
        here = self.classes_here()
        return self.apply_siamese_draws([draws[c] for c in here], [reals[c] for c in here],
                                        [images[self.class_slice(c)] for c in here])

    def augment_each(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-sample DSA (identity when the recipe has no augmentation)."""
        if self.augmenter is None:
            return batch
        return self.augmenter(batch, self.generator)

    def classes_here(self) -> tuple[int, ...]:
        """The classes whose losses this process computes: all, unless a torchrun build split them."""
        return self.owned_classes if self.owned_classes is not None else tuple(range(self.num_classes))

    def class_slice(self, c: int) -> slice:
        """Rows of class ``c`` in a class-contiguous set."""
        return slice(c * self.ipc, (c + 1) * self.ipc)

    def hard_labels(self) -> torch.Tensor:
        """Class-contiguous labels of the synthetic set, on the device."""
        return torch.arange(self.num_classes, device=self.device).repeat_interleave(self.ipc)

    def initial_images(self, init: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Starting synthetic images: 'real' (random real images per class) or 'noise' (standard normal).

        Returns the images (a leaf tensor that requires grad) and, for 'real', the rows they came from.
        """
        if init == "real":
            pos = self.real.random_class_balanced(self.ipc, self.generator)
            images = self.real.rows(pos)
            rows = self.real.source_rows[pos.cpu()]
        elif init == "noise":
            shape = (self.num_classes * self.ipc, *self.real.image_shape)
            images = torch.randn(shape, generator=self.generator).to(self.device)
            rows = None
        else:
            raise ValueError(f"init: unknown {init!r}; valid: real, noise")
        return images.detach().clone().requires_grad_(True), rows


@dataclass
class SetContents:
    """What a method hands the engine at the end: the set's tensors and its own metadata."""

    images: torch.Tensor
    soft_labels: torch.Tensor | None = None
    lr: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] | None = None  # real pixels: how the file stores them (condensed_datasets.pixel_storage)
    patch_mask: torch.Tensor | None = None  # bool [N, rows, cols]: kept patches, with storage "patches"


class Method(ABC):
    """A condensation method: its own maths only; the engine runs the loop around it.

    Iterative methods implement ``initial_state``, ``optimizers``, ``losses`` and ``finalize``;
    one-shot methods (coresets) set ``iterative = False`` and implement ``select``.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    iterative: ClassVar[bool] = True
    splits_classes: ClassVar[bool] = False  # True: losses independent per class (torchrun may split them)
    #: Under torchrun, a split whose state gradients the engine sums over ranks after every backward, so
    #: that every rank takes the identical step: "classes" (the loss holds the terms of ``ctx.classes_here()``)
    #: or "batches" (per-sample terms of ``ctx.batch_shard``'s share of each batch); "" none.
    gradient_split: ClassVar[str] = ""
    #: Whether the command line applies its allocator settings (:mod:`builders.allocator`) to this method's
    #: builds: they pay where large blocks are freed and faulted in again every iteration (DM's real branch).
    tunes_allocator: ClassVar[bool] = True

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        self.params = ctx.recipe.params

    @classmethod
    def check_recipe(cls, recipe: "Recipe") -> None:
        """Raise RecipeError for recipe values this method cannot build with (beyond type checks)."""

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The learnable tensors (leaf tensors that require grad), by name; 'images' is required."""
        raise NotImplementedError(f"{self.name} is not iterative")

    def optimizers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
        """Optimisers over ``state``, by name (the engine checkpoints and steps them)."""
        raise NotImplementedError(f"{self.name} is not iterative")

    def losses(self, state: dict[str, torch.Tensor], iteration: int) -> Iterator[torch.Tensor]:
        """The losses of one iteration; after each yielded loss the engine backpropagates and steps."""
        raise NotImplementedError(f"{self.name} is not iterative")

    def finalize(self, state: dict[str, torch.Tensor]) -> SetContents:
        """The set's tensors from the final state."""
        return SetContents(images=state["images"].detach())

    def select(self) -> SetContents:
        """One-shot methods: choose the set."""
        raise NotImplementedError(f"{self.name} is iterative")
