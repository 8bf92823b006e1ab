"""Atomic file writes: a reader never sees a half-written file at the target path, and a killed writer's
temporary file (``.{name}.{random}.tmp``) is removed by the next write of the same name once it is stale."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from condensed_datasets.constants import STALE_TEMP_AGE_S


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    ``replace=False``: only if nothing is at ``path`` at the moment of the rename (FileExistsError otherwise,
    ``path`` untouched), for a writer that checked earlier and must not replace what another process wrote since."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _rename_if_absent(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _rename_if_absent(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless something is there (FileExistsError): a hard link is created atomically
    or not at all. Where the filesystem has no hard links, a check just before the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def sweep_stale_temps(path: str | os.PathLike, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove the temporary files of earlier writes of ``path`` (``.{name}.*.tmp`` beside it) older than
    ``max_age_s``: leftovers of a writer that was killed. Returns what was removed."""
    path = Path(path)
    removed = []
    now = time.time()
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters made literal."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
