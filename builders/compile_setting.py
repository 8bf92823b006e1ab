"""A build's ``params.compile`` (DM, DC, DSA) and an evaluation's ``eval.compile``: whether each computation goes
through ``torch.compile``, the warning when the network cannot, and "auto"'s fallback to uncompiled code when a
compilation fails."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from builders.errors import CompileError
from builders.realbranch import compilable
from builders.recipe import AUTO

__all__ = ["COMPILE_CHOICES", "CompileSetting"]

#: What ``params.compile`` takes: false, true, or "auto" (each method says when "auto" compiles).
COMPILE_CHOICES = (False, True, AUTO)

#: The note beside the progress bar while the first compiled computation compiles.
COMPILING_NOTE = "compiling (once per process; the first iterations take longer)"

Result = TypeVar("Result")


class CompileSetting:
    """One build's ``params.compile`` (or an evaluation's ``eval.compile``: ``key`` names it in messages).

    - ``true``: compiled wherever the network allows (:func:`builders.realbranch.compilable`), with one warning per
      build where it does not; a failed compilation stops the build (:class:`CompileError`, naming the fix).
    - ``"auto"``: compiled when ``auto`` (the method's decision for this build) and the network allows; a failed
      compilation warns once and the rest of the build runs uncompiled.
    - ``false``: never compiled.
    """

    def __init__(self, setting: bool | str, auto: bool, model: str,
                 announce: Callable[[str], None] | None = None, key: str = "params.compile") -> None:
        if not (isinstance(setting, bool) or setting == AUTO):  # 1 == True, but a recipe's 1 is not a choice
            raise ValueError(f"{key}: expected one of {COMPILE_CHOICES}, got {setting!r}")
        self.key = key
        self.setting = setting
        self.auto = auto
        self.model = model
        self.failed = False  # "auto" met a failed compilation: the rest of the build runs uncompiled
        self._warned = False
        #: told once, before the first compiled computation (a status line beside a progress bar); may be replaced
        #: until then
        self.announce = announce
        self._announced = False
        self.used = False  # a computation of this process ran compiled

    def compiles(self, net: nn.Module) -> bool:
        """Whether a computation through ``net`` goes through ``torch.compile`` now; with ``true``, warns (once per
        build) when ``net`` cannot."""
        if self.setting is True:
            return compilable(net) or self._warn_uncompilable()
        return self.setting == AUTO and self.auto and not self.failed and compilable(net)

    def run(self, net: nn.Module, compute: Callable[[bool], Result]) -> Result:
        """``compute(compiled)``, with ``compiled`` as :meth:`compiles` says; under "auto", a failed compilation
        warns and is computed again uncompiled (``compute`` must draw no random numbers, so that the retry is the
        same computation)."""
        if not self.compiles(net):
            return compute(False)
        if self.announce is not None and not self._announced:
            self._announced = True
            self.announce(COMPILING_NOTE)
        try:
            result = compute(True)
        except CompileError as error:
            message = str(error).replace("params.compile", self.key)  # the compiler's message names the build's key
            if self.setting is True:
                raise CompileError(message) from error
            self.failed = True
            warnings.warn(f"{message} This {'evaluation' if self.key.startswith('eval') else 'build'} runs "
                          "uncompiled.", stacklevel=3)
            return compute(False)
        self.used = True
        return result

    def describe(self) -> dict[str, bool]:
        """For the set's build metadata: whether this process computed compiled (results then differ from an
        uncompiled build's within float rounding), and whether "auto" fell back after a failed compilation."""
        return {"compiled": self.used, **({"compile_fell_back": True} if self.failed else {})}

    def _warn_uncompilable(self) -> bool:
        """Warns, once per build, that ``params.compile: true`` does not apply to this model; False."""
        if not self._warned:
            self._warned = True
            warnings.warn(f"{self.key}: model {self.model!r} is not a ConvNet without BatchNorm (or holds a "
                          f"layer the compiled route does not know); it runs uncompiled. Set {self.key}: false "
                          "to silence this.", stacklevel=4)
        return False
