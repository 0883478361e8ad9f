"""Replay: publish the versions of a recording again, in order, bit-identical.

Each recorded segment is recreated through the broker with its dtype and shape
(or an existing one of the same layout is used), then the versions of every
segment are published in the order of their recorded commit times, at the
recorded pace scaled by ``speed`` or flat out. Each version is read from the
file straight into the segment's next slot (a loan): one copy.

Version numbers are kept: into a fresh segment, version v of the recording is
published as v, gaps included (subscribers count them as missed, as they were).
Into a segment already further on, and on each pass of a loop, every number is
shifted by the same amount so that versions only go forward.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from shmcast.broker import Closing
from shmcast.broker.client import (
    ControlClient,
    CurveKeyTriple,
    check_broker_namespace,
    resolve_endpoint,
    resolve_namespace,
    validate_seconds,
)
from shmcast.broker.errors import (
    ClosedError,
    LayoutConflictError,
    RecordingError,
    SegmentNotFoundError,
    WriterBusyError,
)
from shmcast.broker.recording import RecordedSegment, Recording, SegmentLayout, open_recording

from ._publisher import Publisher

__all__ = ["ReplayStats", "Replayed", "Replayer", "replay"]

log = logging.getLogger(__name__)

#: Seconds behind the recorded pace after which the pace starts again from now.
BEHIND = 0.05
#: Nanoseconds between two passes of a looped recording whose versions all have one
#: commit time (a single version, say), at speed 1.
LOOP_GAP_NS = 1_000_000_000
#: Longest single wait (seconds): a longer one is taken in parts (time_t and
#: threading.TIMEOUT_MAX bound what one call takes).
MAX_WAIT = 3600.0


@dataclass
class ReplayStats:
    """What a replay published of one segment."""

    published: int = 0
    first_version: int = 0
    last_version: int = 0
    passes: int = 0


@dataclass(frozen=True)
class Replayed:
    """One version published again."""

    segment: str
    version: int
    """The version number published."""
    recorded_version: int
    recorded_timestamp_ns: int


class Replayer(Closing):
    """Publish the versions of recordings into a namespace's segments.

    Iterate over it to publish version after version (each step yields a
    :class:`Replayed`), or call :meth:`run`.

    Args:
        paths: a recording file, or several (a Parquet recording of several
            segments is one file per segment); their segments are merged by time.
        segments: replay only these (default: every recorded segment).
        namespace: ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``.
        broker: the broker's control endpoint.
        speed: the recorded pace times this; ``None`` publishes flat out.
        loop: start again from the first version after the last, until stopped (a
            mean interval later; a second later for a recording of one commit time).
        timeout: seconds to wait for each broker reply.

    Raises:
        ValueError: ``speed`` or ``timeout`` is not a finite number > 0.
        NotARecordingError: a file is not a shmcast recording.
        RecordingError: a segment asked for is not in the recordings, two
            recordings hold the same segment, or the segments to replay hold no
            version at all.
        LayoutConflictError: a segment of that name exists with another dtype or
            shape (checked for every segment before any is touched).
        WriterBusyError: a segment of that name has a live writer (checked alike).
        MissingExtraError: h5py / pyarrow is not installed (``shmcast[record]``).
        BrokerUnavailableError: no broker answered.
        NamespaceMismatchError: the broker at ``broker`` serves another namespace.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        segments: Sequence[str] | None = None,
        namespace: str | None = None,
        broker: str | None = None,
        speed: float | None = 1.0,
        loop: bool = False,
        timeout: float = 5.0,
        curve: CurveKeyTriple | None = None,
    ) -> None:
        self._closed = True
        self._recordings: list[Recording] = []
        self._pubs: dict[str, Publisher] = {}
        if speed is not None and not (speed > 0 and math.isfinite(speed)):
            raise ValueError(
                f"speed must be a finite number > 0 (or None: flat out), not {speed!r}"
            )
        # Checked first, as Publisher checks its own: -1 blamed the running broker.
        timeout = validate_seconds("timeout", timeout, positive=True)
        files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not files:
            raise ValueError("replay at least one recording")
        self.namespace = resolve_namespace(namespace)
        self.speed = speed
        self.loop = loop
        try:
            self._sources = self._open(files, segments)
            if not any(len(src) for src in self._sources.values()):
                raise self._nothing_to_replay()
            self._check_layouts(resolve_endpoint(broker, self.namespace), timeout, curve)
            for name, src in self._sources.items():
                lay = src.layout
                if name in self._existing:  # get it, never create: its slots are its own
                    pub = Publisher(
                        name, namespace=self.namespace, broker=broker, timeout=timeout, curve=curve
                    )
                else:
                    pub = Publisher(
                        name,
                        dtype=lay.dtype,
                        shape=lay.shape,
                        slots=lay.slots,
                        namespace=self.namespace,
                        broker=broker,
                        timeout=timeout,
                        curve=curve,
                    )
                self._pubs[name] = pub
            for src in self._sources.values():
                if len(src):
                    src.read(0)  # warm the file's read path up before the clock starts
        except BaseException:
            # Whatever failed (a damaged first entry too): no writer lease, segment
            # handle or file is left open.
            self._teardown()
            raise
        self.segments = list(self._sources)
        self._stats = {name: ReplayStats() for name in self.segments}
        self._order = self._schedule()
        self._closed = False

    def _open(
        self, files: list[str | os.PathLike[str]], wanted: Sequence[str] | None
    ) -> dict[str, RecordedSegment]:
        sources: dict[str, RecordedSegment] = {}
        for path in files:
            rec = open_recording(path)
            self._recordings.append(rec)
            for name, seg in rec.segments.items():
                if name in sources and wanted and name not in wanted:
                    continue  # not replayed: which file it would come from does not matter
                if name in sources:
                    raise RecordingError(
                        rec.path,
                        f"segment {name!r} is in both {sources[name].path} and {rec.path}; "
                        f"replay one of them (--segments, or one file)",
                    )
                sources[name] = seg
        if wanted:
            unknown = [n for n in wanted if n not in sources]
            if unknown:
                there = ", ".join(map(repr, sources)) or "no segment"
                paths = ", ".join(rec.path for rec in self._recordings)
                raise RecordingError(
                    self._recordings[0].path,
                    f"segment(s) {', '.join(map(repr, unknown))} not recorded in {paths}, "
                    f"which holds {there}: give --segments some of those, or leave it "
                    f"out to replay them all",
                )
            sources = {n: sources[n] for n in dict.fromkeys(wanted)}
        return sources

    def _nothing_to_replay(self) -> RecordingError:
        """The segments to replay hold no version at all: an error, before any segment
        is made (an empty one, and a replay that ended at once with exit 0, ``loop``
        too, was all it did)."""
        names = ", ".join(map(repr, self._sources))
        paths = ", ".join(dict.fromkeys(src.path for src in self._sources.values()))
        others = [
            name
            for rec in self._recordings
            for name, seg in rec.segments.items()
            if len(seg) and name not in self._sources
        ]
        if others:
            fix = f"replay those that have some: --segments {' '.join(others)}"
        else:
            fix = (
                "its recorder recorded none (its done line says why: versions missed, or "
                "none published while it ran); record again"
            )
        return RecordingError(
            self._recordings[0].path,
            f"nothing to replay: {paths} holds no version of {names}; {fix}",
        )

    def _check_layouts(self, endpoint: str, timeout: float, curve: CurveKeyTriple | None) -> None:
        """Every segment either does not exist or has the recorded dtype and shape."""
        self._existing: set[str] = set()
        client = ControlClient(endpoint, timeout=timeout, curve=curve)
        try:
            check_broker_namespace(client, self.namespace)
            for name, src in self._sources.items():
                try:
                    info = client.request("describe", name=name)
                except SegmentNotFoundError:
                    continue
                lay = src.layout
                have = f"dtype={info['dtype']} shape={list(info['shape'])}"
                if have != lay.describe():
                    raise LayoutConflictError(
                        name, have, f"{lay.describe()} (recorded in {src.path})", self.namespace
                    )
                # A live writer refuses the lease: say so now, before another segment
                # of the recording is created (and left behind, empty).
                if info.get("writer_alive"):
                    raise WriterBusyError(name, info.get("writer_pid"))
                self._existing.add(name)
        finally:
            client.close()

    def _schedule(self) -> npt.NDArray[np.int64]:
        """(segment index, entry, time) of one pass: each segment's entries in their
        recorded (version) order, the segments merged by commit time.

        The times are wall-clock times: a step of the clock backwards while recording
        (NTP) would put later versions first, which cannot be published (versions
        only go forward). Each segment's intervals are kept, a backwards one as 0.
        """
        times, segs, idx = [], [], []
        for k, src in enumerate(self._sources.values()):
            n = len(src)
            t = src.timestamps_ns.astype(np.int64)
            if n > 1:
                t = t[0] + np.concatenate(([0], np.cumsum(np.maximum(np.diff(t), 0))))
            times.append(t)
            segs.append(np.full(n, k, dtype=np.int64))
            idx.append(np.arange(n, dtype=np.int64))
        t = np.concatenate(times)
        order = np.lexsort((np.concatenate(segs), t))  # by time, then by segment
        return np.stack([np.concatenate(segs)[order], np.concatenate(idx)[order], t[order]], 1)

    # ------------------------------------------------------------------ publishing

    def __iter__(self) -> Iterator[Replayed]:
        return self.replayed()

    def replayed(self, stop: threading.Event | None = None) -> Iterator[Replayed]:
        """Publish, yielding each version once it is published; ends after the last
        (or never, with ``loop``), or when ``stop`` is set.

        Raises:
            ClosedError: the replayer was closed.
        """
        self._check_open()
        names = list(self._sources)
        sources = [self._sources[n] for n in names]
        pubs = [self._pubs[n] for n in names]
        stats = [self._stats[n] for n in names]
        order = self._order.tolist()  # Python ints: cheaper to loop over than numpy scalars
        if not order:
            return
        offsets = []
        for src, pub in zip(sources, pubs, strict=True):
            first = int(src.versions[0]) if len(src) else 1
            offsets.append(0 if pub.version < first else pub.version - first + 1)
        t_first = order[0][2]
        span = order[-1][2] - t_first
        # Between the last version and the next pass: the mean interval, or (nothing
        # to measure it by: one version, or one commit time) a second, not a spin.
        gap = span // (len(order) - 1) if span > 0 else LOOP_GAP_NS
        # A float: at a tiny speed the recorded times scale past any int or time_t
        # (inf: never); waits are then taken in slices of at most MAX_WAIT.
        start = float(time.monotonic_ns())
        speed = self.speed
        while True:
            for k, i, t in order:
                if stop is not None and stop.is_set():
                    return
                if self._closed:
                    raise ClosedError("replayer")
                if speed is not None:
                    due = start + (t - t_first) / speed
                    delay = (due - time.monotonic_ns()) / 1e9
                    if delay < -BEHIND:
                        # Far behind (a stalled machine): keep the recorded intervals from
                        # here on rather than publish the backlog in a burst.
                        start -= delay * 1e9
                    while delay > 0:
                        if stop is not None:
                            if stop.wait(min(delay, MAX_WAIT)):
                                return
                        else:
                            time.sleep(min(delay, MAX_WAIT))
                        delay = (due - time.monotonic_ns()) / 1e9
                src, pub, st = sources[k], pubs[k], stats[k]
                recorded = int(src.versions[i])
                v = recorded + offsets[k]
                with pub.loan(version=v) as out:
                    src.read_into(i, out)
                st.published += 1
                if not st.first_version:
                    st.first_version = v
                st.last_version = v
                yield Replayed(names[k], v, recorded, int(src.timestamps_ns[i]))
            for st in stats:
                st.passes += 1
            if not self.loop:
                return
            for k, src in enumerate(sources):
                if len(src):
                    offsets[k] += int(src.versions[-1]) - int(src.versions[0]) + 1
            if speed is not None:
                start += (span + gap) / speed

    def run(self, stop: threading.Event | None = None) -> dict[str, ReplayStats]:
        """Publish every version (again and again with ``loop``) until done or ``stop``;
        return what was published of each segment. The segments stay (the broker
        owns them); the replayer is closed."""
        try:
            for _ in self.replayed(stop):
                pass
        finally:
            self.close()
        return self.stats()

    def stats(self) -> dict[str, ReplayStats]:
        return {n: replace(st) for n, st in self._stats.items()}

    def layouts(self) -> dict[str, SegmentLayout]:
        """The recorded layout of each segment replayed."""
        return {n: src.layout for n, src in self._sources.items()}

    def __len__(self) -> int:
        """Versions of one pass."""
        return len(self._order)

    # ------------------------------------------------------------------ closing

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("replayer")

    @property
    def closed(self) -> bool:
        return self._closed

    def _teardown(self) -> None:
        for pub in self._pubs.values():
            pub.close()
        self._pubs = {}
        for rec in self._recordings:
            rec.close()
        self._recordings = []

    def close(self) -> None:
        """Release the writer leases and close the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._teardown()

    def __repr__(self) -> str:
        pace = "max" if self.speed is None else f"speed={self.speed:g}"
        return f"<Replayer {self.namespace}/{','.join(self._sources)} {pace}>"


def replay(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    segments: Sequence[str] | None = None,
    namespace: str | None = None,
    broker: str | None = None,
    speed: float | None = 1.0,
    loop: bool = False,
    stop: threading.Event | None = None,
    timeout: float = 5.0,
) -> dict[str, ReplayStats]:
    """Replay recordings into a namespace and return what was published of each
    segment; see :class:`Replayer` for the arguments and errors."""
    with Replayer(
        paths,
        segments=segments,
        namespace=namespace,
        broker=broker,
        speed=speed,
        loop=loop,
        timeout=timeout,
    ) as rep:
        return rep.run(stop)
