"""Text for a terminal: names from ``/dev/shm`` are anyone's to choose.

Any local user may create a file in ``/dev/shm`` (a sticky, world-writable
directory) under a namespace's prefix, with control characters in its name: an
escape sequence printed as it is retitles or clears the reader's terminal, a
newline forges a line of a table. What the human-readable outputs print of
such names goes through :func:`printable`; ``--json`` escapes them already.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    """``text`` with each character that is not printable written as Python writes
    it in a string literal (``\\n``, ``\\x1b``, ``\\u2028``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
