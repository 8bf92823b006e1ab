"""What the benchmarks read from ``torch.profiler``: operators dispatched from Python, and device busy time."""

from __future__ import annotations

from torch.autograd import DeviceType


def python_operators(events, within: str | None = None) -> int:
    """How many operators ``events`` (``profile.events()``) dispatched from Python: ``aten::`` events whose
    parent is not one (on a GPU each launches one kernel or a few); with ``within``, only those under a
    ``record_function`` of that name."""

    def inside(e) -> bool:
        while e is not None and e.name != within:
            e = e.cpu_parent
        return e is not None

    return sum(1 for e in events if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
               and (within is None or inside(e)))


def device_busy_us(averages) -> float:
    """Microseconds the GPU spent in kernels and copies, from ``profile.key_averages()`` (operators only
    launch them, so only device events count)."""
    return sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA)
