"""Text for a terminal: names from ``/dev/shm`` are anyone's to choose.

Any local user may create a file in ``/dev/shm`` (a sticky, world-writable
directory) under a namespace's prefix, with control characters in its name: an
escape sequence printed as it is retitles or clears the reader's terminal, a
newline forges a line of a table. What the human-readable outputs print of
such names goes through :func:`printable`; ``--json`` escapes them already.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["printable"]


def printable(text: str, *, shell: bool = False, quoted: Iterable[str] = ()) -> str:
    """``text`` with each character that is not printable written as Python writes
    it in a string literal (``\\n``, ``\\x1b``, ``\\u2028``), and each backslash
    doubled (``\\\\``): a name holding the four characters ``\\x1b`` does not print
    as one holding an ESC.

    ``shell``: ``text`` is a shell command whose words are quoted already (doctor's
    fixes: ``$'...'`` escapes its own backslashes, and in ``'...'`` a backslash is
    itself); its backslashes are left as they are, so the command pasted still
    names the object.

    ``quoted``: names that ``text`` (an error's message) may hold as Python's
    ``repr`` writes them: ``repr`` escaped them already, as this function would
    (its output is printable, its backslashes doubled), so they are left as they
    are. Escaped again, ``'frames\\xa0'`` printed as ``'frames\\\\xa0'`` beside the
    ``frames\\xa0`` of the same name.
    """
    reprs = sorted({repr(q) for q in quoted}, key=len, reverse=True)
    if reprs:
        parts = re.split(f"({'|'.join(map(re.escape, reprs))})", text)
        # Odd parts are the reprs the split kept: escaped once already.
        return "".join(p if i % 2 else printable(p, shell=shell) for i, p in enumerate(parts))
    if text.isprintable() and (shell or "\\" not in text):
        return text
    return "".join(c if c.isprintable() and (shell or c != "\\") else repr(c)[1:-1] for c in text)
