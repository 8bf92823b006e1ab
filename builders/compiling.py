"""Calling functions made by ``torch.compile``: a compilation that fails, of the forward pass or of the
backward pass, is a :class:`builders.errors.CompileError` raised at the call, where the caller can fall back."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._functorch import config as functorch_config

from builders.errors import CompileError

__all__ = ["backward_compiled_with_forward", "call_compiled", "compile_static"]

#: inductor settings for compilations off the CPU: no FX-graph cache (and so no AOTAutograd cache, which needs it).
#: On an H100, DM's compiled iteration ran 0.0174 and 0.0119 s with a cold cache, 0.0346 and 0.0432 s with the
#: same cache warm, and 0.0153 s warm with both caches off (benchmarks/results/compile_cache_cuda_2026-11-26.json).
#: With these settings a later session saw 3 of 4 processes fast and one at 0.0343 s
#: (gpu_session_partial_cuda_2026-11-26.json): the caches were one way into that slow mode, not the only one;
#: torch's intra-op threads were the main one (builders/host_threads.py).
#: On a CPU the three took 3.13 / 3.35 / 3.48 s (within noise; compile_cache_cpu_2026-11-26.json), and the warm
#: cache halves the compilation, so CPUs keep it.
OFF_CPU_OPTIONS = {"fx_graph_cache": False}

#: torch's switch that lowers a compiled function's backward pass together with its forward pass.
SWITCH = "force_non_lazy_backward_lowering"


@contextlib.contextmanager
def backward_compiled_with_forward() -> Iterator[None]:
    """Within it, ``torch.compile`` compiles a function's backward pass when it compiles its forward pass, not at
    the first ``.backward()`` (a later failure would escape the caller's fallback); torch versions without the
    switch keep compiling it lazily, and without autograd there is no backward to compile. Compiled so, a
    backward pass frees what it uses, as a lazily compiled one does unless asked to keep the graph: a second
    backward through it (``retain_graph=True``) is refused. (The switch is set and restored around the call,
    about 13 us, rather than through ``config.patch``, about 57 us, on the builds' per-iteration path.)"""
    if not torch.is_grad_enabled() or not hasattr(functorch_config, SWITCH):
        yield
        return
    before = getattr(functorch_config, SWITCH)
    setattr(functorch_config, SWITCH, True)
    try:
        yield
    finally:
        setattr(functorch_config, SWITCH, before)


def call_compiled(function: Callable[..., Any], *args: Any, setting: str = "params.compile",
                  turn_off: str = "set params.compile: false") -> Any:
    """``function(*args)`` for a function made by ``torch.compile``; a failed compilation, of its forward pass or
    of its backward pass (compiled here too), is a :class:`CompileError` naming ``setting`` and how to
    ``turn_off`` compilation."""
    try:
        with backward_compiled_with_forward():
            return function(*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        cause = getattr(error, "inner_exception", None) or error  # what the compiler raised, when dynamo kept it
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise CompileError(f"{setting}: torch.compile could not compile the network ({reason}). It needs a "
                           f"working C++ compiler on CPUs (Triton on GPUs): install one (e.g. g++), or "
                           f"{turn_off}.") from error


def compile_static(function: Callable[..., Any], device: torch.device | str) -> Callable[..., Any]:
    """``function`` under ``torch.compile`` with static shapes (one graph per input shape), for inputs on
    ``device``: off the CPU, compiled afresh in each process rather than loaded from inductor's caches
    (:data:`OFF_CPU_OPTIONS`)."""
    options = None if torch.device(device).type == "cpu" else dict(OFF_CPU_OPTIONS)
    return torch.compile(function, dynamic=False, options=options)
