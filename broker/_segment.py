"""The segment engine: a handle on one shared-memory object holding a ring of numpy arrays.

The byte layout is :mod:`._layout`'s; the writer's lease is :mod:`._lease`'s;
the futex is :mod:`._futex`'s.

Writing version v (one writer, holding the lease = an exclusive flock on the
object, which the kernel drops when the writer dies): the slot is the one after
the latest version's, i = (latest slot + 1) mod K, never the latest's own, whatever
v is (a relay skips versions; a loan may be aborted); seq := odd; copy the bytes;
version, commit times; seq := even; latest slot := i; latest := v; notify += 1;
futex wake.

Reading the latest: v := latest; i := latest slot; s := seq of slot i (must be
even) and the slot's version must be v, else the writer moved on between the
loads and the reader looks again; hand out a read-only view; on release seq must
still be s, otherwise the read was torn and is reported as such, never as data.
Reading an exact version v: the slot whose version is v (a scan of the K control
lines), validated the same way; gone from the ring is VersionUnavailableError.
No reader loops without bound: after MAX_RETRIES inconsistent looks it reports
SlotStuckError (a writer died in the middle of a slot that the header still
names, or something writes outside the protocol).

Memory ordering: every shared word is an aligned 8-byte (or 4-byte) value, read
and written through ``memoryview.cast`` indexing, which CPython compiles to one
plain load or store. x86-64 is TSO: stores become visible in program order and
loads are not reordered with other loads, so program order is all the seqlock
needs there. Weakly ordered CPUs (ARM64, POWER) would need a release fence
before the even ``seq`` store and the ``latest`` store, and an acquire fence
after the first ``seq`` load and before the second; pure Python cannot emit
them, which is why :func:`machine_supported` exists for ``shmcast doctor`` to report.

"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import platform
import secrets
import stat
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._futex import WAITV_MAX, Futex, wait_many
from ._layout import (
    DESCR_OFF,
    LAYOUT_VERSION,
    MAGIC,
    MAX_SLOTS,
    MAX_VERSION,
    NOTIFY_IDX,
    NOTIFY_OFF,
    S_MONO,
    S_VERSION,
    S_WALL,
    W_CREATED,
    W_DESCR_LEN,
    W_EPOCH,
    W_HEADER_SIZE,
    W_HEARTBEAT,
    W_INCARNATION,
    W_LATEST,
    W_LATEST_SLOT,
    W_LAYOUT,
    W_MAGIC,
    W_NBYTES,
    W_NDIM,
    W_SHAPE,
    W_SLOTS,
    W_STRIDE,
    W_WRITER_PID,
    W_WRITER_START,
    bytes_castable,
    describe_dtype,
    dtype_str,
    header_size,
    normalize_layout,
    read_header,
    segment_size,
    shm_free,
    slot_ctl_index,
    slot_stride,
)
from ._lease import ProcessId, lease_held, take_lease
from ._names import SHM_DIR, list_segment_names, resolve_namespace, shm_path, validate_segment_name
from .errors import (
    ArrayMismatchError,
    ClosedError,
    LayoutError,
    NotASegmentError,
    NoVersionError,
    ReadOnlyError,
    SegmentError,
    SegmentExistsError,
    SegmentNotFoundError,
    ShmcastError,
    ShmSpaceError,
    SlotStuckError,
    TornReadError,
    VersionUnavailableError,
)

__all__ = ["Segment", "SegmentInfo", "Snapshot", "machine_supported", "wait_any"]

log = logging.getLogger(__name__)

#: CPUs whose memory model (TSO) makes the plain loads and stores of this seqlock sound.
SUPPORTED_MACHINES = ("x86_64", "AMD64")
#: Inconsistent looks at the header a reader takes before it reports SlotStuckError
#: (a writer between two loads costs one; a thousand in a row is not a writer at work).
MAX_RETRIES = 1000
#: Open flags: never follow a symlink planted under a segment's name.
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass(frozen=True)
class Snapshot:
    """One version of a segment as read: zero-copy and read-only inside ``read()``.

    ``timestamp_ns`` is the commit time on the wall clock (comparable across
    hosts); ``monotonic_ns`` the same instant on this host's monotonic clock,
    for durations (latency, staleness) that a clock step must not bend.
    """

    segment: str
    version: int
    timestamp_ns: int
    array: npt.NDArray[Any]
    monotonic_ns: int = 0


@dataclass(frozen=True)
class SegmentInfo:
    """What the header of a segment says, for catalogs and tools."""

    name: str
    namespace: str
    dtype: str
    shape: tuple[int, ...]
    slots: int
    nbytes: int
    size: int
    version: int
    timestamp_ns: int
    created_ns: int
    epoch: int
    writer_pid: int
    writer_alive: bool
    heartbeat_ns: int
    incarnation: int = 0
    monotonic_ns: int = 0

    def age_s(self, now_monotonic_ns: int | None = None) -> float | None:
        """Seconds since the latest commit, on this host's monotonic clock (None: none yet)."""
        if not self.version or not self.monotonic_ns:
            return None
        now = time.monotonic_ns() if now_monotonic_ns is None else now_monotonic_ns
        return max(0.0, (now - self.monotonic_ns) / 1e9)

    def catalog_entry(self) -> dict[str, Any]:
        """The catalog's view of this header (``list``/``describe`` replies, ``shmcast ls``).

        ``ts`` is the latest commit on the wall clock; ``age`` the seconds since it,
        measured on the monotonic clock of the host that answers.
        """
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "slots": self.slots,
            "nbytes": self.nbytes,
            "size": self.size,
            "version": self.version,
            "ts": self.timestamp_ns,
            "created": self.created_ns,
            "writer_pid": self.writer_pid,
            "writer_alive": self.writer_alive,
            "incarnation": self.incarnation,
            "age": self.age_s(),
        }


class Segment:
    """A handle on one shared-memory segment: the writer's, or a reader's.

    Create with :meth:`create` (the writer; fails if the name exists) or open with
    :meth:`attach` (read-only by default; ``writable=True`` takes the writer lease).
    """

    def __init__(self, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise TypeError("use Segment.create(...) or Segment.attach(...)")
        self._closed = True
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._q: memoryview | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(
        cls,
        name: str,
        dtype: npt.DTypeLike,
        shape: int | tuple[int, ...],
        *,
        slots: int = 2,
        namespace: str | None = None,
        mode: int = 0o600,
        epoch: int | None = None,
        prefault: bool = True,
    ) -> Segment:
        """Create a new segment and return its writer handle.

        Args:
            name: segment name (letters, digits, ``_ - .``).
            dtype: any numpy dtype without Python objects, structured ones included.
            shape: the array's shape.
            slots: ring size K (2..64); a view stays valid for K-1 publish intervals.
            namespace: ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``.
            mode: permission bits of the object (owner-only by default).
            epoch: id recorded in the header (the broker's); random when omitted.
            prefault: map the slots with ``MAP_POPULATE`` so that the first write
                pays no page faults.

        Raises:
            SegmentExistsError: the name is taken.
            ShmSpaceError: ``/dev/shm`` cannot hold the segment.
            LayoutError: bad dtype, shape or slots.
        """
        ns = resolve_namespace(namespace)
        validate_segment_name(name)
        dt, shp = normalize_layout(dtype, shape)
        if not isinstance(slots, int) or not 2 <= slots <= MAX_SLOTS:
            raise LayoutError(f"slots must be an integer from 2 to {MAX_SLOTS}, got {slots!r}")
        nbytes = math.prod(shp) * dt.itemsize
        size = segment_size(nbytes, slots)
        path = shm_path(ns, name)
        free = shm_free()
        if free is not None and size > free:  # refuse before making anything
            raise ShmSpaceError(name, size, free, SHM_DIR)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode)
        except FileExistsError:
            raise SegmentExistsError(name, ns) from None
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise ShmSpaceError(name, size, shm_free() or 0, SHM_DIR) from exc
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                log.warning("posix_fallocate unsupported on %s; pages are not reserved", path)
                os.ftruncate(fd, size)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            q = memoryview(mm).cast("Q")
            descr = describe_dtype(dt)
            q[W_LAYOUT] = LAYOUT_VERSION
            q[W_HEADER_SIZE] = header_size(slots)
            q[W_SLOTS] = slots
            q[W_STRIDE] = slot_stride(nbytes)
            q[W_NBYTES] = nbytes
            q[W_EPOCH] = secrets.randbits(63) if epoch is None else epoch
            q[W_CREATED] = time.time_ns()
            q[W_INCARNATION] = secrets.randbits(63) | 1  # never 0: 0 means "no header yet"
            q[W_LATEST_SLOT] = slots - 1  # the first write goes to slot 0
            q[W_DESCR_LEN] = len(descr)
            q[W_NDIM] = len(shp)
            for i, n in enumerate(shp):
                q[W_SHAPE + i] = n
            mm[DESCR_OFF : DESCR_OFF + len(descr)] = descr
            me = ProcessId.current()
            q[W_WRITER_PID] = me.pid
            q[W_WRITER_START] = me.start_time
            q[W_HEARTBEAT] = time.monotonic_ns()
            q[W_MAGIC] = MAGIC  # last: until now the object is "being created"
            q.release()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            raise
        seg = cls(_PRIVATE)
        seg._setup(name, ns, path, fd, mm, writable=True, dtype=dt, shape=shp)
        return seg

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        namespace: str | None = None,
        writable: bool = False,
        prefault: bool = True,
        wait: float = 1.0,
    ) -> Segment:
        """Open an existing segment.

        Args:
            name: segment name.
            namespace: ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``.
            writable: take the writer lease (refused while another writer lives);
                readers map the object read-only, so a reader bug cannot corrupt it.
            prefault: populate the mapping now (``MAP_POPULATE``) rather than on
                the first read of each page.
            wait: seconds to wait for a segment that is still being created.

        Raises:
            SegmentNotFoundError, NotASegmentError, LayoutVersionError, WriterBusyError.
        """
        ns = resolve_namespace(namespace)
        validate_segment_name(name)
        path = shm_path(ns, name)
        oflags = (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS
        try:
            fd = os.open(path, oflags)
        except FileNotFoundError:
            raise SegmentNotFoundError(name, ns) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
                raise NotASegmentError(name, path, "a symbolic link, not a segment") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotASegmentError(name, path, "not a regular file")
            dt, shp, size = read_header(name, path, fd, wait)
            if writable:
                head = os.pread(fd, 8 * (W_WRITER_PID + 1), 0)
                take_lease(name, fd, int.from_bytes(head[8 * W_WRITER_PID :], "little"))
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=prot)
        except BaseException:
            os.close(fd)
            raise
        seg = cls(_PRIVATE)
        seg._setup(name, ns, path, fd, mm, writable=writable, dtype=dt, shape=shp)
        if writable:
            q = seg._q
            assert q is not None
            me = ProcessId.current()
            q[W_WRITER_PID] = me.pid
            q[W_WRITER_START] = me.start_time
            q[W_HEARTBEAT] = time.monotonic_ns()
        return seg

    def _setup(
        self,
        name: str,
        namespace: str,
        path: str,
        fd: int,
        mm: mmap.mmap,
        *,
        writable: bool,
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
    ) -> None:
        self._name = name
        self._namespace = namespace
        self._path = path
        self._fd = fd
        self._mm = mm
        self._writable = writable
        self._dtype = dtype
        self._shape = shape
        q = memoryview(mm).cast("Q")
        self._q = q
        self._slots = int(q[W_SLOTS])
        self._nbytes = int(q[W_NBYTES])
        hs = int(q[W_HEADER_SIZE])
        stride = int(q[W_STRIDE])
        count = math.prod(shape)
        # np.frombuffer keeps a buffer export on the mmap for as long as the array
        # lives, so the mapping cannot be unmapped under a view (numpy #23305).
        views = []
        raw = []
        for i in range(self._slots):
            off = hs + i * stride
            arr = np.frombuffer(mm, dtype=dtype, count=count, offset=off).reshape(shape)
            if writable:
                raw.append(np.frombuffer(mm, dtype=np.uint8, count=self._nbytes, offset=off))
                ro = arr.view()
                ro.flags.writeable = False
                views.append(ro)
            else:
                views.append(arr)
        self._views: list[npt.NDArray[Any]] = views
        self._loan_views: list[npt.NDArray[Any]] = (
            [
                np.frombuffer(mm, dtype=dtype, count=count, offset=hs + i * stride).reshape(shape)
                for i in range(self._slots)
            ]
            if writable
            else []
        )
        self._raw: list[npt.NDArray[np.uint8]] = raw
        # Byte views of the slots, built once: write() copies a C-contiguous array by
        # one memoryview slice assignment (a memmove, ~0.4 µs of call overhead, and as
        # fast as np.copyto from 64 B to 100 MB, measured alternating) instead of
        # np.copyto (~1.2 µs of overhead). Dtypes whose buffer cannot be cast to bytes
        # (datetime, for one) keep numpy's copy.
        self._raw_mv: list[memoryview] = (
            [
                memoryview(mm)[hs + i * stride : hs + i * stride + self._nbytes]
                for i in range(self._slots)
            ]
            if writable and bytes_castable(dtype)
            else []
        )
        self._seq_idx = [slot_ctl_index(i) for i in range(self._slots)]
        self._notify = np.frombuffer(mm, dtype=np.uint32, count=1, offset=NOTIFY_OFF)
        self._futex = Futex(int(self._notify.ctypes.data))
        self._q32 = memoryview(mm).cast("I")
        self.reads = 0
        self.torn_reads = 0
        self._loaning = False
        self._closed = False

    # --------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def path(self) -> str:
        return self._path

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def nbytes(self) -> int:
        """Bytes of one version (the array), not of the whole object."""
        return self._nbytes

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def version(self) -> int:
        """The latest committed version (0 before the first)."""
        q = self._q  # inlined _header(): this is the busy-poll of many readers
        if q is None:
            raise ClosedError(f"segment {getattr(self, '_name', '?')!r}")
        return int(q[W_LATEST])

    @property
    def epoch(self) -> int:
        return int(self._header()[W_EPOCH])

    @property
    def incarnation(self) -> int:
        """The id of this creation of the segment: a segment deleted and created again
        under the same name has another one."""
        return int(self._header()[W_INCARNATION])

    def info(self) -> SegmentInfo:
        q = self._header()
        v = int(q[W_LATEST])
        ts = mono = 0
        if v:
            with contextlib.suppress(ShmcastError):
                i = self._find_latest(q)[1]
                ts, mono = int(q[self._seq_idx[i] + S_WALL]), int(q[self._seq_idx[i] + S_MONO])
        writer = ProcessId(int(q[W_WRITER_PID]), int(q[W_WRITER_START]))
        return SegmentInfo(
            name=self._name,
            namespace=self._namespace,
            dtype=dtype_str(self._dtype),
            shape=self._shape,
            slots=self._slots,
            nbytes=self._nbytes,
            size=len(self._mm) if self._mm is not None else 0,
            version=v,
            timestamp_ns=ts,
            created_ns=int(q[W_CREATED]),
            epoch=int(q[W_EPOCH]),
            writer_pid=writer.pid,
            writer_alive=self.writer_alive(),
            heartbeat_ns=int(q[W_HEARTBEAT]),
            incarnation=int(q[W_INCARNATION]),
            monotonic_ns=mono,
        )

    def writer_alive(self) -> bool:
        """Whether some process holds the writer lease (asked of the kernel, not guessed)."""
        if self._writable and not self._closed:
            return True
        return lease_held(self._path)

    def _header(self) -> memoryview:
        q = self._q
        if q is None:  # close() sets it to None
            raise ClosedError(f"segment {getattr(self, '_name', '?')!r}")
        return q

    # ------------------------------------------------------------------ writing

    def _check_array(self, array: npt.NDArray[Any]) -> None:
        if not isinstance(array, np.ndarray):
            raise ArrayMismatchError(self._name, "type", "numpy.ndarray", type(array).__name__)
        if array.dtype != self._dtype:
            raise ArrayMismatchError(self._name, "dtype", self._dtype, array.dtype)
        if array.shape != self._shape:
            raise ArrayMismatchError(self._name, "shape", self._shape, array.shape)

    def _begin(self, version: int | None = None) -> tuple[int, int, int]:
        q = self._header()
        if not self._writable:
            raise ReadOnlyError(self._name)
        latest = int(q[W_LATEST])
        v = latest + 1 if version is None else int(version)
        if v <= latest:
            # Readers and announcements rely on versions only going forward.
            raise SegmentError(
                self._name,
                f"version {v} of segment {self._name!r} is not newer than the latest "
                f"({latest}); versions only go forward",
            )
        if v > MAX_VERSION:
            raise SegmentError(
                self._name,
                f"version {v} of segment {self._name!r} is beyond the largest version "
                f"{MAX_VERSION}; delete the segment and create it again",
            )
        # The slot after the latest version's, never the latest's own: readers of the
        # latest version are never torn by a write, whatever number it commits.
        i = (int(q[W_LATEST_SLOT]) + 1) % self._slots
        si = self._seq_idx[i]
        s = int(q[si])
        if s & 1:  # a writer died in the middle of this slot: step past its odd value
            s += 1
        q[si] = s + 1  # odd: readers of the version this slot held now fail validation
        return v, i, s

    def _commit(self, v: int, i: int, s: int, wall_ns: int | None = None) -> None:
        q = self._q
        assert q is not None
        si = self._seq_idx[i]
        mono = time.monotonic_ns()
        q[si + S_VERSION] = v
        q[si + S_WALL] = time.time_ns() if wall_ns is None else wall_ns
        q[si + S_MONO] = mono
        q[si] = s + 2  # even again: the slot is whole
        # Latest slot before latest: a reader that sees v and then a slot that does
        # not hold v knows the writer moved on, and looks again.
        q[W_LATEST_SLOT] = i
        q[W_LATEST] = v  # after seq: whoever sees v finds its slot complete
        q[W_HEARTBEAT] = mono
        q32 = self._q32
        q32[NOTIFY_IDX] = (q32[NOTIFY_IDX] + 1) & 0xFFFFFFFF
        self._futex.wake()

    def _abort(self, i: int, s: int) -> None:
        q = self._q
        assert q is not None
        si = self._seq_idx[i]
        q[si + S_VERSION] = 0  # the old version's bytes are gone: no version lives here now
        q[si] = s + 2

    def write(
        self,
        array: npt.NDArray[Any],
        *,
        version: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Copy ``array`` in as the next version and return its number (the first is 1).

        Args:
            array: the data, of the segment's dtype and shape.
            version: commit exactly this version instead of latest + 1 (a relay
                keeps its upstream's numbers); it must be newer than the latest.
            timestamp_ns: the commit time to record (wall clock, ns) instead of now:
                a bridge keeps its upstream's. Durations on this host still use the
                local monotonic clock.

        Raises:
            ArrayMismatchError: wrong dtype or shape (nothing is published).
            ReadOnlyError: this handle is not the writer.
            SegmentError: ``version`` is not newer than the latest.
        """
        self._check_array(array)
        if self._loaning:
            raise LayoutError(f"segment {self._name!r}: write() inside an open loan()")
        v, i, s = self._begin(version)
        try:
            if self._raw_mv:
                try:
                    src = array.data.cast("B")
                except (TypeError, ValueError, BufferError):  # not C-contiguous: numpy copies it
                    np.copyto(self._loan_views[i], array)
                else:
                    self._raw_mv[i][:] = src  # one memcpy, no numpy call overhead
            elif array.flags.c_contiguous:
                # Raw bytes: np.copyto on a record dtype is ~20x slower than memcpy.
                np.copyto(self._raw[i], array.reshape(-1).view(np.uint8))
            else:
                np.copyto(self._loan_views[i], array)
        except BaseException:
            self._abort(i, s)
            raise
        self._commit(v, i, s, timestamp_ns)
        return v

    @contextlib.contextmanager
    def loan(
        self, *, version: int | None = None, timestamp_ns: int | None = None
    ) -> Iterator[npt.NDArray[Any]]:
        """Yield a writable array over the next slot; commit it when the block ends.

        If the block raises, nothing is published (the slot is marked empty).
        The array must not be used after the block. ``version`` commits exactly
        that version (it must be newer than the latest), as in :meth:`write`.
        """
        if self._loaning:
            raise LayoutError(f"segment {self._name!r}: loans do not nest")
        v, i, s = self._begin(version)
        self._loaning = True
        try:
            yield self._loan_views[i]
        except BaseException:
            self._abort(i, s)
            raise
        finally:
            self._loaning = False
        self._commit(v, i, s, timestamp_ns)

    def heartbeat(self) -> None:
        """Refresh the writer heartbeat without publishing (for idle writers)."""
        if not self._writable:
            raise ReadOnlyError(self._name)
        self._header()[W_HEARTBEAT] = time.monotonic_ns()

    # ------------------------------------------------------------------ reading

    def acquire(self, version: int | None = None) -> tuple[int, int, int, int]:
        """Low-level read start: ``(version, slot, seq, timestamp_ns)``.

        The latest version, or exactly ``version``. Pair with :meth:`view` and
        :meth:`validate`; :meth:`read` wraps all three.

        Raises:
            NoVersionError: nothing was published yet.
            VersionUnavailableError: ``version`` is not in the ring (lapped, or not
                published).
            SlotStuckError: the header names a slot that never comes whole.
        """
        q = self._header()
        if version is None:
            return self._find_latest(q)
        v = int(version)
        found = self._scan(q, v) if v > 0 else None
        if found is not None:
            return found
        latest = int(q[W_LATEST])
        if latest == 0:
            raise NoVersionError(self._name)
        raise VersionUnavailableError(self._name, v, latest, self._slots)

    def _find_latest(self, q: memoryview) -> tuple[int, int, int, int]:
        seq_idx = self._seq_idx
        slots = self._slots
        v = 0
        for _ in range(MAX_RETRIES):
            v = int(q[W_LATEST])
            if v == 0:
                raise NoVersionError(self._name)
            i = int(q[W_LATEST_SLOT])
            if i < slots:
                si = seq_idx[i]
                s = int(q[si])
                if not s & 1 and q[si + S_VERSION] == v:
                    return v, i, s, int(q[si + S_WALL])
            found = self._scan(q, v)
            if found is not None:
                return found
            # v's slot is being rewritten already: look at the newer latest
        raise self._stuck(v)

    def _scan(self, q: memoryview, v: int) -> tuple[int, int, int, int] | None:
        """Version ``v`` in whichever slot holds it whole, else None.

        The writer commits the latest-slot hint before ``latest``, so a reader
        that loads ``latest`` and then the hint can find the hint one commit
        ahead; ``v`` is then still whole in its own slot (the writer is filling
        another). Without this look, a fast writer and a reader in lock-step
        missed each other for a thousand looks in a row.
        """
        for k, si in enumerate(self._seq_idx):
            s = int(q[si])
            if not s & 1 and q[si + S_VERSION] == v:
                return v, k, s, int(q[si + S_WALL])
        return None

    def _stuck(self, version: int) -> SlotStuckError:
        return SlotStuckError(self._name, version, MAX_RETRIES, self.writer_alive())

    def monotonic_ns(self, slot: int) -> int:
        """The monotonic commit time of the version ``slot`` holds (this host's clock)."""
        return int(self._header()[self._seq_idx[slot] + S_MONO])

    def view(self, slot: int) -> npt.NDArray[Any]:
        """The read-only array over ``slot`` (valid only between acquire and validate)."""
        return self._views[slot]

    def validate(self, slot: int, seq: int) -> bool:
        """True when ``slot`` was not touched by the writer since :meth:`acquire`."""
        ok = self._header()[self._seq_idx[slot]] == seq
        self.reads += 1
        if not ok:
            self.torn_reads += 1
        return bool(ok)

    def read(self, version: int | None = None) -> contextlib.AbstractContextManager[Snapshot]:
        """Yield a zero-copy, read-only :class:`Snapshot` of the latest (or a given) version.

        Use as ``with seg.read() as snap:``; the version is acquired on entering.

        Raises:
            TornReadError: on leaving the block, if the writer overwrote the slot
                meanwhile: whatever was computed from the view must be discarded.
            NoVersionError, VersionUnavailableError.
        """
        return _Reading(self, version)

    def latest(self, *, retries: int = 1000) -> Snapshot:
        """A validated private copy of the latest version (torn reads are retried)."""
        v = 0
        for _ in range(max(1, retries)):
            v, i, s, ts = self.acquire()
            data = self._views[i].copy()
            mono = self.monotonic_ns(i)
            if self.validate(i, s):
                return Snapshot(self._name, v, ts, data, mono)
        raise TornReadError(self._name, v)

    def wait(self, after: int, timeout: float | None = None) -> int:
        """Block (no busy core: a futex on the header) until a version newer than
        ``after`` is committed or ``timeout`` passes; return the latest version."""
        q = self._header()
        q32 = self._q32
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            word = q32[NOTIFY_IDX]
            v: int = q[W_LATEST]
            if v > after:
                return v
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return v
            self._futex.wait(word, left)

    def wait_acquire(
        self, after: int, timeout: float | None = None, *, spin: bool = False
    ) -> tuple[int, int, int, int] | None:
        """Wait for a version newer than ``after`` and start reading it, in one call.

        The fast path of latency-sensitive loops: :meth:`wait` (or a busy-poll)
        followed by :meth:`acquire` without a second look at the header. Pair the
        result with :meth:`view` and :meth:`validate`.

        Args:
            after: the last version the caller has.
            timeout: seconds; ``None`` waits for ever.
            spin: busy-poll the header's version word (lowest latency, one core
                burnt) instead of sleeping on the futex.

        Returns:
            ``(version, slot, seq, timestamp_ns)`` as :meth:`acquire` returns, or
            ``None`` when ``timeout`` passed first.
        """
        q = self._header()
        q32 = self._q32
        slots = self._slots
        seq_idx = self._seq_idx
        deadline = None if timeout is None else time.monotonic() + timeout
        n = 0
        bad = 0
        while True:
            word = q32[NOTIFY_IDX]
            v: int = q[W_LATEST]
            if v > after:
                i: int = q[W_LATEST_SLOT]
                if i < slots:
                    si = seq_idx[i]
                    s: int = q[si]
                    if not s & 1 and q[si + S_VERSION] == v:
                        return v, i, s, q[si + S_WALL]
                found = self._scan(q, v)
                if found is not None:
                    return found
                bad += 1  # v's slot is being rewritten already: take the newer latest
                if bad >= MAX_RETRIES:
                    raise self._stuck(v)
                continue
            if spin:
                n += 1
                if n & 0x3FF or deadline is None or time.monotonic() < deadline:
                    continue
                return None
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
            self._futex.wait(word, left)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Unmap and release the lease; safe with views still alive (they keep the
        mapping until they are gone). Idempotent."""
        if self._closed:
            return
        self._closed = True
        q = self._q
        if self._writable and q is not None:
            with contextlib.suppress(ValueError, TypeError):
                if q[W_WRITER_PID] == os.getpid():
                    q[W_WRITER_PID] = 0
        self._views = []
        self._loan_views = []
        self._raw = []
        for mv in self._raw_mv:  # exports of the mmap: released, or it cannot be closed
            mv.release()
        self._raw_mv = []
        self._notify = np.empty(0, np.uint32)
        self._q32.release()
        if q is not None:
            q.release()
        self._q = None
        mm, self._mm = self._mm, None
        if mm is not None:
            # With views still alive, close() raises BufferError: the mapping then
            # stays until the last view dies (the mmap object is unmapped with it).
            with contextlib.suppress(BufferError):
                mm.close()
        if self._fd >= 0:
            if self._writable:
                # mmap keeps a dup of the fd; unlock the open file description
                # explicitly so the lease is free even while views live on.
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove the segment's name; mapped handles keep working until closed."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    @staticmethod
    def remove(name: str, *, namespace: str | None = None) -> bool:
        """Unlink a segment by name; True if it existed."""
        ns = resolve_namespace(namespace)
        validate_segment_name(name)
        try:
            os.unlink(shm_path(ns, name))
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def list(namespace: str | None = None) -> list[str]:
        """Names of the segments of a namespace present in ``/dev/shm``."""
        return list_segment_names(resolve_namespace(namespace))

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(
            f"segment {self._name!r} was not closed", ResourceWarning, source=self, stacklevel=2
        )
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<Segment {getattr(self, '_name', '?')!r} closed>"
        role = "writer" if self._writable else "reader"
        return (
            f"<Segment {self._namespace}/{self._name} {role} dtype={self._dtype} "
            f"shape={self._shape} slots={self._slots} version={self.version}>"
        )


_PRIVATE = object()


class _Reading:
    """The context manager of :meth:`Segment.read`: a class, not a generator, since it
    is on every reader's path (about 1 µs less per read)."""

    __slots__ = ("_seg", "_seq", "_slot", "_version")

    def __init__(self, seg: Segment, version: int | None) -> None:
        self._seg = seg
        self._version = version

    def __enter__(self) -> Snapshot:
        seg = self._seg
        v, i, s, ts = seg.acquire(self._version)
        self._version, self._slot, self._seq = v, i, s
        return Snapshot(seg._name, v, ts, seg._views[i], seg.monotonic_ns(i))

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A block that raised keeps its own exception (the read is not counted).
        if exc_type is None and not self._seg.validate(self._slot, self._seq):
            raise TornReadError(self._seg._name, self._version or 0)


def machine_supported() -> bool:
    """True on CPUs whose memory model makes the pure-Python seqlock sound (TSO)."""
    return platform.machine() in SUPPORTED_MACHINES


def wait_any(segments: list[Segment], afters: list[int], timeout: float | None = None) -> bool:
    """Block until one of ``segments`` has a version newer than its ``afters`` entry.

    One futex per segment, waited on together with ``futex_waitv`` (Linux 5.16+);
    older kernels fall back to short sleeps. Returns False on timeout.
    """
    if len(segments) == 1:
        return segments[0].wait(afters[0], timeout) > afters[0]
    deadline = None if timeout is None else time.monotonic() + timeout
    addrs = [seg._futex.addr for seg in segments]
    while True:
        words = [seg._q32[NOTIFY_IDX] for seg in segments]
        if any(seg.version > a for seg, a in zip(segments, afters, strict=True)):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        wait_many(addrs[:WAITV_MAX], words[:WAITV_MAX], deadline)
