"""Text for a terminal: names from ``/dev/shm`` are anyone's to choose.

Any local user may create a file in ``/dev/shm`` (a sticky, world-writable
directory) under a namespace's prefix, with control characters in its name: an
escape sequence printed as it is retitles or clears the reader's terminal, a
newline forges a line of a table. What the human-readable outputs print of
such names goes through :func:`printable`; ``--json`` escapes them already.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str, *, shell: bool = False) -> str:
    """``text`` with each character that is not printable written as Python writes
    it in a string literal (``\\n``, ``\\x1b``, ``\\u2028``), and each backslash
    doubled (``\\\\``): a name holding the four characters ``\\x1b`` does not print
    as one holding an ESC.

    ``shell``: ``text`` is a shell command whose words are quoted already (doctor's
    fixes: ``$'...'`` escapes its own backslashes, and in ``'...'`` a backslash is
    itself); its backslashes are left as they are, so the command pasted still
    names the object.
    """
    if text.isprintable() and (shell or "\\" not in text):
        return text
    return "".join(c if c.isprintable() and (shell or c != "\\") else repr(c)[1:-1] for c in text)
