"""The reading side: attach to segments zero-copy and learn of each new version.

Three ways to learn of a version (``wait=``):

- ``"events"``: the broker's announcements over ZeroMQ (default). Late joiners
  subscribe first, then take the catalog snapshot, then apply newer updates
  (the ZeroMQ guide's Clone pattern). When the broker's heartbeats stop, the
  subscriber polls the mapped headers instead, and picks the broker up again
  (a new epoch means a new snapshot) without being restarted.
- ``"futex"``: block on the segments' header futexes; no broker hop, no busy core.
- ``"spin"``: busy-poll the headers; the lowest latency, one core burnt.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zmq

from shmcast.broker import Segment, Snapshot, wait_any
from shmcast.broker.client import (
    BROKER_TOPIC,
    ControlClient,
    reader_endpoint,
    resolve_endpoint,
    resolve_namespace,
    topic,
    unpack,
    validate_segment_name,
)
from shmcast.broker.errors import (
    BrokerUnavailableError,
    ClosedError,
    NotASegmentError,
    SegmentNotFoundError,
    ShmcastError,
)

__all__ = ["LATENCY_BUCKETS", "SegmentStats", "Subscriber", "Update", "WaitMode"]

log = logging.getLogger(__name__)

WaitMode = Literal["events", "futex", "spin"]

#: Publish-to-read latency buckets, 1 µs .. 100 ms (seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4,
    1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1,
)  # fmt: skip


#: Seconds between the reports an ``events`` subscriber sends its broker.
REPORT_INTERVAL = 1.0
#: Longest single wait of a reading loop: how soon it sees close() from another thread.
WAIT_SLICE = 0.1
#: Seconds close() waits for a reading thread to leave its wait.
CLOSE_WAIT = 2.0


@dataclass(frozen=True)
class Update:
    """A new version of a segment, as learnt.

    ``timestamp_ns`` is the commit time and ``received_ns`` the time it was learnt,
    both on the wall clock (comparable across hosts, not for durations);
    ``latency_s`` is commit to receipt measured on this host's monotonic clock.
    """

    segment: str
    version: int
    timestamp_ns: int
    received_ns: int
    missed: int
    latency_s: float = 0.0


@dataclass
class SegmentStats:
    """Counters of one segment, kept as plain numbers on the hot path."""

    updates: int = 0
    missed: int = 0
    last_version: int = 0
    last_ts: int = 0
    last_mono: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def observe(self, latency: float) -> None:
        self.latency_sum += latency
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
        self.recent.append(latency)

    def percentile(self, q: float) -> float | None:
        if not self.recent:
            return None
        return float(np.percentile(np.fromiter(self.recent, float), q))


class Subscriber:
    """Read one or more segments of a namespace as they are published.

    Args:
        segments: a segment name or names; they need not exist yet (``events``).
        namespace: ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``.
        broker: the broker's control endpoint (``events`` mode); ``None`` means
            the namespace's default ipc endpoint.
        wait: ``"events"``, ``"futex"`` or ``"spin"`` (see the module docstring).
        timeout: seconds to wait for the broker's replies, or (``futex``/``spin``)
            for the segments to exist.
        heartbeat_timeout: seconds without a heartbeat before the broker is
            considered down (default: 3 heartbeat intervals).
        name: how this subscriber names itself in the reports it sends the broker
            about once a second (``events`` mode; ``shmcast top`` shows them).

    Raises:
        BrokerUnavailableError: ``events`` mode and no broker answered.
        SegmentNotFoundError: ``futex``/``spin`` mode and a segment never appeared.
    """

    def __init__(
        self,
        segments: str | Sequence[str],
        *,
        namespace: str | None = None,
        broker: str | None = None,
        wait: WaitMode = "events",
        timeout: float = 5.0,
        heartbeat_timeout: float | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
        name: str = "subscriber",
    ) -> None:
        self._closed = True
        self._client: ControlClient | None = None
        self._sub: zmq.Socket[Any] | None = None
        names = [segments] if isinstance(segments, str) else list(segments)
        if not names:
            raise ValueError("subscribe to at least one segment")
        if wait not in ("events", "futex", "spin"):
            raise ValueError(f"wait must be 'events', 'futex' or 'spin', not {wait!r}")
        self.names = [validate_segment_name(n) for n in dict.fromkeys(names)]
        self.namespace = resolve_namespace(namespace)
        self.mode: WaitMode = wait
        self.name = name
        self._segs: dict[str, Segment] = {}
        self._created: dict[str, int] = {}
        self.stats: dict[str, SegmentStats] = {n: SegmentStats() for n in self.names}
        self.events_missed = 0
        self.bad_messages = 0
        self.epoch_changes = 0
        self.broker_up: bool | None = None
        self.epoch: int | None = None
        self._tseq: dict[bytes, int] = {}
        self._pending: deque[Update] = deque()
        self._io = threading.RLock()
        self._next_report = 0.0
        self._curve = curve
        try:
            if wait == "events":
                self._connect(broker, timeout, heartbeat_timeout)
            else:
                self._attach_all(timeout)
        except BaseException:
            self._teardown()
            raise
        self._closed = False

    # ------------------------------------------------------------------ set-up

    def _connect(self, broker: str | None, timeout: float, hb_timeout: float | None) -> None:
        # A reader of a group the namespace is shared with cannot open the owner's
        # control socket; the read-only one beside it serves all a subscriber asks.
        endpoint = reader_endpoint(resolve_endpoint(broker, self.namespace))
        self._client = ControlClient(endpoint, timeout=timeout, curve=self._curve)
        hello = self._client.request("hello")
        interval = float(hello.get("heartbeat_interval", 0.5))
        self._heartbeat_interval = interval
        self.heartbeat_timeout = hb_timeout if hb_timeout is not None else 3 * interval + 0.2
        sub: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        if self._curve is not None:
            sub.curve_serverkey, sub.curve_publickey, sub.curve_secretkey = self._curve
        for name in self.names:
            sub.setsockopt(zmq.SUBSCRIBE, topic(name))
        sub.setsockopt(zmq.SUBSCRIBE, BROKER_TOPIC)
        sub.connect(str(hello["events"]))
        self._sub = sub
        # Clone pattern: we are subscribed; now the snapshot, then newer updates.
        self._snapshot(first=True)
        self.broker_up = True
        self._last_heartbeat = time.monotonic()

    def _snapshot(self, *, first: bool = False) -> None:
        assert self._client is not None
        reply = self._client.request("list")
        self.epoch = int(reply["epoch"])
        catalog = {str(s["name"]): s for s in reply["segments"]}
        for name in self.names:
            entry = catalog.get(name)
            if entry is None:
                self._detach(name)
                continue
            self._attach(name, created=int(entry.get("created", 0)))
            if first:
                self.stats[name].last_version = int(entry.get("version", 0))
        self._tseq.clear()

    def _attach(self, name: str, created: int | None = None) -> Segment | None:
        seg = self._segs.get(name)
        if seg is not None and (created is None or self._created.get(name) == created):
            return seg
        self._detach(name)
        try:
            seg = Segment.attach(name, namespace=self.namespace)
        except (SegmentNotFoundError, NotASegmentError):
            return None
        self._segs[name] = seg
        self._created[name] = seg.info().created_ns
        return seg

    def _detach(self, name: str) -> None:
        seg = self._segs.pop(name, None)
        if seg is not None:
            seg.close()

    def _attach_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name in self.names:
            while self._attach(name) is None:
                if time.monotonic() >= deadline:
                    raise SegmentNotFoundError(name, self.namespace)
                time.sleep(0.01)
            self.stats[name].last_version = self._segs[name].version

    # ------------------------------------------------------------------ reading

    def segment(self, name: str) -> Segment:
        """The attached read-only :class:`~shmcast.broker.Segment` (attaches if needed)."""
        self._check_open()
        seg = self._segs.get(name) or self._attach(name)
        if seg is None:
            raise SegmentNotFoundError(name, self.namespace)
        return seg

    def read(
        self, segment: str, version: int | None = None
    ) -> contextlib.AbstractContextManager[Snapshot]:
        """The engine's zero-copy validated read, ``with sub.read(name) as snap:``
        (raises TornReadError on leaving the block if the writer overwrote the slot)."""
        return self.segment(segment).read(version)

    def latest(self, segment: str) -> Snapshot:
        """A validated private copy of the latest version."""
        return self.segment(segment).latest()

    def torn_reads(self, segment: str) -> int:
        seg = self._segs.get(segment)
        return seg.torn_reads if seg is not None else 0

    # ------------------------------------------------------------------ updates

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Yield an :class:`Update` per new version learnt; with a ``timeout``,
        end after that many seconds without one.

        Raises:
            ClosedError: the subscriber was closed, also from another thread while
                this one waits (it notices within :data:`WAIT_SLICE` seconds).
        """
        self._check_open()
        if self.mode == "events":
            inner = self._updates_events(timeout)
        elif self.mode == "futex":
            inner = self._updates_futex(timeout)
        else:
            inner = self._updates_spin(timeout)
        # The waiting and reading happen inside next(), under the I/O lock that
        # close() takes before it tears the sockets and mappings down; the caller's
        # own code between two updates runs without it.
        while True:
            with self._io:
                if self._closed:
                    raise ClosedError("subscriber")
                try:
                    update = next(inner)
                except StopIteration:
                    if self._closed:
                        raise ClosedError("subscriber") from None
                    return
                except (zmq.ZMQError, ValueError, ShmcastError) as exc:
                    if self._closed:
                        raise ClosedError("subscriber") from exc
                    raise
            yield update

    def _update(self, name: str, version: int, ts: int, mono: int = 0) -> Update | None:
        st = self.stats[name]
        if version <= st.last_version:
            return None
        if not mono:  # learnt from an announcement: the header has the monotonic time
            mono = self._commit_monotonic(name, version)
        now_mono = time.monotonic_ns()
        now = time.time_ns()
        # Monotonic on one host; the wall clock only when the version is gone already.
        latency = (now_mono - mono) / 1e9 if mono else (now - ts) / 1e9
        missed = version - st.last_version - 1
        st.missed += missed
        st.updates += 1
        st.last_version = version
        st.last_ts = ts
        st.last_mono = mono or now_mono
        st.observe(max(0.0, latency))
        return Update(name, version, ts, now, missed, max(0.0, latency))

    def _commit_monotonic(self, name: str, version: int) -> int:
        seg = self._segs.get(name)
        if seg is None:
            return 0
        try:
            return seg.monotonic_ns(seg.acquire(version)[1])
        except ShmcastError:
            return 0

    def _from_header(self, name: str) -> Update | None:
        seg = self._segs.get(name)
        if seg is None:
            return None
        try:
            v = seg.version
            if v <= self.stats[name].last_version:
                return None
            _, slot, _, ts = seg.acquire(v)
            mono = seg.monotonic_ns(slot)
        except ShmcastError:
            return None
        return self._update(name, v, ts, mono)

    def _updates_one(self, timeout: float | None, *, spin: bool) -> Iterator[Update]:
        """One segment, ``futex`` or ``spin``: the engine's wait_acquire fast path
        (one call per update, no second look at the header)."""
        name = self.names[0]
        seg = self._segs[name]
        st = self.stats[name]
        # Waits are cut into slices so that close() from another thread is seen.
        step = WAIT_SLICE if timeout is None else min(timeout, WAIT_SLICE)
        idle_deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            got = seg.wait_acquire(st.last_version, step, spin=spin)
            if got is None:
                if idle_deadline is not None and time.monotonic() >= idle_deadline:
                    return
                continue
            up = self._update(name, got[0], got[3], seg.monotonic_ns(got[1]))
            if up is not None:
                yield up
                if timeout is not None:
                    idle_deadline = time.monotonic() + timeout

    def _updates_spin(self, timeout: float | None) -> Iterator[Update]:
        if len(self.names) == 1:
            yield from self._updates_one(timeout, spin=True)
            return
        segs = [(name, self._segs[name]) for name in self.names]
        stats = [self.stats[name] for name in self.names]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for (name, seg), st in zip(segs, stats, strict=True):
                if seg.version > st.last_version:
                    up = self._from_header(name)
                    if up is not None:
                        yield up
                        if deadline is not None:
                            deadline = time.monotonic() + timeout  # type: ignore[operator]
            if deadline is not None and time.monotonic() >= deadline:
                return
            if self._closed:
                return

    def _updates_futex(self, timeout: float | None) -> Iterator[Update]:
        if len(self.names) == 1:
            yield from self._updates_one(timeout, spin=False)
            return
        segs = [self._segs[name] for name in self.names]
        idle_deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            afters = [self.stats[name].last_version for name in self.names]
            step = WAIT_SLICE
            if idle_deadline is not None:
                step = min(step, max(0.0, idle_deadline - time.monotonic()))
            if not wait_any(segs, afters, step):
                if idle_deadline is not None and time.monotonic() >= idle_deadline:
                    return
                continue
            if timeout is not None:
                idle_deadline = time.monotonic() + timeout
            for name in self.names:
                up = self._from_header(name)
                if up is not None:
                    yield up
            if self._closed:
                return

    def _updates_events(self, timeout: float | None) -> Iterator[Update]:
        sub = self._sub
        assert sub is not None
        idle_deadline = None if timeout is None else time.monotonic() + timeout
        next_check = time.monotonic() + 0.25
        while not self._closed:
            while self._pending:
                yield self._pending.popleft()
                if timeout is not None:
                    idle_deadline = time.monotonic() + timeout
            now = time.monotonic()
            if idle_deadline is not None and now >= idle_deadline:
                return
            # While the broker is down, or a heartbeat is late, poll the headers
            # every millisecond: a crashed broker costs no latency before it is
            # declared down.
            late = now - self._last_heartbeat > 1.5 * self._heartbeat_interval
            wait = 0.001 if late or not self.broker_up else 0.05
            if idle_deadline is not None:
                wait = min(wait, max(0.0, idle_deadline - now))
            drained = True
            if sub.poll(int(wait * 1000) + (0 if wait == 0 else 1), zmq.POLLIN):
                for _ in range(1000):
                    try:
                        frames = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_event(frames)
                else:
                    drained = False
            now = time.monotonic()
            if self.broker_up and now - self._last_heartbeat > self.heartbeat_timeout:
                log.warning("broker of namespace %r is silent; polling headers", self.namespace)
                self.broker_up = False
            if now >= self._next_report:
                self._next_report = now + REPORT_INTERVAL
                self._report()
            if drained and (late or not self.broker_up or now >= next_check):
                # Cross-check the headers: a notification lost at the high-water mark
                # or while the broker was down still becomes an update. Only once the
                # queue is drained: a subscriber that is merely behind gets every
                # announced version instead of jumping ahead and counting them missed.
                next_check = now + 0.25
                for name in self.names:
                    if name not in self._segs and self.broker_up is False:
                        self._attach(name)
                    up = self._from_header(name)
                    if up is not None:
                        self._pending.append(up)

    def _report(self) -> None:
        """Tell the broker our counters (one-way, never blocks; for ``shmcast top``)."""
        if self._client is None or not self.broker_up:
            return
        segs = {
            name: {
                "last_version": st.last_version,
                "updates": st.updates,
                "missed": st.missed,
                "torn": self.torn_reads(name),
                "p50": st.percentile(50),
                "p99": st.percentile(99),
            }
            for name, st in self.stats.items()
        }
        self._client.send("report", name=self.name, pid=os.getpid(), segments=segs)

    def _on_event(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 2:
                raise ValueError(f"{len(frames)} frames")
            tpc, body = frames
            msg = unpack(body)
            kind = msg["kind"]
            epoch = int(msg["epoch"])
            tseq = int(msg["tseq"])
            if not isinstance(kind, str):
                raise ValueError("kind is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            self.bad_messages += 1
            log.debug("dropped a malformed event: %s", exc)
            return
        if epoch != self.epoch:
            self._new_epoch(epoch)
        last = self._tseq.get(tpc)
        if last is not None and tseq > last + 1:
            self.events_missed += tseq - last - 1
        self._tseq[tpc] = tseq
        if kind == "heartbeat":
            self._last_heartbeat = time.monotonic()
            if not self.broker_up:
                log.info("broker of namespace %r is back", self.namespace)
                self.broker_up = True
            return
        name = msg.get("segment")
        if not isinstance(name, str) or name not in self.stats:
            self.bad_messages += 1
            return
        if kind == "created":
            self._attach(name)
        elif kind == "deleted":
            self._detach(name)
        elif kind == "version":
            version, ts = msg.get("version"), msg.get("ts")
            if not isinstance(version, int) or not isinstance(ts, int):
                self.bad_messages += 1
                return
            seg = self._segs.get(name) or self._attach(name)
            # Versions are announced after they are committed to the header: one
            # beyond it is forged or corrupt, and would wedge last_version forever.
            if seg is None or version > seg.version:
                self.bad_messages += 1
                return
            up = self._update(name, version, ts)
            if up is not None:
                self._pending.append(up)

    def _new_epoch(self, epoch: int) -> None:
        """A broker restarted: take a fresh snapshot (segments were adopted or remade)."""
        log.info("broker epoch changed (%s -> %s): resynchronising", self.epoch, epoch)
        self.epoch_changes += 1
        self._last_heartbeat = time.monotonic()
        self.broker_up = True
        try:
            self._snapshot()
        except (BrokerUnavailableError, ShmcastError) as exc:
            log.warning("snapshot after restart failed: %s", exc)
            self.epoch = epoch
        self._tseq.clear()

    # ------------------------------------------------------------------ closing

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("subscriber")

    @property
    def closed(self) -> bool:
        return self._closed

    def _teardown(self) -> None:
        for name in list(self._segs):
            self._detach(name)
        if self._sub is not None:
            self._sub.close(0)
            self._sub = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        """Detach every segment and close the sockets. Idempotent.

        Safe from another thread: a thread waiting in :meth:`updates` ends with
        :class:`ClosedError` instead of finding its sockets gone.
        """
        if self._closed:
            return
        self._closed = True
        # Wait (bounded) for a reading thread to leave its wait slice first.
        locked = self._io.acquire(timeout=CLOSE_WAIT)
        try:
            self._teardown()
        finally:
            if locked:
                self._io.release()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn("subscriber was not closed", ResourceWarning, source=self, stacklevel=2)
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<Subscriber {self.namespace}/{','.join(self.names)} wait={self.mode}>"
