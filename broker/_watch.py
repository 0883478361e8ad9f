"""The broker's commit watcher: it learns of commits through shared memory.

A thread sleeps (``futex_waitv`` in the engine's core, GIL released, announced
in each segment's waiters word like any sleeping reader) on the notify words of
the segments someone wants every version of: a topic with ``events``
subscribers, or a segment a relay takes. The others are announced at the
broker's ticks, and their commits make no wake syscall while nobody else sleeps
on them (the core skips the wake when no sleeper is announced). When one moves
it waits :data:`DEFER` seconds, so that
the readers woken by the same commit have the CPU to themselves (it also runs
at a lower priority, :data:`NICE`), then wakes the broker's serving thread
through an inproc socket; that thread announces every version committed since
(``Broker._announce_committed``). Publishers
therefore send nothing per version: no ZeroMQ or broker thread wakes up beside
the readers at the moment a version is committed, and the broker still
announces every version for ``events`` subscribers, relays and tools.

The watcher only loads words; it never writes, and it reloads the catalog's
segments at every wake and at least every :data:`SLICE` seconds (a segment
deleted under it costs at most one slice of sleep).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ._catalog import Catalog
from ._nsword import notify_words
from ._segment import Segment, wait_any
from .errors import ShmcastError

__all__ = ["DEFER", "CommitWatcher", "commit_count"]

log = logging.getLogger(__name__)

#: Seconds between a commit and the broker's announcement of it: the readers
#: woken by the commit run first (about the time a woken reader needs to read).
DEFER = 0.0001
#: Longest sleep: how soon the watcher sees a new segment or its stop.
SLICE = 0.1
#: The watcher thread's niceness: woken by the same commit as the readers, it yields
#: the CPU to them on a busy host (its work is deferred anyway).
NICE = 5


class CommitWatcher:
    """The watcher thread of one broker (see the module docstring).

    Args:
        catalog: the broker's catalog, whose segments are watched.
        sock: a PAIR socket connected to the serving thread's (inproc), made by
            that thread so that a broker unable to make it does not start; the
            watcher owns it from here and closes it (``Thread.start()`` is the
            full memory barrier ZeroMQ asks of a socket handed to another thread).
        wanted: whether every version of a segment is wanted (its notify word
            watched).
    """

    def __init__(
        self,
        catalog: Catalog,
        sock: zmq.Socket[Any],
        wanted: Callable[[str], bool],
    ) -> None:
        self._catalog = catalog
        self._wanted = wanted
        self._sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmcast-watch", daemon=True)

    def start(self) -> CommitWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: niceness per thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        sock = self._sock
        before: dict[tuple[str, int], int] = {}
        try:
            while not self._stop.is_set():
                segs = [(n, e.seg) for n, e in self._catalog.items() if self._wanted(n)]
                if not segs:
                    before = {}
                    self._stop.wait(SLICE)
                    continue
                try:
                    # Versions first, then the commit counts: a commit after the first
                    # look ends the sleep below, one before it moved a count.
                    afters = [seg.version for _, seg in segs]
                    # Keyed by incarnation too: a segment deleted and made again while
                    # we slept on the old one may have as many commits as it had.
                    counts = {(n, seg.incarnation): commit_count(seg) for n, seg in segs}
                except (ValueError, TypeError, ShmcastError):  # a segment closed under us
                    time.sleep(0.001)
                    continue
                # A count that moved, or a segment newly wanted (its subscriber's
                # subscription reached the broker after a commit): the serving
                # thread announces what was committed since it last looked.
                if any(before.get(n) != c for n, c in counts.items()):
                    with contextlib.suppress(zmq.Again):
                        sock.send(b"", zmq.NOBLOCK)
                before = counts
                try:
                    # Announced in each segment's waiters word, like any sleeping
                    # reader: its writers wake it.
                    if wait_any([seg for _, seg in segs], afters, SLICE):
                        time.sleep(DEFER)
                except (ValueError, OSError, ShmcastError):
                    time.sleep(0.001)
        except Exception:  # the broker's ticks still announce what the headers say
            log.exception("commit watcher stopped")
        finally:
            sock.close(0)

    def close(self) -> None:
        """Stop the thread (within a slice) and wait for it; the socket is closed
        (by the thread, or here if it never started)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * SLICE + 1.0)
        elif self._thread.ident is None:
            self._sock.close(0)


def commit_count(seg: Segment) -> int:
    """The segment's notify word: +1 at every commit (32 bits, wrapping)."""
    return notify_words([seg])[1][0]
