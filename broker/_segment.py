"""The segment engine: a handle on one shared-memory object holding a ring of numpy arrays.

The byte layout is :mod:`._layout`'s; the writer's lease is :mod:`._lease`'s.
The seqlock and the wake run in a core (:mod:`._backend` picks it): the
compiled ``_core`` (``broker/_core.c``), or the pure-Python fallback
(:mod:`._pycore`, x86-64 only). This module keeps the API, the checks and the
errors; the core does the loads, stores, fences, futex calls and bulk copies.

Writing version v (one writer, holding the lease = an exclusive flock on the
object, which the kernel drops when the writer dies): the slot is the one after
the latest version's, i = (latest slot + 1) mod K, never the latest's own, whatever
v is (a relay skips versions; a loan may be aborted); seq := odd, then a release
fence; copy the bytes; version, commit times; seq := even (release); latest
slot := i, latest := v (release); waiters := 0 (an exchange); notify += 1
(release); a futex wake only if the exchange found a sleeper announced.

Reading the latest: v := latest, i := latest slot, s := seq of slot i (acquire
loads; s must be even and the slot's version v; else the slot holding v is
looked for among the K, and if the writer lapped the reader, the newer latest);
hand out a read-only view; on release an acquire fence, then seq must still be
s, otherwise the read was torn and is reported as such, never as data.
Reading an exact version v: the slot whose version is v (a scan of the K control
lines), validated the same way; gone from the ring is VersionUnavailableError.
No reader loops without bound: after MAX_RETRIES inconsistent looks over at least
20 ms it reports SlotStuckError (a writer died in the middle of a slot that the
header still names, or something writes outside the protocol).

Waiting: a waiter announces itself in the header's waiters word (byte 100)
before it sleeps on the notify word, so a commit nobody waits for makes no
syscall; the ``_core.c`` header comment proves that no wake-up is lost. Readers
map the object read-only; a reader that sleeps maps the first page a second
time, writable, inside the core, for that one word. A reader that cannot (the
object is not writable to it, or ``/dev/shm`` is mounted read-only) sleeps in
slices of :data:`UNANNOUNCED_POLL` seconds, unless the object is readable by
others than its owner: then every writer wakes at every commit.

"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import operator
import os
import secrets
import stat
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from . import _pycore
from ._backend import ENV, TSO_MACHINES, Core, RingLike, c_core, compiled, core_status
from ._closing import Closing
from ._layout import (
    DESCR_OFF,
    LAYOUT_VERSION,
    MAGIC,
    MAX_SLOTS,
    MAX_VERSION,
    NOTIFY_OFF,
    W_CREATED,
    W_DESCR_LEN,
    W_EPOCH,
    W_HEADER_SIZE,
    W_HEARTBEAT,
    W_INCARNATION,
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
    mode_problem,
    normalize_layout,
    read_header,
    segment_size,
    shm_free,
    slot_ctl_index,
    slot_stride,
)
from ._lease import (
    ProcessId,
    forget,
    lease_held,
    open_for_lease,
    prepare_remap,
    remap_shared,
    take_lease,
)
from ._names import (
    PREFIX,
    SHM_DIR,
    check_owned,
    list_segment_names,
    resolve_namespace,
    shm_path,
    validate_segment_name,
)
from .errors import (
    RAISE_NOFILE,
    ArrayMismatchError,
    ClosedError,
    ConfigError,
    LayoutError,
    NotASegmentError,
    NoVersionError,
    OutOfDescriptorsError,
    ReadOnlyError,
    SegmentError,
    SegmentExistsError,
    SegmentNotFoundError,
    ShmSpaceError,
    SlotStuckError,
    TornReadError,
    VersionUnavailableError,
)

__all__ = [
    "Segment",
    "SegmentInfo",
    "Snapshot",
    "engine_core",
    "machine_supported",
    "select_core",
    "wait_any",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T", bound=tuple[int, ...])

#: CPUs whose memory model (TSO) makes the pure-Python fallback's seqlock sound.
SUPPORTED_MACHINES = TSO_MACHINES
#: Inconsistent looks at the header a reader takes before it reports SlotStuckError
#: (over at least 20 ms: a writer preempted between two stores is not stuck).
MAX_RETRIES = 1000
#: Copies of at least this many bytes run in the core without the GIL (another
#: thread runs meanwhile); smaller ones are one memmove under it, cheaper to start.
#: Measured: the core's call costs ~2 µs more (the array's address), the GIL hand-over
#: tens of µs when another thread wants it; a 1 MiB copy takes ~40-100 µs.
COPY_UNLOCKED = 1 << 20
#: A reader that cannot announce itself in the waiters word sleeps at most this long
#: per slice (a writer that skips unwatched wakes would not wake it).
UNANNOUNCED_POLL = 0.002
#: Open flags: never follow a symlink planted under a segment's name.
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW

_fallback_warned: list[bool] = []

#: What :meth:`Segment.write_bytes` and :meth:`Segment.read_into` take: any object
#: with the buffer protocol (``collections.abc.Buffer`` from Python 3.12).
BytesLike = bytes | bytearray | memoryview | np.ndarray[Any, Any]


def select_core() -> Core:
    """The core for a segment being opened now (rules: :mod:`._backend`).

    Raises:
        ConfigError: ``SHMCAST_CORE`` asks for a core that cannot run here, or no
            core can (no compiled core on a CPU other than x86-64).
    """
    name, why = core_status()
    if name is None:
        raise ConfigError(ENV, why, "the environment")
    if name == "c":
        return c_core()
    chosen = os.environ.get(ENV, "").strip().lower() == "python"
    if compiled() is None and not chosen and not _fallback_warned:
        _fallback_warned.append(True)  # once per process: the extension is missing
        warnings.warn(why, RuntimeWarning, stacklevel=3)
    return _pycore.CORE


#: One past the largest commit time the header's 64-bit word holds.
_U64 = 1 << 64

#: The writer handles of this process: a child forked from it may not write
#: through its copies (see :func:`_disown_writers`). Made with the first writer.
_writers: weakref.WeakSet[Segment] | None = None
#: Writer copies a forked child could not make let go of their lease (no /proc).
_kept_leases: weakref.WeakSet[Segment] | None = None
#: The device of SHM_DIR (st_dev), taken with the fork hook: the hook looks at the
#: locks of descriptors of files there alone.
_shm_dev: int | None = None


def _out_of_descriptors(err: int, name: str, path: str) -> OutOfDescriptorsError:
    """EMFILE/ENFILE met attaching segment ``name``: an ``OSError`` still (the broker
    and the doctor must not take it for a damaged segment), named with the limit,
    the descriptors open and the fix. Before, the bare "[Errno 24] Too many open
    files" came out of ``Subscriber``, ``Recorder`` and ``Segment.attach``."""
    return OutOfDescriptorsError.from_os(
        err,
        f"segment {name!r}",
        path,
        fix=(
            "each segment a process attaches holds one: raise the limit "
            f"({RAISE_NOFILE}; `shmcast doctor` checks it), or attach fewer segments "
            "in this process"
        ),
    )


def _arm_fork_hook() -> None:
    """Register :func:`_disown_writers` at fork (and look ``mmap(2)`` up, here and
    not in a forked child: see :func:`prepare_remap`), before this process takes its
    first lease: a child forked while a writer is being opened (its lease taken, the
    handle not yet tracked) lets go of that lease too."""
    global _writers, _shm_dev
    if _writers is None:
        _writers = weakref.WeakSet()
        prepare_remap()
        with contextlib.suppress(OSError):
            _shm_dev = os.stat(SHM_DIR).st_dev
        os.register_at_fork(after_in_child=_disown_writers)


def _track_writer(seg: Segment) -> None:
    _arm_fork_hook()
    assert _writers is not None
    _writers.add(seg)


def _disown_writers() -> None:
    """In a child just forked: every writer handle inherited is the parent's. The
    lease (a flock on the open file description both share) still says the parent
    writes, so a write of the child's would go under the parent's and its readers'
    feet; each copy now refuses to write (:class:`ReadOnlyError`, naming the fix),
    at no cost to a write: the flags the write path looks at anyway change here."""
    if _writers is None:
        return
    segs = [seg for seg in list(_writers) if seg._disown()]
    _writers.clear()
    _let_go_of_leases(segs)


def _let_go_of_leases(segs: list[Segment]) -> None:
    """In a child just forked: keep none of the parent's leases. A flock belongs to
    the open file description, which the child's inherited descriptors (a copy's own
    and the one its mmap keeps) and mappings share with the parent's: while the child
    holds any of them, the lease outlives its opener (a killed opener's segment
    refused every new writer for as long as its child lived). For each segment
    object a descriptor of which holds a ``flock`` (its ``/proc/self/fdinfo`` lists
    it): a writer copy's, and one the parent was opening in another thread at the
    fork (its lease taken, its handle not made yet), every shared mapping of the
    object (``/proc/self/maps``) is replaced in place through a new open file
    description of it (reopened through ``/proc/self/fd``; same pages, same address,
    same protection, so views read on), and each such descriptor is pointed at a new
    description (same access mode): the lock stays with the parent's, and dies with
    it. Other descriptors of the objects (a reader handle's, the application's own
    ``os.open``) hold no lease and are left alone: their offset, flags and sharing
    with the parent are the application's. Where that fails the copy keeps the
    lease, as before."""
    global _kept_leases
    kept: weakref.WeakSet[Segment] = weakref.WeakSet(segs)
    _kept_leases = kept
    copies: dict[Segment, tuple[int, int]] = {}  # each copy's object (st_dev, st_ino)
    for seg in segs:
        if seg._fd < 0:  # closed: it holds nothing
            kept.discard(seg)
            continue
        with contextlib.suppress(OSError):
            st = os.fstat(seg._fd)
            copies[seg] = (st.st_dev, st.st_ino)
    tracked = set(copies.values())
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return
    leases: dict[tuple[int, int], list[int]] = {}
    for fd in fds:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or _shm_dev not in (None, st.st_dev):
                continue
            obj = (st.st_dev, st.st_ino)
            held = _holds_flock(fd)
            if held is None:  # unknown: as before, a writer copy's object only
                held = obj in tracked
            if held and _is_segment_object(fd):
                leases.setdefault(obj, []).append(fd)
        except OSError:
            continue  # the listing's own descriptor, closed now
    failed = set()
    try:
        maps = _shared_mappings(set(leases)) if leases else {}
    except (OSError, ValueError):  # no maps to read: nothing moved, the leases kept
        maps = None
    for obj, lock_fds in leases.items():
        try:
            if maps is None:
                raise OSError("/proc/self/maps could not be read")
            _move_object(lock_fds, maps.get(obj, []))
        except OSError:
            failed.add(obj)
    for seg, obj in copies.items():
        if obj not in failed:
            kept.discard(seg)


def _holds_flock(fd: int) -> bool | None:
    """Whether ``fd``'s open file description holds a ``flock`` (a ``lock:`` line of
    its ``/proc/self/fdinfo``; kernels list the locks a description owns there).
    None when that cannot be read."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            info = f.read()
    except OSError:
        return None
    return any(line.startswith(b"lock:") and b" FLOCK " in line for line in info.splitlines())


def _is_segment_object(fd: int) -> bool:
    """Whether ``fd`` is open on an object of ``/dev/shm`` named as shmcast's (or
    that was: a name unlinked reads ``... (deleted)``)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return target.startswith(os.path.join(SHM_DIR, PREFIX + "."))


def _shared_mappings(
    objs: set[tuple[int, int]],
) -> dict[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The shared mappings of ``objs`` (``(st_dev, st_ino)``) in this process, from
    ``/proc/self/maps``: (address, length, protection, offset) each."""
    devs = {(os.major(dev), os.minor(dev), ino): (dev, ino) for dev, ino in objs}
    found: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    with open("/proc/self/maps", "rb") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5 or not parts[1].endswith(b"s"):
            continue
        major, _, minor = parts[3].partition(b":")
        obj = devs.get((int(major, 16), int(minor, 16), int(parts[4])))
        if obj is None:
            continue
        lo, _, hi = parts[0].partition(b"-")
        perms = parts[1]
        prot = (
            (mmap.PROT_READ if perms[0:1] == b"r" else 0)
            | (mmap.PROT_WRITE if perms[1:2] == b"w" else 0)
            | (mmap.PROT_EXEC if perms[2:3] == b"x" else 0)
        )
        addr = int(lo, 16)
        found.setdefault(obj, []).append((addr, int(hi, 16) - addr, prot, int(parts[2], 16)))
    return found


def _move_object(lock_fds: list[int], mappings: list[tuple[int, int, int, int]]) -> None:
    """Map a new open file description of the object over each of its ``mappings``
    in place, and point each of ``lock_fds`` (the descriptors whose description holds
    the lease) at a new description of its own access mode. OSError when one fails."""
    modes = {fd: fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in lock_fds}
    if mappings:
        writable = any(prot & mmap.PROT_WRITE for _, _, prot, _ in mappings)
        mode = os.O_RDWR if writable else os.O_RDONLY  # what the mappings were made with
        new = os.open(f"/proc/self/fd/{lock_fds[0]}", mode | os.O_CLOEXEC)
        try:
            for addr, length, prot, offset in mappings:
                if not remap_shared(addr, length, prot, new, offset):
                    raise OSError(f"mmap(MAP_FIXED) of {length} bytes at {addr:#x} failed")
        finally:
            os.close(new)
    for fd, mode in modes.items():
        new = os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)
        try:
            os.dup2(new, fd, inheritable=os.get_inheritable(fd))
        finally:
            os.close(new)


def _wall_ns(name: str, timestamp_ns: object) -> int:
    """``timestamp_ns`` as the core records it (0: now), checked before a slot is
    touched: a commit time the header cannot hold must not cost a version."""
    if timestamp_ns is None:
        return 0
    try:
        # Ints only: operator.index refuses 1.5 and "50"; a bool is an int to it.
        ts = -1 if isinstance(timestamp_ns, bool) else operator.index(timestamp_ns)  # type: ignore[arg-type]
    except TypeError:
        ts = -1
    if not 0 <= ts < _U64:
        raise SegmentError(
            name,
            f"timestamp_ns={timestamp_ns!r} for segment {name!r} is not a commit time: "
            "pass nanoseconds since the epoch as an int from 0 to 2**64-1 "
            "(time.time_ns()), or None for now; nothing was published",
        )
    return ts


def _version_number(name: str, version: object) -> int:
    """``version`` as a commit's number: an int (a numpy integer too), never coerced
    from a float, a string or a bool."""
    if not isinstance(version, bool):
        with contextlib.suppress(TypeError):
            return operator.index(version)  # type: ignore[arg-type]
    raise SegmentError(
        name,
        f"version={version!r} for segment {name!r} is not a version number: pass an int "
        f"newer than the latest (up to {MAX_VERSION}), or None for latest + 1; "
        "nothing was published",
    )


def _read_version(name: str, version: object) -> int:
    """A version to read: an int (a numpy integer too), never coerced from a float,
    a string or a bool (``read(1.9)`` read version 1)."""
    if not isinstance(version, bool):
        with contextlib.suppress(TypeError):
            return operator.index(version)  # type: ignore[arg-type]
    raise SegmentError(
        name,
        f"version={version!r} of segment {name!r} is not a version number: pass an int "
        "(an update's version), or None for the latest",
    )


_INF = math.inf


def _timeout(timeout: float | None) -> float | None:
    """A wait's ``timeout`` as both cores take it: None (no limit) or seconds >= 0.

    Infinity is None; a negative timeout (a deadline already passed) is 0: one look,
    no sleep. The callers inline the test ``0 <= timeout < _INF`` of a plain value.

    Raises:
        ValueError: NaN, which no deadline can be made of.
    """
    if timeout is None or 0 <= timeout < _INF:
        return timeout
    if math.isnan(timeout):
        raise ValueError(
            f"timeout={timeout!r} is not a number of seconds: pass seconds >= 0, "
            "or None (or math.inf) to wait without a limit"
        )
    return None if timeout > 0 else 0.0


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


class Segment(Closing):
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
        self._ring: RingLike | None = None
        self._writable = False
        # The ring while this handle may write. Instances keep under CPython's 30
        # shared-key attributes: one more slowed every write by about 0.1 us.
        self._wring: RingLike | None = None
        self._pid = os.getpid()  # the opener: a forked child's copy owns no lease

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
            mode: permission bits of the object (owner-only by default): read and
                write bits only, the owner's among them, none for others to write
                (0o600, 0o640, 0o644), the broker's ``mode`` rule.
            epoch: id recorded in the header (the broker's); random when omitted.
            prefault: map the slots with ``MAP_POPULATE`` so that the first write
                pays no page faults.

        Raises:
            SegmentExistsError: the name is taken.
            ShmSpaceError: ``/dev/shm`` cannot hold the segment.
            LayoutError: bad dtype, shape or slots.
            ConfigError: a ``mode`` that rule refuses (nothing is created).
        """
        ns = resolve_namespace(namespace)
        validate_segment_name(name)
        bad_mode = mode_problem(mode)
        if bad_mode is not None:
            raise ConfigError("mode", bad_mode)
        core = select_core()  # before anything is made: a core that cannot run refuses here
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
            # Until locked, a child forked by another thread closes its copy: see there.
            fd = open_for_lease(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode)
        except FileExistsError:
            # Ours (a segment that exists), or a squatter: say which.
            with contextlib.suppress(FileNotFoundError):
                check_owned(path, os.lstat(path), os.getuid())
            raise SegmentExistsError(name, ns) from None
        try:
            # The lease first: until its header is written the object is no valid
            # segment, and reserving the pages of a large one takes seconds; a held
            # lease is what tells `doctor --fix` a writer is making it.
            _arm_fork_hook()  # before the lease: see there
            take_lease(name, fd)
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
            # Last, after a full fence: a reader that sees the magic (and fences, see
            # read_header) sees every field above.
            core.fence()
            q[W_MAGIC] = MAGIC  # until now the object is "being created"
            q.release()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            forget(fd)
            os.close(fd)
            raise
        seg = cls(_PRIVATE)
        seg._setup(core, name, ns, path, fd, mm, writable=True, dtype=dt, shape=shp, slots=slots)
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
        owner: int | None = None,
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
            owner: the uid of the namespace's owner (its broker's: ``hello`` says
                it); ``None`` is this process's. Only a regular file of that user
                or of root that nobody else may write is attached.

        Raises:
            SegmentNotFoundError, NotASegmentError, LayoutVersionError, WriterBusyError.
            OwnershipError: the object is another user's, or others may write it.
        """
        ns = resolve_namespace(namespace)
        validate_segment_name(name)
        core = select_core()
        path = shm_path(ns, name)
        # O_NONBLOCK: a FIFO planted under the name (anyone may, in /dev/shm) is
        # refused below (not a regular file) rather than waited on for a writer.
        oflags = (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS | os.O_NONBLOCK
        try:
            # A writer's: until locked, a child forked by another thread closes its copy.
            fd = open_for_lease(path, oflags) if writable else os.open(path, oflags)
        except FileNotFoundError:
            raise SegmentNotFoundError(name, ns) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
                raise NotASegmentError(name, path, "a symbolic link, not a segment") from None
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors(exc.errno, name, path) from exc
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotASegmentError(name, path, "not a regular file")
            # Before a byte of it is read: a squatter's object is never trusted.
            check_owned(path, st, os.getuid() if owner is None else owner)
            dt, shp, slots, size = read_header(name, path, fd, wait, fence=core.fence)
            if writable:
                _arm_fork_hook()  # before the lease: see there
                head = os.pread(fd, 8 * (W_WRITER_PID + 1), 0)
                take_lease(name, fd, int.from_bytes(head[8 * W_WRITER_PID :], "little"))
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=prot)  # dup()s the fd
        except BaseException as exc:
            forget(fd)
            os.close(fd)
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors(exc.errno, name, path) from exc
            raise
        seg = cls(_PRIVATE)
        seg._setup(
            core, name, ns, path, fd, mm, writable=writable, dtype=dt, shape=shp, slots=slots
        )
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
        core: Core,
        name: str,
        namespace: str,
        path: str,
        fd: int,
        mm: mmap.mmap,
        *,
        writable: bool,
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
        slots: int,
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
        # The notify word, for waits that sleep on it beside other words (a
        # subscriber's namespace word): its address and value. A buffer export
        # of the mapping, released at close.
        self._notify = np.frombuffer(mm, dtype=np.uint32, count=1, offset=NOTIFY_OFF)
        # The sizes from the layout read_header checked, never the live header again:
        # whoever may write the object could change it since (the core refuses a
        # layout larger than the mapping all the same).
        count = math.prod(shape)
        self._slots = slots
        self._nbytes = count * dtype.itemsize
        hs = header_size(slots)
        stride = slot_stride(self._nbytes)
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
        # (Every handle's: read_into() copies out through them too.)
        self._slot_mv: list[memoryview] = [
            memoryview(mm)[hs + i * stride : hs + i * stride + self._nbytes]
            for i in range(self._slots)
        ]
        self._cast_ok = writable and bytes_castable(dtype)
        self._core = core
        # A writer wakes at every commit when others than the owner may read the
        # object: such a reader may be unable to announce itself (no write access).
        always_wake = bool(os.fstat(fd).st_mode & 0o077)
        self._ring = core.ring(mm, self._slots, hs, stride, self._nbytes, writable, always_wake)
        # The ring keeps the object's identity for linked() from its first look: taken
        # now, while the descriptor is surely this handle's (a first look after a
        # close() in another thread would fstat whatever reuses its number).
        self._ring.same_object(path, fd)
        self._waiters_tried = writable
        self.reads = 0
        self.torn_reads = 0
        # One write at a time per handle, from begin to commit or abort: two threads
        # writing through one handle would share a version number and a slot.
        # _wthread is the thread of the write or open loan (0: none), so that a
        # write nested in the same thread's loan is refused, not deadlocked.
        # Reentrant for close() alone: a signal handler's close() that interrupts
        # this thread's write takes it at once (a plain lock it would wait on for
        # ever), aborts that write's slot, and the write then raises ClosedError.
        # A loan holds it to begin and to end, not for its block: whichever thread
        # ends the loan takes it then (a loan's generator abandoned in one thread
        # and finalised in another released an RLock it did not own: RuntimeError,
        # and the lock stayed held, every other thread's write waiting for ever).
        # Writes of other threads wait meanwhile on _lent, clear while a loan is open.
        self._wlock = threading.RLock()
        self._wthread = 0
        self._lent = threading.Event()
        self._lent.set()
        # The open loan's (slot, seq, array); taken under _loan_guard by whoever ends
        # it: the loan's exit (commit or abort) or close() (abort).
        self._loan: tuple[int, int, npt.NDArray[Any]] | None = None
        self._loan_guard = threading.Lock()
        self._closed = False
        if writable:
            self._wring = self._ring
            _track_writer(self)

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
        ring = self._ring  # inlined _core_ring(): this is the busy-poll of many readers
        if ring is None:
            raise ClosedError(f"segment {getattr(self, '_name', '?')!r}")
        return ring.latest()

    @property
    def core(self) -> str:
        """Which core runs this handle's seqlock: ``"c"`` (compiled) or ``"python"``."""
        return self._core.name

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
        ring = self._core_ring()
        got = ring.acquire_latest(True)
        v, ts, mono = (got[0], got[3], got[4]) if isinstance(got, tuple) else (ring.latest(), 0, 0)
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

    def linked(self) -> bool:
        """Whether the segment's name still leads to this object: False once it was
        deleted (``shmcast rm``, a broker's reclaim), or deleted and made again.
        A writer that goes on writing into an unlinked object writes for no one.
        (One ``stat`` of the path, in the core, compared with the object's identity
        the core took when the handle was opened: about 1.3 µs, where ``os.fstat``
        and ``os.stat`` took 3.)"""
        ring = self._ring
        if self._closed or ring is None:
            return False
        return ring.same_object(self._path, self._fd)

    def writer_alive(self) -> bool:
        """Whether some process holds the writer lease (asked of the kernel, not guessed)."""
        if self._writable and not self._closed:
            return True
        # The probe holds a shared flock for a moment: a child forked by another
        # thread meanwhile would keep it (and every writer out) for its whole life,
        # but for the fork hook, which lets go of it.
        _arm_fork_hook()
        return lease_held(self._path)

    def _header(self) -> memoryview:
        q = self._q
        if q is None:  # close() sets it to None
            raise ClosedError(f"segment {getattr(self, '_name', '?')!r}")
        return q

    def _core_ring(self) -> RingLike:
        ring = self._ring
        if ring is None:  # close() sets it to None
            raise ClosedError(f"segment {getattr(self, '_name', '?')!r}")
        return ring

    def _waiting_ring(self) -> RingLike:
        """The ring, with this reader announced-capable: on the first wait a reader maps
        the object's first page writable for the waiters word (inside the core)."""
        ring = self._core_ring()
        if not self._waiters_tried:
            self._waiters_tried = True
            self._map_waiters(ring)
        return ring

    def _map_waiters(self, ring: RingLike) -> None:
        try:
            fd = os.open(self._path, os.O_RDWR | _OPEN_FLAGS)
        except OSError as exc:
            self._cannot_announce(ring, exc.strerror or str(exc))
            return
        try:
            mine, other = os.fstat(self._fd), os.fstat(fd)
            if (mine.st_dev, mine.st_ino) != (other.st_dev, other.st_ino):
                # The name now leads to another object: never write into that one.
                self._cannot_announce(ring, "the name was replaced since it was attached")
                return
            ring.map_waiters(fd)
        except OSError as exc:
            self._cannot_announce(ring, exc.strerror or str(exc))
        finally:
            os.close(fd)

    def _cannot_announce(self, ring: RingLike, why: str) -> None:
        if os.fstat(self._fd).st_mode & 0o077:
            return  # readable by others: its writers wake at every commit
        ring.set_poll(UNANNOUNCED_POLL)
        log.info(
            "segment %r: cannot announce a sleeping reader (%s); waiting in %g s slices",
            self._name,
            why,
            UNANNOUNCED_POLL,
        )

    # ------------------------------------------------------------------ writing

    def _check_array(self, array: npt.NDArray[Any]) -> None:
        if not isinstance(array, np.ndarray):
            raise ArrayMismatchError(self._name, "type", "numpy.ndarray", type(array).__name__)
        if type(array) is not np.ndarray and isinstance(array, np.ma.MaskedArray):
            raise ArrayMismatchError(
                self._name,
                "the array",
                "a plain numpy.ndarray",
                "a numpy.ma.MaskedArray",
                fix="nothing was published (a segment holds no mask: pass "
                "arr.filled(fill_value), or np.asarray(arr) for the data under the mask)",
            )
        if array.dtype != self._dtype:
            raise ArrayMismatchError(self._name, "dtype", self._dtype, array.dtype)
        if array.shape != self._shape:
            raise ArrayMismatchError(self._name, "shape", self._shape, array.shape)

    def _begin(self, version: int | None = None) -> tuple[RingLike, int, int, int]:
        """Start a write (the caller holds ``_wlock``)."""
        ring = self._core_ring()
        if not self._writable:
            raise self._read_only()
        v = 0 if version is None else _version_number(self._name, version)
        if version is not None and not 0 < v <= MAX_VERSION:
            raise self._bad_version(ring.latest(), version)
        # close() began in another thread (it waits for no new write), or in a signal
        # handler; no call from this look to the compiled core's begin.
        if self._closed:
            raise ClosedError(f"segment {self._name!r}")
        try:
            got = ring.begin(v)
        except ValueError:  # the fallback's begin is Python: a handler's close() in it
            if self._closed:
                raise self._closed_meanwhile() from None
            raise
        if got is None:
            raise self._bad_version(ring.latest(), version)
        # The slot after the latest version's, never the latest's own: readers of the
        # latest version are never torn by a write, whatever number it commits.
        return ring, got[0], got[1], got[2]

    def _bad_version(self, latest: int, version: int | None) -> SegmentError:
        v = latest + 1 if version is None else _version_number(self._name, version)
        if v <= latest:
            # Readers and announcements rely on versions only going forward.
            return SegmentError(
                self._name,
                f"version {v} of segment {self._name!r} is not newer than the latest "
                f"({latest}); versions only go forward",
            )
        return SegmentError(
            self._name,
            f"version {v} of segment {self._name!r} is beyond the largest version "
            f"{MAX_VERSION}; delete the segment and create it again",
        )

    def write(
        self,
        array: npt.NDArray[Any],
        *,
        version: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Copy ``array`` in as the next version and return its number (the first is 1).

        Arrays of :data:`COPY_UNLOCKED` bytes and more are copied without the GIL:
        other threads of the process run meanwhile.

        Args:
            array: the data, of the segment's dtype and shape.
            version: commit exactly this version instead of latest + 1 (a relay
                keeps its upstream's numbers); it must be newer than the latest.
            timestamp_ns: the commit time to record (wall clock, ns) instead of now:
                a bridge keeps its upstream's. Durations on this host still use the
                local monotonic clock.

        Raises:
            ArrayMismatchError: wrong dtype or shape, or a masked array (nothing
                is published).
            ReadOnlyError: this handle is not the writer (a reader's, or a writer's
                inherited across fork: open a new one in the child).
            SegmentError: ``version`` is not an int newer than the latest, or
                ``timestamp_ns`` is not an int from 0 to 2**64-1 (floats, strings
                and bools are refused, never converted; nothing is published).
        """
        self._check_array(array)
        me = threading.get_ident()
        if self._wthread == me:
            raise LayoutError(f"segment {self._name!r}: write() inside an open loan()")
        wall = _wall_ns(self._name, timestamp_ns)
        lock = self._wlock
        lock.acquire()  # ~0.1 us; `with` costs twice that
        if self._wthread:  # another thread's loan is open
            self._wait_turn()
        self._wthread = me
        try:
            ring, v, i, s = self._begin(version)
            try:
                n = self._nbytes
                if n >= COPY_UNLOCKED and array.flags.c_contiguous:
                    if self._closed:  # the ring outlives close(): no copy into it after
                        raise self._closed_meanwhile()
                    # Raw bytes, whatever the dtype (np.copyto on records is ~20x slower).
                    ring.copy_in(i, array.__array_interface__["data"][0], array, n, COPY_UNLOCKED)
                elif self._cast_ok:
                    try:
                        src = array.data.cast("B")
                    except (TypeError, ValueError, BufferError):  # not C-contiguous
                        np.copyto(self._loan_views[i], array)
                    else:
                        self._slot_mv[i][:] = src  # one memcpy, no numpy call overhead
                elif array.flags.c_contiguous:
                    raw = array.reshape(-1).view(np.uint8)  # before the slot's view is taken
                    np.copyto(self._raw[i], raw)
                else:
                    np.copyto(self._loan_views[i], array)
            except BaseException as exc:
                closed = self._write_failed(exc, ring, i, s)
                if closed is None:
                    raise
                raise closed from exc
            # No call from this look to the compiled core's commit: no signal handler
            # runs between them (close() aborts the slot then, see _stop_writes).
            if self._closed:
                raise self._closed_meanwhile()
            try:
                ring.commit(v, i, s, wall)
            except ValueError:  # the fallback's commit is Python: closed in it, see above
                if self._closed:
                    raise self._closed_meanwhile() from None
                raise
        finally:
            self._wthread = 0
            lock.release()
        return v

    def _wait_turn(self) -> None:
        """Called holding ``_wlock`` while another thread's loan is open: wait for it
        to end (or for close()) without the lock; return holding it again. If this
        raises (an exception from a signal handler), the lock is not held."""
        lock = self._wlock
        while self._wthread and not self._closed:
            lent = self._lent
            lock.release()
            lent.wait()
            lock.acquire()

    def _closed_meanwhile(self) -> ClosedError:
        """close() ran during this thread's write (a signal handler): nothing commits
        through a closed handle."""
        return ClosedError(f"segment {self._name!r} (the write was aborted: nothing published)")

    def _write_failed(
        self, exc: BaseException, ring: RingLike, slot: int, seq: int
    ) -> ClosedError | None:
        """A begun write failed: abort its slot; None, or the ClosedError to raise
        instead of ``exc``. When close() ran meanwhile (a signal handler of this
        thread: another thread's close() waits for the write), close() aborted the
        slot, released the lease and took down the handle's views: the write touches
        nothing more, and what failed on them is a ClosedError."""
        if not self._closed:
            with contextlib.suppress(ValueError):  # the fallback's ring, closed right now
                ring.abort(slot, seq)
            return None
        if isinstance(exc, Exception) and not isinstance(exc, ClosedError):
            return self._closed_meanwhile()
        return None

    def write_bytes(
        self, data: BytesLike, *, version: int | None = None, timestamp_ns: int | None = None
    ) -> int:
        """Copy ``data``, one version's raw bytes in C order, in as the next version;
        return its number.

        The writing side of a bridge or relay that receives versions as bytes off a
        wire: no array is built around them, whatever the dtype. ``data`` is any
        C-contiguous bytes-like object of exactly :attr:`nbytes` bytes. Copies of
        :data:`COPY_UNLOCKED` bytes and more run without the GIL. ``version`` and
        ``timestamp_ns`` are as in :meth:`write`.

        Raises:
            ArrayMismatchError: not a C-contiguous buffer of :attr:`nbytes` bytes
                (nothing is published).
            ReadOnlyError: this handle is not the writer (a reader's, or a writer's
                inherited across fork: open a new one in the child).
            SegmentError: ``version`` is not an int newer than the latest, or
                ``timestamp_ns`` is not an int from 0 to 2**64-1 (floats, strings
                and bools are refused, never converted; nothing is published).
        """
        if type(timestamp_ns) is int and 0 <= timestamp_ns < _U64:
            wall = timestamp_ns  # a bridge's upstream commit time: no call for the check
        else:
            wall = _wall_ns(self._name, timestamp_ns)
        me = threading.get_ident()
        if self._wthread == me:
            raise LayoutError(f"segment {self._name!r}: write_bytes() inside an open loan()")
        lock = self._wlock
        lock.acquire()
        if self._wthread:  # another thread's loan is open
            self._wait_turn()
        self._wthread = me
        try:
            ring = self._wring  # None for a reader, after close() and in a forked child
            plain = version is None or (type(version) is int and 0 < version <= MAX_VERSION)
            if ring is not None and plain and not self._closed:
                # A small bytes or bytearray: begin, copy and commit in one call of the
                # core. What runs between a bridge's wake-up and its commit runs with cold
                # caches (on an idle VM 40-60 us through the general path below, 25-30 here).
                try:
                    v = ring.write_from(data, version or 0, wall, COPY_UNLOCKED)
                except ValueError:  # the fallback's ring, closed in it: see write()
                    if self._closed:
                        raise self._closed_meanwhile() from None
                    raise
                if v > 0:
                    return v
            src: bytes | memoryview
            if type(data) is bytes and len(data) == self._nbytes:
                src = data  # bytes of the right size, as a wire hands them over: no checks
            else:
                src = self._byte_buffer(data, writable=False)
            ring, v, i, s = self._begin(version)
            try:
                n = self._nbytes
                if n >= COPY_UNLOCKED:
                    owner = np.frombuffer(src, dtype=np.uint8)
                    addr = owner.__array_interface__["data"][0]
                    if self._closed:  # the ring outlives close(): no copy into it after
                        raise self._closed_meanwhile()
                    ring.copy_in(i, addr, owner, n, COPY_UNLOCKED)
                else:
                    self._slot_mv[i][:] = src
            except BaseException as exc:
                closed = self._write_failed(exc, ring, i, s)
                if closed is None:
                    raise
                raise closed from exc
            # No call from this look to the compiled core's commit: no signal handler
            # runs between them (close() aborts the slot then, see _stop_writes).
            if self._closed:
                raise self._closed_meanwhile()
            try:
                ring.commit(v, i, s, wall)
            except ValueError:  # the fallback's commit is Python: closed in it, see above
                if self._closed:
                    raise self._closed_meanwhile() from None
                raise
            return v
        finally:
            self._wthread = 0
            lock.release()

    def _byte_buffer(self, data: object, *, writable: bool) -> memoryview:
        """``data`` as a flat byte view of exactly :attr:`nbytes` bytes.

        Raises:
            ArrayMismatchError: saying what does not fit, and what would.
        """
        n = self._nbytes
        if writable:
            fix = f"nothing was copied (pass a writable C-contiguous buffer of {n} bytes: "
            fix += "bytearray(seg.nbytes), or an array of the segment's dtype and shape)"
        else:
            fix = f"nothing was published (pass the version's {n} raw bytes in C order)"
        try:
            mv = memoryview(data)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            if not isinstance(data, np.ndarray):
                raise ArrayMismatchError(
                    self._name, "the buffer", "bytes-like", type(data).__name__, fix=fix
                ) from exc
            # datetime64 and timedelta64 arrays export no buffer: their bytes do.
            if not data.flags.c_contiguous:
                raise ArrayMismatchError(
                    self._name, "the buffer", "C-contiguous", "strided", fix=fix
                ) from exc
            mv = memoryview(data.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        if writable and mv.readonly:
            raise ArrayMismatchError(self._name, "the buffer", "writable", "read-only", fix=fix)
        if not mv.c_contiguous:
            raise ArrayMismatchError(self._name, "the buffer", "C-contiguous", "strided", fix=fix)
        if mv.nbytes != n:
            raise ArrayMismatchError(
                self._name, "the buffer's size", f"{n} bytes", f"{mv.nbytes}", fix=fix
            )
        if mv.ndim == 1 and mv.format == "B":
            return mv
        try:
            return mv.cast("B")
        except (TypeError, ValueError) as exc:
            raise ArrayMismatchError(
                self._name, "the buffer's format", "castable to bytes", repr(mv.format), fix=fix
            ) from exc

    @contextlib.contextmanager
    def loan(
        self, *, version: int | None = None, timestamp_ns: int | None = None
    ) -> Iterator[npt.NDArray[Any]]:
        """Yield a writable array over the next slot; commit it when the block ends.

        If the block raises, nothing is published (the slot is marked empty).
        The array turns read-only when the block ends (views taken of it inside
        the block do not: do not keep them). ``version`` and ``timestamp_ns`` are
        as in :meth:`write`.

        The handle writes one version at a time: a :meth:`write` in another thread
        waits for the block to end; one in the same thread is refused, as is a
        nested loan. :meth:`close` inside the block (in any thread) aborts the loan.

        Raises:
            ClosedError: on leaving the block, when the handle was closed during it,
                or on entering it, when closed as the loan began (a signal handler):
                nothing was published.
            LayoutError: a loan or write of this thread is already open.
        """
        me = threading.get_ident()
        if self._wthread == me:
            raise LayoutError(f"segment {self._name!r}: loans do not nest")
        wall = _wall_ns(self._name, timestamp_ns)
        lock = self._wlock
        lock.acquire()
        if self._wthread:  # another thread's loan is open
            self._wait_turn()
        try:
            ring, v, i, s = self._begin(version)
            try:
                arr = self._loan_views[i].view()  # its own object: see view()
            except BaseException as exc:
                closed = self._write_failed(exc, ring, i, s)
                if closed is None:
                    raise
                raise closed from exc
            self._loan = (i, s, arr)
            if self._closed:  # before the loan was open: close() aborts the slot
                self._take_loan()
                raise self._closed_meanwhile()
            self._lent.clear()
            self._wthread = me
        finally:
            lock.release()
        # From here on, whichever thread ends the block ends the loan: the one that
        # opened it, or the one that finalises its abandoned generator.
        try:
            yield arr
        except BaseException:
            with lock:
                try:
                    if self._take_loan() is not None:  # else close() aborted it
                        ring.abort(i, s)
                finally:
                    self._loan_ended()
            raise
        finally:
            # Before the commit: a write through it after the block would
            # change a committed version under readers who validate it.
            arr.flags.writeable = False
        with lock:
            try:
                # No call from the look at _closed to the compiled core's commit: see write().
                if self._take_loan() is None or self._closed:
                    raise ClosedError(
                        f"segment {self._name!r} (closed during loan(): the loan was aborted, "
                        f"nothing published)"
                    )
                try:
                    ring.commit(v, i, s, wall)
                except ValueError:
                    if self._closed:
                        raise self._closed_meanwhile() from None
                    raise
            finally:
                self._loan_ended()

    def _loan_ended(self) -> None:
        """The open loan is over (committed or aborted): writes may go on (under ``_wlock``)."""
        self._loan = None
        self._wthread = 0
        self._lent.set()

    def _read_only(self) -> ReadOnlyError:
        pid = os.getpid()
        if self._pid != pid and self._fd >= 0:
            # Opened for writing: a writer's copy in a forked child (see _disown()).
            with contextlib.suppress(OSError):
                if fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR:
                    kept = _kept_leases is not None and self in _kept_leases
                    return ReadOnlyError(self._name, opener=self._pid, pid=pid, kept_lease=kept)
        return ReadOnlyError(self._name)

    def _disown(self) -> bool:
        """This writer handle is a copy in a child forked from its opener: it writes
        no more (reads go on). The locks are new (a thread of the parent that held
        them is not here), and a loan open in the parent is not the child's to fill.
        True when it was a writer's (its descriptors hold the parent's lease)."""
        if not self._writable:
            return False
        self._writable = False
        self._wring = None
        self._wlock = threading.RLock()
        self._wthread = 0
        self._lent = threading.Event()
        self._lent.set()
        self._loan_guard = threading.Lock()
        loan, self._loan = self._loan, None
        if loan is not None:
            with contextlib.suppress(ValueError):
                loan[2].flags.writeable = False
        return True

    def _take_loan(self) -> tuple[int, int, npt.NDArray[Any]] | None:
        """The open loan, now no longer open (None: none, or someone else ended it)."""
        with self._loan_guard:
            loan, self._loan = self._loan, None
        return loan

    def _stop_writes(self) -> None:
        """close()'s part: wait for a write running in another thread to end, and
        abort the open loan (whose block runs without ``_wlock``); return holding
        ``_wlock`` (release it after). Any write of this thread (a signal handler's
        close() interrupted it) is aborted here. Such writes see _closed and touch
        the ring no more; writes waiting for the loan wake and see it too."""
        self._wlock.acquire()
        loan = self._take_loan()
        if loan is not None:  # its exit raises ClosedError and commits nothing
            self._abort_loan(loan)
        self._lent.set()
        # The only writer (the lease) begins in the slot after the latest one: odd
        # there means a write begun and not committed, this thread's (interrupted
        # anywhere from its begin to its commit) or a dead writer's. Either way the
        # slot's old bytes are gone: abort it, as the write's own failure would.
        with contextlib.suppress(ClosedError, ValueError, TypeError):  # torn down half-way
            q = self._header()
            i = (int(q[W_LATEST_SLOT]) % self._slots + 1) % self._slots
            seq = int(q[slot_ctl_index(i)])
            if seq & 1:
                self._core_ring().abort(i, seq - 1)

    def _abort_loan(self, loan: tuple[int, int, npt.NDArray[Any]]) -> None:
        i, s, arr = loan
        arr.flags.writeable = False  # the slot may be the next writer's
        with contextlib.suppress(ValueError):
            self._core_ring().abort(i, s)

    def heartbeat(self) -> None:
        """Refresh the writer heartbeat without publishing (for idle writers)."""
        if not self._writable:
            raise self._read_only()
        self._core_ring().heartbeat()

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
        got = self._look(version, False)
        return got[0], got[1], got[2], got[3]

    def acquire_timed(self, version: int | None = None) -> tuple[int, int, int, int, int]:
        """:meth:`acquire` and :meth:`monotonic_ns` in one look:
        ``(version, slot, seq, timestamp_ns, monotonic_ns)`` (a subscriber's hot path).

        Raises:
            The same as :meth:`acquire`.
        """
        got = self._look(version, True)
        return got[0], got[1], got[2], got[3], got[4]

    def _look(self, version: int | None, with_mono: bool) -> tuple[int, ...]:
        ring = self._core_ring()
        if version is None:
            got = ring.acquire_latest(with_mono)
            if isinstance(got, tuple):
                return got
            if got == 0:
                raise NoVersionError(self._name)
            raise self._stuck(-got - 1)
        v = version if type(version) is int else _read_version(self._name, version)
        found = ring.acquire(v, with_mono) if 0 < v <= MAX_VERSION else None
        if found is not None:
            return found
        latest = ring.latest()
        if latest == 0:
            raise NoVersionError(self._name)
        raise VersionUnavailableError(self._name, v, latest, self._slots)

    def _notify_word(self) -> tuple[int, int]:
        """``(address, value)`` of the header's notify word (+1 at every commit)."""
        self._header()
        return int(self._notify.ctypes.data), int(self._notify[0])

    def _stuck(self, version: int) -> SlotStuckError:
        return SlotStuckError(self._name, version, MAX_RETRIES, self.writer_alive())

    def monotonic_ns(self, slot: int) -> int:
        """The monotonic commit time of the version ``slot`` holds (this host's clock)."""
        return self._core_ring().monotonic_ns(slot)

    def view(self, slot: int) -> npt.NDArray[Any]:
        """A read-only array over ``slot`` (valid only between acquire and validate).

        A new array object each time (a view of the slot's, about 0.1 us): a caller
        who sets its ``shape`` or ``dtype`` in place changes no one else's reads.
        """
        out: npt.NDArray[Any] = self._views[slot].view()
        return out

    def validate(self, slot: int, seq: int) -> bool:
        """True when ``slot`` was not touched by the writer since :meth:`acquire`."""
        ok = self._core_ring().validate(slot, seq)
        self.reads += 1
        if not ok:
            self.torn_reads += 1
        return ok

    def read(self, version: int | None = None) -> contextlib.AbstractContextManager[Snapshot]:
        """Yield a zero-copy, read-only :class:`Snapshot` of the latest (or a given) version.

        Use as ``with seg.read() as snap:``; the version is acquired on entering.

        Raises:
            TornReadError: on leaving the block, if the writer overwrote the slot
                meanwhile: whatever was computed from the view must be discarded.
            NoVersionError, VersionUnavailableError.
        """
        return _Reading(self, version)

    def read_into(self, out: BytesLike, version: int | None = None) -> tuple[int, int]:
        """Copy the latest version (or exactly ``version``) into ``out`` and validate
        it: ``(version, timestamp_ns)``.

        The reading side of a bridge or recorder that forwards every version from one
        buffer of its own: no array and no allocation per version. ``out`` is any
        writable C-contiguous bytes-like object of exactly :attr:`nbytes` bytes
        (``bytearray(seg.nbytes)``, or an array of the segment's layout); it gets the
        raw bytes in C order. Copies of :data:`COPY_UNLOCKED` bytes and more run
        without the GIL.

        Raises:
            TornReadError: the writer overwrote the slot during the copy; ``out``
                holds no version then (read again).
            ArrayMismatchError: ``out`` is not a writable C-contiguous buffer of
                :attr:`nbytes` bytes (nothing is copied).
            NoVersionError, VersionUnavailableError, SlotStuckError: as :meth:`acquire`.
        """
        ring = self._ring
        if version is None and ring is not None:
            # A small bytearray (a bridge's staging buffer): look, copy and validate in
            # one call of the core (see write_bytes).
            got = ring.read_to(out, COPY_UNLOCKED)
            if isinstance(got, tuple):
                return got
            if got is not None:
                self.torn_reads += 1
                raise TornReadError(self._name, got)
        dst: bytearray | memoryview
        if type(out) is bytearray and len(out) == self._nbytes:
            dst = out  # the usual staging buffer: no checks
        else:
            dst = self._byte_buffer(out, writable=True)
        v, i, s, ts = self._look(version, False)
        ring = self._core_ring()
        n = self._nbytes
        try:
            if n >= COPY_UNLOCKED:
                owner = np.frombuffer(dst, dtype=np.uint8)
                ring.copy_out(i, owner.__array_interface__["data"][0], owner, n, COPY_UNLOCKED)
            else:
                dst[:] = self._slot_mv[i]
        except (ValueError, IndexError) as exc:  # closed by another thread meanwhile
            if self._closed:
                raise ClosedError(f"segment {self._name!r}") from exc
            raise
        if not self.validate(i, s):
            raise TornReadError(self._name, v)
        return v, ts

    def latest(self, *, retries: int = 1000) -> Snapshot:
        """A validated private copy of the latest version (torn reads are retried).

        Versions of :data:`COPY_UNLOCKED` bytes and more are copied without the GIL.
        """
        ring = self._core_ring()
        big = self._nbytes >= COPY_UNLOCKED
        v = 0
        for _ in range(max(1, retries)):
            v, i, s, ts, mono = self._look(None, True)
            if big:
                data = np.empty(self._shape, self._dtype)
                addr = data.__array_interface__["data"][0]
                ring.copy_out(i, addr, data, self._nbytes, COPY_UNLOCKED)
            else:
                data = self._views[i].copy()
            if self.validate(i, s):
                return Snapshot(self._name, v, ts, data, mono)
        raise TornReadError(self._name, v)

    def wait(self, after: int, timeout: float | None = None) -> int:
        """Block (no busy core: a futex on the header) until a version newer than
        ``after`` is committed or ``timeout`` passes; return the latest version.

        ``timeout`` is in seconds: ``None`` or ``math.inf`` waits without a limit,
        0 or less looks once; NaN is a ValueError (the same for every wait)."""
        if timeout is not None and not 0 <= timeout < _INF:
            timeout = _timeout(timeout)
        ring = self._waiting_ring()
        if after < 0:
            return ring.latest()
        return ring.wait(after, timeout, False)

    def wait_acquire(
        self, after: int, timeout: float | None = None, *, spin: bool = False
    ) -> tuple[int, int, int, int] | None:
        """Wait for a version newer than ``after`` and start reading it, in one call.

        The fast path of latency-sensitive loops: :meth:`wait` (or a busy-poll)
        followed by :meth:`acquire` without a second look at the header. Pair the
        result with :meth:`view` and :meth:`validate`. The wait runs in the core
        without the GIL, the busy-poll too.

        Args:
            after: the last version the caller has.
            timeout: seconds; ``None`` or ``math.inf`` waits for ever, 0 or less
                looks once; NaN is a ValueError.
            spin: busy-poll the header's version word (lowest latency, one core
                burnt) instead of sleeping on the futex.

        Returns:
            ``(version, slot, seq, timestamp_ns)`` as :meth:`acquire` returns, or
            ``None`` when ``timeout`` passed first.

        Raises:
            SlotStuckError: the header names a slot that never comes whole.
        """
        if timeout is not None and not 0 <= timeout < _INF:
            timeout = _timeout(timeout)
        return self._waited(self._waiting_ring().wait_acquire(max(0, after), timeout, spin))

    def wait_read(
        self, after: int, timeout: float | None = None, *, spin: bool = False
    ) -> tuple[int, int, int, int, int] | None:
        """:meth:`wait_acquire` that also returns the monotonic commit time, in one call.

        Returns:
            ``(version, slot, seq, timestamp_ns, monotonic_ns)``: the commit on the
            wall clock and on this host's monotonic clock (for latency), or ``None``
            when ``timeout`` passed first. Pair with :meth:`view` and :meth:`validate`.

        Raises:
            SlotStuckError: the header names a slot that never comes whole.
        """
        if timeout is not None and not 0 <= timeout < _INF:
            timeout = _timeout(timeout)
        return self._waited(self._waiting_ring().wait_read(max(0, after), timeout, spin))

    def _waited(self, got: _T | int | None) -> _T | None:
        """A wait's result: the look, None on timeout; an int is a stuck verdict."""
        if got is None or isinstance(got, tuple):
            return got
        assert isinstance(got, int)
        raise self._stuck(-got - 1)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Unmap and release the lease; safe with views still alive (they keep the
        mapping until they are gone). Idempotent.

        A write running in another thread ends first; an open :meth:`loan` is
        aborted (its array turns read-only, and its block's exit raises
        :class:`ClosedError`): nothing commits through a closed handle. From a
        signal handler that interrupts this thread's write, it returns at once,
        aborts that write's slot, and the write raises :class:`ClosedError`."""
        if self._closed:
            return
        self._closed = True
        # A copy inherited across os.fork: the lease (the flock is on the open file
        # description both processes share), the header and any loan are the
        # parent's, and so may be the lock (held by a thread that is not here).
        # It only unmaps and closes its own descriptor.
        owner = self._writable and self._pid == os.getpid()
        if owner:
            self._stop_writes()
        try:
            self._close(owner)
        finally:
            if owner:
                self._wlock.release()

    def _close(self, owner: bool) -> None:
        q = self._q
        if owner and q is not None:
            with contextlib.suppress(ValueError, TypeError):
                if q[W_WRITER_PID] == os.getpid():
                    q[W_WRITER_PID] = 0
        self._views = []
        self._loan_views = []
        self._notify = np.empty(0, np.uint32)
        self._raw = []
        for mv in self._slot_mv:  # exports of the mmap: released, or it cannot be closed
            mv.release()
        self._slot_mv = []
        # The compiled core's ring holds an export of the mapping until the last call
        # on it returns (one may be sleeping in another thread); the fallback's ring
        # releases its views now, and such a call then fails with ValueError.
        self._wring = None
        ring, self._ring = self._ring, None
        close_ring = getattr(ring, "close", None)
        if close_ring is not None:
            close_ring()
        del ring
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
            if owner:
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

    def _unclosed(self) -> str:
        return f"segment {self._name!r} was not closed"

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
        v, i, s, ts, mono = seg._look(self._version, True)
        self._version, self._slot, self._seq = v, i, s
        return Snapshot(seg._name, v, ts, seg.view(i), mono)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A block that raised keeps its own exception (the read is not counted).
        if exc_type is None and not self._seg.validate(self._slot, self._seq):
            raise TornReadError(self._seg._name, self._version or 0)


def engine_core() -> str:
    """The core segments opened now would use: ``"c"`` (compiled) or ``"python"``.

    ``SHMCAST_CORE`` selects (``auto``, ``c`` or ``python``); see ``shmcast doctor``.

    Raises:
        ConfigError: no core can run here, or ``SHMCAST_CORE`` asks for one that cannot.
    """
    return select_core().name


def machine_supported() -> bool:
    """True when the engine is sound on this machine: the compiled core is available
    (C11 atomics: any CPU), or the CPU is x86-64 (TSO) for the pure-Python fallback."""
    return core_status()[0] is not None


def wait_any(
    segments: list[Segment],
    afters: list[int],
    timeout: float | None = None,
    *,
    word: tuple[int, int] | None = None,
) -> bool:
    """Block until one of ``segments`` has a version newer than its ``afters`` entry
    (or, with ``word = (address, value)``, the 32-bit futex word there no longer
    holds ``value``: the subscribers' namespace word).

    One futex per segment, waited on together with ``futex_waitv`` (Linux 5.16+;
    older kernels fall back to short sleeps), without the GIL. Any number of
    segments: beyond the 128 words one ``futex_waitv`` takes, helper threads sleep
    on the further groups for the length of the call, so idle costs no CPU and a
    commit to any segment wakes the caller at once. Returns False on timeout.
    ``timeout`` as in :meth:`Segment.wait`.
    """
    timeout = _timeout(timeout)
    if len(segments) == 1 and word is None:
        return segments[0].wait(afters[0], timeout) > afters[0]
    if not segments:
        raise ValueError("wait_any needs at least one segment")
    extra = () if word is None else (int(word[0]), int(word[1]) & 0xFFFFFFFF)
    rings = tuple(seg._waiting_ring() for seg in segments)
    after = tuple(max(0, int(a)) for a in afters)
    if len(rings) != len(after):
        raise ValueError(f"{len(segments)} segments but {len(afters)} versions")
    core = segments[0]._core
    if all(seg._core is core for seg in segments):
        return core.wait_any(rings, after, timeout, *extra)
    # Handles opened under different SHMCAST_CORE settings: each core in turn, briefly.
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if any(r.latest() > a for r, a in zip(rings, after, strict=True)):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        for c in {seg._core.name: seg._core for seg in segments}.values():
            mine = [
                (r, a) for seg, r, a in zip(segments, rings, after, strict=True) if seg._core is c
            ]
            if c.wait_any(tuple(r for r, _ in mine), tuple(a for _, a in mine), 0.005, *extra):
                return True
