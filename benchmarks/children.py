"""Timed child processes: a benchmark's runs, each in its own process, timed by the stamps it prints."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
#: The line ``build_speed.py --stamps`` (and a patched reference script) prints after each iteration:
#: ``BENCH_ITER <iteration> <wall: perf_counter> <CPU: process_time>``.
STAMP = "BENCH_ITER"


def run_child(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> dict:
    """Run ``cmd`` in ``cwd``, its output to ``log``: the wall and CPU times of its stamps, the last lines it printed
    besides them, its user/sys CPU seconds and peak RSS (``os.wait4``: the whole child, start-up included)."""
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    text = log.read_text()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed ({code}); last lines:\n"
                                   + "\n".join(text.splitlines()[-15:]))
    found = re.findall(rf"^{STAMP} \d+ ([0-9.]+) ([0-9.]+)$", text, re.MULTILINE)
    said = [line for line in text.splitlines() if line.strip() and not line.startswith(STAMP)]
    stamps = [float(w) for w, _ in found]
    return {"stamps": stamps, "cpu_stamps": [float(c) for _, c in found],
            "log_tail": said[-12:],  # warnings (an uncompiled fallback, say) beside the figures
            "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
            # process start to the end of the first iteration (start-up, data, any compilation): perf_counter is
            # the system's monotonic clock here (Linux), the same in parent and child
            "to_first_iteration_s": round(stamps[0] - start, 1) if stamps else None,
            "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def per_iteration(stamps: list[float], warmup: int, timed: int) -> float:
    """Seconds per iteration over iterations ``warmup + 1 .. warmup + timed`` (each stamp ends an iteration)."""
    if len(stamps) < warmup + timed:
        raise click.ClickException(f"only {len(stamps)} iteration stamps, {warmup + timed} needed")
    return (stamps[warmup + timed - 1] - stamps[warmup - 1]) / timed


def run_stamped(cmd: list[str], env: dict[str, str], log: Path, warmup: int, timed: int) -> dict:
    """:func:`run_child` from the repository root, its stamps reduced to wall and CPU seconds per iteration over
    iterations ``warmup + 1 .. warmup + timed``."""
    result = run_child(cmd, env, log)
    return {"s_per_iteration": round(per_iteration(result.pop("stamps"), warmup, timed), 4),
            "cpu_s_per_iteration": round(per_iteration(result.pop("cpu_stamps"), warmup, timed), 4), **result}
