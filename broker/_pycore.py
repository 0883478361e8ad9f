"""The pure-Python fallback of the engine's core, for machines without a C compiler.

The same seqlock and wake protocol as the compiled core (``broker/_core.c``,
whose header comment gives every ordering), with two differences:

- Loads and stores are plain ``memoryview.cast`` indexing, one aligned 8- or
  4-byte access each, in program order. That is enough on x86-64 only (TSO:
  stores become visible in program order, loads are not reordered with other
  loads), so :mod:`._backend` refuses this fallback on any other CPU. The
  fences of the compiled core are compiler barriers on x86-64 and need nothing
  here.
- A committer cannot order its exchange of the waiters word before loading it
  without an atomic instruction, so every commit makes the wake syscall (as
  shmcast did before the compiled core). A waiter still announces itself in the
  waiters word, atomically, through ``FUTEX_WAKE_OP`` (:func:`._futex.futex_or`),
  so that compiled writers in other processes wake it.

Bulk copies go through ``ctypes.memmove``, which runs without the GIL.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
import time
from typing import Any

import numpy as np

from ._backend import Core, fallback_description
from ._futex import WAITV_MAX, Futex, futex_or, wait_many
from ._layout import (
    MAX_SLOTS,
    MAX_VERSION,
    NOTIFY_IDX,
    NOTIFY_OFF,
    PAGE,
    S_MONO,
    S_VERSION,
    S_WALL,
    W_HEARTBEAT,
    W_LATEST,
    W_LATEST_SLOT,
    WAITERS_IDX,
    WAITERS_OFF,
    slot_ctl_index,
)

__all__ = ["CORE", "MAX_LOOKS", "Ring", "fence", "wait_any"]

#: Inconsistent looks at the header before a reader reports a stuck slot (and at
#: least STUCK_S of time: a writer preempted mid-commit is not stuck).
MAX_LOOKS = 1000
STUCK_S = 0.02
YIELD_AFTER = 64
#: Helper groups of wait_any: WAITV_MAX words less the private "done" word.
GROUP = WAITV_MAX - 1


def fence() -> None:
    """No fence is needed on x86-64 for what the engine orders (TSO)."""


class Ring:
    """One segment's seqlock and wake over ``mm`` (the interface of ``_core.Ring``)."""

    def __init__(
        self,
        mm: mmap.mmap,
        slots: int,
        header_size: int,
        stride: int,
        nbytes: int,
        writable: bool,
        always_wake: bool,
    ) -> None:
        # The layout must fit in the mapping, or the copies would run past its end.
        if not (
            2 <= slots <= MAX_SLOTS
            and header_size >= slot_ctl_index(slots) * 8
            and header_size % PAGE == 0
            and 0 < nbytes <= stride
            and header_size + slots * stride <= len(mm)
        ):
            raise ValueError("Ring: impossible mapping or layout")
        self._q: memoryview = memoryview(mm).cast("Q")
        self._b: memoryview = memoryview(mm)
        self._q32: memoryview = memoryview(mm).cast("I")
        self._base = np.frombuffer(mm, dtype=np.uint8)  # an export: the mapping stays
        self._addr = int(self._base.ctypes.data)
        self._seq = [slot_ctl_index(i) for i in range(slots)]
        self._slots = slots
        self._header_size = header_size
        self._stride = stride
        self._nbytes = nbytes
        self._writable = writable
        self._futex = Futex(self._addr + NOTIFY_OFF)
        self.notify_addr = self._addr + NOTIFY_OFF
        self.flag_addr: int | None = self._addr + WAITERS_OFF if writable else None
        self._flag_mm: mmap.mmap | None = None
        self._flag_q32: memoryview | None = self._q32 if writable else None
        self.poll = 0.0
        self.commits = 0
        self.wakes = 0
        self._ident: tuple[int, int] | None = None

    def same_object(self, path: str, fd: int, /) -> bool:
        """Whether ``path`` (a link is not followed) names the object this ring maps,
        open as ``fd`` (whose identity is taken at the first call and kept)."""
        try:
            if self._ident is None:
                mine = os.fstat(fd)
                self._ident = (mine.st_dev, mine.st_ino)
            there = os.stat(path, follow_symlinks=False)
        except OSError:
            return False
        return (there.st_dev, there.st_ino) == self._ident

    # ------------------------------------------------------------- writer

    def latest(self) -> int:
        return int(self._q[W_LATEST])

    def begin(self, version: int) -> tuple[int, int, int] | None:
        q = self._q
        latest = int(q[W_LATEST])
        v = version or latest + 1
        if v <= latest or v > MAX_VERSION:
            return None
        i = (int(q[W_LATEST_SLOT]) % self._slots + 1) % self._slots
        si = self._seq[i]
        s = int(q[si])
        if s & 1:  # a writer died in the middle of this slot: step past its odd value
            s += 1
        q[si] = s + 1  # odd: readers of the version this slot held now fail validation
        return v, i, s

    def commit(self, version: int, slot: int, seq: int, wall_ns: int = 0) -> bool:
        q = self._q
        si = self._seq[slot]
        mono = time.monotonic_ns()
        q[si + S_VERSION] = version
        q[si + S_WALL] = wall_ns or time.time_ns()
        q[si + S_MONO] = mono
        q[si] = seq + 2  # even again: the slot is whole
        q[W_LATEST_SLOT] = slot  # before latest: whoever sees v finds its slot
        q[W_LATEST] = version
        q[W_HEARTBEAT] = mono
        q32 = self._q32
        q32[NOTIFY_IDX] = (q32[NOTIFY_IDX] + 1) & 0xFFFFFFFF
        self._futex.wake()  # always: no atomic exchange of the waiters word here
        self.commits += 1
        self.wakes += 1
        return True

    def abort(self, slot: int, seq: int) -> None:
        q = self._q
        si = self._seq[slot]
        q[si + S_VERSION] = 0  # the old version's bytes are gone
        q[si] = seq + 2

    def write_from(self, data: object, version: int, wall_ns: int, threshold: int) -> int:
        """begin, copy and commit in one call; v, 0 (version refused) or -1 (not
        bytes or bytearray of nbytes, read-only, or threshold bytes or more)."""
        n = self._nbytes
        if not self._writable or n >= threshold or not isinstance(data, bytes | bytearray):
            return -1
        if len(data) != n:
            return -1
        got = self.begin(version)
        if got is None:
            return 0
        v, i, s = got
        at = self._header_size + i * self._stride
        self._b[at : at + n] = data
        self.commit(v, i, s, wall_ns)
        return v

    def heartbeat(self) -> None:
        self._q[W_HEARTBEAT] = time.monotonic_ns()

    def _slot_addr(self, slot: int) -> int:
        if not 0 <= slot < self._slots:
            raise IndexError("slot out of range")
        return self._addr + self._header_size + slot * self._stride

    def copy_in(self, slot: int, addr: int, owner: object, n: int, threshold: int) -> None:
        if not self._writable:
            raise PermissionError("read-only ring")
        if n > self._nbytes:
            raise ValueError("copy: more bytes than a slot holds")
        ctypes.memmove(self._slot_addr(slot), addr, n)  # ctypes drops the GIL

    def copy_out(self, slot: int, addr: int, owner: object, n: int, threshold: int) -> None:
        if n > self._nbytes:
            raise ValueError("copy: more bytes than a slot holds")
        ctypes.memmove(addr, self._slot_addr(slot), n)

    # ------------------------------------------------------------- reader

    def _try(self, i: int, v: int, with_mono: bool) -> tuple[int, ...] | None:
        q = self._q
        si = self._seq[i]
        s = int(q[si])
        if s & 1 or q[si + S_VERSION] != v:
            return None
        if with_mono:
            return v, i, s, int(q[si + S_WALL]), int(q[si + S_MONO])
        return v, i, s, int(q[si + S_WALL])

    def acquire_latest(self, with_mono: bool) -> tuple[int, ...] | int:
        """The latest version's slot; 0 when nothing was published, -(v+1) when stuck
        at v. A write never touches the latest's slot, so a reader that does not find
        it there was lapped (or caught the writer between its latest-slot and latest
        stores) and scans, then looks at the newer latest."""
        q = self._q
        slots = self._slots
        t0 = 0.0
        looks = 0
        while True:
            v = int(q[W_LATEST])
            if v == 0:
                return 0
            hint = int(q[W_LATEST_SLOT])
            if hint < slots:
                got = self._try(hint, v, with_mono)
                if got is not None:
                    return got
            for i in range(slots):
                if i != hint:
                    got = self._try(i, v, with_mono)
                    if got is not None:
                        return got
            if looks == 0:
                t0 = time.monotonic()
            elif looks >= MAX_LOOKS and time.monotonic() - t0 >= STUCK_S:
                return -v - 1
            if looks >= YIELD_AFTER:
                os.sched_yield()
            looks += 1

    def acquire(self, version: int, with_mono: bool) -> tuple[int, ...] | None:
        if version > 0:
            for i in range(self._slots):
                got = self._try(i, version, with_mono)
                if got is not None:
                    return got
        return None

    def read_to(self, out: object, threshold: int) -> tuple[int, int] | int | None:
        """The latest version copied into the bytearray ``out`` and validated:
        (v, wall), v when torn, None when not for this path (see ``_core.c``)."""
        n = self._nbytes
        if n >= threshold or not isinstance(out, bytearray) or len(out) != n:
            return None
        got = self.acquire_latest(False)
        if isinstance(got, int):
            return None
        v, i, s, wall = got
        at = self._header_size + i * self._stride
        out[:] = self._b[at : at + n]
        if not self.validate(i, s):
            return v
        return v, wall

    def validate(self, slot: int, seq: int) -> bool:
        return bool(self._q[self._seq[slot]] == seq)

    def slot_times(self, slot: int) -> tuple[int, int]:
        si = self._seq[slot]
        return int(self._q[si + S_WALL]), int(self._q[si + S_MONO])

    def monotonic_ns(self, slot: int) -> int:
        return int(self._q[self._seq[slot] + S_MONO])

    # ------------------------------------------------------------- waiting

    def announce(self) -> None:
        """Say that a waiter may sleep on the notify word (an atomic OR, in the kernel)."""
        if self.flag_addr is not None:
            futex_or(self.flag_addr, 1)

    def announced(self) -> bool:
        q32 = self._flag_q32
        return q32 is None or q32[WAITERS_IDX] != 0

    def notify(self) -> int:
        return int(self._q32[NOTIFY_IDX])

    def sleep_cap(self, left: float | None) -> float | None:
        """A reader that could not announce itself sleeps at most ``poll`` seconds."""
        if self.flag_addr is not None or self.poll <= 0:
            return left
        return self.poll if left is None else min(left, self.poll)

    def wait(self, after: int, timeout: float | None, spin: bool) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        q = self._q
        n = 0
        while True:
            v = int(q[W_LATEST])
            if v > after:
                return v
            if spin:
                n += 1
                if n & 0x3FF or deadline is None or time.monotonic() < deadline:
                    continue
                return int(q[W_LATEST])
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return v
            self.announce()
            word = self.notify()
            v = int(q[W_LATEST])
            if v > after:
                return v
            if not self.announced():
                continue  # a commit cleared it since: announce again
            self._futex.wait(word, self.sleep_cap(left))

    def _wait_look(
        self, after: int, timeout: float | None, spin: bool, with_mono: bool
    ) -> tuple[int, ...] | int | None:
        while True:
            v = self.wait(after, timeout, spin)
            if v <= after:
                return None
            got = self.acquire_latest(with_mono)
            if isinstance(got, tuple) and got[0] <= after:
                continue
            return got

    def wait_acquire(self, after: int, timeout: float | None, spin: bool) -> Any:
        return self._wait_look(after, timeout, spin, False)

    def wait_read(self, after: int, timeout: float | None, spin: bool) -> Any:
        return self._wait_look(after, timeout, spin, True)

    def map_waiters(self, fd: int) -> None:
        if self.flag_addr is not None:
            return
        mm = mmap.mmap(fd, PAGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._flag_mm = mm
        self._flag_q32 = memoryview(mm).cast("I")
        self.flag_addr = ctypes.addressof(ctypes.c_char.from_buffer(mm)) + WAITERS_OFF

    def set_poll(self, seconds: float) -> None:
        self.poll = max(0.0, seconds)

    def state(self) -> tuple[int, int, int, int, int]:
        return (
            int(self._q32[WAITERS_IDX]),
            int(self._q32[NOTIFY_IDX]),
            self.commits,
            self.wakes,
            int(self.flag_addr is not None),
        )

    def close(self) -> None:
        """Release the views of the mapping (calls after this raise ValueError)."""
        self._q.release()
        self._q32.release()
        self._b.release()
        if self._flag_q32 is not None and self._flag_q32 is not self._q32:
            self._flag_q32.release()
        self._flag_q32 = None
        self.flag_addr = None
        if self._flag_mm is not None:
            # ctypes' from_buffer export dies with its object; BufferError if it lives
            with contextlib.suppress(BufferError):
                self._flag_mm.close()
            self._flag_mm = None


def wait_any(
    rings: tuple[Any, ...],
    afters: tuple[int, ...],
    timeout: float | None,
    word_addr: int = 0,
    word_val: int = 0,
) -> bool:
    """Sleep until one ring's latest is newer than its ``afters`` entry, or the extra
    32-bit futex word at ``word_addr`` (when not 0) no longer holds ``word_val``;
    False on timeout.

    More rings than one ``futex_waitv`` takes are split into groups of
    :data:`GROUP`: helper threads sleep on the later groups, each also on a
    private word that whoever returns first bumps and wakes.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    extra = ctypes.c_uint32.from_address(word_addr) if word_addr else None
    while True:
        if any(r.latest() > a for r, a in zip(rings, afters, strict=True)):
            return True
        if extra is not None and extra.value != word_val:  # one aligned 4-byte load
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        for r in rings:
            r.announce()
        words = [r.notify() for r in rings]
        if any(r.latest() > a for r, a in zip(rings, afters, strict=True)):
            return True
        if not all(r.announced() for r in rings):
            continue
        until = deadline
        caps = [r.poll for r in rings if r.flag_addr is None and r.poll > 0]
        if caps:
            cap = time.monotonic() + min(caps)
            until = cap if until is None else min(until, cap)
        addrs = [r.notify_addr for r in rings]
        if word_addr:  # slept on at its expected value: a move since returns at once
            addrs.append(word_addr)
            words.append(word_val)
        if len(addrs) <= WAITV_MAX:
            wait_many(addrs, words, until)
        else:
            _sleep_groups(addrs, words, until)


def _sleep_groups(addrs: list[int], words: list[int], until: float | None) -> None:
    done = np.zeros(1, np.uint32)  # private: this process's helpers only
    done_addr = int(done.ctypes.data)
    done_futex = Futex(done_addr)

    def sleep(lo: int, hi: int) -> None:
        try:
            wait_many([*addrs[lo:hi], done_addr], [*words[lo:hi], 0], until)
        finally:
            done[0] = 1
            done_futex.wake()

    helpers = [
        threading.Thread(target=sleep, args=(lo, lo + GROUP), daemon=True)
        for lo in range(GROUP, len(addrs), GROUP)
    ]
    for t in helpers:
        t.start()
    sleep(0, GROUP)
    for t in helpers:
        t.join()


#: This fallback as a :class:`._backend.Core`.
CORE = Core(
    name="python",
    description=fallback_description(),
    ring=Ring,
    wait_any=wait_any,
    fence=fence,
    futex=None,
)
