"""The catalog: the segments one broker owns, by name.

The broker's control thread adds and removes entries; the data stream's thread
and the metrics collector read them. Both sides go through this object (and its
lock) instead of reaching into the broker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ._segment import Segment
from .errors import SegmentNotFoundError

__all__ = ["Catalog", "CatalogEntry"]


@dataclass
class CatalogEntry:
    """One owned segment: the broker's read-only handle and what it has announced."""

    seg: Segment
    announced: int = 0
    published: int = 0
    source: str = "local"
    extra: dict[str, Any] = field(default_factory=dict)
    #: Found at start, left by an earlier broker: who fed it (its ``source``) is not
    #: known, so the first relay or bridge that says it is the feeder is believed.
    adopted: bool = False
    #: ``(st_dev, st_ino)`` of the object, once looked up: the tick checks that the
    #: segment's path still names it (one ``stat`` a segment).
    inode: tuple[int, int] | None = None


class Catalog:
    """The segments of one namespace that a broker owns; safe to use from several threads."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._entries: dict[str, CatalogEntry] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The segment names, sorted."""
        with self._lock:
            return sorted(self._entries)

    def items(self) -> list[tuple[str, CatalogEntry]]:
        """A snapshot of ``(name, entry)`` pairs."""
        with self._lock:
            return list(self._entries.items())

    def get(self, name: str) -> CatalogEntry | None:
        with self._lock:
            return self._entries.get(name)

    def entry(self, name: str) -> CatalogEntry:
        """The entry of ``name``.

        Raises:
            SegmentNotFoundError: the broker owns no such segment.
        """
        entry = self.get(name)
        if entry is None:
            raise SegmentNotFoundError(name, self.namespace)
        return entry

    def add(self, name: str, entry: CatalogEntry) -> None:
        with self._lock:
            self._entries[name] = entry

    def pop(self, name: str) -> CatalogEntry | None:
        with self._lock:
            return self._entries.pop(name, None)

    def clear(self) -> list[tuple[str, CatalogEntry]]:
        """Empty the catalog; returns what it held."""
        with self._lock:
            items = list(self._entries.items())
            self._entries.clear()
        return items

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
