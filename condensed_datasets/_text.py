"""Text from strangers' files made safe for a terminal: control characters and escapes shown, not obeyed."""

from __future__ import annotations

import unicodedata


def printable(value: object, keep: str = "") -> str:
    """``str(value)`` with every control or format character (ANSI escapes, carriage returns, bidi marks...)
    written as its Python escape (``\\x1b``); the characters in ``keep`` (e.g. ``"\\n"``) stay as they are."""
    text = str(value)
    return "".join(ch if ch in keep or not unicodedata.category(ch).startswith("C") else repr(ch)[1:-1]
                   for ch in text)
