"""The writer's lease: an exclusive ``flock`` on the segment's object.

One writer per segment: the lease is an open-file-description lock, which the
kernel drops when the writer exits or dies, so a dead writer is detected
without guessing and a new one can take over at once. A child forked from the
writer shares that open file description (its inherited descriptors and
mapping): at fork it moves its copies to descriptions of its own (``_segment``'s
at-fork hook, :func:`remap_shared`), so the lease still dies with its opener.
The header also names the writer (:class:`ProcessId`: pid plus start time, so
pid reuse cannot fool anyone) for tools and error messages; the lock, not the
header, decides.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any

from .errors import WriterBusyError

__all__ = [
    "ProcessId",
    "lease_held",
    "prepare_remap",
    "process_start_time",
    "remap_shared",
    "take_lease",
]

#: Linux's MAP_FIXED (the same on x86-64 and aarch64; Python 3.11's mmap lacks it).
_MAP_FIXED = 0x10
_mmap_fn: Any = None


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


def process_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[19])


def take_lease(name: str, fd: int, writer_pid: int = 0) -> None:
    """Take the exclusive lease on ``fd`` or raise :class:`WriterBusyError`.

    Retried for 0.2 s: a reader probing the lock (:func:`lease_held`) holds a
    shared lock for microseconds. ``writer_pid`` names the holder in the error.
    """
    deadline = time.monotonic() + 0.2
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise WriterBusyError(name, writer_pid or None) from None
            time.sleep(0.002)


def lease_held(path: str) -> bool:
    """Whether some process holds the lease of the object at ``path`` (asked of the kernel)."""
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
