"""Every error the builders raise on purpose, in one place.

Each keeps a builtin base (``ValueError`` for a recipe or request that is wrong, ``RuntimeError`` for a
build that cannot go on) and the family base :class:`BuildersError`; the command line turns exactly
these (and the consumer's :class:`~condensed_datasets.errors.CondensedDatasetsError`) into one-line
messages and lets anything else surface as the bug it is. Imports nothing of ours.
"""

from __future__ import annotations


class BuildersError(Exception):
    """Base of every error of ``builders``."""


class RecipeError(BuildersError, ValueError):
    """A recipe that cannot be built: names the key, the problem and the valid choices."""


class BuildError(BuildersError, RuntimeError):
    """A build that cannot go on (non-finite loss, incompatible checkpoint, unusable device, ...)."""


class CompileError(BuildError):
    """``torch.compile`` could not compile a network (no C++ compiler on a CPU, no working Triton on a GPU)."""


class CheckpointError(BuildError):
    """A checkpoint that is missing, damaged or made by something else."""


class ExpertStoreError(BuildersError, RuntimeError):
    """A missing, incomplete or incompatible expert store (the message says how to build one)."""


class PublishError(BuildersError, ValueError):
    """A set that cannot be published where asked (wrong source for the repository, bad repo id, ...)."""


class PublishConflict(PublishError):
    """A different file already has this name in the repository or folder; pass force to replace it."""


__all__ = ["BuildError", "BuildersError", "CheckpointError", "CompileError", "ExpertStoreError", "PublishConflict",
           "PublishError", "RecipeError"]
