"""Progress bars for long phases: one tqdm bar each, off on request and when output is not a terminal."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``total`` steps; disabled when not ``enabled`` or when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True, **kwargs)
