"""A training step replayed as a CUDA graph, for small networks whose steps are launch-bound on GPUs.

A *step* is a function of device tensors only (say, the batch's positions and its augmentation
parameters) that runs the forward pass, the backward pass and the optimiser's step, with no host
synchronisation and no Python branch on its inputs' values. :class:`GraphedStep` runs its first calls
eagerly on a side stream (the warm-up that lazy initialisations and the optimiser's momentum buffers
need; a batch of another shape, say an epoch's last, gets its own), then captures one call per input
shape with ``torch.cuda.graph`` and from then on replays it:
the inputs are copied into the captured call's own tensors and the whole step is one launch. The
arithmetic is the eager step's, kernel for kernel.

A captured step keeps the Python numbers it was captured with (an optimiser's learning rate, say):
call :meth:`GraphedStep.invalidate` after changing one. On CPUs the step always runs eagerly, and on
GPUs too once a capture has failed (an operation that cannot be captured): a warning says why, once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["GraphedStep"]

Key = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


class GraphedStep:
    """``step(*inputs)``, captured once per input shape and replayed on CUDA (eager elsewhere).

    ``enabled``: capture at all (e.g. ``device.type == "cuda"``); ``warmup``: eager calls of each input shape
    before its capture (at least one: the step's first call may synchronise, e.g. to inspect its loss function,
    and a new shape's first call may initialise kernels or library workspaces lazily).
    """

    def __init__(self, step: Callable[..., None], enabled: bool, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be >= 1, got {warmup}")
        self.step, self.enabled, self.warmup = step, enabled, warmup
        self.eager_calls: dict[Key, int] = {}  # per input shape: eager warm-up calls made so far
        self.graphs: dict[Key, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.failure: str | None = None  # why capturing was given up, if it was
        self.replays = 0

    @property
    def mode(self) -> str:
        """``"graph"`` once a captured step has replayed, else ``"eager"``."""
        return "graph" if self.replays else "eager"

    def invalidate(self) -> None:
        """Forget the captured steps (the next call captures again): after a change of the numbers they hold."""
        self.graphs.clear()

    def __call__(self, *inputs: torch.Tensor) -> None:
        if not self.enabled or self.failure is not None:
            self.step(*inputs)
            return
        key: Key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        captured = self.graphs.get(key)
        if captured is None:
            if self.eager_calls.get(key, 0) < self.warmup:
                self._eager_on_side_stream(inputs)
                self.eager_calls[key] = self.eager_calls.get(key, 0) + 1
                return
            captured = self._capture(key, inputs)
            if captured is None:  # the capture failed: this call's step runs eagerly
                self.step(*inputs)
                return
        graph, static = captured
        for target, value in zip(static, inputs):
            target.copy_(value, non_blocking=True)
        graph.replay()
        self.replays += 1

    def _eager_on_side_stream(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """One eager step on a side stream (as the capture will run), ordered with the current stream."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.step(*inputs)
        current.wait_stream(side)

    def _capture(self, key: Key, inputs: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]] | None:
        """Capture ``step`` on copies of ``inputs`` (nothing runs while capturing); None if it cannot be."""
        static = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                self.step(*static)
        except RuntimeError as error:  # an operation that cannot be captured (a synchronisation, say)
            cause = error
            # when ending the capture failed too ("a previous error during capture"), torch.cuda.graph has left its
            # capture stream current: ours is put back, and the step's own error says why
            if torch.cuda.current_stream() != stream:
                torch.cuda.set_stream(stream)
                cause = error.__context__ if isinstance(error.__context__, RuntimeError) else error
            self.failure = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            warnings.warn(f"GraphedStep: the training step could not be captured as a CUDA graph "
                          f"({self.failure}); it runs eagerly (same results, more kernel launches).", stacklevel=3)
            torch.cuda.synchronize()
            return None
        self.graphs[key] = (graph, static)
        return graph, static
