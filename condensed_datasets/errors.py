"""Every error the consumer package raises on purpose, in one place.

Each keeps a builtin base (``ValueError`` for a bad name or a malformed file, ``RuntimeError`` for data
that is missing or cannot be fetched) and the family base :class:`CondensedDatasetsError`, so a caller
can catch the family and let anything else surface as the bug it is. Imports nothing of ours.
"""

from __future__ import annotations


class CondensedDatasetsError(Exception):
    """Base of every error of ``condensed_datasets``."""


class UnknownNameError(CondensedDatasetsError, ValueError):
    """A source, method, ipc, target type or other name that is not one of the valid ones (listed in the message)."""


class CondensedSetError(CondensedDatasetsError, ValueError):
    """A condensed set (in memory or on disk) that breaks the format; the message names the file and the problem."""


class StorageError(CondensedSetError):
    """Images that cannot be stored (or a stored form that cannot be read) as the metadata says."""


class IndexFormatError(CondensedDatasetsError, ValueError):
    """An ``index.json`` (hub repository or published folder) that is not a valid condensed-datasets index."""


class SetNotFoundError(CondensedDatasetsError, RuntimeError):
    """A condensed set that is neither on disk nor obtainable as asked; the message says how to get it."""


class SourceDataError(CondensedDatasetsError, RuntimeError):
    """Real data (the source's train or test split) that is missing or unreadable; the message says how to get it."""


class HubError(CondensedDatasetsError, RuntimeError):
    """A set could not be obtained from the hub; the message says why and how to get it otherwise."""


class HubNotFoundError(HubError):
    """The repository, the revision or the file does not exist (or is not visible with the token sent).

    ``kind`` says which: ``"repository"``, ``"revision"`` or ``"file"``.
    """

    def __init__(self, message: str, kind: str = "file") -> None:
        super().__init__(message)
        self.kind = kind


class HubOfflineError(HubError):
    """Offline (``HF_HUB_OFFLINE``) or the hub is unreachable, and the set is not in the cache."""


class HubIntegrityError(HubError):
    """A file whose SHA-256 or content does not match what the hub says it is."""


class HubStalledError(HubError):
    """A download that made less than the minimum progress over the window (a stalled or trickling server)."""


class HubServerError(HubError):
    """The hub answered with a server error (HTTP 5xx) and the set is not in the cache."""


class SkippedEntryWarning(UserWarning):
    """One entry of a listing (an index.json entry, a file in a folder) was malformed and left out."""


__all__ = [
    "CondensedDatasetsError", "CondensedSetError", "HubError", "HubIntegrityError", "HubNotFoundError",
    "HubOfflineError", "HubServerError", "HubStalledError", "IndexFormatError", "SetNotFoundError",
    "SkippedEntryWarning", "SourceDataError", "StorageError", "UnknownNameError",
]
