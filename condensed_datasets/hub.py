"""Download condensed sets from a Hugging Face Hub dataset repository (or a mirror that speaks its protocol).

Where a set comes from: the dataset repository ``{org}/condensed-{source}`` (see
:func:`condensed_datasets.catalogue.default_repo_id`; ``org`` is ``$CONDENSED_DATASETS_ORG`` or
``condensed-datasets``), file ``{method}_ipc{ipc}.safetensors``, revision ``main`` unless one is given.
Everything goes through ``huggingface_hub.hf_hub_download``, so the usual variables apply and are read
*at call time*: ``HF_ENDPOINT`` (a mirror), ``HF_HOME`` / ``HF_HUB_CACHE`` (the download cache),
``HF_HUB_OFFLINE`` (no network), ``HF_TOKEN`` (private repositories).

The download lands in the Hugging Face cache, is checked, then copied atomically to
``{root}/condensed/{source}/{method}_ipc{ipc}.safetensors`` (temporary file + rename), under a lock file
beside it (``.{file}.lock``), so concurrent downloads of one set end with one good file.

Integrity: the file's SHA-256 must equal the hub's. The hub's SHA-256 is the LFS object id the server
reports for the file (``X-Linked-Etag`` of the ``resolve`` HEAD response; the Hub stores ``*.safetensors``
in LFS/Xet, whose id is the file's SHA-256). When the server reports no SHA-256 (a file kept in plain
git, whose ETag is a git blob id), the ``sha256`` of the file's entry in the repository's ``index.json``
at the same commit is used instead. With neither, the download is refused. A downloaded file leaves a
record beside it (``.{file}.hub.json``: repository, revision, commit, sha256). The record counts only while
the file holds exactly those bytes: such a hub copy is compared with the hub again on every
``download=True`` lookup and replaced when the revision moved. A valid file whose bytes are not its
record's (rebuilt, re-saved by ``condensed-eval --save``, changed) is the user's own and is never replaced.
An invalid local file is replaced; offline it is restored from the Hugging Face cache or refused, never used.
In a folder that cannot be written (a read-only mount of shared data) nothing is downloaded: a sound local set
is used as it is, as offline, and a missing or invalid one is a HubError saying the folder cannot be written.

Strangers' names never reach a path or URL unchecked (:mod:`condensed_datasets.paths`); a download that
makes less than the minimum progress (:func:`min_download_speed`) is aborted with HubStalledError; a
file whose SHA-256 is wrong is removed from the Hugging Face cache as well as refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as LockTimeout
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import errors as hf_errors

from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets._speed import speed_limit
from condensed_datasets.catalogue import default_repo_id, describe_sets, index_listing, read_index, sort_key
from condensed_datasets.constants import (
    DEFAULT_REVISION,
    HUB_INDEX_NAME,
    LOCK_TIMEOUT_S,
    MIN_DOWNLOAD_RATE,
    MIN_DOWNLOAD_RATE_ENV,
    MIN_DOWNLOAD_WINDOW_ENV,
    MIN_DOWNLOAD_WINDOW_S,
    REPO_TYPE,
)
from condensed_datasets.errors import (
    CondensedSetError,
    HubError,
    HubIntegrityError,
    HubNotFoundError,
    HubOfflineError,
    HubServerError,
    HubStalledError,
    IndexFormatError,
    SkippedEntryWarning,
    UnknownNameError,
)
from condensed_datasets.format import CondensedSet, whole_set_problem
from condensed_datasets.paths import (
    canonical_source,
    check_repo_id,
    check_revision,
    parse_set_filename,
    set_filename,
    set_path,
)
from condensed_datasets.sources import get_source

__all__ = [
    "DEFAULT_REVISION",
    "HubError",
    "HubIntegrityError",
    "HubNotFoundError",
    "HubOfflineError",
    "RemoteFile",
    "download_set",
    "fetch_index",
    "fetch_verified",
    "hub_cache_dir",
    "hub_endpoint",
    "hub_offline",
    "is_hub_copy",
    "list_repo",
    "network_errors",
    "read_record",
    "record_path",
    "remote_file",
    "repo_sets",
    "sha256_file",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_COMMIT = re.compile(r"^[0-9a-f]{40}\Z")
_TRUE = {"1", "ON", "YES", "TRUE"}
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # what creating a file in a folder we cannot write raises

RepositoryNotFoundError = hf_errors.RepositoryNotFoundError
RevisionNotFoundError = hf_errors.RevisionNotFoundError
LocalEntryNotFoundError = hf_errors.LocalEntryNotFoundError
# huggingface_hub >= 1.0 splits remote/local "entry not found"; older versions have one HTTP error class.
RemoteEntryNotFoundError: type[Exception] = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)
HfHubHTTPError = hf_errors.HfHubHTTPError


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about one file at one revision (from a HEAD on its ``resolve`` URL)."""

    repo_id: str
    revision: str
    filename: str
    commit: str | None
    etag: str | None
    sha256: str | None  # the LFS object id when the server reports one, else None
    size: int | None


# -- environment, read at call time --------------------------------------------------------------------------
def hub_endpoint() -> str:
    """The hub's base URL: ``$HF_ENDPOINT`` now, else what huggingface_hub read at import (huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set now or was set when huggingface_hub was imported."""
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_cache_dir() -> str:
    """The Hugging Face download cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def min_download_speed() -> tuple[float, float]:
    """(bytes/s, window in s) below which a download is aborted: the environment's, else the constants'."""
    rate, window = float(MIN_DOWNLOAD_RATE), float(MIN_DOWNLOAD_WINDOW_S)
    try:
        rate = float(os.environ.get(MIN_DOWNLOAD_RATE_ENV) or rate)
        window = float(os.environ.get(MIN_DOWNLOAD_WINDOW_ENV) or window)
    except ValueError:
        raise HubError(f"{MIN_DOWNLOAD_RATE_ENV} (bytes/s) and {MIN_DOWNLOAD_WINDOW_ENV} (seconds) must be "
                       "numbers") from None
    if not (rate >= 0 and window > 0):
        raise HubError(f"{MIN_DOWNLOAD_RATE_ENV} must be >= 0 and {MIN_DOWNLOAD_WINDOW_ENV} > 0")
    return rate, window


def _checked(repo_id: str, revision: str | None) -> tuple[str, str]:
    """(repo_id, revision) checked before they reach a URL or the cache's folder names; HubError otherwise."""
    try:
        return check_repo_id(repo_id), check_revision(DEFAULT_REVISION if revision is None else revision)
    except UnknownNameError as exc:
        raise HubNotFoundError(str(exc), kind="revision" if "revision" in str(exc) else "repository") from None


def _server_error(exc: BaseException | None) -> int | None:
    """The HTTP status of a 5xx answer from the hub behind ``exc`` (or its causes), or None."""
    seen = 0
    while exc is not None and seen < 10:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, HfHubHTTPError) and isinstance(status, int) and status >= 500:
            return status
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _refused(exc: BaseException, filename: str, repo_id: str, revision: str) -> HubError:
    """A HubError for an HTTP answer that is neither "not found" nor a server error (401, 403, 429, ...)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HubError(f"{hub_endpoint()} refused {filename} of {_where(repo_id, revision)} (HTTP {status}: {first}); "
                    "check the token (HF_TOKEN), repo_id and HF_ENDPOINT.")


def _library() -> dict[str, str]:
    version = getattr(sys.modules.get("condensed_datasets"), "__version__", "0")
    return {"library_name": "condensed-datasets", "library_version": str(version)}


def network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub could not be reached", or its redirects not followed (a redirect loop),
    whatever HTTP client huggingface_hub uses."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException"),
                         ("httpx2", "TooManyRedirects"), ("httpx", "TooManyRedirects")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


# -- small helpers -------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_path(path: str | os.PathLike) -> Path:
    """Where the download record of a set file lives: ``.{name}.hub.json`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.hub.json")


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The download record of a set file (repo_id, revision, commit, sha256, ...), or None (not a download)."""
    try:
        record = json.loads(record_path(path).read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def is_hub_copy(path: str | os.PathLike) -> bool:
    """True when ``path`` holds exactly the bytes a download record beside it describes (its SHA-256).

    A file rebuilt, re-saved (``condensed-eval --save``) or changed after its download no longer matches its
    record: it is the user's own set from then on, and no download replaces it.
    """
    record = read_record(path)
    if record is None:
        return False
    try:
        return sha256_file(path) == record["sha256"]
    except OSError:
        return False


def _write_record(path: Path, **fields: Any) -> None:
    atomic_write_bytes(record_path(path), (json.dumps(fields, sort_keys=True, indent=2) + "\n").encode("utf-8"))


def _where(repo_id: str, revision: str) -> str:
    return f"{repo_id}@{revision}"


def how_to_get(root: str | os.PathLike | None, source: str, method: str, ipc: int) -> str:
    """The advice that ends every "could not get it" message: build it instead."""
    out = f" --out {root}" if root is not None else ""
    return (f"You can pass build=True to build it here, or run "
            f"`condensed-build recipes/{method}_{get_source(source).name}.yaml{out} --set ipc={int(ipc)}`.")


# -- talking to the hub ----------------------------------------------------------------------------------------
def _not_found(exc: Exception, repo_id: str, revision: str, filename: str) -> HubNotFoundError:
    """A clear HubNotFoundError for huggingface_hub's repository / revision / entry errors."""
    endpoint = hub_endpoint()
    if isinstance(exc, RepositoryNotFoundError):
        return HubNotFoundError(
            f"no dataset repository {repo_id!r} at {endpoint} (or it is private or gated and no valid token "
            "was sent: run `hf auth login` or set HF_TOKEN). Choose another with repo_id=... or "
            "CONDENSED_DATASETS_ORG, or HF_ENDPOINT for a mirror.",
            kind="repository",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubNotFoundError(
            f"dataset repository {repo_id!r} at {endpoint} has no revision {revision!r}; "
            f"its branches and tags: {_refs_text(repo_id)}.",
            kind="revision",
        )
    sets = repo_sets(repo_id, revision)
    listing = describe_sets(sets) if sets is not None else "(could not list its files)"
    return HubNotFoundError(f"{_where(repo_id, revision)} at {endpoint} has no {filename}; it has: {listing}.")


def _refs_text(repo_id: str) -> str:
    try:
        refs = HfApi(endpoint=hub_endpoint()).list_repo_refs(repo_id, repo_type=REPO_TYPE)
    except Exception:  # noqa: BLE001 - only decorates an error message
        return "(could not be listed)"
    names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
    return ", ".join(sorted(names)) or "none"


def remote_file(repo_id: str, filename: str, revision: str | None = None) -> RemoteFile:
    """HEAD the file's ``resolve`` URL: commit, ETag, SHA-256 (LFS id, when reported) and size.

    Raises HubNotFoundError for a missing repository / revision / file, and huggingface_hub's or the HTTP
    client's own errors when the hub cannot be reached.
    """
    repo_id, revision = _checked(repo_id, revision)
    endpoint = hub_endpoint()
    url = hf_hub_url(repo_id, filename, repo_type=REPO_TYPE, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint, **_library())
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as exc:
        if isinstance(exc, LocalEntryNotFoundError):
            raise
        raise _not_found(exc, repo_id, revision, filename) from None
    etag = (meta.etag or "").strip('"').lower() or None
    return RemoteFile(repo_id=repo_id, revision=revision, filename=filename, commit=meta.commit_hash, etag=etag,
                      sha256=etag if etag and _SHA256.match(etag) else None, size=meta.size)


def _hf_download(repo_id: str, filename: str, revision: str, *, local_only: bool = False,
                 force: bool = False) -> Path:
    """``hf_hub_download`` of one file of the dataset repository into the Hugging Face cache (aborted when
    it makes less than the minimum progress, see :func:`min_download_speed`)."""
    with speed_limit(*min_download_speed()):
        path = hf_hub_download(
            repo_id, filename, repo_type=REPO_TYPE, revision=revision, endpoint=hub_endpoint(),
            cache_dir=hub_cache_dir(), local_files_only=local_only or hub_offline(), force_download=force,
            **_library(),
        )
    return Path(path)


def _forget_cached(cached: Path) -> None:
    """Remove a damaged download from the Hugging Face cache (its snapshot link and the blob it points at)."""
    cache = Path(hub_cache_dir()).resolve()
    blob = Path(os.path.realpath(cached))
    for path in (blob, cached):
        if cache in path.resolve().parents or cache in path.parents:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def fetch_index(repo_id: str, revision: str | None = None) -> dict[str, Any] | None:
    """The repository's ``index.json`` (through the cache; offline, the cached copy), or None when it has none.

    Raises HubNotFoundError (repository / revision), HubOfflineError (offline or unreachable, not cached).
    """
    repo_id, revision = _checked(repo_id, revision)
    try:
        path = _hf_download(repo_id, HUB_INDEX_NAME, revision)
    except LocalEntryNotFoundError as exc:
        if _server_error(exc) is not None:
            raise HubServerError(f"{hub_endpoint()} answered HTTP {_server_error(exc)} (a server error) for "
                                 f"{HUB_INDEX_NAME} of {_where(repo_id, revision)}, and it is not in the Hugging "
                                 "Face cache; retry later") from exc
        raise HubOfflineError(
            f"cannot read {HUB_INDEX_NAME} of {_where(repo_id, revision)}: "
            f"{'HF_HUB_OFFLINE is set' if hub_offline() else f'{hub_endpoint()} could not be reached'} "
            f"and it is not in the Hugging Face cache ({hub_cache_dir()})"
        ) from exc
    except RemoteEntryNotFoundError:
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise _not_found(exc, repo_id, revision, HUB_INDEX_NAME) from None
    except HfHubHTTPError as exc:
        if _server_error(exc) is None:
            raise _refused(exc, HUB_INDEX_NAME, repo_id, revision) from exc
        raise HubServerError(f"{hub_endpoint()} answered HTTP {_server_error(exc)} (a server error) for "
                             f"{HUB_INDEX_NAME} of {_where(repo_id, revision)}; retry later") from exc
    except network_errors() as exc:  # what hf_hub_download does not turn into "not in the cache": a redirect loop
        raise HubOfflineError(f"cannot read {HUB_INDEX_NAME} of {_where(repo_id, revision)}: {hub_endpoint()} "
                              f"could not be reached or followed ({type(exc).__name__}: {exc})") from exc
    return read_index(path, f"{HUB_INDEX_NAME} of {_where(repo_id, revision)}")


def repo_sets(repo_id: str, revision: str | None = None) -> dict[str, list[int]] | None:
    """``{method: ipcs}`` a repository holds (from its index.json, else its file list); None if unreadable."""
    try:
        rows = list_repo(repo_id, revision)
    except (HubError, IndexFormatError, *network_errors()):
        return None
    out: dict[str, list[int]] = {}
    for row in rows:
        out.setdefault(row["method"], []).append(int(row["ipc"]))
    return {m: sorted(set(v)) for m, v in out.items()}


def list_repo(repo_id: str, revision: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
    """Listing rows (see :func:`condensed_datasets.catalogue.available`) of a hub repository.

    From its ``index.json``; a repository without one is listed from its file names (no accuracies).
    """
    repo_id, revision = _checked(repo_id, revision)
    location = repo_id if revision == DEFAULT_REVISION else _where(repo_id, revision)
    index = fetch_index(repo_id, revision)
    if index is not None:
        return index_listing(index, where="hub", location=location, source=source)
    try:
        files = HfApi(endpoint=hub_endpoint()).list_repo_files(repo_id, repo_type=REPO_TYPE, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise _not_found(exc, repo_id, revision, HUB_INDEX_NAME) from None
    except HfHubHTTPError as exc:
        if _server_error(exc) is not None:
            raise HubServerError(f"{hub_endpoint()} answered HTTP {_server_error(exc)} (a server error) listing "
                                 f"{_where(repo_id, revision)}; retry later") from exc
        raise _refused(exc, "the file list", repo_id, revision) from exc
    except network_errors() as exc:
        raise HubOfflineError(f"cannot list {_where(repo_id, revision)}: {hub_endpoint()} could not be reached "
                              f"({type(exc).__name__}: {exc})") from exc
    try:
        guess = canonical_source(source or repo_id.rsplit("/", 1)[-1].removeprefix("condensed-"))
    except UnknownNameError:
        warnings.warn(f"{repo_id} has no index.json and its name does not say its source; pass the source",
                      SkippedEntryWarning, stacklevel=2)
        return []
    rows = []
    for name in files:
        parsed = parse_set_filename(name.rsplit("/", 1)[-1]) if "/" not in name else None
        if parsed is None:
            continue
        rows.append({"source": guess, "method": parsed[0], "ipc": parsed[1], "file": name, "where": "hub",
                     "location": location, "sha256": None, "size": None, "accuracy_mean": None,
                     "accuracy_std": None, "improvement_over_random": None})
    return sorted(rows, key=sort_key)


# -- the download ------------------------------------------------------------------------------------------------
def download_set(
    root: str | os.PathLike,
    source: str,
    method: str,
    ipc: int,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
) -> Path:
    """Make ``{root}/condensed/{source}/{method}_ipc{ipc}.safetensors`` the hub's file and return its path.

    Online: HEAD the file; a local copy with the hub's SHA-256 is kept (no download), otherwise the file
    is downloaded (through the Hugging Face cache), checked (SHA-256, format, source/method/ipc) and
    written atomically. Offline or unreachable: the local copy if it is sound, else the cached one, else
    HubOfflineError. A folder that cannot be written: the local copy if it is sound, else HubError. Missing
    repository / revision / file: HubNotFoundError listing what exists.
    """
    name = get_source(source).name
    repo, rev = _checked(repo_id or default_repo_id(name), revision)
    filename = set_filename(method, ipc)
    dest = set_path(root, name, method, ipc)
    if dest.exists() and not dest.is_file():
        raise HubError(f"{dest} is not a file (a folder or other entry is in the way of the download); "
                       "move it away and retry")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # root (or a folder under it) is a file, or cannot be written
        raise HubError(f"cannot make the folder {dest.parent} for the download ({exc}); pass a root folder "
                       "you can write to") from None
    lock = FileLock(str(dest.parent / f".{filename}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except LockTimeout:
        raise HubError(
            f"another process has been downloading {dest} for more than {LOCK_TIMEOUT_S:.0f} s "
            f"(lock {lock.lock_file}); if none is, delete the lock file and retry"
        ) from None
    except OSError as exc:
        if exc.errno in _READ_ONLY:  # a folder this process cannot write, such as a read-only mount of shared data
            return _read_only_copy(dest, repo, rev, filename, exc, how_to_get(root, name, method, ipc))
        # a folder or a symbolic link where the lock file goes
        raise HubError(f"cannot take the download lock {lock.lock_file} ({exc}); it must be a plain file or "
                       "absent: remove it and retry") from None
    try:
        return _download_locked(dest, root, name, method, int(ipc), repo, rev, filename)
    finally:
        lock.release()


def _read_only_copy(dest: Path, repo: str, rev: str, filename: str, exc: OSError, hint: str) -> Path:
    """``dest`` when it is a sound set, used as it is (as offline): a folder that cannot be written takes no
    download; else HubError saying that the folder cannot be written."""
    problem = _local_problem(dest) if dest.is_file() else ""
    if dest.is_file() and not problem:
        return dest
    raise HubError(f"cannot download {filename} of {_where(repo, rev)} into {dest.parent}: the folder cannot be "
                   f"written ({exc.strerror}).{(' ' + problem) if problem else ''} Pass a root folder you can "
                   f"write to. {hint}")


def _download_locked(dest: Path, root: str | os.PathLike, source: str, method: str, ipc: int, repo: str,
                     rev: str, filename: str) -> Path:
    hint = how_to_get(root, source, method, ipc)
    if hub_offline():
        return _from_cache(dest, repo, rev, filename, source, method, ipc,
                           reason="HF_HUB_OFFLINE is set",
                           hint=f"Unset HF_HUB_OFFLINE (and connect) to download it. {hint}")
    mine, present = _users_own(dest), os.path.lexists(dest)
    try:
        remote = _remote(repo, filename, rev, hint)
    except _Unreachable as down:
        return _from_cache(dest, repo, rev, filename, source, method, ipc, reason=down.reason,
                           hint=f"{down.advice} {hint}", error=down.error)
    expected, hash_from = _expected_sha256(remote, repo, rev, filename, hint)
    if dest.is_file() and sha256_file(dest) == expected:
        _record(dest, repo, rev, remote.commit, filename, expected)
        return dest
    if mine:
        raise HubError(f"{dest} is a set of your own (built or changed here, not the hub's bytes); a download "
                       f"never replaces it. Use it as it is (download=False), or move it away to download "
                       f"{_where(repo, rev)}'s.")
    data = _download_checked(repo, rev, filename, expected, hash_from, hint)
    _check_content(data, f"{repo}/{filename}", source, method, ipc)
    _write_download(dest, data, replace=present)
    _record(dest, repo, rev, remote.commit, filename, expected)
    return dest


def fetch_verified(repo_id: str, filename: str, revision: str | None = None, *, hint: str = "") -> bytes:
    """The bytes of ``filename`` in the dataset repository ``repo_id``, checked against the hub's SHA-256 (its
    LFS id, else the ``index.json`` entry; a file the hub gives no SHA-256 for is refused).

    Downloads go through the Hugging Face cache, with the minimum-speed guard of :func:`download_set`. Offline
    (``HF_HUB_OFFLINE``) or when the hub cannot be reached, the cached copy (checked against the SHA-256 its
    cache entry is named by). Errors are the :class:`HubError` family, each ending with ``hint`` (how else to
    get the file); nothing is written outside the Hugging Face cache.
    """
    repo, rev = _checked(repo_id, revision)
    if hub_offline():
        return _cached_copy(repo, rev, filename, reason="HF_HUB_OFFLINE is set",
                            hint=f"Unset HF_HUB_OFFLINE (and connect) to download it. {hint}", error=HubOfflineError)[0]
    try:
        remote = _remote(repo, filename, rev, hint)
    except _Unreachable as down:
        return _cached_copy(repo, rev, filename, reason=down.reason, hint=f"{down.advice} {hint}", error=down.error)[0]
    expected, hash_from = _expected_sha256(remote, repo, rev, filename, hint)
    return _download_checked(repo, rev, filename, expected, hash_from, hint)


class _Unreachable(Exception):
    """The hub answered with a server error or could not be reached: the caller falls back to the cache."""

    def __init__(self, reason: str, advice: str, error: type[HubError]) -> None:
        super().__init__(reason)
        self.reason, self.advice, self.error = reason, advice, error


def _remote(repo: str, filename: str, rev: str, hint: str) -> RemoteFile:
    """:func:`remote_file`; a missing file or an HTTP refusal is the HubError naming it (ending with ``hint``),
    a server error or an unreachable hub is :class:`_Unreachable`."""
    try:
        return remote_file(repo, filename, rev)
    except HubNotFoundError as exc:
        raise HubNotFoundError(f"{exc} {hint}", kind=exc.kind) from None
    except HfHubHTTPError as exc:
        if _server_error(exc) is None:
            raise HubError(f"{_refused(exc, filename, repo, rev)} {hint}") from exc
        raise _Unreachable(f"the hub at {hub_endpoint()} answered HTTP {_server_error(exc)} (a server error)",
                           "Retry later.", HubServerError) from exc
    except network_errors() as exc:
        raise _Unreachable(f"the hub at {hub_endpoint()} could not be reached ({type(exc).__name__}: {exc})",
                           "Check the connection or HF_ENDPOINT.", HubOfflineError) from exc


def _expected_sha256(remote: RemoteFile, repo: str, rev: str, filename: str, hint: str) -> tuple[str, str]:
    """The SHA-256 the download must have, and where it comes from; HubIntegrityError when the hub gives none."""
    if remote.sha256 is not None:
        return remote.sha256, "LFS sha256"
    expected = _index_sha256(repo, remote.commit or rev, filename)
    if expected is None:
        raise HubIntegrityError(
            f"{_where(repo, rev)} at {hub_endpoint()} gives no SHA-256 for {filename} (no LFS id, and no "
            f"{HUB_INDEX_NAME} entry), so the download cannot be checked; refusing it. {hint}"
        )
    return expected, f"{HUB_INDEX_NAME} sha256"


def _download_checked(repo: str, rev: str, filename: str, expected: str, hash_from: str, hint: str) -> bytes:
    """Download ``filename`` through the cache (again once when the cached copy is damaged) and return its
    bytes, which have the SHA-256 ``expected``; a damaged download is removed from the cache and refused."""
    try:
        cached = _hf_download(repo, filename, rev)
        data = cached.read_bytes()
        if _sha256(data) != expected:  # a damaged cache entry: fetch it again once
            _forget_cached(cached)
            cached = _hf_download(repo, filename, rev, force=True)
            data = cached.read_bytes()
    except HubStalledError as exc:
        raise HubStalledError(f"downloading {filename} from {_where(repo, rev)} at {hub_endpoint()}: {exc}; "
                              f"nothing was written. Retry later, or: {hint}") from None
    except (LocalEntryNotFoundError, *network_errors()) as exc:
        if _server_error(exc) is not None:
            raise HubServerError(f"downloading {filename} from {_where(repo, rev)}: {hub_endpoint()} answered "
                                 f"HTTP {_server_error(exc)} (a server error). Retry later, or: {hint}") from exc
        raise HubError(f"downloading {filename} from {_where(repo, rev)} at {hub_endpoint()} failed "
                       f"({type(exc).__name__}: {exc}). Retry, or: {hint}") from exc
    got = _sha256(data)
    if got != expected:
        _forget_cached(cached)
        raise HubIntegrityError(
            f"{filename} from {_where(repo, rev)} has SHA-256 {got}, but the hub's ({hash_from}) is {expected}; "
            "the download is damaged or the server is inconsistent — nothing was written. Retry later."
        )
    return data


def _from_cache(dest: Path, repo: str, rev: str, filename: str, source: str, method: str, ipc: int, *,
                reason: str, hint: str, error: type[HubError] = HubOfflineError) -> Path:
    """No network: keep a sound local copy, else restore the cached download, else HubOfflineError."""
    problem, present = "", os.path.lexists(dest)
    if dest.is_file():
        problem = _local_problem(dest)
        if not problem:
            return dest
    data, cached = _cached_copy(repo, rev, filename, reason=reason, hint=hint, error=error, problem=problem)
    _check_content(data, str(cached), source, method, ipc)
    _write_download(dest, data, replace=present)
    commit = cached.parent.name if _COMMIT.match(cached.parent.name) else None
    _record(dest, repo, rev, commit, filename, _sha256(data))
    return dest


def _cached_copy(repo: str, rev: str, filename: str, *, reason: str, hint: str, error: type[HubError],
                 problem: str = "") -> tuple[bytes, Path]:
    """The cached download of ``filename`` and its path in the cache, checked against the SHA-256 its blob is
    named by (a damaged one is removed: HubIntegrityError); none cached, or unreadable: ``error`` saying
    ``reason`` (and ``problem``, what was wrong with the local copy)."""
    try:
        cached = _hf_download(repo, filename, rev, local_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise error(
            f"{reason}, and {filename} of {_where(repo, rev)} is not in the Hugging Face cache "
            f"({hub_cache_dir()}).{(' ' + problem) if problem else ''} {hint}"
        ) from None
    try:
        data = cached.read_bytes()
    except OSError as exc:  # a folder (or an unreadable entry) in the cache where the file should be
        raise error(f"{reason}, and the cached copy {cached} cannot be read ({exc}); remove it. {hint}") from None
    blob = Path(os.path.realpath(cached)).name
    got = _sha256(data)
    if _SHA256.match(blob) and got != blob:
        _forget_cached(cached)
        raise HubIntegrityError(f"the cached copy {cached} was damaged (SHA-256 {got}, expected {blob}) and is "
                                f"removed; download it again when online. {hint}")
    return data, cached


def _local_problem(dest: Path) -> str:
    """Why a local copy must not be used ("" when it is sound): invalid file, or not what was downloaded."""
    try:
        CondensedSet.load(dest)
    except (CondensedSetError, OSError) as exc:
        return f"The local file {dest} is not a valid set ({exc}); it is not used."
    return ""


def _write_download(dest: Path, data: bytes, *, replace: bool) -> None:
    """Write a checked download to ``dest``; where nothing was there when the download began, only if nothing is
    there now (a build of the same name may have finished meanwhile: HubError, its set kept)."""
    try:
        atomic_write_bytes(dest, data, replace=replace)
    except FileExistsError:
        raise HubError(f"{dest} appeared while it was downloading (a build of the same set, or another copy); a "
                       "download never replaces it. Use it as it is (download=False), or move it away and "
                       "download again.") from None


def _users_own(dest: Path) -> bool:
    """A valid set at ``dest`` that is not a hub copy (no record of exactly its bytes): the user's, kept."""
    if not dest.is_file() or is_hub_copy(dest):
        return False
    try:
        CondensedSet.load(dest)
    except (CondensedSetError, OSError):
        return False
    return True


def _index_sha256(repo: str, revision: str, filename: str) -> str | None:
    try:
        index = fetch_index(repo, revision)
    except (HubError, IndexFormatError):
        return None
    entry = (index or {}).get("files", {}).get(filename) or {}
    sha = entry.get("sha256") or ""
    return sha if _SHA256.match(sha) else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_content(data: bytes, name: str, source: str, method: str, ipc: int) -> None:
    """Refuse bytes that are not a valid set of ``source``/``method``/``ipc``."""
    try:
        cset = CondensedSet.from_bytes(data, name)
    except CondensedSetError as exc:
        raise HubIntegrityError(f"{name} is not a valid condensed set: {exc}") from None
    problem = whole_set_problem(cset.metadata, source, method, ipc)
    if problem:
        raise HubIntegrityError(f"{name} {problem}; the repository is misnamed")


def _record(dest: Path, repo: str, rev: str, commit: str | None, filename: str, sha: str) -> None:
    fields = {"repo_id": repo, "revision": rev, "commit": commit, "filename": filename, "sha256": sha,
              "endpoint": hub_endpoint()}
    if read_record(dest) != fields:
        _write_record(dest, **fields)
