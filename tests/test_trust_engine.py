"""The engine keeps its promises under misuse: the trust issue's classes 1, 3 and 9
as the segment engine sees them.

- Class 1: no write touches the latest version's slot, whatever version it
  commits; no reader call spins without bound; a slot a dead writer left odd is
  reported, never spun on.
- Class 3: each creation of a segment has an identity of its own.
- Class 9: durations on one host (age, latency) use the monotonic clock.
- Objects under a segment's name that are not segments (symlinks, directories)
  are refused; versions stay within what the wire can carry.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from shmcast.broker import (
    NotASegmentError,
    OwnershipError,
    Segment,
    SegmentError,
    SlotStuckError,
    VersionUnavailableError,
)
from shmcast.broker._layout import MAX_VERSION, W_LATEST, slot_ctl_index
from shmcast.broker.client import shm_path
from tests._seg_util import kill, read_line, run_python, worker

# The engine's tests run on both cores of the seqlock (conftest.each_core).
pytestmark = pytest.mark.usefixtures("each_core")

K = 2


@pytest.fixture
def seg(namespace: str) -> Iterator[Segment]:
    w = Segment.create("t", np.int64, (1024,), slots=K)
    try:
        yield w
    finally:
        w.unlink()
        w.close()


def _fill(seg: Segment, version: int | None = None) -> int:
    v = (seg.version + 1) if version is None else version
    return seg.write(np.full(1024, v % 2**62, np.int64), version=version)


@pytest.mark.parametrize("skip", [K, 2 * K, 3 * K + 2])
def test_a_write_skipping_versions_never_tears_the_latest(seg: Segment, skip: int) -> None:
    _fill(seg)
    r = Segment.attach("t")
    try:
        with r.read() as snap:  # a reader of the latest version, mid-read
            assert snap.version == 1
            _fill(seg, version=1 + skip)  # was slot (1 + skip) mod K == slot of 1
            assert (snap.array == 1).all()
        # Leaving the block validated the read: it was not torn.
        assert r.torn_reads == 0
        assert r.latest().version == 1 + skip
    finally:
        r.close()


def test_an_aborted_loan_leaves_the_latest_readable(seg: Segment) -> None:
    _fill(seg)
    r = Segment.attach("t")
    try:

        def produce() -> None:
            with seg.loan(version=1 + K) as arr:
                arr[:] = -1
                raise RuntimeError("the producer failed mid-version")

        with pytest.raises(RuntimeError):
            produce()
        snap = r.latest()  # old code: busy-spun here for ever
        assert snap.version == 1
        assert (snap.array == 1).all()
        assert _fill(seg) == 2  # and the writer goes on
    finally:
        r.close()


READ_EVERYTHING = """
import time
from shmcast.broker import Segment
r = Segment.attach("t")
t0 = time.monotonic()
v = r.latest().version
with r.read() as snap:
    assert snap.version == v and (snap.array == v).all()
got = r.wait_acquire(0, timeout=1.0)
assert got is not None and got[0] == v
print(v, round(time.monotonic() - t0, 3))
r.close()
"""


def test_readers_go_on_when_a_writer_dies_mid_skip(seg: Segment) -> None:
    _fill(seg)
    seg.close()  # hand the lease to the child
    child = worker("half-loan-skipping", "t")
    try:
        line = read_line(child, 20)
        assert line == f"HALF {1 + K}"
    finally:
        kill(child)  # SIGKILL mid-write
    # Every read call returns at once with the intact version 1 (old code: spun for ever).
    out = run_python(READ_EVERYTHING, timeout=20)
    assert out.returncode == 0, out.stderr
    version, seconds = out.stdout.split()
    assert int(version) == 1
    assert float(seconds) < 2.0
    # The next writer repairs the half-written slot and goes on.
    w = Segment.attach("t", writable=True)
    try:
        assert _fill(w) == 2
        with Segment.attach("t") as r:
            assert (r.latest().array == 2).all()
    finally:
        w.close()


def test_a_fast_writer_never_makes_a_reader_report_a_stuck_slot(namespace: str) -> None:
    """A writer committing tiny versions flat out and a reader looking at the latest
    fell into lock-step: the latest-slot hint was always one commit ahead, and the
    reader reported SlotStuckError against a healthy writer (13 in 3 s)."""
    w = Segment.create("fast", np.float64, (8,), slots=2)
    w.write(np.zeros(8))
    w.close()
    child = worker("tiny-writer", "fast")
    try:
        assert read_line(child, 20) == "READY"
        with Segment.attach("fast") as r:
            start = r.version
            reads = 0
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                r.acquire()  # raised SlotStuckError before the fix
                reads += 1
            assert r.version > start + 1000  # the writer really raced us
            assert reads > 1000
    finally:
        kill(child)
        Segment.remove("fast")


def _poke(namespace: str, name: str, word: int, value: int) -> None:
    """Write one u64 header word of an object, as a buggy or hostile writer would."""
    fd = os.open(shm_path(namespace, name), os.O_RDWR)
    try:
        with mmap.mmap(fd, 4096) as mm:
            memoryview(mm).cast("Q")[word] = value
    finally:
        os.close(fd)


def test_a_slot_stuck_mid_write_is_reported_not_spun_on(seg: Segment, namespace: str) -> None:
    _fill(seg)
    seg.close()
    # The latest version's slot left odd under the header's nose.
    _poke(namespace, "t", slot_ctl_index(0), 1)
    r = Segment.attach("t")
    try:
        t0 = time.monotonic()
        with pytest.raises(SlotStuckError, match="no writer holds the lease"):
            r.acquire()
        with pytest.raises(SlotStuckError):
            r.latest()
        with pytest.raises(SlotStuckError):
            r.wait_acquire(0, timeout=5)
        assert time.monotonic() - t0 < 2.0
    finally:
        r.close()


def test_a_latest_version_in_no_slot_is_reported(seg: Segment, namespace: str) -> None:
    _fill(seg)
    _poke(namespace, "t", W_LATEST, 99)  # a version no slot holds
    with Segment.attach("t") as r:
        with pytest.raises(SlotStuckError, match="alive"):  # the writer (seg) holds the lease
            r.acquire()
        with pytest.raises(VersionUnavailableError):
            r.acquire(99)


def test_versions_stay_within_what_the_wire_carries(seg: Segment, namespace: str) -> None:
    _fill(seg, version=MAX_VERSION)
    with pytest.raises(SegmentError, match="beyond the largest version"):
        _fill(seg, version=MAX_VERSION + 1)
    with pytest.raises(SegmentError, match=r"beyond the largest version|not newer"):
        _fill(seg)  # latest + 1: old code died of OverflowError
    assert seg.latest().version == MAX_VERSION
    _poke(namespace, "t", W_LATEST, 2**64 - 1)
    with pytest.raises(NotASegmentError, match="impossible latest version"):
        Segment.attach("t")


def test_every_creation_has_its_own_incarnation(namespace: str) -> None:
    a = Segment.create("again", np.uint8, (8,))
    try:
        first = a.incarnation
        with Segment.attach("again") as r:
            assert r.incarnation == first
            assert r.info().incarnation == first
            assert r.info().catalog_entry()["incarnation"] == first
    finally:
        a.unlink()
        a.close()
    b = Segment.create("again", np.uint8, (8,))
    try:
        assert b.incarnation not in (0, first)
    finally:
        b.unlink()
        b.close()


def test_durations_use_the_monotonic_clock(seg: Segment, monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(seg)
    with Segment.attach("t") as r:
        with r.read() as snap:
            assert abs(time.monotonic_ns() - snap.monotonic_ns) < 5e9
        # The wall clock steps an hour ahead: ages measured on one host do not move.
        real = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real() + 3600 * 10**9)
        age = r.info().age_s()
        assert age is not None
        assert age < 60
        entry = r.info().catalog_entry()
        assert entry["age"] < 60


def test_a_symlink_under_a_segment_name_is_refused(seg: Segment, namespace: str) -> None:
    _fill(seg)
    link = shm_path(namespace, "alias")
    os.symlink(seg.path, link)
    try:
        with pytest.raises(NotASegmentError, match="symbolic link"):
            Segment.attach("alias")
        with pytest.raises(OwnershipError, match="symbolic link"):
            Segment.create("alias", np.int64, (1024,))  # named for what it is
        assert os.path.islink(link)  # the engine refuses; it removes nothing
    finally:
        os.unlink(link)


def test_a_directory_under_a_segment_name_is_refused(namespace: str) -> None:
    path = shm_path(namespace, "dir")
    os.mkdir(path)
    try:
        with pytest.raises((NotASegmentError, IsADirectoryError)):
            Segment.attach("dir")
    finally:
        os.rmdir(path)


def test_the_engine_refuses_objects_others_may_write(namespace: str) -> None:
    """A segment-shaped object that group or others may write is never attached: they
    could forge versions under its readers (trust class 2, the engine's side)."""
    w = Segment.create("open", np.uint8, (8,), mode=0o600)
    try:
        w.write(np.ones(8, np.uint8))
        os.chmod(w.path, 0o666)
        with pytest.raises(OwnershipError, match="shmcast doctor --fix"):
            Segment.attach("open")
        os.chmod(w.path, 0o640)  # group may read: fine
        with Segment.attach("open") as r:
            assert r.latest().version == 1
    finally:
        w.unlink()
        w.close()


def test_the_engine_attaches_another_owners_object_only_when_told(namespace: str) -> None:
    """Readers of a group attach the broker's objects by naming its uid (``owner=``);
    without it, an object of another user is a squatter's."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make an object owned by another user")
    w = Segment.create("theirs", np.uint8, (8,), mode=0o644)
    try:
        w.write(np.ones(8, np.uint8))
        os.chown(w.path, 65534, 65534)
        with pytest.raises(OwnershipError, match="owned by another user"):
            Segment.attach("theirs")
        with pytest.raises(OwnershipError, match="owned by another user"):
            Segment.create("theirs", np.uint8, (8,))  # a squatter is named, not "exists"
        with Segment.attach("theirs", owner=65534) as r:
            assert r.latest().version == 1
    finally:
        w.unlink()
        w.close()
