"""The segment engine: one named POSIX shared-memory object holding a ring of numpy arrays.

Layout (layout version 1, all integers little-endian, one object per segment at
``/dev/shm/shmcast.<namespace>.<segment>``)::

    header block, HEADER_SIZE(K) = round_up(SLOT_CTL + 64*K, 4096) bytes
      byte   0  u64  magic  b"SHMCAST\\0"      written last at create: a half-made
                                              object never looks valid
      byte   8  u64  layout version (1)
      byte  16  u64  header size
      byte  24  u64  K, the number of slots (2..64)
      byte  32  u64  slot stride (bytes, a multiple of 4096)
      byte  40  u64  nbytes, the array's size
      byte  48  u64  epoch (random id of the broker or process that created it)
      byte  56  u64  created, ns since the Unix epoch
      byte  64  u64  latest committed version (0: none yet)     <- seqlock publish word
      byte  72  u64  writer pid (0: no writer)
      byte  80  u64  writer start time (clock ticks since boot, /proc/PID/stat 22)
      byte  88  u64  writer heartbeat, ns (updated at every commit)
      byte  96  u32  notify word (futex; +1 at every commit)
      byte 104  u64  dtype description length (bytes)
      byte 112  u64  ndim
      byte 120  u64  shape[0..ndim), at most 16 dims (ends at byte 248)
      byte 256  ...  dtype description: repr() of numpy.lib.format.dtype_to_descr, ASCII,
                     at most 1792 bytes (ends at byte 2048)
      byte 2048 K x 64-byte slot control lines, one cache line each:
                     u64 seq (odd while being written), u64 version, u64 commit ns
    slot i data at HEADER_SIZE + i * stride, page aligned, nbytes long

Writing version v (one writer, holding the lease = an exclusive flock on the
object, which the kernel drops when the writer dies): slot = v mod K; seq := odd;
copy the bytes; version, time; seq := even; latest := v; notify += 1; futex wake.

Reading: v := latest; slot = v mod K; s := seq (must be even) and the slot's
version must be v; hand out a read-only view; on release seq must still be s,
otherwise the read was torn and is reported as such, never as data.

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

import ast
import contextlib
import ctypes
import errno
import fcntl
import logging
import math
import mmap
import os
import platform
import secrets
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.lib.format as npformat
import numpy.typing as npt

from ._names import (
    SHM_DIR,
    ProcessId,
    list_segment_names,
    resolve_namespace,
    shm_path,
    validate_segment_name,
)
from .errors import (
    ArrayMismatchError,
    ClosedError,
    LayoutError,
    LayoutVersionError,
    NotASegmentError,
    NoVersionError,
    ReadOnlyError,
    SegmentError,
    SegmentExistsError,
    SegmentNotFoundError,
    ShmSpaceError,
    TornReadError,
    VersionUnavailableError,
    WriterBusyError,
)

__all__ = ["LAYOUT_VERSION", "Segment", "SegmentInfo", "Snapshot"]

log = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"SHMCAST\0", "little")
LAYOUT_VERSION = 1
PAGE = 4096
MAX_SLOTS = 64
MAX_NDIM = 16
MAX_DESCR = 1792
DESCR_OFF = 256
SLOT_CTL = 2048
SLOT_CTL_SIZE = 64
SUPPORTED_MACHINES = ("x86_64", "AMD64")

# Header word indices (byte offset / 8).
W_MAGIC = 0
W_LAYOUT = 1
W_HEADER_SIZE = 2
W_SLOTS = 3
W_STRIDE = 4
W_NBYTES = 5
W_EPOCH = 6
W_CREATED = 7
W_LATEST = 8
W_WRITER_PID = 9
W_WRITER_START = 10
W_HEARTBEAT = 11
NOTIFY_OFF = 96  # u32 futex word
NOTIFY_IDX = NOTIFY_OFF // 4  # its index in the u32 view
W_DESCR_LEN = 13
W_NDIM = 14
W_SHAPE = 15

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_INT_MAX = 2**31 - 1


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def header_size(slots: int) -> int:
    return _round_up(SLOT_CTL + SLOT_CTL_SIZE * slots, PAGE)


def slot_stride(nbytes: int) -> int:
    return max(PAGE, _round_up(nbytes, PAGE))


def segment_size(nbytes: int, slots: int) -> int:
    """Bytes of shared memory a segment of ``nbytes`` per version and ``slots`` slots takes."""
    return header_size(slots) + slots * slot_stride(nbytes)


def normalize_layout(
    dtype: npt.DTypeLike, shape: int | tuple[int, ...] | list[int]
) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """Validate a dtype and shape and fold a sub-array dtype into the shape.

    Raises:
        LayoutError: the dtype holds Python objects, the shape is negative or too
            large, or the description does not fit the header.
    """
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"not a numpy dtype: {dtype!r} ({exc})") from exc
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shp = tuple(int(n) for n in shape)
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"shape must be a tuple of integers, got {shape!r}") from exc
    if dt.subdtype is not None:
        base, sub = dt.subdtype
        dt, shp = base, shp + tuple(sub)
    if dt.hasobject:
        raise LayoutError(
            f"dtype {dt} holds Python objects, which cannot live in shared memory; "
            f"use fixed-size fields (e.g. 'S16' or 'U8' instead of object)"
        )
    if dt.itemsize == 0:
        raise LayoutError(f"dtype {dt} has no size; give strings and voids a length")
    if any(n < 0 for n in shp) or len(shp) > MAX_NDIM:
        raise LayoutError(f"shape {shp} must have at most {MAX_NDIM} non-negative dimensions")
    nbytes = math.prod(shp) * dt.itemsize
    if nbytes == 0:
        raise LayoutError(f"shape {shp} of {dt} holds no bytes; a segment needs at least one")
    if nbytes > 2**46:
        raise LayoutError(
            f"shape {shp} of {dt} is {nbytes} bytes, more than shmcast allows (64 TiB)"
        )
    try:
        descr = _describe(dt)
    except ValueError as exc:  # numpy cannot describe overlapping or out-of-order fields
        raise LayoutError(f"dtype {dt} cannot be recorded ({exc}); order fields by offset") from exc
    if len(descr) > MAX_DESCR:
        raise LayoutError(f"dtype {dt} is too complex to record (more than {MAX_DESCR} bytes)")
    return dt, shp


def _describe(dt: np.dtype[Any]) -> bytes:
    # ascii(), not repr(): field names and titles may hold any unicode character.
    # Dtype metadata is not part of the layout (numpy warns that it is dropped).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        descr = npformat.dtype_to_descr(dt)
    return ascii(descr).encode("ascii")


def _parse_descr(text: bytes) -> np.dtype[Any]:
    return np.dtype(npformat.descr_to_dtype(ast.literal_eval(text.decode("ascii"))))


def dtype_str(dt: np.dtype[Any]) -> str:
    """A string that ``parse_dtype`` turns back into exactly ``dt`` (for the wire and CLI)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        descr = npformat.dtype_to_descr(dt)
    return descr if isinstance(descr, str) else repr(descr)


def parse_dtype(text: str) -> np.dtype[Any]:
    """Inverse of :func:`dtype_str`; also takes plain numpy names such as ``float64``."""
    try:
        return _parse_descr(text.encode("ascii"))
    except (ValueError, SyntaxError, TypeError, UnicodeEncodeError, MemoryError, RecursionError):
        try:
            return np.dtype(text)
        except (TypeError, ValueError, SyntaxError) as exc:
            raise LayoutError(f"not a numpy dtype: {text!r}") from exc


def _shm_free() -> int | None:
    """Free bytes in /dev/shm, or None when it cannot be told."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _futex_syscall() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn


_syscall: Any = None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _syscall_fn() -> Any:
    global _syscall
    if _syscall is None:
        _syscall = _futex_syscall()
    return _syscall


def _bytes_castable(dtype: np.dtype[Any]) -> bool:
    """Whether ``memoryview(array).cast("B")`` works for arrays of ``dtype`` (plain
    native scalars; record, datetime and byte-swapped dtypes take numpy's copy)."""
    try:
        np.zeros(1, dtype).data.cast("B")
    except (TypeError, ValueError, NotImplementedError):
        return False
    return True


@dataclass(frozen=True)
class Snapshot:
    """One version of a segment as read: zero-copy and read-only inside ``read()``."""

    segment: str
    version: int
    timestamp_ns: int
    array: npt.NDArray[Any]


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

    def catalog_entry(self) -> dict[str, Any]:
        """The catalog's view of this header (``list``/``describe`` replies, ``shmcast ls``)."""
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
            "heartbeat": self.heartbeat_ns,
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
        free = _shm_free()
        if free is not None and size > free:  # refuse before making anything
            raise ShmSpaceError(name, size, free, SHM_DIR)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            raise SegmentExistsError(name, ns) from None
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise ShmSpaceError(name, size, _shm_free() or 0, SHM_DIR) from exc
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                log.warning("posix_fallocate unsupported on %s; pages are not reserved", path)
                os.ftruncate(fd, size)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            q = memoryview(mm).cast("Q")
            descr = _describe(dt)
            q[W_LAYOUT] = LAYOUT_VERSION
            q[W_HEADER_SIZE] = header_size(slots)
            q[W_SLOTS] = slots
            q[W_STRIDE] = slot_stride(nbytes)
            q[W_NBYTES] = nbytes
            q[W_EPOCH] = secrets.randbits(63) if epoch is None else epoch
            q[W_CREATED] = time.time_ns()
            q[W_DESCR_LEN] = len(descr)
            q[W_NDIM] = len(shp)
            for i, n in enumerate(shp):
                q[W_SHAPE + i] = n
            mm[DESCR_OFF : DESCR_OFF + len(descr)] = descr
            me = ProcessId.current()
            q[W_WRITER_PID] = me.pid
            q[W_WRITER_START] = me.start_time
            q[W_HEARTBEAT] = time.time_ns()
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
        oflags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(path, oflags)
        except FileNotFoundError:
            raise SegmentNotFoundError(name, ns) from None
        try:
            dt, shp, size = _read_layout(name, path, fd, wait)
            if writable:
                _take_lease(name, fd)
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
            q[W_HEARTBEAT] = time.time_ns()
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
            if writable and _bytes_castable(dtype)
            else []
        )
        self._seq_idx = [(SLOT_CTL + SLOT_CTL_SIZE * i) // 8 for i in range(self._slots)]
        self._notify = np.frombuffer(mm, dtype=np.uint32, count=1, offset=NOTIFY_OFF)
        self._notify_addr = int(self._notify.ctypes.data)
        self._q32 = memoryview(mm).cast("I")
        # The futex syscalls' ctypes arguments, built once: building c_void_p and
        # c_int objects per call cost ~0.6 µs of every commit.
        self._fsys: Any = None
        self._wake_args: tuple[Any, ...] = ()
        self._wait_addr: Any = None
        if _SYS_FUTEX is not None:
            self._fsys = _syscall_fn()
            self._wait_addr = ctypes.c_void_p(self._notify_addr)
            # FUTEX_WAKE reads no further arguments: four instead of seven saves ~0.1 µs.
            self._wake_args = (_SYS_FUTEX, self._wait_addr, _FUTEX_WAKE, _INT_MAX)
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

    def info(self) -> SegmentInfo:
        q = self._header()
        v = int(q[W_LATEST])
        ts = 0
        if v:
            ts = int(q[self._seq_idx[v % self._slots] + 2])
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
        )

    def writer_alive(self) -> bool:
        """Whether some process holds the writer lease (asked of the kernel, not guessed)."""
        if self._writable and not self._closed:
            return True
        return _lease_held(self._path)

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
        i = v % self._slots
        si = self._seq_idx[i]
        s = int(q[si])
        if s & 1:  # a writer died in the middle of this slot: step past its odd value
            s += 1
        q[si] = s + 1  # odd: readers of the version this slot held now fail validation
        return v, i, s

    def _commit(self, v: int, i: int, s: int) -> None:
        q = self._q
        assert q is not None
        si = self._seq_idx[i]
        now = time.time_ns()
        q[si + 1] = v
        q[si + 2] = now
        q[si] = s + 2  # even again: the slot is whole
        q[W_LATEST] = v  # after seq: whoever sees v finds its slot complete
        q[W_HEARTBEAT] = now
        q32 = self._q32
        q32[NOTIFY_IDX] = (q32[NOTIFY_IDX] + 1) & 0xFFFFFFFF
        if self._fsys is not None:
            self._fsys(*self._wake_args)

    def _abort(self, i: int, s: int) -> None:
        q = self._q
        assert q is not None
        si = self._seq_idx[i]
        q[si + 1] = 0  # the old version's bytes are gone: no version lives here now
        q[si] = s + 2

    def write(self, array: npt.NDArray[Any], *, version: int | None = None) -> int:
        """Copy ``array`` in as the next version and return its number (the first is 1).

        Args:
            array: the data, of the segment's dtype and shape.
            version: commit exactly this version instead of latest + 1 (a relay
                keeps its upstream's numbers); it must be newer than the latest.

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
        self._commit(v, i, s)
        return v

    @contextlib.contextmanager
    def loan(self, *, version: int | None = None) -> Iterator[npt.NDArray[Any]]:
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
        self._commit(v, i, s)

    def heartbeat(self) -> None:
        """Refresh the writer heartbeat without publishing (for idle writers)."""
        if not self._writable:
            raise ReadOnlyError(self._name)
        self._header()[W_HEARTBEAT] = time.time_ns()

    # ------------------------------------------------------------------ reading

    def acquire(self, version: int | None = None) -> tuple[int, int, int, int]:
        """Low-level read start: ``(version, slot, seq, timestamp_ns)``.

        Pair with :meth:`view` and :meth:`validate`; :meth:`read` wraps all three.
        """
        q = self._header()
        if version is None:
            while True:
                v = int(q[W_LATEST])
                if v == 0:
                    raise NoVersionError(self._name)
                si = self._seq_idx[v % self._slots]
                s = int(q[si])
                if not s & 1 and q[si + 1] == v:
                    return v, v % self._slots, s, int(q[si + 2])
                # the writer lapped us between the two loads: take the newer latest
        v = int(version)
        si = self._seq_idx[v % self._slots]
        s = int(q[si])
        if v <= 0 or s & 1 or q[si + 1] != v:
            latest = int(q[W_LATEST])
            if latest == 0:
                raise NoVersionError(self._name)
            raise VersionUnavailableError(self._name, v, latest, self._slots)
        return v, v % self._slots, s, int(q[si + 2])

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
            if self.validate(i, s):
                return Snapshot(self._name, v, ts, data)
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
            self._futex_wait(word, left)

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
        while True:
            word = q32[NOTIFY_IDX]
            v: int = q[W_LATEST]
            if v > after:
                si = seq_idx[v % slots]
                s: int = q[si]
                if not s & 1 and q[si + 1] == v:
                    return v, v % slots, s, q[si + 2]
                continue  # lapped between the two loads: take the newer latest
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
            self._futex_wait(word, left)

    def _futex_wait(self, word: int, left: float | None) -> None:
        if self._fsys is None:
            time.sleep(0.0005 if left is None else min(left, 0.0005))
            return
        ts = None
        if left is not None:
            sec = int(left)
            ts = ctypes.byref(_Timespec(sec, int((left - sec) * 1e9)))
        # Sleeps only if the word is still `word`: a commit between our load and
        # the syscall changes it, so no wake-up can be lost.
        self._fsys(_SYS_FUTEX, self._wait_addr, _FUTEX_WAIT, word, ts, None, 0)

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
        return Snapshot(seg._name, v, ts, seg._views[i])

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A block that raised keeps its own exception (the read is not counted).
        if exc_type is None and not self._seg.validate(self._slot, self._seq):
            raise TornReadError(self._seg._name, self._version or 0)


def _read_layout(
    name: str, path: str, fd: int, wait: float
) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """Read and check the header through a private read-only mapping."""
    deadline = time.monotonic() + wait
    while True:
        size = os.fstat(fd).st_size
        if size >= PAGE:
            with mmap.mmap(fd, PAGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
                head = bytes(mm[:PAGE])
            magic = int.from_bytes(head[0:8], "little")
            if magic == MAGIC:
                break
            if magic != 0:
                raise NotASegmentError(name, path, "wrong magic number")
        elif size != 0:
            raise NotASegmentError(name, path, f"{size} bytes is smaller than any header")
        if time.monotonic() >= deadline:
            raise NotASegmentError(name, path, "header never completed (creator died?)")
        time.sleep(0.005)
    w = [int.from_bytes(head[8 * k : 8 * k + 8], "little") for k in range(W_SHAPE + MAX_NDIM)]
    layout = w[W_LAYOUT]
    if layout != LAYOUT_VERSION:
        raise LayoutVersionError(name, layout, LAYOUT_VERSION)
    slots, nbytes, stride, hsize = w[W_SLOTS], w[W_NBYTES], w[W_STRIDE], w[W_HEADER_SIZE]
    ndim, dlen = w[W_NDIM], w[W_DESCR_LEN]
    if not 2 <= slots <= MAX_SLOTS:
        raise NotASegmentError(name, path, f"impossible slot count {slots}")
    if hsize != header_size(slots) or stride != slot_stride(nbytes):
        raise NotASegmentError(name, path, "header and slot sizes do not match the layout")
    if ndim > MAX_NDIM or not 0 < dlen <= MAX_DESCR:
        raise NotASegmentError(name, path, "impossible dtype description or ndim")
    expected = hsize + slots * stride
    if size != expected:
        raise NotASegmentError(name, path, f"object is {size} bytes, header says {expected}")
    try:
        dt = _parse_descr(head[DESCR_OFF : DESCR_OFF + dlen])
    except (ValueError, SyntaxError, TypeError, UnicodeDecodeError, MemoryError) as exc:
        raise NotASegmentError(name, path, f"unreadable dtype ({exc})") from exc
    shape = tuple(w[W_SHAPE : W_SHAPE + ndim])
    # The layout must be one that create() accepts as is: no Python objects, no
    # empty arrays, no sub-array dtype left unfolded (views are built from it).
    try:
        canonical = normalize_layout(dt, shape)
    except LayoutError as exc:
        raise NotASegmentError(name, path, f"impossible layout ({exc})") from exc
    if canonical != (dt, shape):
        raise NotASegmentError(name, path, f"layout {dt} {shape} is not in canonical form")
    if math.prod(shape) * dt.itemsize != nbytes:
        raise NotASegmentError(name, path, "dtype and shape do not add up to the slot size")
    return dt, shape, size


def _take_lease(name: str, fd: int) -> None:
    # Retried briefly: a reader probing the lock (writer_alive) holds it for microseconds.
    deadline = time.monotonic() + 0.2
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                head = os.pread(fd, 8 * (W_WRITER_PID + 1), 0)
                pid = int.from_bytes(head[8 * W_WRITER_PID :], "little")
                raise WriterBusyError(name, pid or None) from None
            time.sleep(0.002)


def _lease_held(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our shared probe lock
    return False


def machine_supported() -> bool:
    """True on CPUs whose memory model makes the pure-Python seqlock sound (TSO)."""
    return platform.machine() in SUPPORTED_MACHINES


class _FutexWaitv(ctypes.Structure):
    _fields_ = [
        ("val", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


_SYS_FUTEX_WAITV = 449 if platform.machine() in ("x86_64", "aarch64") else None
_FUTEX2_SIZE_U32 = 0x02
_CLOCK_MONOTONIC = 1
_waitv_ok: bool | None = None


def wait_any(segments: list[Segment], afters: list[int], timeout: float | None = None) -> bool:
    """Block until one of ``segments`` has a version newer than its ``afters`` entry.

    One futex per segment, waited on together with ``futex_waitv`` (Linux 5.16+);
    older kernels fall back to short sleeps. Returns False on timeout.
    """
    global _waitv_ok, _syscall
    if len(segments) == 1:
        return segments[0].wait(afters[0], timeout) > afters[0]
    deadline = None if timeout is None else time.monotonic() + timeout
    waiters = (_FutexWaitv * len(segments))()
    while True:
        for k, seg in enumerate(segments):
            waiters[k].val = seg._q32[NOTIFY_IDX]
            waiters[k].uaddr = seg._notify_addr
            waiters[k].flags = _FUTEX2_SIZE_U32
        if any(seg.version > a for seg, a in zip(segments, afters, strict=False)):
            return True
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        if _SYS_FUTEX_WAITV is None or _waitv_ok is False:
            time.sleep(0.0005 if left is None else min(left, 0.0005))
            continue
        if _syscall is None:
            _syscall = _futex_syscall()
        ts = None
        if deadline is not None:
            sec = int(deadline)
            ts = ctypes.byref(_Timespec(sec, int((deadline - sec) * 1e9)))
        rc = _syscall(
            _SYS_FUTEX_WAITV, waiters, ctypes.c_uint(len(segments)), 0, ts, _CLOCK_MONOTONIC
        )
        if rc < 0 and ctypes.get_errno() == errno.ENOSYS:
            _waitv_ok = False
