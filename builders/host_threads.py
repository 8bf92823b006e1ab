"""Process-wide CPU thread setting for builds on an accelerator, applied by the command-line entry points only.

On a GPU the host thread only launches kernels, but torch's intra-op pool still forks a thread per core for
each small CPU operation, and those threads spin after it. On an H100 host (16 cores) a DM build then used
0.12-0.30 CPU-s per iteration for 0.015-0.034 s of wall time, and ran at two speeds from process to process;
with ``OMP_NUM_THREADS=1`` it used one core and ran 1.4-1.5x faster (median of two rounds each, Fashion-MNIST
and CIFAR-10-shaped DM ipc 10; ``benchmarks/results/dm_vs_reference_cuda_*variant-OMP_NUM_THREADS-1*``).
So a build, evaluation, continual or NAS run on an accelerator keeps one intra-op thread. Nothing here runs on
``import``; ``CONDENSED_DATASETS_KEEP_THREADS=1`` turns it off, and an ``OMP_NUM_THREADS`` the user set wins.
"""

from __future__ import annotations

import os

import torch

ENV_OFF = "CONDENSED_DATASETS_KEEP_THREADS"


def limit_threads_for(device: torch.device) -> bool:
    """One intra-op CPU thread when ``device`` is not the CPU, unless the variable above or ``OMP_NUM_THREADS``
    is set; True if it changed the setting."""
    if device.type == "cpu" or os.environ.get(ENV_OFF, "") not in ("", "0") or os.environ.get("OMP_NUM_THREADS"):
        return False
    if torch.get_num_threads() == 1:
        return False
    torch.set_num_threads(1)
    return True
