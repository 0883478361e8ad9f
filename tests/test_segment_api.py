"""The public surface of the segment engine (issue 2, part 1), in one process."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from shmcast.broker import (
    ArrayMismatchError,
    ClosedError,
    InvalidNameError,
    LayoutError,
    NoVersionError,
    ReadOnlyError,
    Segment,
    SegmentError,
    SegmentExistsError,
    SegmentNotFoundError,
    Snapshot,
    TornReadError,
    VersionUnavailableError,
)
from shmcast.broker._layout import slot_ctl_index
from shmcast.broker._segment import COPY_UNLOCKED
from shmcast.broker.client import resolve_namespace, shm_path

# The engine's tests run on both cores of the seqlock (conftest.each_core).
pytestmark = pytest.mark.usefixtures("each_core")


@pytest.fixture
def made(namespace: str) -> Iterator[list[Segment]]:
    """Segments a test creates or attaches; all closed and unlinked afterwards."""
    segs: list[Segment] = []
    try:
        yield segs
    finally:
        for seg in segs:
            seg.close()
        for seg in segs:
            seg.unlink()


def _create(made: list[Segment], name: str = "s", dtype: str = "<f8", shape=(8,), **kw) -> Segment:
    seg = Segment.create(name, dtype, shape, **kw)
    made.append(seg)
    return seg


def _attach(made: list[Segment], name: str = "s", **kw) -> Segment:
    seg = Segment.attach(name, **kw)
    made.append(seg)
    return seg


def _filled(value: float, shape=(8,), dtype: str = "<f8") -> np.ndarray:
    return np.full(shape, value, dtype=dtype)


# ------------------------------------------------------------------- create and attach


def test_create_fails_if_the_name_exists_and_leaves_it_alone(made, namespace):
    seg = _create(made)
    seg.write(_filled(7))
    with pytest.raises(SegmentExistsError) as info:
        Segment.create("s", "<i4", (3,), namespace=namespace)
    assert "'s'" in str(info.value)
    assert namespace in str(info.value)
    reader = _attach(made)
    assert reader.dtype == np.dtype("<f8")
    assert reader.shape == (8,)
    assert reader.latest().array.tolist() == [7.0] * 8


def test_attach_missing_segment(namespace):
    with pytest.raises(SegmentNotFoundError) as info:
        Segment.attach("nothing-here")
    assert "nothing-here" in str(info.value)
    assert namespace in str(info.value)


def test_attach_is_read_only_by_default(made):
    _create(made)
    reader = _attach(made)
    assert not reader.writable
    with pytest.raises(ReadOnlyError):
        reader.write(_filled(1))
    with pytest.raises(ReadOnlyError), reader.loan():
        pass
    assert reader.version == 0


def test_write_returns_consecutive_versions_starting_at_one(made):
    seg = _create(made)
    reader = _attach(made)
    assert seg.version == 0
    assert reader.version == 0
    for expected in range(1, 6):
        assert seg.write(_filled(expected)) == expected
        assert seg.version == expected
        assert reader.version == expected


def test_read_yields_a_zero_copy_read_only_snapshot(made):
    seg = _create(made)
    reader = _attach(made)
    before = time.time_ns()
    seg.write(_filled(1))
    after = time.time_ns()
    with reader.read() as snap:
        assert isinstance(snap, Snapshot)
        assert snap.version == 1
        assert before <= snap.timestamp_ns <= after
        assert snap.array.dtype == np.dtype("<f8")
        assert snap.array.shape == (8,)
        assert snap.array.tolist() == [1.0] * 8
        assert not snap.array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            snap.array[0] = 99.0
        with pytest.raises(ValueError, match="WRITEABLE"):
            snap.array.flags.writeable = True
        held = snap.array
    # Zero-copy: the array is the shared slot itself, so once the writer comes
    # round to that slot again (version 3 with two slots) the held view shows it.
    seg.write(_filled(2))
    seg.write(_filled(3))
    assert held.tolist() == [3.0] * 8


def test_reshaping_an_array_handed_out_changes_no_other_read_or_loan(made):
    """Setting ``shape`` or ``dtype`` in place is a common way to reinterpret an
    array: it may change that array only. (The same array object was handed out for
    every read of a slot, and every loan of it: a float64 segment then read back as
    int64 garbage, and a later ``write`` went through the reshaped loan.)"""
    seg = _create(made, shape=(4,))
    reader = _attach(made)
    seg.write(np.arange(4.0))
    with reader.read() as snap:
        snap.array.shape = (2, 2)
    with reader.read() as snap:
        snap.array.dtype = np.dtype("<i8")
    with seg.loan() as arr:
        arr.dtype = np.dtype("<i8")
        arr.shape = (2, 2)
        arr[...] = 0
    for v in (1, 2, 3, 4):  # both slots, both ways in
        if v % 2:
            seg.write(np.full(4, 1.5 * v))
        else:
            with seg.loan() as arr:
                arr[:] = 1.5 * v
        with reader.read() as snap:
            assert (snap.array.dtype, snap.array.shape) == (np.dtype("<f8"), (4,))
            assert snap.array.tolist() == [1.5 * v] * 4
        assert reader.view(0).shape == (4,)


def _read_while_writing(reader: Segment, seg: Segment, versions: list[int]) -> Snapshot:
    with reader.read() as snap:
        for v in versions:
            seg.write(_filled(v))
    return snap


def test_read_detects_the_writer_overwriting_the_slot(made):
    seg = _create(made)
    reader = _attach(made)
    seg.write(_filled(1))
    # Version 2 goes to the other slot; version 3 to the slot being read: torn.
    with pytest.raises(TornReadError) as info:
        _read_while_writing(reader, seg, [2, 3])
    assert info.value.version == 1
    assert reader.torn_reads == 1
    assert _read_while_writing(reader, seg, [4]).version == 3  # one slot away: whole
    assert reader.torn_reads == 1


def test_writer_reads_its_own_segment_read_only(made):
    seg = _create(made)
    seg.write(_filled(5))
    with seg.read() as snap:
        assert snap.array.tolist() == [5.0] * 8
        assert not snap.array.flags.writeable


# ------------------------------------------------------------------------ mismatches


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(8, dtype="<f4"),
        np.zeros(8, dtype=">f8"),
        np.zeros(8, dtype="<i8"),
        np.zeros(9, dtype="<f8"),
        np.zeros((2, 4), dtype="<f8"),
        np.zeros((), dtype="<f8"),
        [0.0] * 8,
        np.ma.masked_array(np.zeros(8, "<f8"), mask=[True] * 8),  # was an AttributeError
    ],
    ids=["f4", "big-endian", "i8", "len9", "2x4", "0d", "list", "masked"],
)
def test_mismatched_array_publishes_nothing(made, bad):
    seg = _create(made)
    reader = _attach(made)
    seg.write(_filled(1))
    seg.write(_filled(2))
    with pytest.raises(ArrayMismatchError) as info:
        seg.write(bad)
    assert "nothing was published" in str(info.value)
    assert seg.version == 2
    assert reader.version == 2
    for v in (1, 2):  # neither slot was touched
        with reader.read(v) as snap:
            assert snap.array.tolist() == [float(v)] * 8
    assert seg.write(_filled(3)) == 3


def test_non_contiguous_and_structured_arrays_round_trip(made):
    seg = _create(made, shape=(4, 3))
    src = np.arange(24, dtype="<f8").reshape(4, 6)[:, ::2]
    assert not src.flags.c_contiguous
    seg.write(src)
    assert np.array_equal(_attach(made).latest().array, src)

    tick = np.dtype([("t", "<i8"), ("px", "<f8", (2,)), ("sym", "S4")])
    rec = _create(made, "ticks", tick, (3,))
    data = np.zeros(3, tick)
    data["t"] = [1, 2, 3]
    data["px"] = [[1.5, 2.5], [3.5, 4.5], [5.5, 6.5]]
    data["sym"] = [b"AAPL", b"MSFT", b"X"]
    rec.write(data)
    got = _attach(made, "ticks").latest().array
    assert got.dtype == tick
    assert got.tobytes() == data.tobytes()


# ---------------------------------------------------------------------------- loans


def test_loan_commits_on_normal_exit(made):
    seg = _create(made)
    reader = _attach(made)
    with seg.loan() as arr:
        assert arr.shape == (8,)
        assert arr.dtype == np.dtype("<f8")
        arr[:] = np.arange(8)
        assert seg.version == 0  # nothing visible before the block ends
        with pytest.raises(NoVersionError):
            reader.latest()
    assert seg.version == 1
    assert reader.latest().array.tolist() == list(map(float, range(8)))


@pytest.mark.parametrize("fails", [False, True], ids=["commits", "raises"])
def test_a_loans_array_is_read_only_after_its_block(made, fails):
    """Before, it stayed writable: a write after the block changed the committed
    version under readers, who validated it."""
    seg = _create(made)
    reader = _attach(made)
    with contextlib.suppress(RuntimeError), seg.loan() as arr:
        arr[:] = 1.0
        if fails:
            raise RuntimeError("feed broke")
    with pytest.raises(ValueError, match="read-only"):
        arr[:] = 999.0
    assert reader.version == (0 if fails else 1)
    if not fails:
        assert reader.latest().array.tolist() == [1.0] * 8
    with seg.loan() as again:  # the slot's next loan is writable as ever
        again[:] = 2.0
    assert reader.latest().array.tolist() == [2.0] * 8


def _broken_loan(seg: Segment) -> None:
    with seg.loan() as arr:
        arr[:4] = 3.0  # half of the next version lands in the slot of version 1
        raise RuntimeError("feed broke")


def test_loan_that_raises_publishes_nothing(made):
    seg = _create(made)
    reader = _attach(made)
    seg.write(_filled(1))
    seg.write(_filled(2))
    with pytest.raises(RuntimeError, match="feed broke"):
        _broken_loan(seg)
    assert seg.version == 2
    assert reader.version == 2
    snap = reader.latest()
    assert (snap.version, snap.array.tolist()) == (2, [2.0] * 8)
    # The slot's old bytes are half overwritten: version 1 must not be served.
    with pytest.raises(VersionUnavailableError), reader.read(1):
        pass
    assert seg.write(_filled(3)) == 3
    with reader.read(3) as s3:
        assert s3.array.tolist() == [3.0] * 8


def test_loans_do_not_nest_and_write_is_refused_inside_one(made):
    seg = _create(made)
    with seg.loan() as arr:
        arr[:] = 1.0
        with pytest.raises(LayoutError), seg.loan():
            pass
        with pytest.raises(LayoutError):
            seg.write(_filled(9))
    assert seg.version == 1
    assert seg.latest().array.tolist() == [1.0] * 8


def test_threads_writing_through_one_handle_take_turns(made):
    """From begin to commit one write at a time per handle: a second thread's write
    waits for the first one's copy (which runs without the GIL). Before, both took
    the same slot and version number, and readers validated a mix of the two."""
    n = COPY_UNLOCKED // 8  # a copy without the GIL
    seg = _create(made, dtype="<i8", shape=(n,))
    reader = _attach(made)
    real = seg._ring
    versions: list[int] = []
    other = threading.Thread(target=lambda: versions.append(seg.write(np.full(n, 2, "<i8"))))

    class MidCopy:
        """The ring, with the first copy paused while the other thread writes."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def copy_in(self, *args: Any) -> None:
            if not other.is_alive() and not versions:
                other.start()
                other.join(timeout=0.3)  # it cannot commit meanwhile: 0.3 s is all it gets
            real.copy_in(*args)

    seg._ring = MidCopy()  # type: ignore[assignment]
    versions.append(seg.write(np.full(n, 1, "<i8")))
    other.join(timeout=10)
    assert sorted(versions) == [1, 2]
    snap = reader.latest()
    assert snap.version == 2
    assert (snap.array == 2).all()


def _close_inside_a_loan(seg: Segment, namespace: str) -> None:
    with seg.loan() as arr:
        arr[:] = 5
        seg.close()
        with Segment.attach("s", namespace=namespace, writable=True) as heir:
            assert heir.write(np.full(4, 2, "<i8")) == 2  # the same slot as the loan's
        with pytest.raises(ValueError, match="read-only"):
            arr[:] = 7


def test_closing_during_a_loan_aborts_it(made, namespace):
    """close() in the loan's block aborts it: its exit raises ClosedError, its array
    is read-only, and a writer that took the lease meanwhile is never overwritten."""
    seg = _create(made, dtype="<i8", shape=(4,))
    reader = _attach(made)
    seg.write(np.full(4, 1, "<i8"))
    # Before: "segment 's': closed during loan() is closed".
    said = (
        r"^segment 's' \(closed during loan\(\): the loan was aborted, nothing published\) "
        r"is closed$"
    )
    with pytest.raises(ClosedError, match=said):
        _close_inside_a_loan(seg, namespace)
    snap = reader.latest()
    assert (snap.version, snap.array.tolist()) == (2, [2] * 4)


def _close_from_another_thread_inside_a_loan(seg: Segment) -> None:
    closer = threading.Thread(target=seg.close)
    with seg.loan() as arr:
        arr[:] = 5.0
        closer.start()
        closer.join(timeout=10)
        assert not closer.is_alive()  # it did not wait for the block


def test_closing_from_another_thread_during_a_loan_aborts_it(made):
    seg = _create(made)
    reader = _attach(made)
    with pytest.raises(ClosedError):
        _close_from_another_thread_inside_a_loan(seg)
    assert seg.closed
    assert reader.version == 0
    with pytest.raises(NoVersionError):
        reader.latest()


def test_a_loan_abandoned_and_finalised_in_another_thread_lets_others_write(made):
    """A loan opened in one thread, abandoned, and its generator finalised in
    another (a reference cycle the GC collects there): it is aborted, and other
    threads write on. Before, its exit released the handle's RLock from a thread
    that did not own it: RuntimeError, the lock stayed held, and every other
    thread's write (and close()) waited for ever."""
    seg = _create(made)
    reader = _attach(made)
    loans: list[Any] = []
    opened, done = threading.Event(), threading.Event()

    def opener() -> None:
        cm = seg.loan()
        cm.__enter__()[:] = 1.0
        loans.append(cm)  # never exited
        del cm
        opened.set()
        done.wait(10)  # alive meanwhile: no other thread takes its ident
        # Without the fix the lock is still this thread's: release it, so that the
        # test fails instead of hanging in close().
        with contextlib.suppress(RuntimeError):
            seg._wlock.release()

    first = threading.Thread(target=opener)
    first.start()
    try:
        assert opened.wait(10)
        loans.clear()  # the generator is finalised here, in this thread
        versions: list[int] = []
        other = threading.Thread(target=lambda: versions.append(seg.write(_filled(2))))
        other.start()
        other.join(timeout=5)
        assert versions == [1]  # the abandoned loan published nothing
    finally:
        done.set()
        first.join(timeout=10)
    assert reader.latest().array.tolist() == [2.0] * 8
    assert _odd_slots(reader) == []


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """TimeoutError in this (the main) thread after ``seconds``: a hang fails the test."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _CloseWhenLocked:
    """The handle's write lock; close() runs as the next write takes it, as a signal
    handler's would between the lock and the record of its holder."""

    def __init__(self, seg: Segment) -> None:
        self._seg, self._real, self._armed = seg, seg._wlock, True

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._real.acquire(blocking, timeout)
        if self._armed:
            self._armed = False
            self._seg.close()
        return got

    def release(self) -> None:
        self._real.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _CloseWhenBegun:
    """The handle's ring; close() runs as begin() returns (the slot now odd), as a
    signal handler's would."""

    def __init__(self, seg: Segment) -> None:
        self._seg, self._real = seg, seg._ring

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def begin(self, version: int) -> Any:
        got = self._real.begin(version)
        self._seg.close()
        return got


def _odd_slots(handle: Segment) -> list[int]:
    q = handle._header()
    return [i for i in range(handle.slots) if q[slot_ctl_index(i)] & 1]


def _write_2(seg: Segment, how: str, when: str) -> None:
    if how == "write":
        seg.write(_filled(2))
    elif how == "write_bytes":
        data = _filled(2).tobytes()  # bytes: the core's one-call path; a view: the general one
        seg.write_bytes(data if when == "locked" else memoryview(data))
    else:
        with seg.loan() as arr:
            arr[:] = 2


@pytest.mark.parametrize("when", ["locked", "begun"])
@pytest.mark.parametrize("how", ["write", "write_bytes", "loan"])
def test_a_signal_handlers_close_during_a_write_ends_it_with_closed_error(
    made, namespace, how, when
):
    """close() from a signal handler that interrupts this thread's write: it returns
    at once (it waited for ever on the lock its own thread held), the write raises
    ClosedError (IndexError before, from the views close() took down), nothing is
    committed and no slot is left half-written."""
    seg = _create(made)
    reader = _attach(made)
    seg.write(_filled(1))
    if when == "locked":
        seg._wlock = _CloseWhenLocked(seg)  # type: ignore[assignment]
    else:
        seg._ring = _CloseWhenBegun(seg)  # type: ignore[assignment]
    with _deadline(5), pytest.raises(ClosedError):
        _write_2(seg, how, when)
    assert seg.closed
    assert reader.version == 1
    assert reader.latest().array.tolist() == [1.0] * 8
    assert _odd_slots(reader) == []
    with Segment.attach("s", namespace=namespace, writable=True) as heir:
        assert heir.write(_filled(3)) == 2  # the lease was released


# ------------------------------------------------------------------ versions in the ring


def test_older_versions_are_readable_while_in_the_ring(made):
    seg = _create(made, slots=3)
    reader = _attach(made)
    for v in (1, 2, 3):
        seg.write(_filled(v))
    for v in (1, 2, 3):
        with reader.read(v) as snap:
            assert snap.version == v
            assert snap.array.tolist() == [float(v)] * 8
    seg.write(_filled(4))  # takes the slot of version 1
    with pytest.raises(VersionUnavailableError) as info, reader.read(1):
        pass
    assert (info.value.version, info.value.latest) == (1, 4)
    for v in (2, 3, 4):
        with reader.read(v) as snap:
            assert snap.array.tolist() == [float(v)] * 8


def test_acquire_timed_is_acquire_and_the_commit_time_in_one_look(made):
    seg = _create(made, slots=3)
    reader = _attach(made)
    with pytest.raises(NoVersionError):
        reader.acquire_timed()
    before = time.monotonic_ns()
    for v in (1, 2, 3, 4):
        seg.write(_filled(v))
    after = time.monotonic_ns()
    for version in (None, 3, 4):
        v, i, s, ts, mono = reader.acquire_timed(version)
        assert (v, i, s, ts) == reader.acquire(version)
        assert mono == reader.monotonic_ns(i)
        assert before <= mono <= after
        assert reader.view(i)[0] == float(v)
        assert reader.validate(i, s)
    with pytest.raises(VersionUnavailableError):
        reader.acquire_timed(1)  # lapped


@pytest.mark.parametrize("version", [0, -1, 3, 100])
def test_versions_never_published_are_unavailable(made, version):
    seg = _create(made)
    seg.write(_filled(1))
    seg.write(_filled(2))
    with pytest.raises(VersionUnavailableError), _attach(made).read(version):
        pass


def test_no_version_yet(made):
    seg = _create(made)
    reader = _attach(made)
    for handle in (seg, reader):
        with pytest.raises(NoVersionError), handle.read():
            pass
        with pytest.raises(NoVersionError), handle.read(1):
            pass
        with pytest.raises(NoVersionError):
            handle.latest()


def test_latest_is_a_validated_private_copy(made):
    seg = _create(made)
    reader = _attach(made)
    seg.write(_filled(1))
    seg.write(_filled(2))
    snap = reader.latest()
    assert snap.version == 2
    assert snap.array.tolist() == [2.0] * 8
    assert snap.array.flags.owndata
    assert snap.timestamp_ns == reader.info().timestamp_ns
    for v in (3, 4, 5):  # the writer laps every slot: the copy does not change
        seg.write(_filled(v))
    assert snap.array.tolist() == [2.0] * 8
    assert reader.latest().version == 5


# ------------------------------------------------------------------ raw bytes in and out

TICK = np.dtype([("t", "<i8"), ("px", "<f8", (2,)), ("sym", "S4")])


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        ("<f8", (8,)),
        (TICK, (3,)),
        ("<M8[ns]", (4,)),  # datetimes export no buffer: before, refused as "not bytes-like"
        ("<m8[us]", (2, 3)),
        ("<u2", (1024, 512)),  # 1 MiB, copied without the GIL
    ],
    ids=["f8", "records", "datetime64", "timedelta64", "1MiB"],
)
def test_raw_bytes_go_in_and_come_out_whole(made, dtype, shape):
    seg = _create(made, dtype=dtype, shape=shape)
    reader = _attach(made)
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, seg.nbytes, dtype=np.uint8).tobytes()
    assert seg.write_bytes(data, timestamp_ns=42) == 1
    more = bytearray(rng.integers(0, 256, seg.nbytes, dtype=np.uint8).tobytes())
    assert seg.write_bytes(memoryview(more), version=7, timestamp_ns=43) == 7
    out = bytearray(seg.nbytes)
    assert reader.read_into(out) == (7, 43)
    assert out == more
    into = np.zeros(shape, dtype)  # an array of the layout takes the bytes as well
    assert reader.read_into(into, 1) == (1, 42)
    assert into.tobytes() == data
    assert reader.latest().array.tobytes() == bytes(more)  # what write_bytes wrote is the version
    assert seg.write_bytes(into) == 8  # an array of the layout goes in as well
    assert reader.latest().array.tobytes() == data


@pytest.mark.parametrize(
    "bad",
    [
        bytes(63),
        bytes(65),
        memoryview(bytearray(128))[::2],
        np.zeros(16, "<f8")[::2],
        np.zeros(16, "<M8[ns]")[::2],
        np.zeros(7, "<M8[ns]"),
        64,
        "x" * 64,
    ],
    ids=["short", "long", "strided", "strided-array", "strided-dt", "7-dt", "int", "str"],
)
def test_bad_raw_buffers_publish_and_copy_nothing(made, bad):
    seg = _create(made)  # 8 float64: 64 bytes
    reader = _attach(made)
    seg.write(_filled(1))
    with pytest.raises(ArrayMismatchError, match="nothing was published"):
        seg.write_bytes(bad)
    assert seg.version == 1
    with reader.read(1) as snap:
        assert snap.array.tolist() == [1.0] * 8
    out = bytearray(b"\xaa" * 64)
    for wrong in (bad, bytes(64), bytearray(65)):  # the bad one, read-only, too long
        with pytest.raises(ArrayMismatchError, match="nothing was copied"):
            reader.read_into(wrong)
    assert out == b"\xaa" * 64
    assert reader.read_into(out) == (1, reader.info().timestamp_ns)


def test_read_into_refuses_a_copy_the_writer_overwrote(made, monkeypatch):
    """The copy is validated after it is made: a writer that laps the slot between
    the look and the copy gets a TornReadError, never its bytes as the version's.
    (An array goes through the general path; a bytearray through the core's one
    call, below and in test_segment_concurrency.)"""
    seg = _create(made)  # two slots
    reader = _attach(made)
    seg.write(_filled(1))
    look = reader._look

    def look_then_lap(version, with_mono):
        got = look(version, with_mono)
        seg.write(_filled(2))
        seg.write(_filled(3))  # into version 1's slot
        return got

    monkeypatch.setattr(reader, "_look", look_then_lap)
    with pytest.raises(TornReadError) as info:
        reader.read_into(np.zeros(8))
    assert info.value.version == 1
    assert reader.torn_reads == 1


def test_read_into_a_bytearray_refuses_a_copy_the_writer_overwrote(made, monkeypatch, each_core):
    """The fallback core's one-call read_to, lapped between its look and its copy.
    (The compiled core's is raced by a writer process in test_segment_concurrency.)"""
    if each_core == "c":
        pytest.skip("a compiled ring cannot be patched: test_segment_concurrency races it")
    seg = _create(made)  # two slots
    reader = _attach(made)
    seg.write(_filled(1))
    ring = reader._ring
    look = ring.acquire_latest

    def look_then_lap(with_mono):
        got = look(with_mono)
        seg.write(_filled(2))
        seg.write(_filled(3))  # into version 1's slot
        return got

    monkeypatch.setattr(ring, "acquire_latest", look_then_lap)
    out = bytearray(64)
    with pytest.raises(TornReadError) as info:
        reader.read_into(out)
    assert info.value.version == 1
    assert reader.torn_reads == 1


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "now", True, np.True_])
@pytest.mark.parametrize("how", ["write", "write_bytes", "write_bytes-memoryview", "loan"])
def test_a_bad_timestamp_is_refused_before_a_version_is_lost(made, how, bad):
    """A commit time the header cannot hold is refused with the fix, before the
    write takes a slot: before, the core refused it at commit, after the slot of an
    older version had been begun (that version was lost) and with an OverflowError."""
    seg = _create(made)  # two slots: the next write takes version 1's
    reader = _attach(made)
    seg.write(_filled(1))
    seg.write(_filled(2))
    raw = _filled(3).tobytes()

    def loan() -> None:
        with seg.loan(timestamp_ns=bad) as arr:
            arr[:] = 3

    attempt = {
        "write": lambda: seg.write(_filled(3), timestamp_ns=bad),
        "write_bytes": lambda: seg.write_bytes(raw, timestamp_ns=bad),
        "write_bytes-memoryview": lambda: seg.write_bytes(memoryview(raw), timestamp_ns=bad),
        "loan": loan,
    }[how]
    with pytest.raises(SegmentError, match=r"time\.time_ns\(\)") as info:
        attempt()
    assert "nothing was published" in str(info.value)
    assert seg.version == 2
    for v in (1, 2):
        with reader.read(v) as snap:
            assert snap.array.tolist() == [float(v)] * 8


@pytest.mark.parametrize("bad", [3.0, 3.9, "3", True, np.float64(3)])
@pytest.mark.parametrize("how", ["write", "write_bytes", "loan"])
def test_a_version_that_is_not_an_int_is_refused(made, how, bad):
    """Before, version= went through int(): 3.9 committed 3, "50" committed 50, and
    True committed 1."""
    seg = _create(made)
    seg.write(_filled(1))
    seg.write(_filled(2))

    def loan() -> None:
        with seg.loan(version=bad) as arr:
            arr[:] = 3

    attempt = {
        "write": lambda: seg.write(_filled(3), version=bad),
        "write_bytes": lambda: seg.write_bytes(_filled(3).tobytes(), version=bad),
        "loan": loan,
    }[how]
    with pytest.raises(SegmentError, match=r"is not a version number.*nothing was published"):
        attempt()
    assert seg.version == 2
    assert seg.write(_filled(3), version=np.int64(3)) == 3  # numpy integers are ints
    assert seg.version == 3


@pytest.mark.parametrize("bad", [1.9, "1", True])
def test_a_version_to_read_that_is_not_an_int_is_refused(made, bad):
    """Before, read(1.9) read version 1 and acquire("1") version 1: a float or a
    string version is a bug in the caller, named as such."""
    seg = _create(made)
    seg.write(_filled(1))
    seg.write(_filled(2))
    with pytest.raises(SegmentError, match="is not a version number"), seg.read(bad):
        pass
    with pytest.raises(SegmentError, match="is not a version number"):
        seg.acquire(bad)
    assert seg.acquire(np.int64(2))[0] == 2  # numpy integers are ints


def test_a_numpy_integer_timestamp_is_recorded(made):
    seg = _create(made)
    assert seg.write_bytes(_filled(1).tobytes(), timestamp_ns=np.int64(1234)) == 1
    assert seg.write(_filled(2), timestamp_ns=np.uint64(5678)) == 2
    reader = _attach(made)
    with reader.read(1) as one, reader.read(2) as two:
        assert (one.timestamp_ns, two.timestamp_ns) == (1234, 5678)


def test_write_bytes_refuses_a_version_that_is_not_newer(made):
    """The core's one-call write refuses it as the general path does: nothing written."""
    seg = _create(made)
    seg.write_bytes(_filled(1).tobytes(), version=5)
    for bad in (5, 4, 0, -1, 2**70):
        with pytest.raises(SegmentError):
            seg.write_bytes(_filled(9).tobytes(), version=bad)
    assert seg.version == 5
    assert _attach(made).latest().array.tolist() == [1.0] * 8


def test_read_into_a_closed_segment_is_a_closed_error(made):
    seg = _create(made)
    seg.write(_filled(1))
    reader = _attach(made)
    reader.close()
    with pytest.raises(ClosedError):
        reader.read_into(bytearray(64))


# ------------------------------------------------------------------------ properties


def test_properties_and_info(made, namespace):
    dt = np.dtype([("a", "<u2"), ("b", ">f4")])
    seg = _create(made, "props", dt, (3, 5), slots=4)
    reader = _attach(made, "props")
    seg.write(np.zeros((3, 5), dt))
    for handle in (seg, reader):
        assert handle.name == "props"
        assert handle.namespace == namespace
        assert handle.path == shm_path(namespace, "props")
        assert handle.dtype == dt
        assert handle.shape == (3, 5)
        assert handle.slots == 4
        assert handle.nbytes == 15 * dt.itemsize == 90
        assert handle.version == 1
    assert seg.writable
    assert not reader.writable
    info = reader.info()
    assert (info.name, info.namespace, info.shape, info.slots) == ("props", namespace, (3, 5), 4)
    assert info.version == 1
    assert info.writer_pid == os.getpid()
    assert info.writer_alive
    assert info.epoch == seg.epoch
    assert info.size == os.stat(seg.path).st_size
    assert info.size >= 4 * 90


def test_scalar_shape_and_subarray_dtype_are_normalised(made):
    seg = _create(made, "one", "<i4", 5)
    assert seg.shape == (5,)
    sub = _create(made, "sub", np.dtype(("<f4", (2, 3))), (4,))
    assert (sub.dtype, sub.shape) == (np.dtype("<f4"), (4, 2, 3))
    assert sub.nbytes == math.prod((4, 2, 3)) * 4


# --------------------------------------------------------------------------- closing


def test_close_is_idempotent_and_reported(made):
    seg = _create(made)
    reader = _attach(made)
    seg.write(_filled(1))
    for handle in (reader, seg):
        assert not handle.closed
        handle.close()
        assert handle.closed
        handle.close()
        assert handle.closed
        with pytest.raises(ClosedError):
            _ = handle.version
        with pytest.raises(ClosedError), handle.read():
            pass
        with pytest.raises(ClosedError):
            handle.latest()
    with pytest.raises(ClosedError):
        seg.write(_filled(2))
    assert "closed" in repr(seg)


def test_context_manager_closes(namespace):
    try:
        with Segment.create("cm", "<f8", (8,)) as seg:
            seg.write(_filled(1))
            with Segment.attach("cm") as reader:
                assert reader.latest().version == 1
            assert reader.closed
            assert not seg.closed
        assert seg.closed
        # The lease went with the handle: a new writer may take over.
        with Segment.attach("cm", writable=True) as again:
            assert again.write(_filled(2)) == 2
    finally:
        Segment.remove("cm", namespace=namespace)


def test_unlink_removes_the_name_but_not_the_mappings(made, namespace):
    seg = _create(made)
    reader = _attach(made)
    seg.write(_filled(1))
    assert os.path.exists(shm_path(namespace, "s"))
    seg.unlink()
    assert not os.path.exists(shm_path(namespace, "s"))
    assert Segment.list(namespace) == []
    with pytest.raises(SegmentNotFoundError):
        Segment.attach("s")
    seg.write(_filled(2))  # handles keep working on the unlinked object
    assert reader.latest().array.tolist() == [2.0] * 8
    seg.unlink()  # unlinking twice is harmless
    assert not Segment.remove("s", namespace=namespace)


def test_linked_says_whether_the_name_still_leads_to_the_handles_object(made, namespace):
    """``linked()`` (both syscalls in the core since reads of the latest check it at
    every read): the object, not a link to it nor a new one under the name, and
    never a closed handle's."""
    seg = _create(made)
    reader = _attach(made)
    assert seg.linked()
    assert reader.linked()
    path = shm_path(namespace, "s")
    held = f"{path}.held"
    os.rename(path, held)  # the same object, now under another name
    try:
        os.symlink(held, path)  # and a link to it under the segment's name
        try:
            assert not reader.linked()  # a link is never followed
        finally:
            os.unlink(path)
        assert not reader.linked()  # gone
        again = _create(made)  # made again under the name: another object
        assert again.linked()
        assert not reader.linked()
        assert not seg.linked()
    finally:
        os.unlink(held)
    again.close()
    assert not again.linked()  # closed: the handle maps nothing any more


def test_list_names_the_segments_of_one_namespace(made, namespace):
    assert Segment.list(namespace) == []
    for name in ("zeta", "alpha", "mid.dle"):
        _create(made, name)
    assert Segment.list(namespace) == ["alpha", "mid.dle", "zeta"]
    assert Segment.list() == ["alpha", "mid.dle", "zeta"]  # from SHMCAST_NAMESPACE
    other = namespace + "x"
    assert Segment.list(other) == []
    _create(made, "elsewhere", namespace=other)
    assert Segment.list(other) == ["elsewhere"]
    assert "elsewhere" not in Segment.list(namespace)


# ------------------------------------------------------------------------ namespaces


def test_namespace_none_uses_the_environment(made, namespace):
    seg = _create(made, "envns")
    assert seg.namespace == namespace
    assert seg.path == shm_path(namespace, "envns")
    assert os.path.exists(shm_path(namespace, "envns"))
    assert _attach(made, "envns").namespace == namespace


@pytest.mark.parametrize("value", [None, ""])
def test_namespace_defaults_to_default(monkeypatch, value):
    """Without a namespace or $SHMCAST_NAMESPACE, "default" is used. Looked up, never
    created: the default namespace may be a real broker's (tests touch only their own)."""
    if value is None:
        monkeypatch.delenv("SHMCAST_NAMESPACE", raising=False)
    else:
        monkeypatch.setenv("SHMCAST_NAMESPACE", value)
    assert resolve_namespace(None) == "default"
    name = f"t{os.getpid()}-{time.monotonic_ns()}"
    with pytest.raises(SegmentNotFoundError) as info:
        Segment.attach(name)
    assert info.value.namespace == "default"
    assert shm_path("default", name) == f"/dev/shm/shmcast.default.{name}"


BAD_SEGMENT_NAMES = ["", ".hidden", "a/b", "a b", "x" * 129, "é", "a\0b", "../x", 5, None]
BAD_NAMESPACES = ["", "a.b", "a/b", "x" * 49, "sp ace", "..", 3]


@pytest.mark.parametrize("name", BAD_SEGMENT_NAMES)
def test_bad_segment_names_are_refused(namespace, name):
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(InvalidNameError) as info:
        Segment.create(name, "<f8", (8,))
    assert repr(name) in str(info.value)
    with pytest.raises(InvalidNameError):
        Segment.attach(name)
    with pytest.raises(InvalidNameError):
        Segment.remove(name)
    assert set(os.listdir("/dev/shm")) == before


@pytest.mark.parametrize("ns", BAD_NAMESPACES)
def test_bad_namespaces_are_refused(ns, monkeypatch):
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(InvalidNameError) as info:
        Segment.create("ok", "<f8", (8,), namespace=ns)
    assert repr(ns) in str(info.value)
    with pytest.raises(InvalidNameError):
        Segment.attach("ok", namespace=ns)
    with pytest.raises(InvalidNameError):
        Segment.list(ns)
    if isinstance(ns, str) and ns:
        monkeypatch.setenv("SHMCAST_NAMESPACE", ns)
        with pytest.raises(InvalidNameError):
            Segment.create("ok", "<f8", (8,))
    assert set(os.listdir("/dev/shm")) == before


def test_longest_valid_names_work(made):
    name = "a" * 128
    seg = Segment.create(name, "<f8", (8,), namespace="n" * 48)
    made.append(seg)
    assert Segment.list("n" * 48) == [name]


@pytest.mark.parametrize("slots", [0, 1, 65, 2.5, "2"])
def test_bad_slot_counts_are_refused(namespace, slots):
    with pytest.raises(LayoutError, match="slots"):
        Segment.create("s", "<f8", (8,), slots=slots)
    assert Segment.list(namespace) == []
