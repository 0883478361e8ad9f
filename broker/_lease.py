"""The writer's lease: an exclusive ``flock`` on the segment's object.

One writer per segment: the lease is an open-file-description lock, which the
kernel drops when the writer exits or dies, so a dead writer is detected
without guessing and a new one can take over at once. A child forked from the
writer shares that open file description (its inherited descriptors and
mapping): at fork it moves its copies to descriptions of its own (``_segment``'s
at-fork hook, :func:`remap_shared`), so the lease still dies with its opener.
A descriptor another thread of the parent opened for a lease and had not locked yet
at the fork is closed in the child (:func:`open_for_lease`): the parent's later
``flock`` would lock the description the child shares, behind its hook's back.
The header also names the writer (:class:`ProcessId`: pid plus start time, so
pid reuse cannot fool anyone) for tools and error messages; the lock, not the
header, decides.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import WriterBusyError

__all__ = [
    "ProcessId",
    "forget",
    "keep_from_children",
    "lease_held",
    "open_for_lease",
    "pid_running",
    "prepare_remap",
    "process_start_time",
    "process_stat",
    "process_state",
    "remap_shared",
    "take_lease",
]

#: Linux's MAP_FIXED (the same on x86-64 and aarch64; Python 3.11's mmap lacks it).
_MAP_FIXED = 0x10
_mmap_fn: Any = None

#: Held from an ``open`` meant for a lease until the descriptor is in
#: :data:`_unlocked`, and by a fork (at-fork ``before``): a fork never lands between
#: the two. Never held across a ``flock``, a wait or a fork. Reentrant: a signal
#: handler that forks in the thread that holds it does not deadlock.
_opening = threading.RLock()
#: Descriptors opened for a lease, not locked yet: descriptor -> its opener thread.
_unlocked: dict[int, int] = {}
#: Descriptors holding a lock of this process alone (a broker's ``broker.lock``):
#: a forked child closes its copies, whatever thread forked (:func:`keep_from_children`).
_parents_only: set[int] = set()


def _before_fork() -> None:
    _opening.acquire()


def _after_fork_in_parent() -> None:
    _opening.release()


def _after_fork_in_child() -> None:
    """Close the descriptors other threads of the parent were opening for a lease:
    those threads are not in the child, nobody here will use them, and the parent's
    coming ``flock`` would otherwise lock the description the child shares, after
    the child's fork hook looked (the lease outlived its opener)."""
    me = threading.get_ident()
    for fd, opener in list(_unlocked.items()):
        if opener != me:
            with contextlib.suppress(OSError):
                os.close(fd)
            del _unlocked[fd]
    for fd in _parents_only:
        with contextlib.suppress(OSError):
            os.close(fd)
    _parents_only.clear()
    _opening.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def open_for_lease(path: str, flags: int, mode: int = 0o777) -> int:
    """``os.open`` of a segment object whose description will take a ``flock`` (the
    lease, or :func:`lease_held`'s probe): until :func:`forget` (which
    :func:`take_lease` calls once the lock is taken), a child forked by another
    thread closes its copy of the descriptor."""
    with _opening:
        fd = os.open(path, flags, mode)
        _unlocked[fd] = threading.get_ident()
    return fd


def forget(fd: int) -> None:
    """``fd`` (from :func:`open_for_lease`) holds its lock now, or is about to be
    closed: a forked child keeps its copy (the fork hook moves a locked one). Call
    it before ``os.close``: the number may be reused at once."""
    _parents_only.discard(fd)
    _unlocked.pop(fd, None)


def keep_from_children(fd: int) -> None:
    """``fd`` (from :func:`open_for_lease`) holds a lock now that must die with this
    process, not with its last forked child (a broker's ``broker.lock``: a worker
    forked by the application that runs the broker kept it, and no broker could
    serve the namespace after this process died while the worker lived). Every
    forked child closes its copy; :func:`forget` it before ``os.close``."""
    _parents_only.add(fd)  # first: until then it is listed as unlocked
    _unlocked.pop(fd, None)


@dataclass(frozen=True)
class ProcessId:
    """A process named so that pid reuse cannot fool us: pid plus start time."""

    pid: int
    start_time: int

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(pid, process_start_time(pid))

    def alive(self) -> bool:
        if self.pid <= 0:
            return False
        try:
            return process_start_time(self.pid) == self.start_time
        except OSError:
            return False


def process_stat(pid: int) -> tuple[bytes, int]:
    """``pid``'s state letter and start time, read once from ``/proc/PID/stat``:
    field 3 (``b"R"``, ``b"S"``, ``b"T"`` stopped, ``b"Z"`` a zombie, ...) and field
    22 (clock ticks since boot). Raises ``OSError`` (no such process), or
    ``ValueError``/``IndexError`` for a line it cannot parse."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0][:1], int(rest[19])


def process_state(pid: int) -> bytes | None:
    """The state letter of ``pid`` (:func:`process_stat`), or None when it cannot be read."""
    try:
        return process_stat(pid)[0]
    except (OSError, ValueError, IndexError):
        return None


def pid_namespace(pid: int | str = "self") -> int | None:
    """The inode of ``pid``'s pid namespace (``/proc/PID/ns/pid`` reads
    ``pid:[4026531836]``), or None when it cannot be read."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    digits = link[link.find("[") + 1 : -1]
    return int(digits) if link.startswith("pid:[") and digits.isdigit() else None


def process_uid(pid: int) -> int | None:
    """The real uid of ``pid`` (``/proc/PID/status``, the first of its ``Uid:``
    line), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pid_running(pid: int) -> bool:
    """Whether ``pid`` names a process of this pid namespace that is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    return process_state(pid) != b"Z"


def process_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (:func:`process_stat`)."""
    return process_stat(pid)[1]


def take_lease(name: str, fd: int, writer_pid: int = 0) -> None:
    """Take the exclusive lease on ``fd`` or raise :class:`WriterBusyError`.

    Retried for 0.2 s: a reader probing the lock (:func:`lease_held`) holds a
    shared lock for microseconds. ``writer_pid`` names the holder in the error.
    ``fd`` comes from :func:`open_for_lease`; it is forgotten once locked (after the
    ``flock``: a fork in between closes the child's copy), and left to the caller
    to :func:`forget` and close when the lease is refused.
    """
    deadline = time.monotonic() + 0.2
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            forget(fd)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise WriterBusyError(name, writer_pid or None) from None
            time.sleep(0.002)


def lease_held(path: str) -> bool:
    """Whether some process holds the lease of the object at ``path`` (asked of the kernel).

    Opened with ``O_NONBLOCK`` and ``O_NOFOLLOW``: anyone may put a FIFO (or a link
    to one) in ``/dev/shm`` under a name that was freed, and an ``open`` of it for
    reading waits for a writer, under the lock every fork of this process takes (a
    probe of a deleted segment's path hung, and every fork with it). Only a regular
    file holds a lease."""
    try:
        fd = open_for_lease(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link: no segment, no lease
            return False
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)  # before forget: a child forked after keeps none
    except BlockingIOError:
        return True
    finally:
        forget(fd)
        os.close(fd)
    return False


def prepare_remap() -> None:
    """Look ``mmap(2)`` up for :func:`remap_shared` now, in the parent: a child
    forked from a multi-threaded process may not take the dynamic loader's lock
    (``dlopen``), which another thread of the parent may have held at the fork."""
    global _mmap_fn
    if _mmap_fn is None:
        fn = ctypes.CDLL(None, use_errno=True).mmap
        fn.restype = ctypes.c_void_p
        fn.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        ]  # fmt: skip
        _mmap_fn = fn


def remap_shared(addr: int, length: int, prot: int, fd: int, offset: int = 0) -> bool:
    """Map ``fd`` (from ``offset``, shared) over the mapping at ``addr`` in place
    (``MAP_FIXED``): the same object's pages at the same address, through ``fd``'s
    open file description instead. True when the kernel did it; False when
    :func:`prepare_remap` was not called before the fork."""
    if _mmap_fn is None:
        return False
    got = _mmap_fn(addr, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    return bool(got == addr)
