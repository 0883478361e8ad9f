"""Which core runs a segment's seqlock and wake: the compiled one, or the pure-Python fallback.

The compiled core (``broker/_core.c``, imported as ``shmcast.broker._core``) is
built by ``pip install`` with the system's C compiler; it is correct on any CPU
(C11 acquire/release atomics) and skips the wake syscall when nobody sleeps.
The pure-Python fallback (:mod:`._pycore`) relies on x86-64's store and load
ordering, so it runs there only. msgpack-python's rule, applied here:

- ``SHMCAST_CORE`` unset, empty or ``auto``: the compiled core; if it is not
  installed, the fallback with a warning on x86-64, and :class:`ConfigError`
  on any other CPU;
- ``SHMCAST_CORE=c``: the compiled core, or :class:`ConfigError` if it is missing;
- ``SHMCAST_CORE=python``: the fallback, chosen explicitly (no warning);
  :class:`ConfigError` on CPUs other than x86-64.

The variable is read when a segment is created or attached (and by
``shmcast doctor``), never at import; child processes inherit it, so one
setting covers a whole test or deployment. This module decides
(:func:`core_status`) and describes a core (:class:`Core`, :class:`RingLike`);
:func:`._segment.select_core` builds the one chosen (the fallback's comes from
:mod:`._pycore`, which sits above this module).
"""

from __future__ import annotations

import mmap
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

__all__ = [
    "ENV",
    "TSO_MACHINES",
    "Core",
    "RingLike",
    "c_core",
    "compiled",
    "core_status",
    "fallback_description",
]

#: The environment variable that selects the core.
ENV = "SHMCAST_CORE"
#: CPUs whose memory model (TSO) makes the fallback's plain loads and stores sound.
TSO_MACHINES = ("x86_64", "AMD64")

_compiled: ModuleType | None
_import_error: str
try:
    from . import _core as _compiled_module

    _compiled = _compiled_module
    _import_error = ""
except ImportError as exc:  # built without a compiler: the extension is absent
    _compiled = None
    _import_error = str(exc)

_c_cache: list[Core] = []


class RingLike(Protocol):
    """One segment's seqlock and wake, as both cores implement it (see ``_core.c``)."""

    def latest(self) -> int: ...
    def begin(self, version: int, /) -> tuple[int, int, int] | None: ...
    def commit(self, version: int, slot: int, seq: int, wall_ns: int = 0, /) -> bool: ...
    def abort(self, slot: int, seq: int, /) -> None: ...
    def write_from(self, data: object, version: int, wall_ns: int, threshold: int, /) -> int: ...
    def read_to(self, out: object, threshold: int, /) -> tuple[int, int] | int | None: ...
    def heartbeat(self) -> None: ...
    def copy_in(self, slot: int, addr: int, owner: object, n: int, threshold: int, /) -> None: ...
    def copy_out(self, slot: int, addr: int, owner: object, n: int, threshold: int, /) -> None: ...
    def acquire_latest(self, with_mono: bool, /) -> tuple[int, ...] | int: ...
    def acquire(self, version: int, with_mono: bool, /) -> tuple[int, ...] | None: ...
    def validate(self, slot: int, seq: int, /) -> bool: ...
    def slot_times(self, slot: int, /) -> tuple[int, int]: ...
    def monotonic_ns(self, slot: int, /) -> int: ...
    def wait(self, after: int, timeout: float | None, spin: bool, /) -> int: ...
    def wait_acquire(
        self, after: int, timeout: float | None, spin: bool, /
    ) -> tuple[int, int, int, int] | int | None: ...
    def wait_read(
        self, after: int, timeout: float | None, spin: bool, /
    ) -> tuple[int, int, int, int, int] | int | None: ...
    def map_waiters(self, fd: int, /) -> None: ...
    def set_poll(self, seconds: float, /) -> None: ...
    def state(self) -> tuple[int, int, int, int, int]: ...
    def same_object(self, path: str, fd: int, /) -> bool:
        """Whether ``path`` (a link is not followed) names the object this ring maps,
        open as ``fd``: its identity taken once, then one ``stat`` per call; False
        on any error (``Segment.linked()``)."""
        ...


@dataclass(frozen=True)
class Core:
    """One implementation of the engine's core.

    ``ring(mm, slots, header_size, stride, nbytes, writable, always_wake)`` makes
    the seqlock of one mapping; ``wait_any(rings, afters, timeout)`` sleeps on
    several; ``fence()`` is a full memory fence (a no-op where TSO suffices).
    """

    name: str
    description: str
    ring: Callable[[mmap.mmap, int, int, int, int, bool, bool], RingLike]
    #: ``wait_any(rings, afters, timeout[, word_addr, word_val])``
    wait_any: Callable[..., bool]
    fence: Callable[[], None]
    futex: ModuleType | None  # the compiled module for raw futex calls, if it is the one


def compiled() -> ModuleType | None:
    """The compiled core module, or None when it is not installed."""
    return _compiled


def _tso() -> bool:
    return platform.machine() in TSO_MACHINES


def fallback_description() -> str:
    return "pure-Python fallback (x86-64's TSO ordering; every commit wakes)"


def c_core() -> Core:
    """The compiled core (it must be installed: see :func:`core_status`)."""
    if _c_cache:
        return _c_cache[0]
    mod = _compiled
    assert mod is not None
    import numpy as np

    def ring(
        mm: mmap.mmap,
        slots: int,
        header_size: int,
        stride: int,
        nbytes: int,
        writable: bool,
        always_wake: bool,
    ) -> RingLike:
        # The ring holds this array, a buffer export of the mapping: the mapping
        # cannot be unmapped while a call on the ring runs, even one that sleeps
        # without the GIL while another thread closes the segment.
        base = np.frombuffer(mm, dtype=np.uint8)
        r: RingLike = mod.Ring(
            base, int(base.ctypes.data), slots, header_size, stride, nbytes, writable, always_wake
        )
        return r

    core = Core(
        name="c",
        description=f"compiled core (C11 acquire/release atomics, {mod.COMPILER})",
        ring=ring,
        wait_any=mod.wait_any,
        fence=mod.fence,
        futex=mod,
    )
    _c_cache.append(core)
    return core


def core_status() -> tuple[str | None, str]:
    """Which core a segment opened now would use, and why, without warning or raising:
    ``("c" | "python", description)``, or ``(None, the problem and its fix)``."""
    choice = os.environ.get(ENV, "").strip().lower()
    machine = platform.machine()
    rebuild = (
        "install a C compiler (Debian: apt-get install gcc python3-dev) and reinstall "
        "shmcast (pip install --force-reinstall --no-binary shmcast shmcast, or from source)"
    )
    if choice in ("", "auto"):
        if _compiled is not None:
            return "c", c_core().description
        if _tso():
            return "python", (
                f"{fallback_description()}: the compiled core is not installed "
                f"({_import_error}); {rebuild}, or set {ENV}=python to choose the fallback"
            )
        return None, (
            f"the compiled core is not installed ({_import_error}) and the pure-Python "
            f"fallback is sound on x86-64 only, not on {machine}; {rebuild}"
        )
    if choice == "c":
        if _compiled is not None:
            return "c", c_core().description
        return None, f"{ENV}=c but the compiled core is not installed ({_import_error}); {rebuild}"
    if choice == "python":
        if _tso():
            return "python", fallback_description()
        return None, (
            f"{ENV}=python but the pure-Python fallback relies on x86-64's memory ordering "
            f"and this CPU is {machine}; unset {ENV} to use the compiled core"
        )
    return None, f"{ENV}={choice!r} is not one of auto, c, python"
