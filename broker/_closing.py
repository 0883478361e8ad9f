"""The life cycle of the handles that hold something until closed.

A writer :class:`~._segment.Segment` holds a lease and a mapping, a
``Publisher`` a segment and a broker connection, a ``Subscriber`` its threads and
sockets, a ``Recorder`` an open file, a ``Replayer`` the leases of its segments.
Each is a context manager that closes on leaving the block; one that is collected
while still open warns (``ResourceWarning``, naming it) and closes then, so a
forgotten handle lets go of its lease at the latest when it is collected.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TypeVar

__all__ = ["Closing"]

C = TypeVar("C", bound="Closing")


class Closing:
    """Base of the handles: subclasses implement :meth:`close` (idempotent) and set
    ``_closed`` to False once open; :meth:`_unclosed` names them in the warning."""

    _closed: bool

    def close(self) -> None:
        raise NotImplementedError

    def _unclosed(self) -> str:
        """The warning given when the handle is collected while still open."""
        return f"{type(self).__name__.lower()} was not closed"

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):  # closed, or __init__ failed before opening
            return
        warnings.warn(self._unclosed(), ResourceWarning, source=self, stacklevel=2)
        with contextlib.suppress(Exception):
            self.close()
