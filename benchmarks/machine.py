"""What every benchmark record says about the machine it ran on."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(script: str, device: str, note: str = "") -> dict[str, str]:
    """The fields every record ends with: device, torch, the command as run, the UTC date, a note."""
    return {
        "device": device,
        "torch": torch.__version__,
        "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": note,
    }
