"""A minimum download speed for huggingface_hub's HTTP downloads (as curl's --speed-limit / --speed-time).

huggingface_hub reads a body in large chunks and only times out a single read, so a server that sends a
byte every few seconds holds a download (and our lock) for hours. Inside :func:`speed_limit`, every GET
response of huggingface_hub's HTTP client is wrapped so that each network read checks the average speed
since the window began, and raises :class:`~condensed_datasets.errors.HubStalledError` when less than
``rate`` bytes/s arrived over ``window`` seconds. Outside it (other threads, other code) nothing changes.

This needs huggingface_hub's httpx-style client (huggingface_hub >= 1.0: ``event_hooks`` and
``SyncByteStream``); with an older client, or downloads through Xet, only huggingface_hub's own per-read
timeout applies.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterator
from typing import Any

from huggingface_hub.utils import get_session

from condensed_datasets.constants import MIN_DOWNLOAD_RATE_ENV, MIN_DOWNLOAD_WINDOW_ENV
from condensed_datasets.errors import HubStalledError

_LIMIT: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "condensed_datasets_speed_limit", default=None)


class SpeedLimitedStream:
    """A response body that raises HubStalledError when it arrives slower than ``rate`` bytes/s over ``window`` s.

    Made a subclass of the HTTP client's own ``SyncByteStream`` by :func:`_stream_class` (the client checks it).
    """

    def __init__(self, stream: Any, rate: float, window: float) -> None:
        self._stream, self._rate, self._window = stream, rate, window

    def __iter__(self) -> Iterator[bytes]:
        since, got = time.monotonic(), 0
        for chunk in self._stream:
            got += len(chunk)
            elapsed = time.monotonic() - since
            if elapsed >= self._window:
                if got < self._rate * elapsed:
                    raise HubStalledError(
                        f"the download made {got / elapsed:.0f} bytes/s over {elapsed:.1f} s, under the minimum of "
                        f"{self._rate:.0f} bytes/s over {self._window:g} s ({MIN_DOWNLOAD_RATE_ENV}, "
                        f"{MIN_DOWNLOAD_WINDOW_ENV}); the server stalled"
                    )
                since, got = time.monotonic(), 0
            yield chunk

    def close(self) -> None:
        self._stream.close()


_STREAM_CLASSES: dict[type, type] = {}


def _stream_class(base: type) -> type:
    """SpeedLimitedStream as a subclass of the client's ``SyncByteStream`` ``base`` (made once per base)."""
    if base not in _STREAM_CLASSES:
        _STREAM_CLASSES[base] = type("SpeedLimitedStream", (SpeedLimitedStream, base), {})
    return _STREAM_CLASSES[base]


def _limit_response(response: Any) -> None:
    limit = _LIMIT.get()
    base = getattr(sys.modules.get(type(response).__module__.split(".")[0]), "SyncByteStream", None)
    if (limit is not None and base is not None and response.request.method == "GET"
            and isinstance(response.stream, base)):
        response.stream = _stream_class(base)(response.stream, *limit)


@contextlib.contextmanager
def speed_limit(rate: float, window: float) -> Iterator[None]:
    """Within the block, this thread's huggingface_hub downloads abort below ``rate`` bytes/s over ``window`` s
    (``rate`` 0: no limit)."""
    if rate <= 0:
        yield
        return
    client = get_session()
    hooks = getattr(client, "event_hooks", None)
    if isinstance(hooks, dict) and _limit_response not in hooks.get("response", []):
        client.event_hooks = {**hooks, "response": [*hooks.get("response", []), _limit_response]}
    token = _LIMIT.set((rate, window))
    try:
        yield
    finally:
        _LIMIT.reset(token)
