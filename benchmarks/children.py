"""Timed child processes: a benchmark's builds, each in its own process, timed by the stamps it prints."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
#: The line ``build_speed.py --stamps`` prints after each iteration: ``BENCH_ITER <iteration> <wall> <cpu>``.
STAMP = "BENCH_ITER"


def run_stamped(cmd: list[str], env: dict[str, str], log: Path, warmup: int, timed: int) -> dict:
    """Run ``cmd`` (from the repository root, its output to ``log``): wall and CPU seconds per iteration over its
    stamps ``warmup + 1`` to ``warmup + timed``, its user/sys CPU and peak RSS (``os.wait4``, the whole child)."""
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed; last lines:\n" + "\n".join(text.splitlines()[-15:]))
    found = re.findall(rf"^{STAMP} \d+ ([0-9.]+) ([0-9.]+)$", text, re.MULTILINE)
    if len(found) < warmup + timed:
        raise click.ClickException(f"only {len(found)} iteration stamps, {warmup + timed} needed")
    walls, cpus = [float(w) for w, _ in found], [float(c) for _, c in found]
    return {"s_per_iteration": round((walls[warmup + timed - 1] - walls[warmup - 1]) / timed, 4),
            "cpu_s_per_iteration": round((cpus[warmup + timed - 1] - cpus[warmup - 1]) / timed, 4),
            "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
            # process start to the end of the first iteration (start-up, data, any compilation): perf_counter is
            # the system's monotonic clock here (Linux), the same in parent and child
            "to_first_iteration_s": round(walls[0] - start, 1),
            "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
