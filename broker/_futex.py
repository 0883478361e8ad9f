"""Futex waits and wake-ups on 32-bit words in shared memory (Linux ``futex(2)``).

A :class:`Futex` names one word by its address (read-only mappings work: the
kernel keys a shared futex by the page, not by the mapping's protection). A
waiter passes the value it last saw; the kernel puts it to sleep only if the
word still holds that value, so a wake-up between the waiter's load and its
syscall is never lost. :func:`wait_many` sleeps on several words at once with
``futex_waitv`` (Linux 5.16+, at most :data:`WAITV_MAX` words).

With the compiled core selected (:mod:`._backend`) the syscalls are its own,
made without the GIL; otherwise they go through ctypes, whose arguments are
built once per word (a ``c_void_p`` per call costs about 0.6 µs of every
commit). :func:`futex_or` is the pure-Python fallback's atomic OR on a shared
word (``FUTEX_WAKE_OP``, which the kernel performs atomically), used to
announce a sleeper in a segment's waiters word.
"""

from __future__ import annotations

import ctypes
import errno
import math
import platform
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ._backend import compiled, core_status

__all__ = ["WAITV_MAX", "Futex", "futex_or", "futex_supported", "wait_many"]

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_FUTEX_WAKE_OP = 5
_FUTEX_OP_OR = 2
_FUTEX_OP_CMP_EQ = 0
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_SYS_FUTEX_WAITV = 449 if platform.machine() in ("x86_64", "aarch64") else None
_FUTEX2_SIZE_U32 = 0x02
_CLOCK_MONOTONIC = 1
_INT_MAX = 2**31 - 1
#: The kernel's limit on the words of one ``futex_waitv`` call.
WAITV_MAX = 128

_syscall: Any = None
_waitv_ok: bool | None = None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _FutexWaitv(ctypes.Structure):
    _fields_ = [
        ("val", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


def _syscall_fn() -> Any:
    global _syscall
    if _syscall is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
        fn.restype = ctypes.c_long
        _syscall = fn
    return _syscall


def _compiled_futex() -> ModuleType | None:
    """The compiled module when it is the selected core, else None (ctypes)."""
    name, _ = core_status()
    return compiled() if name == "c" else None


def futex_supported() -> bool:
    """Whether this CPU's futex syscall number is known (else waits poll in short sleeps)."""
    return _SYS_FUTEX is not None or _compiled_futex() is not None


class Futex:
    """One 32-bit futex word at ``addr`` (the caller keeps its mapping alive)."""

    __slots__ = ("_core", "_fsys", "_wait_addr", "_wake_args", "addr")

    def __init__(self, addr: int) -> None:
        self.addr = addr
        self._core = _compiled_futex()
        self._fsys: Any = None
        self._wait_addr: Any = None
        self._wake_args: tuple[Any, ...] = ()
        if self._core is None and _SYS_FUTEX is not None:
            self._fsys = _syscall_fn()
            self._wait_addr = ctypes.c_void_p(addr)
            # FUTEX_WAKE reads no further arguments: four instead of seven saves ~0.1 µs.
            self._wake_args = (_SYS_FUTEX, self._wait_addr, _FUTEX_WAKE, _INT_MAX)

    def wait(self, expected: int, timeout: float | None) -> None:
        """Sleep while the word equals ``expected``, at most ``timeout`` seconds.

        Returns on a wake-up, a timeout, a signal or a changed word alike: the
        caller looks at the shared state again.
        """
        if self._core is not None:
            self._core.futex_wait(self.addr, expected, timeout)
            return
        if self._fsys is None:
            time.sleep(0.0005 if timeout is None else min(timeout, 0.0005))
            return
        ts = None
        if timeout is not None and not 0 <= timeout < math.inf:
            # NaN never passes a deadline (a caller would spin), inf overflows a timespec
            timeout = None if timeout == math.inf else 0.0
        if timeout is not None:
            sec = int(timeout)
            ts = ctypes.byref(_Timespec(sec, int((timeout - sec) * 1e9)))
        self._fsys(_SYS_FUTEX, self._wait_addr, _FUTEX_WAIT, expected, ts, None, 0)

    def wake(self) -> None:
        """Wake every process sleeping on the word."""
        if self._core is not None:
            self._core.futex_wake(self.addr)
        elif self._fsys is not None:
            self._fsys(*self._wake_args)


def futex_or(addr: int, bits: int) -> None:
    """Atomically OR ``bits`` into the 32-bit word at ``addr`` (writable mapping).

    ``FUTEX_WAKE_OP`` with nothing to wake: the kernel applies the operation
    with an atomic instruction, a full barrier, which pure Python cannot emit.
    """
    if _SYS_FUTEX is None:
        raise OSError(errno.ENOSYS, f"no futex syscall number known for {platform.machine()}")
    op = (_FUTEX_OP_OR << 28) | (_FUTEX_OP_CMP_EQ << 24) | ((bits & 0xFFF) << 12)
    word = ctypes.c_void_p(addr)
    rc = _syscall_fn()(_SYS_FUTEX, word, _FUTEX_WAKE_OP, 0, None, word, op)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"FUTEX_WAKE_OP on {addr:#x}: {errno.errorcode.get(err, err)}")


def wait_many(addrs: Sequence[int], expected: Sequence[int], deadline: float | None) -> None:
    """Sleep until one of the words at ``addrs`` differs from ``expected`` or is woken,
    or until ``deadline`` (``time.monotonic()`` seconds).

    Up to :data:`WAITV_MAX` words; without ``futex_waitv`` (kernels before 5.16)
    it sleeps half a millisecond instead, and the caller polls.
    """
    global _waitv_ok
    if len(addrs) > WAITV_MAX:
        raise ValueError(f"futex_waitv takes at most {WAITV_MAX} words, got {len(addrs)}")
    core = _compiled_futex()
    if core is not None and addrs:
        if core.futex_waitv(addrs, expected, deadline):
            return
        _waitv_ok = False
    if not addrs or _SYS_FUTEX_WAITV is None or _waitv_ok is False:
        left = None if deadline is None else deadline - time.monotonic()
        time.sleep(0.0005 if left is None else max(0.0, min(left, 0.0005)))
        return
    waiters = (_FutexWaitv * len(addrs))()
    for k, (addr, val) in enumerate(zip(addrs, expected, strict=True)):
        waiters[k].val = val
        waiters[k].uaddr = addr
        waiters[k].flags = _FUTEX2_SIZE_U32
    ts = None
    if deadline is not None and not 0 <= deadline < math.inf:
        deadline = None if deadline == math.inf else 0.0  # as in Futex.wait
    if deadline is not None:
        sec = int(deadline)
        ts = ctypes.byref(_Timespec(sec, int((deadline - sec) * 1e9)))
    rc = _syscall_fn()(
        _SYS_FUTEX_WAITV, waiters, ctypes.c_uint(len(addrs)), 0, ts, _CLOCK_MONOTONIC
    )
    if rc < 0 and ctypes.get_errno() == errno.ENOSYS:
        _waitv_ok = False
