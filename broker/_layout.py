"""The segment format: the header spec byte by byte, its sizes, and the dtype codec.

Layout (layout version 2, all integers little-endian, one object per segment at
``/dev/shm/shmcast.<namespace>.<segment>``)::

    header block, HEADER_SIZE(K) = round_up(SLOT_CTL + 64*K, 4096) bytes
      byte   0  u64  magic  b"SHMCAST\\0"     written last at create: a half-made
                                              object never looks valid
      byte   8  u64  layout version (2)
      byte  16  u64  header size
      byte  24  u64  K, the number of slots (2..64)
      byte  32  u64  slot stride (bytes, a multiple of 4096)
      byte  40  u64  nbytes, the array's size
      byte  48  u64  epoch (random id of the broker or process that created it)
      byte  56  u64  created, ns since the Unix epoch (CLOCK_REALTIME)
      byte  64  u64  latest committed version (0: none yet)     <- seqlock publish word
      byte  72  u64  writer pid (0: no writer)
      byte  80  u64  writer start time (clock ticks since boot, /proc/PID/stat 22)
      byte  88  u64  writer heartbeat, CLOCK_MONOTONIC ns (every commit, or heartbeat())
      byte  96  u32  notify word (futex; +1 at every commit)
      byte 100  u32  waiters: non-zero when a waiter may sleep on the notify word
                     since the last commit (set by waiters, cleared by commits)
      byte 104  u64  dtype description length (bytes)
      byte 112  u64  ndim
      byte 120  u64  shape[0..ndim), at most 16 dims (ends at byte 248)
      byte 248  u64  incarnation: a random non-zero id drawn at each creation, so that
                     a segment deleted and created again under its name is told apart
      byte 256  u64  latest slot: the slot that holds the latest version (K-1 before
                     the first, so that the first write goes to slot 0)
      byte 264  ...  reserved (zero) up to byte 512
      byte 512  ...  dtype description: ascii() of numpy.lib.format.dtype_to_descr,
                     at most 1536 bytes (ends at byte 2048)
      byte 2048 K x 64-byte slot control lines, one cache line each:
                     +0  u64 seq (odd while being written)
                     +8  u64 version held (0: none)
                     +16 u64 commit time, CLOCK_REALTIME ns (across hosts, records)
                     +24 u64 commit time, CLOCK_MONOTONIC ns (durations on this host)
    slot i data at HEADER_SIZE + i * stride, page aligned, nbytes long

Versions are at most :data:`MAX_VERSION` (2**63 - 1): they travel as signed
64-bit integers in msgpack, and a header claiming more is corrupt.

Every word is naturally aligned; each slot's control line is a cache line of its
own, so a reader polling one slot does not share a line with the writer's next.

Memory ordering (the compiled core, ``broker/_core.c``, whose header comment
gives the full argument; the pure-Python fallback, x86-64 only, gets the same
orderings from TSO). Each store and what it pairs with:

=====================  ==============================  =================================
word                   writer                          reader
=====================  ==============================  =================================
slot seq, begin        relaxed store (odd), then a     acquire fence, then the second
                       release fence: before the       load of seq (validate): every
                       slot's bytes                    load of the view comes before it
slot version, times    relaxed stores, inside the      loaded after the acquire of seq,
                       odd/even window                 validated with the bytes
slot seq, commit       release store (even): after     acquire load (first look): the
                       the bytes and control words     bytes are loaded after it
latest slot, latest    release stores, latest slot     acquire loads, latest first: a
                       first                           reader of latest v finds v whole
waiters                exchange with 0 (seq_cst),      OR 1 (seq_cst) before loading
                       after latest                    notify; acquire load again after
notify                 release store (+1), after the   acquire load: the value
                       exchange; FUTEX_WAKE only if    FUTEX_WAIT compares
                       the exchange found a waiter
magic                  store after a full fence, last  the page is read again after an
                       of the header at creation       acquire fence once it is seen
=====================  ==============================  =================================

The lease, the slot choice and the waits are the engine's: see :mod:`._segment`.
"""

from __future__ import annotations

import ast
import math
import mmap
import operator
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.lib.format as npformat
import numpy.typing as npt

from ._names import SHM_DIR
from .errors import LayoutError, LayoutVersionError, NotASegmentError

__all__ = [
    "LAYOUT_VERSION",
    "dtype_str",
    "header_size",
    "mode_problem",
    "normalize_layout",
    "parse_dtype",
    "read_header",
    "segment_size",
    "shm_free",
    "slot_stride",
]

MAGIC = int.from_bytes(b"SHMCAST\0", "little")
LAYOUT_VERSION = 2
PAGE = 4096
MAX_SLOTS = 64
MAX_NDIM = 16
MAX_DESCR = 1536
DESCR_OFF = 512
SLOT_CTL = 2048
SLOT_CTL_SIZE = 64
MAX_VERSION = 2**63 - 1

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
WAITERS_OFF = 100  # u32 count of possible sleepers
WAITERS_IDX = WAITERS_OFF // 4
W_DESCR_LEN = 13
W_NDIM = 14
W_SHAPE = 15
W_INCARNATION = 31
W_LATEST_SLOT = 32

# Slot control line word offsets (from the line's first word).
S_SEQ = 0
S_VERSION = 1
S_WALL = 2
S_MONO = 3


def slot_ctl_index(slot: int) -> int:
    """The index of ``slot``'s control line (its seq word) in the header's u64 view."""
    return (SLOT_CTL + SLOT_CTL_SIZE * slot) // 8


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def header_size(slots: int) -> int:
    return _round_up(SLOT_CTL + SLOT_CTL_SIZE * slots, PAGE)


def slot_stride(nbytes: int) -> int:
    return max(PAGE, _round_up(nbytes, PAGE))


def mode_problem(mode: object) -> str | None:
    """What is wrong with ``mode`` as a segment object's permission bits, or None.

    The rule of the broker's ``mode`` setting (``_config.BrokerConfig``) and of
    ``Segment.create``: read/write bits only, the owner's among them,
    and none for group or others to write (attach refuses such an object).
    """
    if not isinstance(mode, int) or isinstance(mode, bool) or mode & ~0o666 or not mode & 0o600:
        shown = oct(mode) if isinstance(mode, int) and not isinstance(mode, bool) else repr(mode)
        return f"{shown}: use read/write bits only, e.g. 0o600"
    if mode & 0o022:
        return (
            f"{mode:04o} lets others write the segments (and truncate them under "
            "every reader): use 0600, or 0640 with a group"
        )
    return None


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
    except Exception as exc:  # numpy: TypeError, ValueError, IndexError, ... for nonsense
        raise LayoutError(f"not a numpy dtype: {dtype!r} ({exc})") from exc
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        # Integers only: int() would take 2.5 as 2 and fail on inf with OverflowError.
        shp = tuple(operator.index(n) for n in shape)
    except TypeError as exc:
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
        descr = describe_dtype(dt)
    except ValueError as exc:  # numpy cannot describe overlapping or out-of-order fields
        raise LayoutError(f"dtype {dt} cannot be recorded ({exc}); order fields by offset") from exc
    if len(descr) > MAX_DESCR:
        raise LayoutError(f"dtype {dt} is too complex to record (more than {MAX_DESCR} bytes)")
    return dt, shp


def describe_dtype(dt: np.dtype[Any]) -> bytes:
    # ascii(), not repr(): field names and titles may hold any unicode character.
    # Dtype metadata is not part of the layout (numpy warns that it is dropped).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        descr = npformat.dtype_to_descr(dt)
    return ascii(descr).encode("ascii")


def parse_descr(text: bytes) -> np.dtype[Any]:
    return np.dtype(npformat.descr_to_dtype(ast.literal_eval(text.decode("ascii"))))


def dtype_str(dt: np.dtype[Any]) -> str:
    """A string that ``parse_dtype`` turns back into exactly ``dt`` (for the wire and CLI)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        descr = npformat.dtype_to_descr(dt)
    return descr if isinstance(descr, str) else repr(descr)


def parse_dtype(text: str) -> np.dtype[Any]:
    """Inverse of :func:`dtype_str`; also takes plain numpy names such as ``float64``."""
    # Any text may come here from the wire: numpy's parsers raise IndexError,
    # TypeError, ValueError, ... for nonsense, and every one of them is a bad dtype.
    try:
        return parse_descr(text.encode("ascii"))
    except Exception:
        try:
            return np.dtype(text)
        except Exception as exc:
            raise LayoutError(f"not a numpy dtype: {text!r}") from exc


def shm_free() -> int | None:
    """Free bytes in /dev/shm, or None when it cannot be told."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def bytes_castable(dtype: np.dtype[Any]) -> bool:
    """Whether ``memoryview(array).cast("B")`` works for arrays of ``dtype`` (plain
    native scalars; record, datetime and byte-swapped dtypes take numpy's copy)."""
    try:
        np.zeros(1, dtype).data.cast("B")
    except (TypeError, ValueError, NotImplementedError):
        return False
    return True


def _no_fence() -> None:
    pass


def read_header(
    name: str, path: str, fd: int, wait: float, *, fence: Callable[[], None] = _no_fence
) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """Read and check the header of ``fd`` through a private read-only mapping.

    Waits up to ``wait`` seconds for a header still being written (magic 0).
    Once the magic is seen, ``fence`` (the core's full fence) runs and the page is
    read again: the creator stored the magic last, after a fence, so the second
    copy holds every field. Returns ``(dtype, shape, slots, object size)``: the
    values checked here are the only ones to build on (anyone who may write the
    object may change its header after the check; header size, stride and slot
    size follow from them: :func:`header_size`, :func:`slot_stride`).

    Raises:
        NotASegmentError: not a shmcast object, or a header no writer could make.
        LayoutVersionError: written by another layout version.
    """
    deadline = time.monotonic() + wait
    while True:
        size = os.fstat(fd).st_size
        if size >= PAGE:
            with mmap.mmap(fd, PAGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
                head = bytes(mm[:PAGE])
                magic = int.from_bytes(head[0:8], "little")
                if magic == MAGIC:
                    fence()
                    head = bytes(mm[:PAGE])
            if magic == MAGIC:
                break
            if magic != 0:
                raise NotASegmentError(name, path, "wrong magic number")
        elif size != 0:
            raise NotASegmentError(name, path, f"{size} bytes is smaller than any header")
        if time.monotonic() >= deadline:
            raise NotASegmentError(name, path, "header never completed (creator died?)")
        time.sleep(0.005)
    w = [int.from_bytes(head[8 * k : 8 * k + 8], "little") for k in range(W_LATEST_SLOT + 1)]
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
    if w[W_INCARNATION] == 0 or w[W_LATEST_SLOT] >= slots:
        raise NotASegmentError(name, path, "no incarnation id or an impossible latest slot")
    if w[W_LATEST] > MAX_VERSION:
        raise NotASegmentError(name, path, f"impossible latest version {w[W_LATEST]}")
    expected = hsize + slots * stride
    if size != expected:
        raise NotASegmentError(name, path, f"object is {size} bytes, header says {expected}")
    try:
        dt = parse_descr(head[DESCR_OFF : DESCR_OFF + dlen])
    except Exception as exc:  # numpy's parser raises IndexError, TypeError, ... too
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
    return dt, shape, slots, size
