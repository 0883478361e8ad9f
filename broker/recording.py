"""The recording format: what ``shmcast record`` writes and ``shmcast replay`` reads.

One place for both sides: the writers (:func:`open_writer`), the reader
(:func:`open_recording`) and the check that a file is a shmcast recording at
all. h5py and pyarrow are imported when a file is opened, never at import
time, so the base install works without the ``record`` extra.

HDF5 (the default; written in SWMR mode, so other processes can read while it
grows; open it with ``h5py.File(path, "r", swmr=True)``, which also opens the
file of a recorder that was killed)::

    /                        attrs shmcast_format = "shmcast-recording", format_version = 1
    /<segment>               one group per segment, attrs:
        dtype                  dtype_str() of the segment's dtype; parse_dtype() reads it back
        shape                  int64 array: the shape of one version
        namespace, slots       where it was recorded, the ring size
        storage                "native": the numpy dtype as HDF5 type (records become compound
                               types); "opaque": V<itemsize> bytes, for dtypes HDF5 has no type
                               for (unicode, datetime) and records with padding bytes (HDF5's
                               compound conversion drops those), viewed back as ``dtype``
        missed                 uint64: versions of the recorded span never recorded
                               (rewritten at each flush)
    /<segment>/data          (N, *shape); a chunk per version (versions under 64 KiB share
                             chunks of up to 64 KiB); optional gzip or lzf
    /<segment>/version       (N,) uint64, increasing
    /<segment>/timestamp_ns  (N,) uint64: the commit time of each version

Rows are appended data first, then version and timestamp. A reader takes the
shortest of the three lengths and drops trailing rows whose version is 0 (space
allocated but never written), so a file cut short anywhere reads as the versions
written whole.

Parquet (pyarrow), for one-dimensional record dtypes (no field named ``version``
or ``timestamp_ns``: those are the recording's columns; none of 0 bytes): one file per segment, one
row per record; the record's fields as columns (numbers, booleans and datetimes
as themselves, unicode as strings (UTF-8: a record holding a code point that is no
character, a surrogate or one past U+10FFFF, is refused), fixed-size sub-arrays as fixed-size lists,
anything else, bytes included, as fixed-size binary of the field's raw bytes)
and ``version``, ``timestamp_ns`` (uint64). The schema's metadata ``shmcast``
holds JSON (format, format_version, segment, dtype, shape, namespace, slots);
the file's metadata ``shmcast.missed`` is written when the file is closed, as
is Parquet's footer: a Parquet recording is readable once its recorder stopped.
Fields come back bit-identical, but for two things: padding bytes between fields
come back as zeros, and a bool byte other than 0 and 1 (numpy takes any for
True; a view of raw bytes as bool makes them) comes back as 1, since a Parquet
boolean is one bit. Keeping such bytes would take another column type for bool
fields, a change of the format; HDF5 keeps them.

A full disk is never met inside HDF5 or Parquet (HDF5 2.0 can crash on the way
out after ENOSPC): each writer keeps file space reserved ahead of what it hands
the library (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``; a ``statvfs`` check
where that is unsupported) and raises :class:`RecordingSpaceError` before a
write it cannot cover; closing then fits in the reserve.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import importlib
import json
import logging
import math
import os
import stat
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, BinaryIO, Literal, TypeGuard

import numpy as np
import numpy.typing as npt

from ._layout import dtype_str, normalize_layout, parse_dtype
from .errors import (
    RAISE_NOFILE,
    LayoutError,
    MissingExtraError,
    NotARecordingError,
    OutOfDescriptorsError,
    RecordingError,
    RecordingExistsError,
    RecordingSpaceError,
    ShmcastError,
)

__all__ = [
    "EXTRA",
    "FORMAT",
    "FORMATS",
    "FORMAT_VERSION",
    "Format",
    "RecordedSegment",
    "Recording",
    "RecordingWriter",
    "SegmentLayout",
    "detect_format",
    "open_recording",
    "open_writer",
    "output_paths",
    "require",
]

log = logging.getLogger(__name__)

Format = Literal["hdf5", "parquet"]

#: The mark of a shmcast recording (HDF5 root attribute ``shmcast_format``).
FORMAT = "shmcast-recording"
#: Bumped when a reader of the previous version could misread a new file.
FORMAT_VERSION = 1
FORMATS: tuple[Format, ...] = ("hdf5", "parquet")
#: The optional dependencies: ``pip install 'shmcast[record]'``.
EXTRA = "record"

MARK_ATTR = "shmcast_format"
VERSION_ATTR = "format_version"
META_KEY = b"shmcast"
MISSED_KEY = b"shmcast.missed"
COLUMNS = ("version", "timestamp_ns")

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PARQUET_SIGNATURE = b"PAR1"

#: Versions smaller than this share HDF5 chunks (up to this size).
SMALL_CHUNK = 64 * 1024
#: HDF5 chunks must stay under 4 GiB.
MAX_CHUNK = 2**31
#: Chunk length of the version and timestamp datasets.
INDEX_CHUNK = 1024
#: Rows of a Parquet row group (it is written once this many rows are pending).
ROW_GROUP_ROWS = 128 * 1024
#: Bytes of a Parquet row group (whichever comes first).
ROW_GROUP_BYTES = 64 * 2**20
#: File space kept reserved beyond what was handed to HDF5 or Parquet: their
#: metadata, a chunk index that grows, the Parquet footer.
MARGIN = 8 * 2**20


def require(module: str, what: str) -> ModuleType:
    """Import an optional dependency of the ``record`` extra.

    Raises:
        MissingExtraError: it is not installed (names the extra to install).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(EXTRA, module.split(".")[0], what) from exc


@dataclass(frozen=True)
class SegmentLayout:
    """What a recording keeps of a segment to recreate it."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    namespace: str = ""
    slots: int = 2

    @property
    def nbytes(self) -> int:
        """Bytes of one version."""
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"dtype={dtype_str(self.dtype)} shape={list(self.shape)}"


def output_paths(output: str, segments: Sequence[str], fmt: Format) -> dict[str, str]:
    """Segment -> file: one HDF5 file for all; for Parquet one file per segment, the
    output name itself for one segment, else ``<stem>.<segment><suffix>``."""
    if fmt == "hdf5" or len(segments) == 1:
        return dict.fromkeys(segments, output)
    stem, suffix = os.path.splitext(output)
    return {s: f"{stem}.{s}{suffix or '.parquet'}" for s in segments}


def detect_format(path: str) -> Format:
    """``"hdf5"`` or ``"parquet"``, from the file's signature.

    Raises:
        NotARecordingError: no such file, or neither signature.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NotARecordingError(path, "there is no such file") from None
    except OSError as exc:
        raise RecordingError(path, f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        # Never opened: a FIFO would block the open until a writer came.
        raise NotARecordingError(path, f"it is {_file_kind(mode)}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            tail = b""
            if size >= 12:
                f.seek(-4, os.SEEK_END)
                tail = f.read(4)
    except FileNotFoundError:
        raise NotARecordingError(path, "there is no such file") from None
    except IsADirectoryError:
        raise NotARecordingError(path, "it is a directory") from None
    except OSError as exc:
        raise RecordingError(path, f"cannot read {path}: {exc.strerror or exc}") from exc
    if head == HDF5_SIGNATURE:
        return "hdf5"
    if head[:4] == PARQUET_SIGNATURE:
        if tail != PARQUET_SIGNATURE:
            raise NotARecordingError(
                path, "a Parquet file without its footer (its recorder did not stop cleanly)"
            )
        return "parquet"
    what = "an empty file" if size == 0 else "neither an HDF5 nor a Parquet file"
    raise NotARecordingError(path, what)


# ------------------------------------------------------------------ disk space


@functools.lru_cache(maxsize=1)
def _fallocate() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_KEEP_SIZE = 1  # FALLOC_FL_KEEP_SIZE: reserve blocks past the end, the size stays
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


#: ``struct flock`` (Linux): l_type, l_whence, l_start, l_len, l_pid. A writer's lock on
#: its file is an open file description lock (``F_OFD_SETLK``), not a ``flock``: HDF5
#: takes ``flock`` locks of its own, and an SWMR reader in another process could not
#: open a file we held one on. OFD locks go with the descriptor, as ``flock``'s do.
_FLOCK = struct.Struct("hhqqi4x")


class _Reserve:
    """File space kept allocated ahead of what a writer hands its library.

    ``ensure(n)`` before handing over ``n`` bytes: the blocks from the file's end
    to past everything pending are allocated (reserved past EOF, which the
    library's writes then fill), or :class:`RecordingSpaceError` is raised and
    nothing was handed over. ``flushed()`` after a flush: pending bytes are in
    the file now. ``release()`` frees what is left past the end.

    Pending bytes count from the file's size at the last flush: the library
    writes many of them before the flush (direct chunk writes, Parquet row
    groups), and counting them on top of the grown file counted them twice (a
    recording stopped as "full" with half the disk free).
    """

    def __init__(self, path: str, fd: int, *, owned: bool = False) -> None:
        self.path = path
        self._fd = fd
        #: Whether the file is this writer's to remove if it fails (it made it, or
        #: emptied it holding the lock); never a file another writer won the lock of.
        self.owned = owned
        self._end = 0
        self._base = os.fstat(self._fd).st_size
        self._pending = 0
        self._fallocate = _fallocate()

    @classmethod
    def claim(cls, path: str, overwrite: bool) -> _Reserve:
        """Open ``path`` to write (made if missing; through a symbolic link, as the
        libraries' own opens go), nothing truncated yet, and take the writer's lock on
        it, held until :meth:`release`: the lock is taken before anything is written,
        so of two writers started on one file at the same instant one gets it and the
        other is refused, the file untouched. Before, the check was a probe and the
        lock came after the library's truncating open: both writers passed, and one
        truncated (HDF5: or removed) the other's file.

        Raises:
            RecordingExistsError (``path`` exists and not ``overwrite``),
            RecordingError (another writer holds the lock; no regular file; the open
            failed).
        """
        # O_NONBLOCK: a FIFO put there since _check_regular is refused (ENXIO), not
        # waited on.
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK
        made = False
        try:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                made = True
            except FileExistsError:
                if not overwrite:
                    raise
                try:
                    fd = os.open(path, flags)
                except FileNotFoundError:  # a dangling link (or removed since): made
                    fd = os.open(path, flags | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _os_error(path, exc) from exc
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise RecordingError(path, _not_regular(path, mode))
            os.set_blocking(fd, True)
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
            except (OSError, AttributeError) as exc:
                if getattr(exc, "errno", None) in (errno.EAGAIN, errno.EACCES):
                    raise RecordingError(path, _in_progress(path)) from None
                # No open file description locks here (an old kernel, some network
                # filesystems): written unguarded, as before there were any.
        except BaseException:
            os.close(fd)  # a file made here but locked by another is that one's now
            raise
        return cls(path, fd, owned=made)

    def truncate(self) -> None:
        """Empty the file (``--overwrite``), the lock held: it is this writer's now."""
        os.ftruncate(self._fd, 0)
        self.owned = True
        self._base = 0

    def open_file(self) -> BinaryIO:
        """A binary file object writing the claimed file from its start."""
        fd = os.dup(self._fd)
        try:
            return open(fd, "wb")  # an int: not truncated; closed by the caller
        except BaseException:
            os.close(fd)
            raise

    def discard(self) -> None:
        """A writer that failed to start: remove its file if it is its own, then let
        the lock go (after: nobody else is let in while it is removed)."""
        if self.owned:
            _remove_made(self.path)
        self.release()

    def ensure(self, nbytes: int) -> None:
        size = os.fstat(self._fd).st_size
        want = max(size, self._base + self._pending) + nbytes + MARGIN
        if want > self._end:
            target = want + max(MARGIN, 4 * nbytes)  # fewer calls: reserve ahead
            self._allocate(size, want, target)
        self._pending += nbytes

    def _allocate(self, size: int, want: int, target: int) -> None:
        fn = self._fallocate
        if fn is not None:
            if fn(self._fd, _KEEP_SIZE, size, target - size) == 0:
                self._end = target
                return
            err = ctypes.get_errno()
            if err in _NO_SPACE:
                # Settle for the bare need before giving up.
                if fn(self._fd, _KEEP_SIZE, size, want - size) == 0:
                    self._end = want
                    return
                raise RecordingSpaceError(self.path, want - size, self._free())
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise RecordingError(
                    self.path, f"cannot reserve space for {self.path}: {os.strerror(err)}"
                )
            self._fallocate = None  # this filesystem cannot: check free space instead
        free = self._free()
        if free < want - size:
            raise RecordingSpaceError(self.path, want - size, free)

    def _free(self) -> int:
        st = os.fstatvfs(self._fd)
        return st.f_bavail * st.f_frsize

    def flushed(self) -> None:
        self._base = os.fstat(self._fd).st_size
        self._pending = 0

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            # Truncating to the same size frees the blocks reserved past the end.
            os.ftruncate(self._fd, os.fstat(self._fd).st_size)
        os.close(self._fd)
        self._fd = -1


# ------------------------------------------------------------------ writers


class RecordingWriter(ABC):
    """Appends versions of segments to a recording; one thread at a time.

    ``append`` keeps no reference to the arrays it is given.
    """

    def __init__(self, layouts: Sequence[SegmentLayout]) -> None:
        self.layouts = {lay.name: lay for lay in layouts}
        #: Versions an ``append`` took (it returned): written, buffered or dropped.
        self.counts = dict.fromkeys(self.layouts, 0)
        #: Versions written to the file, which no later failure takes back: at once
        #: for HDF5; a format that buffers (Parquet) writes a row group at a time.
        #: One exception: a Parquet file whose footer cannot be written at close is
        #: unreadable, and its versions move from here to :attr:`dropped`.
        self.written = dict.fromkeys(self.layouts, 0)
        #: Versions an ``append`` took (it returned) that never reached the file: a
        #: format that buffers (Parquet) loses its buffer when a later write fails.
        self.dropped = dict.fromkeys(self.layouts, 0)
        self._missed = dict.fromkeys(self.layouts, 0)
        self._dropped_at_set = dict.fromkeys(self.layouts, 0)
        self._closed = False

    #: Segment -> the file its versions go to.
    paths: dict[str, str]

    @abstractmethod
    def append(
        self,
        segment: str,
        arrays: Sequence[npt.NDArray[Any]],
        versions: Sequence[int],
        timestamps: Sequence[int],
    ) -> None:
        """Append versions of ``segment``, in order.

        Raises:
            RecordingSpaceError: the disk cannot take them (nothing was appended).
        """

    def set_missed(self, segment: str, missed: int) -> None:
        """The count of versions of ``segment`` never recorded (stored at the next flush),
        :attr:`dropped` ones included; those dropped after this call are added to it."""
        self._missed[segment] = int(missed)
        self._dropped_at_set[segment] = self.dropped[segment]

    def _missed_now(self, segment: str) -> int:
        return self._missed[segment] + self.dropped[segment] - self._dropped_at_set[segment]

    def buffered(self, segment: str) -> int:
        """Versions of ``segment`` taken and neither written nor dropped yet: what a
        format that buffers (Parquet) holds in memory until its next row group."""
        return max(0, self.counts[segment] - self.written[segment] - self.dropped[segment])

    @abstractmethod
    def flush(self) -> None:
        """Make what was appended readable by other processes (HDF5) or durable."""

    @abstractmethod
    def _close(self) -> None: ...

    def close(self) -> None:
        """Flush and close every file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def size(self) -> int:
        """Bytes of the files on disk."""
        total = 0
        for path in set(self.paths.values()):
            with contextlib.suppress(OSError):
                total += os.path.getsize(path)
        return total

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_writer(
    output: str,
    layouts: Sequence[SegmentLayout],
    *,
    format: Format = "hdf5",
    compression: str | None = None,
    overwrite: bool = False,
) -> RecordingWriter:
    """Create a recording of ``layouts`` (nothing recorded yet).

    Args:
        output: the file; for Parquet and several segments, see :func:`output_paths`.
        layouts: the segments to record.
        format: ``"hdf5"`` or ``"parquet"``.
        compression: HDF5: ``None``, ``"gzip"`` or ``"lzf"``; Parquet: ``None``
            (snappy), ``"none"``, ``"gzip"``, ``"snappy"`` or ``"zstd"``.
        overwrite: replace existing files (refused otherwise, and left untouched).

    Raises:
        RecordingExistsError, MissingExtraError, LayoutError (a layout of no bytes,
        a dtype Parquet cannot take), RecordingError (the file cannot be created),
        OutOfDescriptorsError (this process is out of file descriptors).
    """
    if format not in FORMATS:
        raise LayoutError(f"recording format must be one of {', '.join(FORMATS)}, not {format!r}")
    if not layouts:
        raise LayoutError("a recording needs at least one segment")
    for lay in layouts:
        if lay.nbytes == 0:  # before anything is made: HDF5 divided by it, Parquet wrote on
            raise LayoutError(
                f"segment {lay.name!r} holds {lay.describe()}: 0 bytes a version; a "
                f"recording (like a segment) needs at least 1: give the dtype a size "
                f"and each dimension of the shape at least 1"
            )
    paths = output_paths(output, [lay.name for lay in layouts], format)
    for path in paths.values():
        if not overwrite and os.path.lexists(path):
            raise RecordingExistsError(path)
        _check_regular(path)
    if format == "hdf5":
        return _Hdf5Writer(output, layouts, compression=compression, overwrite=overwrite)
    return _ParquetWriter(paths, layouts, compression=compression, overwrite=overwrite)


def _check_regular(path: str) -> None:
    """Refuse an output that exists and is no regular file (``--overwrite`` of
    ``/dev/null``, a FIFO, a directory): opening a FIFO to write blocks until a
    reader comes, and a writer that fails removes the file it made.

    Raises:
        RecordingError: naming what the path is.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # nothing there (or a dangling link): the file is made
    if stat.S_ISREG(mode):
        return
    raise RecordingError(path, _not_regular(path, mode))


def _claim_all(paths: Sequence[str], overwrite: bool) -> list[_Reserve]:
    """Claim every output (:meth:`_Reserve.claim`), then empty those that existed
    (``--overwrite``): one refused leaves every file as it was.

    Raises:
        RecordingExistsError, RecordingError: from :meth:`_Reserve.claim`, or the
        truncation failed.
    """
    claimed: list[_Reserve] = []
    try:
        for path in paths:
            claimed.append(_Reserve.claim(path, overwrite))
        for reserve in claimed:
            try:
                reserve.truncate()
            except OSError as exc:
                raise _os_error(reserve.path, exc) from exc
    except BaseException:
        for reserve in claimed:
            reserve.discard()
        raise
    return claimed


def _in_progress(path: str) -> str:
    return (
        f"{path} is being recorded by a running recorder (it holds the file's lock): "
        f"--overwrite replaces a finished recording, not one in progress; stop that "
        f"recorder first, or give another --output"
    )


def _not_regular(path: str, mode: int) -> str:
    return (
        f"{path} is {_file_kind(mode)}: a recording is written to a regular file; pick "
        f"another --output"
    )


def _file_kind(mode: int) -> str:
    """What a path that is no regular file is, for a message."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _remove_made(path: str) -> None:
    """Remove the file a writer that failed made: a regular file only, never what
    else the path may name by then."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)


def _os_error(path: str, exc: OSError) -> RecordingError | OutOfDescriptorsError:
    if isinstance(exc, FileExistsError):
        return RecordingExistsError(path)
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return _out_of_descriptors(path, exc.errno)
    return RecordingError(path, f"cannot create {path}: {exc.strerror or exc}")


def _bare_emfile(exc: BaseException) -> TypeGuard[OSError]:
    """An ``OSError`` of EMFILE/ENFILE not made an :class:`OutOfDescriptorsError` yet."""
    return (
        isinstance(exc, OSError)
        and not isinstance(exc, OutOfDescriptorsError)
        and exc.errno in (errno.EMFILE, errno.ENFILE)
    )


def _out_of_descriptors(path: str, err: int) -> OutOfDescriptorsError:
    """EMFILE/ENFILE met opening the recording file ``path`` (our open, HDF5's or
    Arrow's): the error a segment's attach gives, naming the file, the limit and
    the fix. Before, a ``RecordingError`` said "cannot create PATH: Too many open
    files" (HDF5: its own long message), or Arrow's bare ``OSError`` came out."""
    return OutOfDescriptorsError.from_os(
        err,
        "the recording file",
        path,
        fix=(
            "a recorder holds one for each segment it records and each file it "
            "writes (Parquet: a file a segment): raise the limit "
            f"({RAISE_NOFILE}; `shmcast doctor` checks it), or record fewer segments "
            "in this process"
        ),
    )


def _has_padding(dt: np.dtype[Any]) -> bool:
    """Whether a record dtype (at any depth) has bytes that belong to no field."""
    if dt.subdtype is not None:
        return _has_padding(dt.subdtype[0])
    if dt.fields is None:
        return False
    covered = 0
    for field, *_ in dt.fields.values():
        if _has_padding(field):
            return True
        covered += field.itemsize
    return covered != dt.itemsize


def _h5_storage(h5py: Any, dt: np.dtype[Any]) -> tuple[str, np.dtype[Any]]:
    """How HDF5 holds ``dt``: as itself, or as opaque bytes of its size: for dtypes
    HDF5 has no type for, and for records with padding, whose bytes HDF5's compound
    conversion does not copy (they came back as zeros, or as bytes of unrelated
    memory: a replay must be bit-identical, and a file must not leak memory)."""
    opaque = "opaque", np.dtype(f"V{dt.itemsize}")
    if _has_padding(dt):
        return opaque
    try:
        h5py.h5t.py_create(dt, logical=True)
    except (TypeError, ValueError):
        return opaque
    return "native", dt


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    nbytes = math.prod(shape) * itemsize
    if nbytes < SMALL_CHUNK:
        return (max(1, SMALL_CHUNK // nbytes), *shape)
    dims = list(shape)
    # A version of 2 GiB or more: HDF5 chunks must be smaller, split the largest axis.
    while math.prod(dims) * itemsize >= MAX_CHUNK and max(dims, default=1) > 1:
        i = dims.index(max(dims))
        dims[i] = (dims[i] + 1) // 2
    return (1, *dims)


_HDF5_COMPRESSION = {None: None, "none": None, "gzip": "gzip", "lzf": "lzf"}


class _Hdf5Group:
    __slots__ = ("count", "data", "direct", "group", "opaque", "timestamp", "version", "zeros")

    def __init__(self, group: Any, opaque: np.dtype[Any] | None, direct: bool) -> None:
        self.group = group
        self.data = group["data"]
        self.version = group["version"]
        self.timestamp = group["timestamp_ns"]
        self.opaque = opaque
        # A chunk per version and no filter: a version's bytes are its chunk, written
        # as is (H5Dwrite_chunk), without HDF5's selection and conversion machinery.
        self.direct = direct
        self.zeros = (0,) * (len(self.data.shape) - 1)
        self.count = 0


class _Hdf5Writer(RecordingWriter):
    def __init__(
        self,
        path: str,
        layouts: Sequence[SegmentLayout],
        *,
        compression: str | None,
        overwrite: bool,
    ) -> None:
        super().__init__(layouts)
        h5py = require("h5py", "recording to HDF5")
        if compression not in _HDF5_COMPRESSION:
            raise LayoutError(f"HDF5 compression is gzip, lzf or none, not {compression!r}")
        comp = _HDF5_COMPRESSION[compression]
        self.path = path
        self.paths = dict.fromkeys(self.layouts, path)
        # The file is made (an existing one refused unless overwrite) and locked
        # before HDF5 opens it: HDF5's own open truncates.
        self._reserve = reserve = _claim_all([path], overwrite)[0]
        try:
            self._file = h5py.File(path, "w", libver=("v110", "latest"))
        except BaseException as exc:
            # HDF5 failed writing the file (a full disk): removed, or it would be in
            # the way of the next attempt.
            reserve.discard()
            if isinstance(exc, OSError):
                raise _os_error(path, exc) from exc
            raise
        try:
            f = self._file
            f.attrs[MARK_ATTR] = FORMAT
            f.attrs[VERSION_ATTR] = FORMAT_VERSION
            self._groups: dict[str, _Hdf5Group] = {}
            for lay in layouts:
                storage, h5dtype = _h5_storage(h5py, lay.dtype)
                g = f.create_group(lay.name)
                g.create_dataset(
                    "data",
                    shape=(0, *lay.shape),
                    maxshape=(None, *lay.shape),
                    dtype=h5dtype,
                    chunks=_chunks(lay.shape, lay.dtype.itemsize),
                    compression=comp,
                    compression_opts=4 if comp == "gzip" else None,
                )
                for name in COLUMNS:
                    g.create_dataset(
                        name, shape=(0,), maxshape=(None,), dtype="<u8", chunks=(INDEX_CHUNK,)
                    )
                g.attrs["dtype"] = dtype_str(lay.dtype)
                g.attrs["shape"] = np.asarray(lay.shape, dtype=np.int64)
                g.attrs["namespace"] = lay.namespace
                g.attrs["slots"] = lay.slots
                g.attrs["storage"] = storage
                g.attrs["missed"] = np.uint64(0)
                direct = comp is None and g["data"].chunks == (1, *lay.shape)
                self._groups[lay.name] = _Hdf5Group(
                    g, h5dtype if storage == "opaque" else None, direct
                )
            # Every object exists before SWMR starts: SWMR writers cannot add any.
            f.swmr_mode = True
            f.flush()
            reserve.flushed()
        except BaseException:
            with contextlib.suppress(Exception):
                self._file.close()
            reserve.discard()
            raise
        self._written_missed = dict.fromkeys(self.layouts, 0)

    def append(
        self,
        segment: str,
        arrays: Sequence[npt.NDArray[Any]],
        versions: Sequence[int],
        timestamps: Sequence[int],
    ) -> None:
        k = len(arrays)
        if not k:
            return
        g = self._groups[segment]
        nbytes = self.layouts[segment].nbytes
        self._reserve.ensure(k * (nbytes + 16) + 4096)
        n0 = g.count
        n1 = n0 + k
        g.data.resize(n1, axis=0)
        if g.direct:
            write_chunk = g.data.id.write_direct_chunk
            for j, a in enumerate(arrays):
                write_chunk((n0 + j, *g.zeros), np.ascontiguousarray(a).reshape(-1).view(np.uint8))
                # h5py keeps the GIL while it writes: hand it over between chunks, so a
                # thread waiting for it (the recorder's reader) waits one chunk at most.
                time.sleep(0)
        else:
            if g.opaque is not None:
                arrays = [a.view(g.opaque) for a in arrays]
            self._write(g, arrays, n0, n1, nbytes)
        # Version and time after the data: a row with a version has its data.
        g.timestamp.resize(n1, axis=0)
        g.timestamp[n0:n1] = np.asarray(timestamps, dtype=np.uint64)
        g.version.resize(n1, axis=0)
        g.version[n0:n1] = np.asarray(versions, dtype=np.uint64)
        g.count = n1
        self.counts[segment] = self.written[segment] = n1

    @staticmethod
    def _write(
        g: _Hdf5Group, arrays: Sequence[npt.NDArray[Any]], n0: int, n1: int, nbytes: int
    ) -> None:
        if n1 - n0 == 1:
            g.data[n0] = arrays[0]
        elif nbytes < SMALL_CHUNK:
            g.data[n0:n1] = np.stack(arrays)
        else:
            for j, a in enumerate(arrays):
                g.data[n0 + j] = a

    def flush(self) -> None:
        for name, g in self._groups.items():
            if self._missed[name] != self._written_missed[name]:
                g.group.attrs["missed"] = np.uint64(self._missed[name])
                self._written_missed[name] = self._missed[name]
        self._file.flush()
        self._reserve.flushed()

    def _close(self) -> None:
        try:
            self.flush()
        finally:
            try:
                self._file.close()
            finally:
                self._reserve.release()


_PARQUET_COMPRESSION = {
    None: "snappy",
    "none": "none",
    "gzip": "gzip",
    "snappy": "snappy",
    "zstd": "zstd",
}


def _parquet_check(lay: SegmentLayout) -> None:
    if lay.dtype.names is None or len(lay.shape) != 1:
        raise LayoutError(
            f"segment {lay.name!r} holds {lay.describe()}: Parquet takes one-dimensional "
            f"record (structured) dtypes, a row per record; record it with --format hdf5"
        )
    # A field of the name of a column of the recording's own would be the same
    # column: its values were replaced by the version numbers and commit times.
    taken = [n for n in COLUMNS if n in lay.dtype.names]
    if taken:
        raise LayoutError(
            f"segment {lay.name!r} has field(s) {', '.join(map(repr, taken))}, the name(s) "
            f"of the columns a Parquet recording adds to each row; record it with "
            f"--format hdf5"
        )
    # Parquet has no fixed-size value of 0 bytes: pyarrow failed writing S0 and V0
    # fields (the row group lost), and a U0 field did not read back.
    fields = lay.dtype.fields
    assert fields is not None
    empty = [n for n in lay.dtype.names if fields[n][0].itemsize == 0]
    if empty:
        raise LayoutError(
            f"segment {lay.name!r} has field(s) {', '.join(map(repr, empty))} of 0 bytes, "
            f"which Parquet cannot hold; record it with --format hdf5"
        )


def _arrow_kind(field: np.dtype[Any]) -> str:
    """How a field becomes a column: 'num', 'str', 'list' or 'raw' bytes."""
    if field.subdtype is not None:
        base = field.subdtype[0]
        return "list" if _arrow_kind(base) == "num" else "raw"
    if field.kind in "biuf":
        return "num"
    if field.kind in "mM" and np.datetime_data(field)[0] in ("s", "ms", "us", "ns"):
        return "num"
    if field.kind == "U":
        return "str"
    return "raw"


def _arrow_columns(pa: Any, arr: npt.NDArray[Any]) -> dict[str, Any]:
    dt = arr.dtype
    assert dt.names is not None
    assert dt.fields is not None
    n = len(arr)
    cols: dict[str, Any] = {}
    raw = arr.view(np.uint8).reshape(n, dt.itemsize) if n else None
    for name in dt.names:
        field, offset = dt.fields[name][:2]
        kind = _arrow_kind(field)
        if kind == "num":
            col = arr[name]
            if not col.dtype.isnative:
                col = col.astype(col.dtype.newbyteorder("="))
            cols[name] = pa.array(col)
        elif kind == "list":
            assert field.subdtype is not None
            sub = field.subdtype[1]
            flat = np.ascontiguousarray(arr[name]).reshape(-1)
            if not flat.dtype.isnative:
                flat = flat.astype(flat.dtype.newbyteorder("="))
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), math.prod(sub))
        elif kind == "str":
            # Through Python strings: numpy-to-arrow conversion cuts at the first NUL.
            cols[name] = pa.array(arr[name].tolist(), type=pa.string())
        else:
            size = field.itemsize
            data = b"" if raw is None else np.ascontiguousarray(raw[:, offset : offset + size])
            cols[name] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(size), n, [None, pa.py_buffer(data)]
            )
    return cols


def _arrow_schema(pa: Any, dt: np.dtype[Any]) -> Any:
    """The Arrow schema of a Parquet recording of records of ``dt``: its fields' columns,
    then ``version`` and ``timestamp_ns``."""
    sample = _arrow_columns(pa, np.zeros(1, dt))
    sample["version"] = pa.array(np.zeros(1, np.uint64))
    sample["timestamp_ns"] = pa.array(np.zeros(1, np.uint64))
    return pa.table(sample).schema


def _check_text(path: str, arr: npt.NDArray[Any]) -> None:
    """Refuse records whose unicode fields hold code points that are no character (a
    surrogate, or past U+10FFFF): Parquet keeps text as UTF-8, which has none for
    them; pyarrow refused a surrogate with the whole pending row group, and wrote
    one past U+10FFFF as bytes it then could not read back (the row group lost).

    Raises:
        RecordingError: naming the field and the fix; nothing of ``arr`` was taken
            (:meth:`_ParquetWriter.append` takes the versions before it).
    """
    dt = arr.dtype
    assert dt.names is not None
    assert dt.fields is not None
    for name in dt.names:
        field = dt.fields[name][0]
        if field.kind != "U":
            continue
        raw = np.ascontiguousarray(arr[name]).reshape(-1)
        codes = raw.view(np.dtype(field.str[0] + "u4"))
        if bool(np.any((codes > 0x10FFFF) | ((codes >= 0xD800) & (codes <= 0xDFFF)))):
            raise RecordingError(
                path,
                f"field {name!r} holds code points that are no unicode character "
                f"(a surrogate, or past U+10FFFF), which Parquet's UTF-8 text cannot "
                f"hold; record the segment with --format hdf5, which keeps them",
            )


def _first_refused_text(path: str, arrays: Sequence[npt.NDArray[Any]]) -> int:
    """The index of the first of ``arrays`` :func:`_check_text` refuses (their
    number when none is)."""
    for k, arr in enumerate(arrays):
        try:
            _check_text(path, arr)
        except RecordingError:
            return k
    return len(arrays)


def _same_type(pa: Any, have: Any, want: Any) -> bool:
    """Whether a column read back is of the type the writer made: the same, or a
    time of another unit (Parquet keeps none in seconds: they come back in ms)."""
    if have.equals(want):
        return True
    if pa.types.is_timestamp(want):
        return bool(pa.types.is_timestamp(have) and have.tz == want.tz)
    return bool(pa.types.is_duration(want) and pa.types.is_duration(have))


def _from_arrow(table: Any, dt: np.dtype[Any]) -> npt.NDArray[Any]:
    """Rows of a Parquet recording back into records, field by field, as raw bytes.

    Raises:
        ValueError: a column holds nulls where the writer makes none (it writes a
            null for NaT only), or values its field cannot take.
    """
    assert dt.names is not None
    assert dt.fields is not None
    n = table.num_rows
    out = np.zeros(n, dtype=dt)
    raw = out.view(np.uint8).reshape(n, dt.itemsize)
    for name in dt.names:
        field, offset = dt.fields[name][:2]
        col = table.column(name).combine_chunks()
        kind = _arrow_kind(field)
        nulls = col.null_count + (col.flatten().null_count if kind == "list" else 0)
        if nulls and not (kind == "num" and field.kind in "mM"):
            raise ValueError(f"column {name!r} holds {nulls} null value(s)")
        if kind == "num":
            values = col.to_numpy(zero_copy_only=False).astype(field, copy=False)
        elif kind == "list":
            assert field.subdtype is not None
            base, sub = field.subdtype
            values = col.flatten().to_numpy(zero_copy_only=False).astype(base).reshape(n, *sub)
        elif kind == "str":
            values = np.asarray(col.to_pylist(), dtype=field)
        else:
            size = field.itemsize
            buf = np.frombuffer(col.buffers()[1], dtype=np.uint8)
            values = buf[col.offset * size : (col.offset + n) * size]
            raw[:, offset : offset + size] = values.reshape(n, size)
            continue
        raw[:, offset : offset + field.itemsize] = (
            np.ascontiguousarray(values).view(np.uint8).reshape(n, field.itemsize)
        )
    return out


class _ParquetSegment:
    __slots__ = ("file", "pending", "pending_bytes", "reserve", "schema", "writer")

    def __init__(self, file: Any, writer: Any, schema: Any, reserve: _Reserve) -> None:
        self.file = file
        self.writer = writer
        self.schema = schema
        self.reserve = reserve
        #: (rows, versions, timestamps, how many versions) of each buffered append.
        self.pending: list[tuple[npt.NDArray[Any], npt.NDArray[np.uint64], Any, int]] = []
        self.pending_bytes = 0


class _ParquetWriter(RecordingWriter):
    def __init__(
        self,
        paths: dict[str, str],
        layouts: Sequence[SegmentLayout],
        *,
        compression: str | None,
        overwrite: bool,
    ) -> None:
        super().__init__(layouts)
        for lay in layouts:
            _parquet_check(lay)
        if compression not in _PARQUET_COMPRESSION:
            raise LayoutError(
                f"Parquet compression is none, gzip, snappy or zstd, not {compression!r}"
            )
        self._pa = require("pyarrow", "recording to Parquet")
        self._pq = require("pyarrow.parquet", "recording to Parquet")
        self.paths = paths
        self._segs: dict[str, _ParquetSegment] = {}
        # Every file made (existing ones refused unless overwrite) and locked first.
        reserves = _claim_all([paths[lay.name] for lay in layouts], overwrite)
        try:
            for lay, reserve in zip(layouts, reserves, strict=True):
                self._segs[lay.name] = self._open(lay, compression, reserve)
        except BaseException as exc:
            for seg in self._segs.values():
                with contextlib.suppress(Exception):
                    seg.writer.close()
                seg.file.close()
            for reserve in reserves:
                reserve.discard()
            # Arrow's own opens (a ParquetWriter; its lazy import of pandas while
            # the schema is built) run out as bare OSErrors.
            if _bare_emfile(exc):
                raise _out_of_descriptors(paths[lay.name], exc.errno or errno.EMFILE) from exc
            raise

    def _open(
        self, lay: SegmentLayout, compression: str | None, reserve: _Reserve
    ) -> _ParquetSegment:
        pa = self._pa
        path = self.paths[lay.name]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "segment": lay.name,
            "dtype": dtype_str(lay.dtype),
            "shape": list(lay.shape),
            "namespace": lay.namespace,
            "slots": lay.slots,
        }
        schema = _arrow_schema(pa, lay.dtype).with_metadata({META_KEY: json.dumps(meta).encode()})
        try:
            file = reserve.open_file()  # the claimed file (closed in _close)
        except OSError as exc:
            raise _os_error(path, exc) from exc
        try:
            reserve.ensure(0)
            writer = self._pq.ParquetWriter(
                file, schema, compression=_PARQUET_COMPRESSION[compression]
            )
        except BaseException:
            file.close()  # the reserve is the caller's to discard
            raise
        return _ParquetSegment(file, writer, schema, reserve)

    def append(
        self,
        segment: str,
        arrays: Sequence[npt.NDArray[Any]],
        versions: Sequence[int],
        timestamps: Sequence[int],
    ) -> None:
        if not arrays:
            return
        seg = self._segs[segment]
        rows = len(arrays[0])
        data = np.concatenate(arrays)  # a copy: the caller may reuse its arrays
        try:
            _check_text(self.paths[segment], data)
        except RecordingError:
            # The versions before the refused one are taken (counts says how many),
            # as they would have been had they come in an append of their own.
            k = _first_refused_text(self.paths[segment], arrays)
            if k:
                self.append(segment, arrays[:k], versions[:k], timestamps[:k])
            raise
        seg.pending.append(
            (
                data,
                np.repeat(np.asarray(versions, dtype=np.uint64), rows),
                np.repeat(np.asarray(timestamps, dtype=np.uint64), rows),
                len(arrays),
            )
        )
        seg.pending_bytes += data.nbytes
        if seg.pending_bytes >= ROW_GROUP_BYTES or sum(len(p[0]) for p in seg.pending) >= (
            ROW_GROUP_ROWS
        ):
            try:
                self._write(segment, seg)
            except BaseException:
                # This call's own versions are the caller's to count: append raised.
                self.dropped[segment] -= len(arrays)
                raise
        self.counts[segment] += len(arrays)

    def _write(self, name: str, seg: _ParquetSegment) -> None:
        """Write the buffered versions as one row group; if that fails, they are gone
        (counted in :attr:`dropped`), never written twice nor counted twice."""
        pending, seg.pending, seg.pending_bytes = seg.pending, [], 0
        if not pending:
            return
        try:
            pa = self._pa
            data = np.concatenate([p[0] for p in pending])
            cols = _arrow_columns(pa, data)
            cols["version"] = pa.array(np.concatenate([p[1] for p in pending]))
            cols["timestamp_ns"] = pa.array(np.concatenate([p[2] for p in pending]))
            table = pa.table(cols, schema=seg.schema)
            seg.reserve.ensure(int(data.nbytes * 1.1) + 16 * len(data) + 65536)
            seg.writer.write_table(table, row_group_size=max(1, table.num_rows))
        except BaseException:
            self.dropped[name] += sum(p[3] for p in pending)
            raise
        self.written[name] += sum(p[3] for p in pending)

    def flush(self) -> None:
        for name, seg in self._segs.items():
            if seg.pending_bytes >= ROW_GROUP_BYTES // 4:
                self._write(name, seg)
            seg.file.flush()
            seg.reserve.flushed()

    def _close(self) -> None:
        errors: list[BaseException] = []
        for name, seg in self._segs.items():
            try:
                try:
                    self._write(name, seg)
                finally:
                    missed = self._missed_now(name)
                    try:
                        seg.writer.add_key_value_metadata({MISSED_KEY: str(missed)})
                        seg.writer.close()
                        seg.file.flush()  # the footer's last bytes wait in its buffer
                    except Exception as exc:
                        raise self._unreadable(name, exc) from exc
            except (ShmcastError, OSError) as exc:
                errors.append(exc)
            finally:
                # Flushed, or its flush failed and was counted: what closing it could
                # raise is that same failure again.
                with contextlib.suppress(OSError):
                    seg.file.close()
                seg.reserve.release()
        if errors:
            raise errors[0]

    def _unreadable(self, name: str, exc: Exception) -> RecordingError:
        """The footer of ``name``'s file was not written: without it no row group of
        the file can be read, so the versions written to it are lost (moved to
        :attr:`dropped`). Before, they stayed counted written, and the recorder
        said them recorded in a file that does not read back."""
        lost, self.written[name] = self.written[name], 0
        self.dropped[name] += lost
        path = self.paths[name]
        return RecordingError(
            path,
            f"writing the footer of {path} failed ({exc}): the file is unreadable, and "
            f"the {lost} versions of segment {name!r} written to it are lost (counted "
            f"unwritten); remove it, fix the disk and record again",
        )


# ------------------------------------------------------------------ reading


class RecordedSegment(ABC):
    """The versions of one segment in a recording.

    ``versions`` and ``timestamps_ns`` are uint64 arrays (one entry per recorded
    version); :meth:`read` and :meth:`read_into` give the data of entry ``i``.
    """

    layout: SegmentLayout
    versions: npt.NDArray[np.uint64]
    timestamps_ns: npt.NDArray[np.uint64]
    missed: int
    path: str

    def __len__(self) -> int:
        return len(self.versions)

    @property
    def name(self) -> str:
        return self.layout.name

    def read(self, i: int) -> npt.NDArray[Any]:
        """A private copy of the data of entry ``i``."""
        out = np.empty(self.layout.shape, dtype=self.layout.dtype)
        self.read_into(i, out)
        return out

    @abstractmethod
    def read_into(self, i: int, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` (the segment's dtype and shape, C-contiguous, writable)."""

    def refresh(self) -> None:  # noqa: B027 (only a growing HDF5 file has anything to do)
        """See versions appended since the file was opened (HDF5, SWMR)."""

    def __iter__(self) -> Iterator[tuple[int, int, npt.NDArray[Any]]]:
        """``(version, timestamp_ns, array)`` of every entry, in order."""
        for i in range(len(self)):
            yield int(self.versions[i]), int(self.timestamps_ns[i]), self.read(i)

    def __repr__(self) -> str:
        return f"<RecordedSegment {self.name} {self.layout.describe()} versions={len(self)}>"


class Recording:
    """An open recording file: ``segments`` maps each segment's name to its
    :class:`RecordedSegment`. Close it (or use ``with``)."""

    def __init__(self, path: str, fmt: Format, segments: dict[str, RecordedSegment]) -> None:
        self.path = path
        self.format: Format = fmt
        self.segments = segments
        self._closers: list[Any] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fn in reversed(self._closers):
            with contextlib.suppress(Exception):
                fn()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Recording {self.path} {self.format} segments={list(self.segments)}>"


def open_recording(path: str | os.PathLike[str]) -> Recording:
    """Open a recording written by :func:`open_writer` (HDF5 or Parquet) for reading.

    Raises:
        NotARecordingError: not a file shmcast wrote, or too damaged to read.
        MissingExtraError: h5py / pyarrow is not installed.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "hdf5":
        return _open_hdf5(path)
    return _open_parquet(path)


def _layout_from(path: str, where: str, name: str, meta: dict[str, Any]) -> SegmentLayout:
    try:
        dt, shape = normalize_layout(parse_dtype(str(meta["dtype"])), tuple(meta["shape"]))
        layout = SegmentLayout(
            name=name,
            dtype=dt,
            shape=shape,
            namespace=str(meta.get("namespace", "")),
            slots=int(meta.get("slots", 2)),
        )
        if layout.slots < 2:
            raise ValueError(f"{layout.slots} slots (a segment has 2 or more)")
        return layout
    except (KeyError, TypeError, ValueError, ShmcastError) as exc:
        raise NotARecordingError(path, f"{where}: no usable layout ({exc})") from exc


#: What h5py, pyarrow and numpy raise for a damaged file (and a value they made of it).
_DAMAGED = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError)


def _checked_columns(
    path: str, name: str, versions: npt.NDArray[Any], missed: object
) -> tuple[npt.NDArray[np.uint64], int]:
    """The versions (a column), strictly increasing from 1 up, and a count of missed
    versions that is a non-negative integer: as a writer makes them."""
    v = np.asarray(versions, dtype=np.uint64)
    if v.size and (v[0] == 0 or bool(np.any(v[1:] <= v[:-1]))):
        raise NotARecordingError(path, f"segment {name!r}: its versions do not only go forward")
    if (
        isinstance(missed, bool)
        or not isinstance(missed, (int, np.integer))
        or not 0 <= missed < 2**64
    ):
        raise NotARecordingError(path, f"segment {name!r}: a missed count of {missed!r}")
    return v, int(missed)


class _Hdf5Segment(RecordedSegment):
    def __init__(self, path: str, group: Any, layout: SegmentLayout) -> None:
        self.path = path
        self.layout = layout
        self._group = group
        self._data = group["data"]
        self._version = group["version"]
        self._timestamp = group["timestamp_ns"]
        self._view = self._data.dtype
        if self._data.shape[1:] != layout.shape or self._view.itemsize != layout.dtype.itemsize:
            raise NotARecordingError(
                path,
                f"group {layout.name!r}: data {self._data.dtype} {self._data.shape[1:]} does "
                f"not match its attributes ({layout.describe()})",
            )
        self._fd = -1
        self._offsets: npt.NDArray[np.int64] | None = None
        # A chunk per version, no filter: read a version's bytes straight from the
        # file into the destination (one pread) when HDF5 agrees on entry 0.
        self._direct = (
            self._data.chunks == (1, *layout.shape)
            and self._data.id.get_create_plist().get_nfilters() == 0
        )
        self._load()
        if self._direct:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._index()
                if len(self.versions) and not self._agrees():
                    self._direct = False
                    self._offsets = None
            except BaseException:
                self.close()  # a damaged chunk index: the caller never gets it to close
                raise

    def _index(self) -> None:
        n = len(self.versions)
        offsets = np.full(n, -1, dtype=np.int64)
        nbytes = self.layout.nbytes
        dsid = self._data.id

        def visit(info: Any) -> None:
            i = info.chunk_offset[0]
            if i < n and info.size == nbytes and info.filter_mask == 0:
                offsets[i] = info.byte_offset

        try:
            dsid.chunk_iter(visit)
        except (AttributeError, NotImplementedError):  # older h5py/HDF5: one call per chunk
            zeros = (0,) * len(self.layout.shape)
            for i in range(n):
                visit(dsid.get_chunk_info_by_coord((i, *zeros)))
        self._offsets = offsets

    def _agrees(self) -> bool:
        a = np.empty(self.layout.shape, self.layout.dtype)
        b = np.empty(self.layout.shape, self.layout.dtype)
        self._data.read_direct(a.view(self._view), source_sel=np.s_[0])
        return self._pread(0, b) and a.tobytes() == b.tobytes()

    def _pread(self, i: int, out: npt.NDArray[Any]) -> bool:
        offsets = self._offsets
        if offsets is None or i >= len(offsets) or offsets[i] < 0:
            return False
        buf = out.reshape(-1).view(np.uint8).data
        return os.preadv(self._fd, [buf], int(offsets[i])) == len(buf)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _load(self) -> None:
        for ds in (self._version, self._timestamp):
            if ds.ndim != 1:
                raise NotARecordingError(
                    self.path, f"segment {self.name!r}: version columns of shape {ds.shape}"
                )
            # Written whole, never compressed: the file holds each entry's bytes (but
            # the last chunks, which a growing file may not have stored yet). A forged
            # column of 10**9 entries (a fill value) in a file of 72 KiB was read whole.
            size = ds.dtype.itemsize
            stored = ds.id.get_storage_size()
            if (ds.shape[0] - 2 * INDEX_CHUNK) * size > stored:
                raise NotARecordingError(
                    self.path,
                    f"segment {self.name!r}: a column of {ds.shape[0]} entries in "
                    f"{stored} bytes of the file",
                )
        versions = np.asarray(self._version[()])
        times = np.asarray(self._timestamp[()], dtype=np.uint64)
        n = min(len(versions), len(times), self._data.shape[0])
        while n and versions[n - 1] == 0:  # space allocated, never written
            n -= 1
        self.versions, self.missed = _checked_columns(
            self.path, self.name, versions[:n], self._group.attrs.get("missed", 0)
        )
        self.timestamps_ns = times[:n]

    def refresh(self) -> None:
        for ds in (self._data, self._version, self._timestamp):
            ds.refresh()
        self._load()
        if self._direct:
            self._index()

    def read_into(self, i: int, out: npt.NDArray[Any]) -> None:
        if not 0 <= i < len(self.versions):
            raise IndexError(f"entry {i} of {len(self.versions)} of segment {self.name!r}")
        if self._direct and out.flags.c_contiguous and self._pread(i, out):
            return
        try:
            self._data.read_direct(out.view(self._view), source_sel=np.s_[i])
        except (OSError, RuntimeError) as exc:  # a damaged chunk
            where = f"entry {i} of segment {self.name!r}"
            raise NotARecordingError(self.path, f"{where}: {exc}") from exc


def _closed_cleanly(path: str) -> bool:
    """True when the file's HDF5 superblock (version 2 or 3, as the writer makes)
    says no writer has it open: its file consistency flags are clear."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return False
    return len(head) == 12 and head[:8] == b"\x89HDF\r\n\x1a\n" and head[8] >= 2 and head[11] == 0


def _check_in_file(h5py: Any, path: str, parent: Any, key: str, where: str) -> None:
    """Refuse an object a writer never makes that reads other files: a link to another
    file (or any link but a plain one), a dataset stored in external raw files or
    mapped from other files (virtual). A forged recording made replay read any file
    this process may read (/etc/shadow, as root) and publish its bytes."""
    link = parent.get(key, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise NotARecordingError(
            path, f"{where} is a {type(link).__name__}, not an object of its own"
        )
    obj = parent[key]
    if isinstance(obj, h5py.Dataset) and (
        obj.is_virtual or obj.id.get_create_plist().get_external_count()
    ):
        raise NotARecordingError(path, f"{where} keeps its values in other files")


def _open_hdf5(path: str) -> Recording:
    h5py = require("h5py", "reading an HDF5 recording")
    segments: dict[str, _Hdf5Segment] = {}
    # h5py raises OSError or RuntimeError for a file it cannot read. A file its
    # writer closed is opened with every check: in SWMR mode HDF5 skips the one of
    # the file's length (a truncated file opened as an empty recording) and retries
    # each damaged metadata read for minutes. SWMR is for a file whose writer is
    # still running, or was killed.
    try:
        if _closed_cleanly(path):
            f = h5py.File(path, "r")
        else:
            try:
                f = h5py.File(path, "r", swmr=True)
            except (OSError, RuntimeError):
                f = h5py.File(path, "r")
    except (OSError, RuntimeError) as exc:
        raise NotARecordingError(path, f"HDF5 cannot open it ({exc})") from exc
    try:
        mark = f.attrs.get(MARK_ATTR)
        if isinstance(mark, bytes):
            mark = mark.decode(errors="replace")
        if mark != FORMAT:
            raise NotARecordingError(
                path, f"an HDF5 file without the mark of one (root attribute {MARK_ATTR!r})"
            )
        version = int(f.attrs.get(VERSION_ATTR, 0))
        if version > FORMAT_VERSION:
            raise NotARecordingError(
                path,
                f"format version {version}, written by a newer shmcast; this one reads "
                f"version {FORMAT_VERSION}",
            )
        for name in list(f):
            where = f"group {name!r}"
            _check_in_file(h5py, path, f, name, where)
            group = f[name]
            if not isinstance(group, h5py.Group) or not all(k in group for k in ("data", *COLUMNS)):
                raise NotARecordingError(path, f"{where} lacks data, version or timestamp_ns")
            for k in ("data", *COLUMNS):
                _check_in_file(h5py, path, group, k, f"{where}: {k}")
            attrs = {k: group.attrs[k] for k in group.attrs}
            if isinstance(attrs.get("dtype"), bytes):
                attrs["dtype"] = attrs["dtype"].decode()
            if "shape" in attrs:
                attrs["shape"] = [int(n) for n in np.atleast_1d(attrs["shape"])]
            segments[name] = _Hdf5Segment(path, group, _layout_from(path, where, name, attrs))
        if not segments:
            raise NotARecordingError(path, "it holds no segment")
    except BaseException as exc:
        for seg in segments.values():
            seg.close()
        f.close()
        if isinstance(exc, _DAMAGED) and not isinstance(exc, ShmcastError):
            raise NotARecordingError(path, f"HDF5 cannot read it ({exc})") from exc
        raise
    rec = Recording(path, "hdf5", dict(segments))
    rec._closers.append(f.close)
    rec._closers.extend(seg.close for seg in segments.values())
    return rec


class _ParquetRecorded(RecordedSegment):
    def __init__(self, path: str, pf: Any, layout: SegmentLayout, missed: int) -> None:
        self.path = path
        self.layout = layout
        self._pf = pf
        self._rows = layout.shape[0]
        cols = pf.read(columns=list(COLUMNS))
        for col in COLUMNS:
            if cols.column(col).null_count:
                raise NotARecordingError(path, f"column {col!r} holds null values")
        versions = cols.column("version").to_numpy()
        times = cols.column("timestamp_ns").to_numpy()
        if len(versions) % self._rows:
            raise NotARecordingError(
                path, f"{len(versions)} rows is not a whole number of {self._rows}-row versions"
            )
        # The rows of one version share its number and commit time, as written.
        for what, col in (("version", versions), ("commit time", times)):
            per = col.reshape(-1, self._rows)
            if per.size and not bool(np.all(per == per[:, :1])):
                raise NotARecordingError(
                    path, f"the {self._rows} rows of a version do not share one {what}"
                )
        self.versions, self.missed = _checked_columns(
            path, layout.name, np.ascontiguousarray(versions[:: self._rows]), missed
        )
        self.timestamps_ns = np.ascontiguousarray(times[:: self._rows], dtype=np.uint64)
        md = pf.metadata
        starts = [0]
        for g in range(md.num_row_groups):
            starts.append(starts[-1] + md.row_group(g).num_rows)
        self._starts = starts
        self._cached: tuple[int, npt.NDArray[Any]] | None = None

    def _group(self, g: int) -> npt.NDArray[Any]:
        if self._cached is None or self._cached[0] != g:
            try:
                table = self._pf.read_row_group(g, columns=list(self.layout.dtype.names or ()))
                rows = _from_arrow(table, self.layout.dtype)
            except _DAMAGED as exc:  # pyarrow: OSError, ArrowInvalid (a ValueError), ...
                raise NotARecordingError(self.path, f"row group {g}: {exc}") from exc
            self._cached = (g, rows)
        return self._cached[1]

    def read_into(self, i: int, out: npt.NDArray[Any]) -> None:
        if not 0 <= i < len(self.versions):
            raise IndexError(f"entry {i} of {len(self.versions)} of segment {self.name!r}")
        start, stop = i * self._rows, (i + 1) * self._rows
        parts = []
        row = start
        while row < stop:
            g = int(np.searchsorted(self._starts, row, side="right")) - 1
            rows = self._group(g)
            end = min(stop, self._starts[g + 1])
            parts.append(rows[row - self._starts[g] : end - self._starts[g]])
            row = end
        src = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out.view(np.uint8)[...] = src.view(np.uint8).reshape(out.view(np.uint8).shape)


def _open_parquet(path: str) -> Recording:
    pq = require("pyarrow.parquet", "reading a Parquet recording")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid, an OSError or ValueError
        raise NotARecordingError(path, f"pyarrow cannot read it ({exc})") from exc
    try:
        meta_all = pf.metadata.metadata or {}
        raw = meta_all.get(META_KEY)
        try:
            meta = json.loads(raw) if raw else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise NotARecordingError(path, "a Parquet file without shmcast's metadata")
        version = int(meta.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise NotARecordingError(
                path,
                f"format version {version}, written by a newer shmcast; this one reads "
                f"version {FORMAT_VERSION}",
            )
        name = str(meta.get("segment", ""))
        layout = _layout_from(path, "metadata", name, meta)
        _parquet_check(layout)
        names = set(pf.schema_arrow.names)
        wanted = {*(layout.dtype.names or ()), *COLUMNS}
        if not wanted <= names:
            raise NotARecordingError(path, f"columns {sorted(wanted - names)} are missing")
        # Each column of the type the writer makes of its field: another type's values
        # were read as if they were (a variable-size binary column's offsets as a
        # field's bytes), or failed with a traceback.
        pa = require("pyarrow", "reading a Parquet recording")
        for field in _arrow_schema(pa, layout.dtype):
            have = pf.schema_arrow.field(field.name).type
            if not _same_type(pa, have, field.type):
                raise NotARecordingError(
                    path,
                    f"column {field.name!r} is {have}, where {layout.describe()} makes it "
                    f"{field.type}",
                )
        missed = int(meta_all.get(MISSED_KEY, b"0"))  # ValueError: damaged, said below
        seg = _ParquetRecorded(path, pf, layout, missed)
    except LayoutError as exc:
        pf.close()
        raise NotARecordingError(path, str(exc)) from exc
    except BaseException as exc:
        pf.close()
        if isinstance(exc, _DAMAGED) and not isinstance(exc, ShmcastError):
            raise NotARecordingError(path, f"pyarrow cannot read it ({exc})") from exc
        raise
    rec = Recording(path, "parquet", {name: seg})
    rec._closers.append(pf.close)
    return rec
