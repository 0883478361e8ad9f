"""The recorder: a subscriber that writes every version it reads to a file.

Two threads. The reading thread (the caller's, in :meth:`Recorder.records` or
:meth:`Recorder.run`) learns of each version, reads exactly that version with
the engine's validated zero-copy read and copies it into a buffer of a bounded
pool inside the read; a copy counts once the read validated. The writing thread
appends the buffers to the file (:mod:`shmcast.broker.recording`), flushes at
least once a second, and gives the buffers back. A slow disk therefore never
stalls the reading: when the pool is empty the version is dropped and counted.

Nothing is lost silently. Per segment, every version from the first one after
the recorder started to the last one it handled is either recorded (written to
the file), counted in ``missed``, or, while recording, queued for the disk
(:meth:`Recorder.queued`). Missed: lapped (it left the ring before it was
copied), torn (the writer overwrote it during the copy), dropped (no free
buffer: the disk was slower than the stream) or unwritten (queued when writing
failed). ``missed`` is stored in the file with the data. Each count only goes
up: a version is counted recorded once it is written, never before (Parquet
buffers a row group's versions; a failed write of them counts them unwritten),
but for a Parquet file whose footer cannot be written at close: it reads back
nothing, and its versions move from recorded to unwritten.

A segment deleted while it is recorded (its publisher gone) is no loss of
versions (the recorder reads what its last incarnation still holds) but the end
of its stream: the recorder logs a warning, once per deletion, and counts it in
``deleted``; the other segments go on being recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from shmcast.broker import Closing, Segment
from shmcast.broker.client import CurveKeyTriple, resolve_namespace, validate_segment_name
from shmcast.broker.errors import (
    ClosedError,
    NotASegmentError,
    RecordingError,
    RecordingExistsError,
    SegmentNotFoundError,
    ShmcastError,
    TornReadError,
    VersionUnavailableError,
)
from shmcast.broker.recording import (
    FORMATS,
    Format,
    RecordingWriter,
    SegmentLayout,
    open_writer,
    output_paths,
    require,
)

from ._subscriber import WAIT_SLICE, Subscriber, WaitMode

__all__ = ["Recorded", "Recorder", "RecorderStats"]

log = logging.getLogger(__name__)

#: Bytes of copies a recorder may hold while the disk catches up (per segment).
BUFFER_BYTES = 64 * 2**20
#: Most items the writing thread appends in one call.
BATCH = 256
#: Bytes of versions handed to the writer in one call, at most (one version at
#: least): a call is all or nothing, so a larger batch is handed over in parts.
APPEND_BYTES = 4 << 20
#: Seconds between the reading thread's looks for segments deleted under it.
ABSENT_LOOK = 0.1
#: Seconds between the writing thread's turns (each writes everything queued),
#: unless the reading thread calls it sooner (half of a pool's buffers queued).
WRITE_INTERVAL = 0.05


@dataclass
class RecorderStats:
    """What a recorder did with the versions of one segment."""

    recorded: int = 0
    """Versions written to the file (once written: Parquet's buffered ones are
    queued until their row group is written)."""
    lapped: int = 0
    torn: int = 0
    dropped: int = 0
    unwritten: int = 0
    deleted: int = 0
    """Times the segment was deleted while recorded (no versions since, until it is
    made again; that ends the recording: see :class:`Recorder`)."""
    recorded_bytes: int = 0
    """Bytes of the versions recorded (``recorded`` times a version's size; the file
    adds its own metadata and compression: :meth:`Recorder.size`)."""
    first_version: int = 0
    last_version: int = 0

    @property
    def missed(self) -> int:
        """Versions of the recorded span that are not in the file."""
        return self.lapped + self.torn + self.dropped + self.unwritten


@dataclass(frozen=True)
class Recorded:
    """One version copied out and handed to the writing thread."""

    segment: str
    version: int
    timestamp_ns: int
    missed: int
    """Versions of this segment missed since the previous one recorded."""


class _Pool:
    """Buffers of one segment: allocated on demand up to a cap, then reused."""

    def __init__(self, dtype: np.dtype[Any], shape: tuple[int, ...], cap: int) -> None:
        self.dtype = dtype
        self.shape = shape
        self.cap = cap
        self.made = 0
        self.free: deque[tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]] = deque()

    def take(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint8]] | None:
        try:
            return self.free.pop()  # deque pops and appends are atomic: no lock
        except IndexError:
            if self.made >= self.cap:
                return None
        self.made += 1
        arr = np.empty(self.shape, dtype=self.dtype)
        return arr, arr.reshape(-1).view(np.uint8)


class Recorder(Closing):
    """Record segments of a namespace to an HDF5 or Parquet file.

    Args:
        segments: a segment name or names; each must exist within ``segment_timeout``.
        output: the file (Parquet and several segments: one file per segment,
            ``<stem>.<segment>.parquet``).
        format: ``"hdf5"`` (default) or ``"parquet"`` (one-dimensional record dtypes).
        namespace: ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``.
        broker: the broker's control endpoint (``events`` mode).
        wait: how the recorder learns of versions, as :class:`Subscriber`'s
            ``wait``. ``futex`` (default) wakes on every commit, needs no broker
            and sees every version from the moment it is ready; ``events`` goes
            through the broker's announcements (and reports to ``shmcast top``),
            but a ZeroMQ subscription takes a moment to start delivering.
            Whatever wakes it, the recorder reads every version still in the ring.
        compression: HDF5 ``"gzip"`` or ``"lzf"``; Parquet ``"gzip"``,
            ``"snappy"`` (its default) or ``"zstd"``; ``None``/``"none"``: none.
        overwrite: replace an existing output file (otherwise refused, untouched).
        flush_interval: seconds between flushes, at most 1: what a reader of the
            growing file sees, and what a killed recorder leaves.
        segment_timeout: seconds to wait for the segments to exist.
        timeout: seconds to wait for the broker's replies.
        buffer_bytes: bytes of copies held per segment while the disk catches up.
        name: how the recorder names itself to the broker (``shmcast top``) and
            the ``recorder`` label of its metrics (:func:`serve_recorder_metrics`).

    Raises:
        SegmentNotFoundError: a segment did not appear (the message names those
            that exist).
        RecordingExistsError: the output exists and ``overwrite`` is false.
        MissingExtraError: h5py / pyarrow is not installed (``shmcast[record]``).
        BrokerUnavailableError: ``events`` mode and no broker answered.
        OutOfDescriptorsError: the process ran out of file descriptors attaching a
            segment or opening the output file (an ``OSError`` of ``EMFILE``, its
            message naming what, the limit and the fix).
    """

    def __init__(
        self,
        segments: str | Sequence[str],
        output: str | os.PathLike[str],
        *,
        format: Format = "hdf5",
        namespace: str | None = None,
        broker: str | None = None,
        wait: WaitMode = "futex",
        compression: str | None = None,
        overwrite: bool = False,
        flush_interval: float = 0.5,
        segment_timeout: float = 2.0,
        timeout: float = 5.0,
        buffer_bytes: int = BUFFER_BYTES,
        curve: CurveKeyTriple | None = None,
        name: str = "recorder",
    ) -> None:
        self._closed = True
        self._final_size = 0
        self._sub: Subscriber | None = None
        self._writer: RecordingWriter | None = None
        self._thread: threading.Thread | None = None
        names = [segments] if isinstance(segments, str) else list(segments)
        if not names:
            raise ValueError("record at least one segment")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        if not 0 < flush_interval <= 1.0:
            raise ValueError(f"flush_interval must be in (0, 1] seconds, not {flush_interval!r}")
        self.names = [validate_segment_name(n) for n in dict.fromkeys(names)]
        self.name = name
        self.namespace = resolve_namespace(namespace)
        self.output = os.fspath(output)
        self.format: Format = format
        self.flush_interval = flush_interval
        # A missing extra fails first, before any broker or file is touched.
        require("h5py" if format == "hdf5" else "pyarrow.parquet", f"recording to {format}")
        if not overwrite:  # fail before connecting; open_writer checks again, atomically
            for path in output_paths(self.output, self.names, format).values():
                if os.path.lexists(path):
                    raise RecordingExistsError(path)
        try:
            self._sub = Subscriber(
                self.names,
                namespace=self.namespace,
                broker=broker,
                wait=wait,
                timeout=timeout if wait == "events" else segment_timeout,
                curve=curve,
                name=name,
            )
            self._segs = self._attach(segment_timeout)
        except SegmentNotFoundError as exc:  # futex/spin: the Subscriber waited for it
            self._teardown()
            raise SegmentNotFoundError(
                exc.segment, self.namespace, existing=Segment.list(self.namespace)
            ) from None
        except BaseException:
            self._teardown()
            raise
        try:
            layouts = [
                SegmentLayout(n, s.dtype, s.shape, self.namespace, s.slots)
                for n, s in self._segs.items()
            ]
            self._writer = open_writer(
                self.output, layouts, format=format, compression=compression, overwrite=overwrite
            )
        except BaseException:
            self._teardown()
            raise
        self.paths: dict[str, str] = dict(self._writer.paths)
        self._stats = {n: RecorderStats() for n in self.names}
        # Where recording starts: versions committed before now are not ours to count.
        self._last = {n: s.version for n, s in self._segs.items()}
        # The incarnation recorded, kept here: the subscriber closes the handle of an
        # incarnation once its queued versions are read, and a closed handle has none.
        self._incarnations = {n: s.incarnation for n, s in self._segs.items()}
        self._layouts = {lay.name: lay for lay in layouts}
        self._nbytes = {lay.name: lay.nbytes for lay in layouts}
        self._pools = {
            n: _Pool(s.dtype, s.shape, max(2, min(1 << 16, buffer_bytes // max(1, s.nbytes))))
            for n, s in self._segs.items()
        }
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._failed = threading.Event()
        #: Set under _put_lock when nothing more may be queued nor counted: the writer
        #: failed, or close() is about to have it write what is queued the last time.
        self._ended = False
        #: Of the writer's written and dropped versions, those counted already (_count).
        self._written_seen = dict.fromkeys(self.names, 0)
        self._dropped_seen = dict.fromkeys(self.names, 0)
        #: Held to queue a version, and to stop queueing on a failure (see _fail).
        self._put_lock = threading.Lock()
        self._stop = threading.Event()  # set: write what is queued, then stop
        self._kick = threading.Event()  # set: a turn now (a pool is half queued, or stop)
        # The thread holds the recorder only during its turns: one forgotten while
        # open can then be collected, and is closed (Closing: a ResourceWarning).
        self._thread = threading.Thread(
            target=_write_thread,
            args=(weakref.ref(self), self._writer, self._kick),
            name="shmcast-recorder",
            daemon=True,
        )
        self._next_flush = time.monotonic() + flush_interval
        #: When the writing thread last flushed the file (its start until it first does).
        self._flushed_at = time.monotonic()
        #: Segments seen deleted (warned about once), until attached again.
        self._gone: set[str] = set()
        #: Segments whose last deletion is counted in ``deleted`` (see _new_incarnation).
        self._counted: set[str] = set()
        self._next_look = 0.0
        self._closed = False
        self._thread.start()

    # ------------------------------------------------------------------ set-up

    def _attach(self, timeout: float) -> dict[str, Segment]:
        sub = self._sub
        assert sub is not None
        deadline = time.monotonic() + timeout
        segs: dict[str, Segment] = {}
        for name in self.names:
            while name not in segs:
                try:
                    segs[name] = sub.segment(name)
                except (SegmentNotFoundError, NotASegmentError):
                    if time.monotonic() >= deadline:
                        raise SegmentNotFoundError(
                            name, self.namespace, existing=Segment.list(self.namespace)
                        ) from None
                    time.sleep(0.02)
        return segs

    # ------------------------------------------------------------------ reading

    def records(
        self,
        *,
        count: int = 0,
        duration: float | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Recorded]:
        """Record, yielding each version as it is copied out, until ``count``
        versions (all segments together; 0: no limit), ``duration`` seconds,
        ``stop`` is set, or the recorder is closed.

        Raises:
            RecordingSpaceError: the disk filled up; the file keeps what was written.
            RecordingError: writing failed otherwise.
        """
        self._check_open()
        sub = self._sub
        assert sub is not None
        deadline = None if duration is None else time.monotonic() + duration
        n = 0
        while not self._should_stop(stop, deadline):
            step = WAIT_SLICE
            if deadline is not None:
                step = max(0.0, min(step, deadline - time.monotonic()))
            updates = sub.updates(timeout=step)
            try:
                self._look_absent(sub)
                for up in updates:
                    for rec in self._take(up.segment, up.version, up.incarnation):
                        yield rec
                        n += 1
                        if count and n >= count:
                            return
                    if self._should_stop(stop, deadline):
                        break
                    if time.monotonic() >= self._next_look:  # a stream of others' versions
                        self._look_absent(sub)
            except ClosedError:
                if self._closed:
                    return
                raise
            finally:
                close = getattr(updates, "close", None)  # a generator: end its wait now
                if close is not None:
                    close()
        if self._failure is not None:
            raise self._failure

    def run(
        self,
        *,
        count: int = 0,
        duration: float | None = None,
        stop: threading.Event | None = None,
    ) -> dict[str, RecorderStats]:
        """Record until ``count``, ``duration`` or ``stop`` (see :meth:`records`),
        close the file, and return what happened to each segment's versions."""
        try:
            for _ in self.records(count=count, duration=duration, stop=stop):
                pass
        finally:
            self.close()
        return self.stats()

    def _look_absent(self, sub: Subscriber) -> None:
        """Warn once, and count, per deletion of a recorded segment: a recorder whose
        publisher went away otherwise waits on, recording nothing, with no sign."""
        self._next_look = time.monotonic() + ABSENT_LOOK
        absent = sub.absent()
        if not absent and not self._gone:
            return
        for name in absent:
            if name in self._gone:
                continue
            self._gone.add(name)
            self._counted.add(name)
            st = self._stats[name]
            st.deleted += 1
            log.warning(
                "segment %r of namespace %r was deleted: nothing more to record from "
                "it; waiting for it to be made again (a recording holds one "
                "incarnation: a new one ends the recording, saying so)",
                name, self.namespace,
            )  # fmt: skip
        self._gone.intersection_update(absent)

    def _should_stop(self, stop: threading.Event | None, deadline: float | None) -> bool:
        if self._closed or self._failed.is_set():
            return True
        if stop is not None and stop.is_set():
            return True
        return deadline is not None and time.monotonic() >= deadline

    def _take(self, name: str, upto: int, incarnation: int = 0) -> Iterator[Recorded]:
        """Copy out every version of ``name`` after the last one handled, up to ``upto``
        or the latest committed, whichever is newer."""
        if incarnation and incarnation != self._incarnations[name]:
            # Before the version test: a new incarnation starts again at version 1.
            self._new_incarnation(name)
        last = self._last[name]
        if upto <= last:
            return
        seg = self._segs[name]
        st = self._stats[name]
        pool = self._pools[name]
        latest = seg.version
        # Up to the header's latest, not just the version announced: a recorder that
        # learns late reads what is in the ring now rather than after its own news.
        upto = max(upto, latest)
        # Versions older than the ring's oldest are gone for sure: no need to try them.
        first = max(last + 1, latest - seg.slots + 1)
        # Versions missed, by cause, counted in the stats under the lock with the next
        # version queued (or at the end): once the recording ended (closed, or the
        # writer failed) they are past its end, neither in the file nor missed.
        lapped = first - last - 1
        torn = dropped = 0
        missed = lapped
        put = self._queue.put
        kick = self._kick
        busy = max(1, pool.cap // 2)
        for v in range(first, upto + 1):
            buf = pool.take()
            if buf is None:
                dropped += 1
                missed += 1
                continue
            try:
                with seg.read(v) as snap:
                    # Raw bytes: numpy's copy of record dtypes is ~20x slower than memcpy.
                    np.copyto(buf[1], snap.array.reshape(-1).view(np.uint8))
                    ts = snap.timestamp_ns
            except VersionUnavailableError:
                pool.free.append(buf)
                lapped += 1
                missed += 1
                continue
            except TornReadError:
                pool.free.append(buf)
                torn += 1
                missed += 1
                continue
            with self._put_lock:
                if self._ended:
                    # The writer stopped, or is writing what was queued for the last
                    # time (the recorder is closed): this version is past the
                    # recording's end, neither in it nor missed.
                    pool.free.append(buf)
                    return
                st.lapped += lapped
                st.torn += torn
                st.dropped += dropped
                lapped = torn = dropped = 0
                self._last[name] = v
                if not st.first_version:
                    st.first_version = v
                st.last_version = v
                put((name, v, ts, buf))
            # Half the pool waits for the disk: call the writing thread now rather
            # than at its next interval, or a stream faster than the pool refills
            # between turns is dropped while the disk idles.
            if pool.made - len(pool.free) >= busy and not kick.is_set():
                kick.set()
            yield Recorded(name, v, ts, missed)
            missed = 0
        with self._put_lock:
            if self._ended:
                return
            st.lapped += lapped
            st.torn += torn
            st.dropped += dropped
            self._last[name] = upto

    def _new_incarnation(self, name: str) -> NoReturn:
        """The segment was deleted and created again: its versions start over at 1,
        while a recording's only go forward (replay publishes them in order). Every
        version after this would be lost or misfiled: the recording stops, saying so."""
        sub = self._sub
        assert sub is not None
        if name not in self._counted:  # deleted and made again between two looks
            self._stats[name].deleted += 1
        old = self._layouts[name]
        layout = ""
        with contextlib.suppress(ShmcastError):  # gone again: say what is known
            seg = sub.segment(name)
            if seg.dtype != old.dtype or seg.shape != old.shape:
                layout = (
                    f" with another layout (dtype={seg.dtype} shape={seg.shape}, recording "
                    f"dtype={old.dtype} shape={old.shape})"
                )
        raise RecordingError(
            self.output,
            f"segment {name!r} was deleted and created again{layout}: a recording holds "
            f"one incarnation of each segment, and the new one's versions start over at 1; "
            f"the recording stops here (record again to follow the new incarnation)",
        )

    # ------------------------------------------------------------------ writing

    def _write_turn(self, writer: RecordingWriter) -> bool:
        """One turn of the writing thread (see :func:`_write_thread`): take everything
        queued and write it, flushing when due; on the last turn (close) or a failure,
        close the file. True once the file is closed."""
        # Wake at intervals and take everything queued: few, large appends keep this
        # thread's turns at the GIL short and rare, so the reading thread gets it back
        # at once when a version arrives. Sooner when called: a kick during this turn
        # makes the next one start at once.
        q = self._queue
        done = True
        try:
            self._kick.clear()
            stopping = self._stop.is_set()  # set before its kick: seen by this turn
            batch: list[tuple[str, int, int, Any]] = []
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
                if len(batch) >= BATCH:
                    self._append(writer, batch)
                    batch = []
            self._append(writer, batch)
            if stopping or time.monotonic() >= self._next_flush:
                for name, st in self._stats.items():
                    writer.set_missed(name, st.missed)
                try:
                    writer.flush()  # Parquet: may write a row group, or drop it
                finally:
                    self._count(writer)
                self._flushed_at = time.monotonic()
                self._next_flush = self._flushed_at + self.flush_interval
            done = stopping
        except BaseException as exc:
            self._fail(exc)
        if done:
            try:
                self._count(writer)
                for name, st in self._stats.items():
                    writer.set_missed(name, st.missed)
                writer.close()
            except BaseException as exc:
                self._fail(exc)
            # Written or dropped by the close itself: the file's missed count has the
            # dropped ones already.
            self._count(writer)
        return done

    def _count(self, writer: RecordingWriter) -> None:
        """Count what the writer wrote since the last call as recorded, and what it
        lost (Parquet's buffered rows, when a write fails) as unwritten. Counted when
        written, not when handed over: a version counted recorded and then lost took
        ``recorded`` down, which Prometheus reads as a counter reset."""
        for name, st in self._stats.items():
            new = writer.written[name] - self._written_seen[name]
            if new:
                self._written_seen[name] += new
                st.recorded += new
                st.recorded_bytes += new * self._nbytes[name]
            new = writer.dropped[name] - self._dropped_seen[name]
            if new:
                self._dropped_seen[name] += new
                st.unwritten += new

    def _append(self, writer: RecordingWriter, batch: list[tuple[str, int, int, Any]]) -> None:
        if not batch:
            return
        by_seg: dict[str, list[tuple[str, int, int, Any]]] = {}
        for item in batch:
            by_seg.setdefault(item[0], []).append(item)
        groups = list(by_seg.items())
        for k, (name, items) in enumerate(groups):
            # A call of the writer is all or nothing (but for what a Parquet writer
            # takes before a text it cannot hold): a backlog is handed over in
            # parts, so that on a disk with less room than it, what fits is kept.
            step = max(1, APPEND_BYTES // max(1, items[0][3][0].nbytes))
            done = 0
            try:
                while done < len(items):
                    part = items[done : done + step]
                    before = writer.counts[name]
                    try:
                        writer.append(
                            name,
                            [it[3][0] for it in part],
                            [it[1] for it in part],
                            [it[2] for it in part],
                        )
                    except BaseException:
                        # Those before a refused one are the writer's: written, or
                        # buffered (then written or dropped, and counted, later).
                        done += writer.counts[name] - before
                        raise
                    finally:
                        self._count(writer)
                    done += len(part)
            except BaseException:
                # The rest of this segment's versions, and those of the segments after
                # it in the batch: taken from the queue, they will never be written.
                self._stats[name].unwritten += len(items) - done
                for other, rest in groups[k + 1 :]:
                    self._stats[other].unwritten += len(rest)
                    self._pools[other].free.extend(it[3] for it in rest)
                raise
            finally:
                free = self._pools[name].free
                for it in items:
                    free.append(it[3])

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            log.error("recording to %s failed: %s", self.output, exc)
            if not isinstance(exc, ShmcastError):
                wrapped = RecordingError(self.output, f"writing {self.output} failed: {exc}")
                wrapped.__cause__ = exc
                exc = wrapped
            self._failure = exc
        # What is still queued will never be written: count it. Under the lock the
        # reading thread queues under, so that nothing is queued after the count.
        with self._put_lock:
            self._failed.set()
            self._ended = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                self._stats[item[0]].unwritten += 1

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, RecorderStats]:
        """A snapshot of each segment's counters."""
        return {n: replace(st) for n, st in self._stats.items()}

    def queued(self) -> dict[str, int]:
        """Versions of each segment copied out and not written yet: the disk's backlog
        (a pool full of them drops the next versions, counted ``dropped``), and the
        versions a Parquet writer buffers for its next row group."""
        writer = self._writer
        return {
            n: pool.made - len(pool.free) + (writer.buffered(n) if writer is not None else 0)
            for n, pool in self._pools.items()
        }

    def flush_age(self, now: float | None = None) -> float:
        """Seconds since the file was last flushed (since the start, before the first
        flush): what a reader of the growing file lacks, and a crash would lose. It
        grows past ``flush_interval`` while the disk stalls, and for ever once
        writing stopped (closed, or failed: :attr:`failure`)."""
        return (time.monotonic() if now is None else now) - self._flushed_at

    @property
    def failure(self) -> BaseException | None:
        """Why writing stopped early (a full disk, say), or None."""
        return self._failure

    def size(self) -> int:
        """Bytes of the recording's files on disk."""
        return self._writer.size() if self._writer is not None else self._final_size

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"recorder of {self.output}")

    @property
    def closed(self) -> bool:
        return self._closed

    def _teardown(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self._thread is None and self._writer is not None:
            self._writer.close()
        self._writer = None

    def close(self) -> None:
        """Stop reading, write what was copied, flush and close the file. Idempotent.

        A failure of the last writes is kept in :attr:`failure`, not raised.
        """
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            # A reading thread still in records() (close() called from another thread)
            # queues nothing after the writer's last turn, nor counts: it would be lost.
            with self._put_lock:
                self._ended = True
            self._stop.set()
            self._kick.set()
            if thread is threading.current_thread():
                # Collected in its own writing thread (which let go of it last, after
                # a turn): the last turn is taken here.
                last = self._writer
                if last is not None and not last.closed:
                    self._write_turn(last)
            elif not sys.is_finalizing():  # at exit, daemon threads are stopped: no wait
                thread.join()
            self._thread = None
        writer = self._writer
        self._writer = None
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if writer is not None:
            self._final_size = writer.size()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "recording"
        return f"<Recorder {self.namespace}/{','.join(self.names)} -> {self.output} {state}>"


def _write_thread(
    ref: weakref.ref[Recorder], writer: RecordingWriter, kick: threading.Event
) -> None:
    """The recorder's writing thread: a turn at least every :data:`WRITE_INTERVAL`
    seconds (sooner when kicked), until the file is closed. It holds the recorder
    only during a turn: a thread holding it for ever kept a recorder forgotten while
    open from ever being collected (its thread, file and segments held until the
    process ended, with no warning)."""
    while True:
        kick.wait(WRITE_INTERVAL)
        rec = ref()
        if rec is None:  # collected, and closed by its __del__ (the file with it)
            with contextlib.suppress(Exception):
                writer.close()
            return
        if writer.closed or rec._write_turn(writer):
            return
        del rec
