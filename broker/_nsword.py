"""The namespace word: one small shared object per namespace that tells readers,
without a broker hop, that the catalog changed or that the broker is alive.

Object ``/dev/shm/shmcast.<namespace>.@catalog`` (``@`` cannot start a segment
name), one page, all integers little-endian::

    byte  0  u64  magic b"SHMCNSW\\0"        written last at create
    byte  8  u64  layout version (1)
    byte 16  u64  incarnation: a random non-zero id drawn when the object is made
    byte 24  u64  epoch of the broker serving the namespace (0: none)
    byte 32  u64  pid of that broker (0: none; stopped cleanly)
    byte 40  u64  heartbeat interval, ns
    byte 48  u64  last heartbeat, CLOCK_MONOTONIC ns (0: stopped)
    byte 56  u64  catalog generation: +1 at every create or delete of a segment
    byte 64  u32  notify word (futex): +1 after every change above

The broker is its only writer: it makes the object (or takes over the one a
killed broker left) when it starts, bumps the generation on every create and
delete, stamps a heartbeat every heartbeat interval, and on a clean stop marks
itself gone. Each change stores its words first and, after the core's full fence,
the notify word last, then wakes the futex: a reader that loads the notify word,
then (after a fence: :meth:`NamespaceWord.state`) the other words, and
then sleeps on the value it loaded misses nothing (the kernel refuses the sleep
if the word moved since).

Readers (subscribers) map it read-only and wait on its notify word together with
the notify words of the segments they read (:func:`wait_segments`), so one
``futex_waitv`` covers "a new version", "the catalog changed" and "the broker
is alive". Heartbeats stopping is the broker being down; the segments stay
readable through their own words.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import stat
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ._futex import WAITV_MAX, Futex, wait_many
from ._names import SHM_DIR, catalog_path, resolve_namespace
from ._segment import Segment, select_core, wait_any
from .errors import (
    RAISE_NOFILE,
    AccessError,
    ClosedError,
    NotASegmentError,
    OutOfDescriptorsError,
)

__all__ = ["CATALOG_OBJECT_SIZE", "NamespaceWord", "notify_words", "wait_segments", "wait_words"]

MAGIC = int.from_bytes(b"SHMCNSW\0", "little")
LAYOUT = 1
CATALOG_OBJECT_SIZE = 4096
W_MAGIC = 0
W_LAYOUT = 1
W_INCARNATION = 2
W_EPOCH = 3
W_PID = 4
W_INTERVAL = 5
W_HEARTBEAT = 6
W_GENERATION = 7
NOTIFY_OFF = 64
_NOTIFY32 = NOTIFY_OFF // 4
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


def _out_of_descriptors(err: int, ns: str, path: str) -> OutOfDescriptorsError:
    """EMFILE/ENFILE met attaching namespace ``ns``'s word: an ``OSError`` still (the
    callers that tell it from an untrusted word by kind still do), named with the
    limit and the fix. Before, the bare "[Errno 24] Too many open files"."""
    return OutOfDescriptorsError.from_os(
        err,
        f"the namespace word of {ns!r}",
        path,
        fix=(
            f"raise the open-files limit ({RAISE_NOFILE}; `shmcast doctor` checks it), "
            "or attach fewer "
            "segments in this process (each holds one)"
        ),
    )


class NamespaceWord:
    """A handle on a namespace's word: the broker's (writable) or a reader's.

    Make the broker's with :meth:`serve`, a reader's with :meth:`attach`.
    """

    def __init__(self, namespace: str, path: str, fd: int, mm: mmap.mmap, writable: bool) -> None:
        self.namespace = namespace
        self.path = path
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._writable = writable
        self._q: memoryview | None = memoryview(mm).cast("Q")
        self._q32 = memoryview(mm).cast("I")
        self._word = np.frombuffer(mm, dtype=np.uint32, count=1, offset=NOTIFY_OFF)
        self._futex = Futex(int(self._word.ctypes.data))
        # The core's full fence orders the plain stores and loads of the words
        # around the notify word (and the magic) on CPUs weaker than x86-64's TSO.
        self._fence = select_core().fence
        self.ino = os.fstat(fd).st_ino

    # ------------------------------------------------------------------ opening

    @classmethod
    def serve(
        cls,
        namespace: str | None,
        *,
        epoch: int,
        interval: float,
        mode: int = 0o600,
        gid: int | None = None,
    ) -> NamespaceWord:
        """The broker's handle: take over a valid object a killed broker left (its
        readers stay on it), else make a new one. The caller holds the namespace lock.

        Raises:
            OutOfDescriptorsError: the word could not be opened, made or mapped for
                want of a descriptor (naming the limit and the fix; before, a broker
                started at an open-files limit of 15 or 16 raised the bare
                "[Errno 24] Too many open files").
        """
        ns = resolve_namespace(namespace)
        path = catalog_path(ns)
        try:
            word = cls._take_over(ns, path) or cls._create(ns, path, mode, gid)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            raise _out_of_descriptors(exc.errno, ns, path) from exc
        q = word._header()
        q[W_EPOCH] = epoch
        q[W_PID] = os.getpid()
        q[W_INTERVAL] = int(interval * 1e9)
        q[W_HEARTBEAT] = time.monotonic_ns()
        word._bump()
        return word

    @classmethod
    def _take_over(cls, ns: str, path: str) -> NamespaceWord | None:
        """The broker's handle on the valid word a killed broker left; None when there
        is none (an untrusted one is unlinked)."""
        try:
            fd = os.open(path, os.O_RDWR | _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            os.unlink(path)  # a symlink planted under our name: never followed
            return None
        try:
            return cls._open(ns, path, fd, writable=True)
        except (NotASegmentError, AccessError):
            os.close(fd)
            os.unlink(path)
            return None
        except BaseException:
            os.close(fd)  # mmap's dup() out of descriptors: not left open
            raise

    @classmethod
    def _create(cls, ns: str, path: str, mode: int, gid: int | None) -> NamespaceWord:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode)
        try:
            os.fchmod(fd, mode)
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.posix_fallocate(fd, 0, CATALOG_OBJECT_SIZE)
            mm = mmap.mmap(fd, CATALOG_OBJECT_SIZE, mmap.MAP_SHARED)
            q = memoryview(mm).cast("Q")
            q[W_LAYOUT] = LAYOUT
            q[W_INCARNATION] = secrets.randbits(63) | 1
            select_core().fence()  # a reader that sees the magic sees the words above
            q[W_MAGIC] = MAGIC  # last: until now the object is "being created"
            q.release()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            raise
        return cls(ns, path, fd, mm, writable=True)

    @classmethod
    def attach(cls, namespace: str | None) -> NamespaceWord | None:
        """A reader's handle (read-only mapping), or None when the namespace has no
        word (no broker ever served it here, or this process does not share the
        broker's ``/dev/shm``).

        Raises:
            NotASegmentError: the object is not a namespace word (a symlink, a
                foreign file, a corrupt header) or others may write it.
        """
        ns = resolve_namespace(namespace)
        path = catalog_path(ns)
        try:
            # O_NONBLOCK: a FIFO anyone put under the name is refused (not a regular
            # file) rather than waited on for a writer.
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotASegmentError("@catalog", path, "a symbolic link") from None
            if exc.errno == errno.EACCES:
                raise AccessError(path, "read", "permission denied") from None
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors(exc.errno, ns, path) from exc
            raise
        try:
            return cls._open(ns, path, fd, writable=False)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors(exc.errno, ns, path) from exc  # mmap's dup()
            raise

    @classmethod
    def _open(cls, ns: str, path: str, fd: int, *, writable: bool) -> NamespaceWord:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotASegmentError("@catalog", path, "not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise AccessError(
                path, "trust", f"mode {stat.S_IMODE(st.st_mode):04o} lets others write it"
            )
        if writable and st.st_uid != os.geteuid():
            raise AccessError(path, "take over", f"owned by uid {st.st_uid}")
        if st.st_size != CATALOG_OBJECT_SIZE:
            raise NotASegmentError("@catalog", path, f"{st.st_size} bytes, not a namespace word")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, CATALOG_OBJECT_SIZE, mmap.MAP_SHARED, prot)
        head = memoryview(mm).cast("Q")
        try:
            ok = head[W_MAGIC] == MAGIC
            select_core().fence()  # the creator stored the magic last, after a fence
            ok = ok and head[W_LAYOUT] == LAYOUT
        finally:
            head.release()
        if not ok:
            mm.close()
            raise NotASegmentError("@catalog", path, "not a namespace word (magic or layout)")
        return cls(ns, path, fd, mm, writable)

    # ------------------------------------------------------------------ reading

    def _header(self) -> memoryview:
        q = self._q
        if q is None:
            raise ClosedError(f"namespace word of {self.namespace!r}")
        return q

    @property
    def notify(self) -> int:
        """The notify word: it moves at every catalog change and heartbeat.

        Raises:
            ClosedError: the word was closed (perhaps by another thread).
        """
        try:
            return int(self._q32[_NOTIFY32])
        except ValueError:  # the view was released by close()
            raise ClosedError(f"namespace word of {self.namespace!r}") from None

    def state(self) -> tuple[int, int, int]:
        """``(generation, epoch, pid)``, loaded after a fence: read after
        :attr:`notify`, they are at least as new as the change that moved it."""
        self._fence()
        q = self._header()
        return int(q[W_GENERATION]), int(q[W_EPOCH]), int(q[W_PID])

    @property
    def generation(self) -> int:
        """Catalog generation: +1 at every create or delete."""
        return int(self._header()[W_GENERATION])

    @property
    def incarnation(self) -> int:
        return int(self._header()[W_INCARNATION])

    @property
    def epoch(self) -> int:
        """The serving broker's epoch (0 when none served yet)."""
        return int(self._header()[W_EPOCH])

    @property
    def pid(self) -> int:
        """The serving broker's pid (0 once it stopped cleanly)."""
        return int(self._header()[W_PID])

    @property
    def interval(self) -> float:
        """The broker's heartbeat interval, seconds."""
        return int(self._header()[W_INTERVAL]) / 1e9

    @property
    def heartbeat_ns(self) -> int:
        """The broker's last heartbeat, CLOCK_MONOTONIC ns (0: stopped cleanly)."""
        return int(self._header()[W_HEARTBEAT])

    def heartbeat_age(self, now_ns: int | None = None) -> float | None:
        """Seconds since the broker's last heartbeat (monotonic clock); None when the
        broker stopped cleanly."""
        hb = int(self._header()[W_HEARTBEAT])
        if not hb:
            return None
        now = time.monotonic_ns() if now_ns is None else now_ns
        return max(0.0, (now - hb) / 1e9)

    def broker_up(self, timeout: float | None = None) -> bool:
        """Whether heartbeats arrive: the last is younger than ``timeout`` seconds
        (default: three intervals and a fifth of a second)."""
        age = self.heartbeat_age()
        if age is None:
            return False
        limit = 3 * self.interval + 0.2 if timeout is None else timeout
        return age < limit

    def replaced(self) -> bool:
        """True when the path now names another object (or none): a broker made a new word."""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino != self.ino
        except FileNotFoundError:
            return True

    def wait(self, seen: int, timeout: float | None) -> None:
        """Sleep while the notify word is ``seen``, at most ``timeout`` seconds."""
        with self.pinned():
            self._futex.wait(seen, timeout)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep the mapping for the length of the block, even through a :meth:`close`
        from another thread: a sleep on the notify word's address (without the GIL)
        must not outlive the mapping. The mapping then goes with the block's end.

        Raises:
            ClosedError: the word was closed before.
        """
        mm = self._mm
        try:
            pin = memoryview(mm) if mm is not None else None
        except ValueError:  # closed between the two lines
            pin = None
        if pin is None:
            raise ClosedError(f"namespace word of {self.namespace!r}")
        try:
            yield
        finally:
            pin.release()

    @property
    def futex_addr(self) -> int:
        return self._futex.addr

    # ------------------------------------------------------------------ writing

    def _bump(self) -> None:
        q32 = self._q32
        self._fence()  # the other words are in before the notify word moves
        q32[_NOTIFY32] = (q32[_NOTIFY32] + 1) & 0xFFFFFFFF
        self._futex.wake()

    def catalog_changed(self) -> None:
        """A segment was created or deleted (the broker, after the change)."""
        q = self._header()
        q[W_GENERATION] = q[W_GENERATION] + 1
        self._bump()

    def heartbeat(self) -> None:
        q = self._header()
        q[W_HEARTBEAT] = time.monotonic_ns()
        self._bump()

    def stopped(self) -> None:
        """The broker stops cleanly: readers learn it at once instead of after a timeout."""
        q = self._header()
        q[W_PID] = 0
        q[W_HEARTBEAT] = 0
        self._bump()

    def unlink_if_alone(self) -> bool:
        """Unlink the word when its namespace has no segment left in ``/dev/shm``
        (a clean stop that kept none); True if unlinked. Works on a closed word
        too (its path and inode are kept): closed first, the look at ``/dev/shm``
        has its descriptor at the open-files limit."""
        prefix = os.path.basename(self.path).rsplit(".", 1)[0] + "."
        try:
            others = [e for e in os.listdir(SHM_DIR) if e.startswith(prefix) and "@" not in e]
        except FileNotFoundError:
            others = []
        if others:
            return False
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path, follow_symlinks=False).st_ino == self.ino:
                os.unlink(self.path)
                return True
        return False

    # ------------------------------------------------------------------ closing

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmap. Idempotent."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        self._word = np.empty(0, np.uint32)
        self._q32.release()
        if self._q is not None:
            self._q.release()
            self._q = None
        # A sleeper holds the mapping (pinned()): it is unmapped when that ends.
        with contextlib.suppress(BufferError):
            mm.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> NamespaceWord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<NamespaceWord {self.namespace!r} closed>"
        return f"<NamespaceWord {self.namespace!r} generation={self.generation}>"


def wait_segments(
    segments: Sequence[Segment],
    afters: Sequence[int],
    timeout: float | None,
    *,
    word: NamespaceWord | None = None,
    seen: int = 0,
) -> bool:
    """Block until one of ``segments`` has a version newer than its ``afters`` entry,
    or the namespace ``word`` no longer holds ``seen``, or ``timeout`` passes.

    The subscriber's one wait: the segments' notify words and the namespace word
    together in one ``futex_waitv``, in the engine's core (without the GIL), the
    sleeper announced in each segment's waiters word so that its writers wake it
    (a commit nobody is announced for makes no wake syscall). Returns False on
    timeout (a spurious wake-up may return True with nothing new: look again).
    """
    if word is None:
        if not segments:
            if timeout:
                time.sleep(timeout)
            return False
        return wait_any(list(segments), list(afters), timeout)
    with word.pinned():
        if word.notify != seen:
            return True
        if not segments:
            word.wait(seen, timeout)
            return word.notify != seen
        return wait_any(list(segments), list(afters), timeout, word=(word.futex_addr, seen))


def notify_words(
    segments: Sequence[Segment], word: NamespaceWord | None = None
) -> tuple[list[int], list[int]]:
    """The futex addresses and current values of the segments' notify words and the
    namespace word's: what :func:`wait_words` sleeps on. (A watcher that must not
    touch version numbers, e.g. a helper thread waking an event loop, waits for
    these words to move instead.)"""
    addrs: list[int] = []
    vals: list[int] = []
    if word is not None:  # first: above WAITV_MAX words the last ones are polled
        vals.append(word.notify)
        addrs.append(word.futex_addr)
    for seg in segments:
        addr, value = seg._notify_word()
        vals.append(value)
        addrs.append(addr)
    return addrs, vals


def wait_words(addrs: Sequence[int], vals: Sequence[int], timeout: float | None) -> None:
    """Sleep until one of the words at ``addrs`` no longer holds its ``vals`` entry,
    or ``timeout`` passes (a spurious return is possible: look again). Above
    :data:`WAITV_MAX` words the sleep is cut to a millisecond."""
    if not addrs:
        if timeout:
            time.sleep(min(timeout, 0.1))
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    if len(addrs) > WAITV_MAX:
        short = time.monotonic() + 0.001
        deadline = short if deadline is None else min(deadline, short)
        addrs, vals = addrs[:WAITV_MAX], vals[:WAITV_MAX]
    wait_many(addrs, vals, deadline)
