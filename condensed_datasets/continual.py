"""Class-incremental memory buffers: per-step condensed sets, each made from that step's classes only.

The protocol of the DM paper's continual-learning experiments (reference script ``CL_DM.py`` of
VICO-UoE/DatasetCondensation): the classes of a source are put in an order fixed by a seed and split into
``steps`` equal groups; step ``t``'s memory holds ``ipc`` images of each class of group ``t``, condensed
with only those classes available; a learner at step ``t`` trains on the union of the memories of steps
``0..t``.

```python
from condensed_datasets.continual import ClassIncrementalBuffer

buffer = ClassIncrementalBuffer("fashionmnist", "dm", ipc=10, steps=5, order_seed=0, root="data", build=True)
for step in range(buffer.num_steps):
    train = buffer.dataset(step)            # memory of steps 0..step; targets are source class indices
    seen = buffer.seen_classes(step)        # test on these classes' real test images
```

Step sets live at ``{root}/condensed/{source}/classes/{method}_ipc{ipc}_c{i}-{j}-....safetensors`` (the
step's classes in label order) and record the classes in their metadata (``class_subset``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.catalogue import default_repo_id
from condensed_datasets.constants import DEFAULT_REVISION
from condensed_datasets.datasets import TARGET_TYPES
from condensed_datasets.errors import CondensedDatasetsError, SetNotFoundError, UnknownNameError
from condensed_datasets.format import CondensedSet
from condensed_datasets.hub import fetch_verified
from condensed_datasets.paths import check_ipc, check_repo_id, check_revision, subset_set_path
from condensed_datasets.sources import get_source

Builder = Callable[[str, str, int, list[int], Path], Path]
"""``build(source, method, ipc, classes, root) -> path``: makes the set of ``classes`` and returns its path."""


def class_order(num_classes: int, order_seed: int) -> list[int]:
    """The class order of seed ``order_seed``: the same permutation as ``CL_DM.py``
    (``np.random.seed(seed); np.random.permutation(num_classes)``), drawn from its own generator.
    ``order_seed`` is an int in [0, 2**32), the seeds numpy takes."""
    if isinstance(order_seed, bool) or not isinstance(order_seed, (int, np.integer)) or not 0 <= order_seed < 2 ** 32:
        raise UnknownNameError(f"order_seed must be an int in [0, 2**32), got {order_seed!r}")
    return [int(c) for c in np.random.RandomState(int(order_seed)).permutation(int(num_classes))]


def split_steps(order: Sequence[int], steps: int) -> list[list[int]]:
    """``order`` cut into ``steps`` consecutive groups of equal size."""
    if steps < 1 or len(order) % steps:
        raise UnknownNameError(f"steps={steps}: {len(order)} classes do not split into {steps} equal steps; "
                         f"valid: the divisors of {len(order)}")
    size = len(order) // steps
    return [list(order[i * size:(i + 1) * size]) for i in range(steps)]


class MemoryDataset(Dataset):
    """A torchvision-style Dataset of a buffer's memory: ``data`` (N,C,H,W), ``targets`` (source class
    indices), ``soft_targets`` (N, source classes) or None, ``classes`` (the source's names), ``seen``."""

    def __init__(self, data: torch.Tensor, targets: list[int], soft_targets: torch.Tensor | None,
                 classes: list[str], seen: list[int], *, transform: Callable | None = None,
                 target_transform: Callable | None = None, target_type: str = "auto") -> None:
        if target_type not in TARGET_TYPES:
            raise UnknownNameError(f"target_type {target_type!r}: valid: {', '.join(TARGET_TYPES)}")
        if target_type == "soft" and soft_targets is None:
            raise UnknownNameError("target_type='soft' but the memory has no soft labels; use 'hard' or 'auto'")
        self.data = data
        self.targets = targets
        self.soft_targets = soft_targets
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.seen = seen
        self.transform = transform
        self.target_transform = target_transform
        self.target_type = ("soft" if soft_targets is not None else "hard") if target_type == "auto" else target_type

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.data[index]
        target: Any = self.soft_targets[index] if self.target_type == "soft" else self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


class ClassIncrementalBuffer:
    """Per-step memories of a class-incremental stream over ``source``.

    ``steps`` groups of classes in the order of ``order_seed`` (``steps=0``: an empty schedule, to be
    filled with :meth:`add_step`). A step's set is read from ``root``; when missing it is downloaded
    (``download=True``, from the source's hub repository, file ``classes/{name}``) or built
    (``build=True``: the shipped recipe of ``method`` with ``classes`` set to the step's classes; or
    ``build=callable(source, method, ipc, classes, root) -> path``). A step's set is always made with
    that step's classes only; a file whose ``class_subset`` differs is refused.
    """

    def __init__(self, source: str, method: str, ipc: int, steps: int, order_seed: int = 0,
                 root: str | os.PathLike = "data", *, build: bool | Builder = False, download: bool = False,
                 repo_id: str | None = None, revision: str | None = None) -> None:
        self.info = get_source(source)
        self.source = self.info.name
        self.method = str(method)
        self.ipc = check_ipc(ipc)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise UnknownNameError(f"steps must be an int (0: add steps with add_step), got {steps!r}")
        self.order = class_order(self.info.num_classes, order_seed)
        self.order_seed = int(order_seed)
        self.root = Path(root).expanduser()
        self.build = build
        self.download = download
        self.repo_id = repo_id
        self.revision = revision
        self._steps: list[list[int]] = split_steps(self.order, steps) if steps else []
        self._memories: dict[int, CondensedSet] = {}
        subset_set_path(self.root, self.source, self.method, self.ipc, [0], self.info.num_classes)  # checks the method's name early

    def __repr__(self) -> str:
        return (f"ClassIncrementalBuffer(source={self.source!r}, method={self.method!r}, ipc={self.ipc}, "
                f"steps={self.num_steps}, order_seed={self.order_seed})")

    # -- the schedule ---------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def _check_step(self, step: int) -> int:
        if not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise IndexError(f"step {step!r}: this buffer has steps 0..{self.num_steps - 1}")
        return step

    def classes(self, step: int) -> list[int]:
        """The source class indices that arrive at ``step``."""
        return list(self._steps[self._check_step(step)])

    def seen_classes(self, step: int) -> list[int]:
        """Every class of steps ``0..step``, in arrival order."""
        self._check_step(step)
        return [c for group in self._steps[: step + 1] for c in group]

    def path(self, step: int) -> Path:
        """Where ``step``'s set lives under ``root``."""
        return subset_set_path(self.root, self.source, self.method, self.ipc, self.classes(step), self.info.num_classes)

    def add_step(self, classes: Sequence[int], memory: CondensedSet | str | os.PathLike | None = None) -> int:
        """Append a step with new ``classes`` (a user's own stream); its memory is ``memory`` (a set or a
        file of exactly those classes, in that order) or, when None, found like the other steps'. Returns
        the step's index."""
        classes = [int(c) for c in classes]
        seen = {c for group in self._steps for c in group}
        again = sorted(set(classes) & seen)
        if again:
            raise UnknownNameError(f"classes {again} already arrived at an earlier step; a step brings new classes")
        subset_set_path(self.root, self.source, self.method, self.ipc, classes, self.info.num_classes)  # validates the classes
        step = self.num_steps
        if memory is not None:
            name = "the given set" if isinstance(memory, CondensedSet) else str(memory)
            cset = memory if isinstance(memory, CondensedSet) else CondensedSet.load(memory)
            self._memories[step] = self._checked(cset, classes, step, name)
        self._steps.append(classes)
        return step

    # -- the memories ---------------------------------------------------------------------------------
    def memory(self, step: int) -> CondensedSet:
        """The set of ``step`` (its classes only, labels 0..k-1 in the order of :meth:`classes`)."""
        self._check_step(step)
        if step not in self._memories:
            path = self._locate(step)
            self._memories[step] = self._checked(CondensedSet.load(path), self.classes(step), step, str(path))
        return self._memories[step]

    def _checked(self, cset: CondensedSet, expected: list[int], step: int, name: str) -> CondensedSet:
        if cset.source != self.source or cset.metadata.get("class_subset") != expected:
            raise UnknownNameError(f"{name} holds source {cset.source!r} classes {cset.metadata.get('class_subset')}, "
                             f"not step {step}'s {self.source!r} classes {expected}; a step's memory must be "
                             "made with that step's classes only (build it with recipe key classes)")
        if cset.ipc != self.ipc or cset.method != self.method:
            raise UnknownNameError(f"{name} is {cset.method} ipc {cset.ipc}, this buffer wants {self.method} ipc {self.ipc}")
        return cset

    def _locate(self, step: int) -> Path:
        path = self.path(step)
        if path.is_file():
            return path
        if self.download:
            try:
                return self._download(path, step)
            except (OSError, CondensedDatasetsError) as exc:  # hub client errors are OSErrors
                if not self.build:
                    raise SetNotFoundError(f"could not download step {step}'s set {path.name}: {exc}") from exc
        if self.build:
            if callable(self.build):
                built = Path(self.build(self.source, self.method, self.ipc, self.classes(step), self.root))
            else:
                # Build-on-demand's knock on the producer's door (DESIGN.md), as in datasets.py.
                from builders.build import build_subset_set

                built = Path(build_subset_set(self.source, self.method, self.ipc, self.classes(step), self.root))
            if not built.is_file():
                raise SetNotFoundError(f"building step {step} ({self.method} ipc {self.ipc}) did not produce {built}")
            return built
        raise SetNotFoundError(
            f"Step {step}'s memory not found at {path}. Pass build=True to build it (recipes/"
            f"{self.method}_{self.source}.yaml with classes: {self.classes(step)}), download=True to download "
            f"it, or run `condensed-build recipes/{self.method}_{self.source}.yaml --set 'classes="
            f"{self.classes(step)}' --out {self.root}`"
        )

    def _download(self, path: Path, step: int) -> Path:
        """Fetch ``classes/{name}`` of the source's hub repository (checked against the hub's SHA-256), check it
        is this step's set, write it atomically."""
        repo = check_repo_id(self.repo_id or default_repo_id(self.source))
        revision = check_revision(self.revision or DEFAULT_REVISION)
        name = f"classes/{path.name}"
        data = fetch_verified(repo, name, revision, hint=f"Or build step {step}'s memory here (build=True).")
        cset = CondensedSet.from_bytes(data, name)  # refuses anything that is not a set
        self._checked(cset, self.classes(step), step, f"{repo}/{name}")  # nothing written unless it fits
        return atomic_write_bytes(path, data)

    def dataset(self, step: int, *, transform: Callable | None = None, target_transform: Callable | None = None,
                target_type: str = "auto") -> MemoryDataset:
        """The memory of steps ``0..step`` as one Dataset, targets in the source's class indices; soft
        targets (probabilities over all source classes) when every step's set has soft labels."""
        self._check_step(step)
        sets = [self.memory(s) for s in range(step + 1)]
        zcas = [s.zca_transform for s in sets]
        if any(z is not None for z in zcas) and not all(z is not None and torch.equal(z, zcas[0]) for z in zcas):
            raise UnknownNameError("the step sets were built in different ZCA spaces; their union is not one training "
                             "set (build the memories without ZCA)")
        images = torch.cat([s.images for s in sets])
        targets = [s.source_classes[label] for s in sets for label in s.labels.tolist()]
        soft = None
        if all(s.soft_labels is not None for s in sets):
            soft = torch.zeros(len(targets), self.info.num_classes)
            row = 0
            for s in sets:
                probs = torch.softmax(s.soft_labels, dim=1)
                soft[row:row + len(s), s.source_classes] = probs
                row += len(s)
        return MemoryDataset(images, targets, soft, list(self.info.classes), self.seen_classes(step),
                             transform=transform, target_transform=target_transform, target_type=target_type)
