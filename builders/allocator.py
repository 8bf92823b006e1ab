"""Process-wide allocator settings for long CPU runs, applied by the command-line entry points only.

Large tensors (a real batch's activations are hundreds of MB) are served by glibc through ``mmap``
and handed back to the kernel when freed, so every iteration faults the same pages in again (system
time). Setting ``M_MMAP_MAX`` to 0 serves them from the heap, and a high ``M_TRIM_THRESHOLD`` keeps
freed heap memory for reuse. Nothing here runs on ``import``; ``CONDENSED_DATASETS_NO_MALLOPT=1``
turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV_OFF = "CONDENSED_DATASETS_NO_MALLOPT"

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes a C int: larger values wrap (2**36 would become 0)


def tune_allocator() -> bool:
    """Apply the settings above when the C library is glibc and the variable is unset; True if applied."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
