"""What every benchmark record says about the machine it ran on."""

from __future__ import annotations

import json
import os
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


def device_name(device: torch.device | str) -> str:
    """What ran a measurement: the GPU's name, or the CPU's model with its cores and torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def provenance(script: str, device: str, note: str = "") -> dict[str, str]:
    """The fields every record ends with: device, torch and its intra-op CPU threads at the time, the command as
    run, the UTC date, a note."""
    return {
        "device": device,
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": note,
    }


RESULTS = Path(__file__).parent / "results"
#: Environment variable naming another folder for records (``gpu_session.py --smoke`` points it at a
#: temporary one: a smoke run measures nothing and must not add records to ``results/``).
RESULTS_ENV = "BENCHMARK_RESULTS_DIR"


def results_dir() -> Path:
    """Where records go: ``$BENCHMARK_RESULTS_DIR`` when set, else ``benchmarks/results``."""
    override = os.environ.get(RESULTS_ENV)
    return Path(override) if override else RESULTS


def write_record(stem: str, record: dict) -> Path:
    """Write ``record`` as ``<results_dir()>/<stem>_<date>.json`` and return the path; never replaces a record.

    ``date`` is the record's own (its first 10 characters); when that file exists (an earlier run on the
    same day), the name gets ``_2``, ``_3``, ... before ``.json``.
    """
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{stem}_{str(record['date'])[:10]}"
    path, n = folder / f"{base}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{base}_{n}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
