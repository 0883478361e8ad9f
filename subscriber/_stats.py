"""What a subscriber hands out and what it counts: :class:`Update` and :class:`SegmentStats`.

Every version of a segment that a subscriber present from the segment's first
version could have read ends in exactly one of four counters, so that, per
segment::

    updates + missed + overrun + torn == versions published

except the versions of an incarnation the subscriber never saw: one created,
written and deleted between two of its looks at the segment's path. It looks when
the namespace word (``shm``, ``futex``) or a created/deleted announcement
(``events``) says the catalog changed, and every 0.5 s, but only while
:meth:`~Subscriber.updates` or :meth:`~Subscriber.aupdates` runs, not while the
consumer works between two updates. Such an incarnation's versions are in no
counter and it is not in ``incarnations``: once its object is gone nothing tells
how many versions it had (in ``events`` mode its announcements carry no
incarnation, and cannot be told from another incarnation's).

- ``updates``: versions delivered. A version is delivered when its
  :class:`Update` was handed to the consumer and the consumer is done with it:
  if the consumer reads it (``sub.read(update)``, ``sub.copy(update)``) before
  it asks for the next update, the first such read decides, and a read that
  completes validated is a delivery; an update the consumer does not read
  before asking for the next one is delivered as news (consumers that never
  read, or that read the latest instead, count every update they were given).
- ``missed``: versions never learnt of: gaps in the announcements (``events``)
  or in what the headers showed (``shm``, ``futex``, ``spin``), including
  versions a new incarnation published before the subscriber saw it; and, when
  the subscriber closes, those learnt of but never handed out (a consumer that
  stopped early) and those its segments' headers show beyond the last one learnt
  (committed since its last look, or announced and still queued).
- ``overrun``: versions learnt of whose exact read could not start: the
  writer had lapped them (``VersionUnavailableError``).
- ``torn``: versions whose exact read started but failed validation on exit
  (``TornReadError``): the bytes were overwritten during the read; also those
  whose ``sub.copy()`` raised before the copy was done (``MemoryError``,
  ``KeyboardInterrupt``): read, and never handed over.

Reads of the latest version (``sub.read(name)``, ``sub.latest(name)``) are not
part of this accounting. The counters go on across incarnations of a segment
(Prometheus counters never go down); ``incarnations`` counts the creations
seen and ``incarnation`` is the current one's id.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["LATENCY_BUCKETS", "SegmentStats", "Update"]

#: Publish-to-read latency buckets, 1 µs .. 100 ms (seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4,
    1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1,
)  # fmt: skip


class Update(NamedTuple):
    """A new version of a segment, as learnt: read it with ``sub.read(update)``.

    ``timestamp_ns`` is the commit time and ``received_ns`` the time it was learnt,
    both on the wall clock (comparable across hosts, not for durations);
    ``latency_s`` is commit to receipt measured on this host's monotonic clock.
    ``missed`` is how many versions went unlearnt just before this one;
    ``incarnation`` the id of the segment's creation the version belongs to.
    (A named tuple: immutable, and cheap to make on every version.)
    """

    segment: str
    version: int
    timestamp_ns: int
    received_ns: int
    missed: int
    latency_s: float = 0.0
    incarnation: int = 0


@dataclass
class SegmentStats:
    """Counters of one segment, kept as plain numbers on the hot path (see the
    module docstring for what each of the four version counters means)."""

    updates: int = 0
    missed: int = 0
    overrun: int = 0
    torn: int = 0
    last_version: int = 0
    last_ts: int = 0
    last_mono: int = 0
    incarnation: int = 0
    incarnations: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    @property
    def accounted(self) -> int:
        """``updates + missed + overrun + torn``: the versions this subscriber has
        accounted for (equal to the versions published once it has caught up, and
        once it is closed)."""
        return self.updates + self.missed + self.overrun + self.torn

    def observe(self, latency: float) -> None:
        self.latency_sum += latency
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
        self.recent.append(latency)

    def percentile(self, q: float) -> float | None:
        if not self.recent:
            return None
        return float(np.percentile(np.fromiter(self.recent, float), q))
