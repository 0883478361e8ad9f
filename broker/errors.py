"""The one exception tree of shmcast.

Every error raised by ``broker``, ``publisher`` and ``subscriber`` derives from
:class:`ShmcastError`. Errors take structured arguments and build their own
message, which names the segment, endpoint or size involved and the fix::

    ShmcastError
    ├── InvalidNameError            a segment or namespace name we refuse
    ├── LayoutError                 dtype / shape / slots we cannot store
    │   └── ArrayMismatchError      an array that does not fit the segment
    ├── SegmentError                something about one segment
    │   ├── SegmentNotFoundError
    │   │   └── SegmentUnreachableError  the broker has it; this process's /dev/shm not
    │   ├── SegmentExistsError
    │   ├── NotASegmentError        not a shmcast segment, or a corrupt header
    │   ├── LayoutVersionError      written by another layout version
    │   ├── LayoutConflictError     exists with another dtype / shape / slots
    │   ├── NoVersionError          nothing published yet
    │   ├── VersionUnavailableError the version has left the ring
    │   ├── TornReadError           the writer overwrote the slot under a read
    │   ├── SlotStuckError          the header names a slot that never comes whole
    │   ├── WriterBusyError         a second writer was refused
    │   └── ReadOnlyError           writing through a read-only handle
    ├── ShmSpaceError               /dev/shm is too small for the segment
    ├── AccessError                 the OS refused us a segment or directory
    │   └── OwnershipError          a file or directory we refuse to trust (owner, mode, kind)
    ├── ClosedError                 you closed it (vs. it broke under you)
    ├── EndpointError               an address we cannot bind or connect to
    ├── RecordingError              a recording file (``shmcast record`` / ``replay``)
    │   ├── NotARecordingError      not a shmcast recording, or a damaged one
    │   ├── RecordingExistsError    the output file exists (pass overwrite)
    │   └── RecordingSpaceError     the disk of the recording is full
    ├── MissingExtraError           an optional dependency is not installed
    ├── BrokerError                 the control plane
    │   ├── BrokerUnavailableError  no broker answered at the endpoint
    │   │   └── BrokerHandshakeError  the endpoint refused the connection's handshake (CURVE keys)
    │   ├── BrokerRunningError      a broker already serves the namespace
    │   ├── NamespaceMismatchError  the broker at the endpoint serves another namespace
    │   ├── ForbiddenError          the broker refused an operation to this client's role
    │   └── RemoteError             the broker answered with an error
    └── ConfigError                 a bad configuration value (names the field)

    OSError
    └── OutOfDescriptorsError       out of file descriptors or ZeroMQ sockets (no ShmcastError)

Where an OS or ZeroMQ error enters our code it is wrapped (``raise ... from
exc``), and classes that stand for an OS condition also derive from the builtin
one (``ShmSpaceError`` is an ``OSError``, ``AccessError`` a ``PermissionError``,
``SegmentNotFoundError`` a ``FileNotFoundError``, ``MissingExtraError`` an
``ImportError``), so either can be caught.

:class:`OutOfDescriptorsError` alone is no :class:`ShmcastError`: it is the OS's
``EMFILE``/``ENFILE`` (``errno`` kept), named with the limit, the count open and the
fix. The broker and ``shmcast doctor`` take a ``ShmcastError`` from attaching a
segment as a damaged segment, to reclaim; running out of descriptors says nothing
about the segment, and they keep telling the two apart by kind.
"""

from __future__ import annotations

import errno as _errno
import os
import pwd
import resource
from collections.abc import Sequence

__all__ = [
    "AccessError",
    "ArrayMismatchError",
    "BrokerError",
    "BrokerHandshakeError",
    "BrokerRunningError",
    "BrokerUnavailableError",
    "ClosedError",
    "ConfigError",
    "EndpointError",
    "ForbiddenError",
    "InvalidNameError",
    "LayoutConflictError",
    "LayoutError",
    "LayoutVersionError",
    "MissingExtraError",
    "NamespaceMismatchError",
    "NoVersionError",
    "NotARecordingError",
    "NotASegmentError",
    "OutOfDescriptorsError",
    "OwnershipError",
    "ReadOnlyError",
    "RecordingError",
    "RecordingExistsError",
    "RecordingSpaceError",
    "RemoteError",
    "SegmentError",
    "SegmentExistsError",
    "SegmentNotFoundError",
    "SegmentUnreachableError",
    "ShmSpaceError",
    "ShmcastError",
    "SlotStuckError",
    "TornReadError",
    "VersionUnavailableError",
    "WriterBusyError",
]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


#: How to raise the open-files limit: every out-of-descriptors message names it.
RAISE_NOFILE = "ulimit -n 4096; systemd LimitNOFILE=; docker --ulimit nofile=4096"


class ShmcastError(Exception):
    """Base of every shmcast error."""


def _open_descriptors(limit: int) -> int | None:
    """How many file descriptors this process holds, or None when it cannot tell
    (``/proc`` unmounted, and no more than ``limit`` to look through)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing them
    except OSError:  # EMFILE: the listing needs a descriptor of its own
        pass
    if limit > 1 << 16:
        return None
    count = 0
    for fd in range(limit):
        try:
            os.fstat(fd)
        except OSError:
            continue
        count += 1
    return count


class OutOfDescriptorsError(OSError):
    """This process ran out of file descriptors (``EMFILE``; ``ENFILE``: the system
    did), or of the ZeroMQ sockets its context allows (``sockets`` set): the OS's
    ``OSError`` with its ``errno``, ``strerror`` and ``filename`` kept, and a message
    naming what ran out, how many are open, the limit and the fix.

    Deliberately no :class:`ShmcastError` (see the module's docstring): code that
    tells an ``OSError`` of ``EMFILE`` from a damaged segment still does.

    Attributes:
        what: what was being opened ("segment 'x'", "a ZeroMQ socket").
        open_fds: the descriptors open when it was raised (None: unknown).
        soft, hard: the open-files limit (``RLIMIT_NOFILE``).
        sockets, max_sockets: the ZeroMQ sockets shmcast opened in the context, and
            its cap (``zmq.MAX_SOCKETS``), when the cap is what ran out; else None.
    """

    what: str = ""
    open_fds: int | None = None
    soft: int = -1
    hard: int = -1
    sockets: int | None = None
    max_sockets: int | None = None
    #: The fix, where it differs from raising the open-files limit.
    fix: str = ""

    @classmethod
    def from_os(
        cls,
        err: int,
        what: str,
        filename: str | None = None,
        *,
        sockets: int | None = None,
        max_sockets: int | None = None,
        fix: str = "",
    ) -> OutOfDescriptorsError:
        """The error for ``err`` (``EMFILE``, ``ENFILE``) met opening ``what``;
        ``sockets``/``max_sockets`` when a ZeroMQ context's cap is what ran out."""
        text = os.strerror(err)
        exc = cls(err, text) if filename is None else cls(err, text, filename)
        exc.what = what
        exc.soft, exc.hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        exc.open_fds = _open_descriptors(exc.soft)
        exc.sockets = sockets
        exc.max_sockets = max_sockets
        exc.fix = fix
        return exc

    def __str__(self) -> str:
        if not self.what:  # made as a plain OSError is, not by from_os: nothing to add
            return super().__str__()

        def n(v: int) -> str:
            return "unlimited" if v == resource.RLIM_INFINITY else str(v)

        held = "" if self.open_fds is None else f"{self.open_fds} descriptors open; "
        limit = (
            f"this process's open-files limit is {n(self.soft)} (RLIMIT_NOFILE, hard "
            f"limit {n(self.hard)})"
        )
        raise_it = f"raise it ({RAISE_NOFILE}; `shmcast doctor` checks it)"
        if self.max_sockets is not None:
            return (
                f"out of ZeroMQ sockets opening {self.what}: its context holds the most "
                f"it allows, ZMQ_MAX_SOCKETS {self.max_sockets} ({self.sockets} of them "
                f"opened by shmcast, ZeroMQ's socket monitors aside; {held}{limit}); "
                f"{self.fix or raise_it}"
            )
        if self.errno == _errno.ENFILE:  # the whole system's table, not this process's
            return (
                f"out of file descriptors opening {self.what}: {self.strerror}; the "
                f"system's open-file table is full: raise it (sysctl fs.file-max) or stop "
                f"what holds so many"
            )
        where = f" ({self.filename})" if self.filename else ""
        return (
            f"out of file descriptors opening {self.what}{where}: {self.strerror}; "
            f"{held}{limit}; {self.fix or raise_it}"
        )


class InvalidNameError(ShmcastError, ValueError):
    def __init__(self, kind: str, name: object, rule: str) -> None:
        self.kind = kind
        self.name = name
        self.rule = rule
        super().__init__(f"invalid {kind} name {name!r}: {rule}")


class LayoutError(ShmcastError, ValueError):
    """A dtype, shape or slot count that a segment cannot hold."""


class ArrayMismatchError(LayoutError):
    """An array, or a raw buffer (with its own ``fix``), that does not fit the segment."""

    def __init__(
        self, segment: str, what: str, expected: object, got: object, *, fix: str | None = None
    ) -> None:
        self.segment = segment
        self.what = what
        self.expected = expected
        self.got = got
        if fix is not None:  # a raw buffer (write_bytes, read_into)
            super().__init__(f"segment {segment!r}: {what} must be {expected}, got {got}; {fix}")
            return
        super().__init__(
            f"segment {segment!r} holds {what} {expected}, got {got}; nothing was published "
            f"(convert with arr.astype(...) / arr.reshape(...), "
            f"or create a segment with that {what})"
        )


class SegmentError(ShmcastError):
    def __init__(self, segment: str, message: str) -> None:
        self.segment = segment
        super().__init__(message)


class SegmentNotFoundError(SegmentError, FileNotFoundError):
    def __init__(
        self, segment: str, namespace: str, *, existing: Sequence[str] | None = None
    ) -> None:
        self.namespace = namespace
        self.existing = None if existing is None else list(existing)
        there = ""
        if existing is not None:
            there = f"; it has {', '.join(map(repr, existing))}" if existing else "; it has none"
        super().__init__(
            segment,
            f"no segment {segment!r} in namespace {namespace!r}{there} "
            f"(list them with `shmcast ls --namespace {namespace}`; create it with a "
            f"Publisher, or with Segment.create: a running broker adopts such a segment "
            f"at the first request that names it)",
        )


class SegmentUnreachableError(SegmentNotFoundError):
    """The broker serves the segment, but this process cannot see it: its ``/dev/shm``
    is not the broker's (a container that did not join the broker's IPC namespace)."""

    def __init__(self, segment: str, namespace: str, path: str, endpoint: str) -> None:
        self.path = path
        self.endpoint = endpoint
        super().__init__(segment, namespace)
        what = "namespace" if segment.startswith("@") else f"segment {segment!r} of namespace"
        self.args = (
            f"the broker at {endpoint} serves {what} {namespace!r}, but {path} does not "
            f"exist here: this process does not share the broker's /dev/shm (Docker: "
            f'--ipc container:<broker>, compose ipc: "service:broker"; Kubernetes: the '
            f"same pod, /dev/shm an emptyDir of medium Memory)",
        )


def _rm_hint(segment: str, namespace: str | None) -> str:
    ns = f" -n {namespace}" if namespace else ""
    return f"`shmcast rm {segment}{ns}`"


class SegmentExistsError(SegmentError, FileExistsError):
    def __init__(self, segment: str, namespace: str) -> None:
        self.namespace = namespace
        ns = namespace if namespace != "?" else None
        path = f"/dev/shm/shmcast.{namespace}.{segment}"  # as _names.shm_path (which imports us)
        super().__init__(
            segment,
            f"segment {segment!r} already exists in namespace {namespace!r} ({path}): "
            f"open it (a Publisher, or Segment.attach(..., writable=True)), or delete it "
            f"first: {_rm_hint(segment, ns)}. If it is no valid segment (a crashed "
            f"Segment.create, a stray file: the broker neither serves nor creates it), "
            f"delete {path} once no process writes it, or run "
            f"`shmcast doctor{' -n ' + ns if ns else ''} --fix`",
        )


class NotASegmentError(SegmentError):
    def __init__(self, segment: str, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            segment,
            f"{path} is not a usable shmcast segment: {reason} "
            f"(`shmcast doctor --fix` removes it once no writer holds it; or delete {path})",
        )


class LayoutVersionError(SegmentError):
    def __init__(self, segment: str, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            segment,
            f"segment {segment!r} has layout version {found}, this shmcast reads version "
            f"{supported}; run the same shmcast version on both sides",
        )


class LayoutConflictError(SegmentError):
    def __init__(
        self, segment: str, existing: str, requested: str, namespace: str | None = None
    ) -> None:
        self.existing = existing
        self.requested = requested
        self.namespace = namespace
        super().__init__(
            segment,
            f"segment {segment!r} exists as {existing}, requested {requested}; "
            f"use another name, or delete {segment!r} first: {_rm_hint(segment, namespace)} "
            f"(refused while a writer holds it)",
        )


class NoVersionError(SegmentError):
    def __init__(self, segment: str) -> None:
        super().__init__(segment, f"segment {segment!r} has no version yet; wait for a publish")


class VersionUnavailableError(SegmentError):
    def __init__(
        self, segment: str, version: int, latest: int, slots: int, why: str | None = None
    ) -> None:
        self.version = version
        self.latest = latest
        if why is None and version > latest:
            why = (
                f"version {version} of segment {segment!r} is not committed yet (latest is "
                f"{latest}); wait for it (Segment.wait), or read the latest"
            )
        super().__init__(
            segment,
            why
            or f"version {version} of segment {segment!r} is not in the ring (latest is {latest}, "
            f"the ring keeps the last {slots - 1} committed versions safely); read the latest, "
            f"or create the segment with more slots",
        )


class TornReadError(SegmentError):
    def __init__(self, segment: str, version: int) -> None:
        self.version = version
        super().__init__(
            segment,
            f"version {version} of segment {segment!r} was overwritten by the writer during the "
            f"read; discard what was computed and read again (copy out faster, or add slots)",
        )


class SlotStuckError(SegmentError):
    def __init__(self, segment: str, version: int, looks: int, writer_alive: bool) -> None:
        self.version = version
        self.writer_alive = writer_alive
        if writer_alive:
            why = (
                "its writer is alive, so something writes this segment outside shmcast's "
                "protocol; stop it, then delete the segment and create it again"
            )
        else:
            why = (
                "no writer holds the lease: a writer died in the middle of that slot; "
                "the next publish repairs it (or delete the segment and create it again)"
            )
        super().__init__(
            segment,
            f"segment {segment!r} names version {version} as its latest, but its slot "
            f"did not come whole in {looks} looks; {why}",
        )


class WriterBusyError(SegmentError):
    def __init__(self, segment: str, pid: int | None) -> None:
        self.pid = pid
        who = f"process {pid}" if pid else "another handle"
        super().__init__(
            segment,
            f"segment {segment!r} already has a writer ({who}); one writer per segment: "
            f"stop that writer first (its lease is freed when it exits or dies)",
        )


class ReadOnlyError(SegmentError):
    """Writing through a handle that may not write: attached read-only, or (with
    ``opener``) a writer's handle that process ``pid`` inherited across ``fork``."""

    def __init__(
        self,
        segment: str,
        *,
        opener: int | None = None,
        pid: int | None = None,
        kept_lease: bool = False,
    ) -> None:
        self.opener = opener
        if opener is None:
            message = (
                f"segment {segment!r} is attached read-only; attach with writable=True "
                f"(or use a Publisher) to write"
            )
        else:
            # The lease is a flock on the open file description the opener's handle
            # opened; a child lets go of it at fork (kept_lease: it could not).
            then = (
                f". Close this copy (it holds that lease too, even after process {opener} "
                f"ends), then open"
                if kept_lease
                else "; open"
            )
            message = (
                f"segment {segment!r}: this writer handle was opened by process {opener} "
                f"and inherited across fork by process {pid}, which may not write through "
                f"it (the writer lease stays with process {opener}); nothing was written"
                f"{then} a new Publisher (or Segment.attach(..., writable=True)) in the "
                f"child once process {opener} has closed its own or ended; or start the "
                f"child with the 'spawn' method"
            )
        super().__init__(segment, message)


class ShmSpaceError(ShmcastError, OSError):
    def __init__(self, segment: str, needed: int, free: int, shm_dir: str = "/dev/shm") -> None:
        self.segment = segment
        self.needed = needed
        self.free = free
        super().__init__(
            f"segment {segment!r} needs {_mib(needed)} ({needed} bytes) of shared memory but "
            f"{shm_dir} has {_mib(free)} free; give the container more (docker run --shm-size, "
            f"compose shm_size) or delete unused segments"
        )


class AccessError(ShmcastError, PermissionError):
    def __init__(self, path: str, action: str, reason: str) -> None:
        self.path = path
        self.action = action
        super().__init__(
            f"cannot {action} {path}: {reason} (run as the namespace's owner, or ask it to "
            f"share the namespace with a group: `group` and `mode` in the broker config)"
        )


def _user(uid: int) -> str:
    """``"user 'name' (uid N)"``, or ``"uid N"`` for a uid with no name here."""
    try:
        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:  # no such user in this container's /etc/passwd
        return f"uid {uid}"


class OwnershipError(AccessError):
    """A file or directory that shmcast refuses to use: not what it made, or not only ours.

    Args:
        path: what was refused.
        reason: why, in a few words ("owned by another user", "a symbolic link", ...).
        uid: its owner.
        mode: its permission bits.
        kind: "directory", "regular file", "symbolic link", ...
        expected: what shmcast accepts there.
    """

    def __init__(
        self, path: str, reason: str, *, uid: int, mode: int, kind: str, expected: str
    ) -> None:
        self.path = path
        self.action = "use"
        self.reason = reason
        self.uid = uid
        self.mode = mode
        self.kind = kind
        self.expected = expected
        ShmcastError.__init__(
            self,
            f"refusing {path}: {reason} ({kind}, owner {_user(uid)}, mode {mode:04o}; "
            f"shmcast accepts {expected}); run `shmcast doctor --fix` to repair it "
            f"(as root for another user's file), or set XDG_RUNTIME_DIR / --namespace "
            f"to somewhere of your own",
        )


class ClosedError(ShmcastError):
    """Used after :meth:`close` (by this process), as opposed to broken under us."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is closed")


class EndpointError(ShmcastError):
    def __init__(
        self,
        role: str,
        endpoint: str,
        reason: str,
        *,
        connect: bool = False,
        fix: str | None = None,
    ) -> None:
        self.role = role
        self.endpoint = endpoint
        self.reason = reason
        if fix is not None:
            verb = "connect to" if connect else "bind"
        elif connect:
            fix = "check the address (tcp://HOST:PORT or ipc://PATH)"
            verb = "connect to"
        else:
            fix = "pick another address or port, or stop the process that holds it"
            if role == "metrics":
                fix = "pick another --metrics-port (0 picks a free one) or stop what holds it"
            verb = "bind"
        super().__init__(f"cannot {verb} the {role} endpoint {endpoint}: {reason}; {fix}")


class RecordingError(ShmcastError):
    """A recording file: what ``shmcast record`` writes and ``shmcast replay`` reads."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


class NotARecordingError(RecordingError):
    def __init__(self, path: str, reason: str) -> None:
        self.reason = reason
        super().__init__(
            path,
            f"{path} is not a shmcast recording: {reason} (record one with `shmcast record "
            f"SEGMENT --output FILE`; HDF5 and Parquet files written by shmcast are accepted)",
        )


class RecordingExistsError(RecordingError, FileExistsError):
    def __init__(self, path: str) -> None:
        super().__init__(
            path,
            f"{path} exists; nothing was written to it (pick another --output, or pass "
            f"--overwrite / overwrite=True to replace it)",
        )


class RecordingSpaceError(RecordingError, OSError):
    def __init__(self, path: str, needed: int, free: int) -> None:
        self.needed = needed
        self.free = free
        super().__init__(
            path,
            f"the disk of {path} is full: {_mib(needed)} more needed, {_mib(free)} free; "
            f"recording stopped and the file keeps every version written before (free "
            f"some space, or record to another disk)",
        )


class MissingExtraError(ShmcastError, ImportError):
    def __init__(self, extra: str, module: str, what: str) -> None:
        self.extra = extra
        self.module = module
        super().__init__(
            f"{what} needs the Python package {module!r}, which is not installed; install "
            f"the extra: pip install 'shmcast[{extra}]'"
        )


class BrokerError(ShmcastError):
    """The control plane."""


class BrokerUnavailableError(BrokerError):
    """No reply from the broker at ``endpoint``. ``pid`` is set when a live process
    holds the namespace's broker lock beside that (ipc) endpoint: a broker runs but
    did not answer (``stopped``: it is stopped, SIGSTOP or a debugger), and starting
    another, the fix for no broker at all, would be refused. ``reached`` (no
    ``pid`` known: a TCP endpoint, say) says that a peer took the connection:
    ``"connected"``, or ``"handshake"`` once ZeroMQ's handshake was done. ``uid``
    (with ``pid``) is the uid that process runs as, when known: one other than
    this process's effective uid is named, and resuming or stopping it takes that
    user or root."""

    def __init__(
        self,
        endpoint: str,
        waited: float,
        *,
        pid: int | None = None,
        stopped: bool = False,
        reached: str | None = None,
        uid: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.pid = pid
        self.stopped = stopped
        self.reached = reached if pid is None else None
        self.uid = uid if pid is not None else None
        theirs = _not_yours(self.uid)
        if pid is None and reached is not None:
            done = "and ZeroMQ's handshake " if reached == "handshake" else ""
            message = (
                f"a peer at {endpoint} took the connection {done}but did not answer "
                f"within {waited:g}s: a broker there is stopped (SIGSTOP, Ctrl-Z, a "
                f"debugger), busy or hung, or the endpoint is not a broker's control "
                f"endpoint; look at the process listening there, rather than start "
                f"another broker"
            )
        elif pid is None:
            message = (
                f"no broker answered at {endpoint} within {waited:g}s; start one with "
                f"`shmcast broker` (same --namespace), or name the one that runs: "
                f"--broker ENDPOINT or $SHMCAST_BROKER (the library: broker=ENDPOINT)"
            )
        elif stopped and theirs:
            message = (
                f"the broker at {endpoint} (pid {pid}) did not answer within {waited:g}s: "
                f"it is stopped (SIGSTOP, Ctrl-Z, a debugger); it runs as {theirs}, not as "
                f"you: resuming it takes that user or root (`kill -CONT {pid}` as that "
                f"user, or `sudo kill -CONT {pid}`)"
            )
        elif stopped:
            message = (
                f"the broker at {endpoint} (pid {pid}) did not answer within {waited:g}s: "
                f"it is stopped (SIGSTOP, Ctrl-Z, a debugger); resume it: `kill -CONT {pid}`"
            )
        else:
            message = (
                f"the broker at {endpoint} (pid {pid}, which holds the namespace) did not "
                f"answer within {waited:g}s: it is busy or hung, or does not let this client "
                f"in (with CURVE keys it answers only the clients it lists); look at it "
                f"(`top -p {pid}`), wait longer, or stop it (`kill {pid}`) and start another"
            )
            if theirs:
                message += f" (it runs as {theirs}, not as you: `kill` takes that user or root)"
        super().__init__(message)


def _not_yours(uid: int | None) -> str:
    """``"user 'name' (uid N)"`` for a uid other than this process's effective
    one; ``""`` for ours or None (unknown)."""
    return "" if uid is None or uid == os.geteuid() else _user(uid)


class BrokerHandshakeError(BrokerUnavailableError):
    """No reply, and the endpoint's ZeroMQ handshake failed: a peer listens there but
    refused the connection's security (CURVE keys missing, wrong or not allowed), or
    it is no broker's control endpoint (it closed the connection during the
    handshake, speaks no ZeroMQ, or is a broker's events socket). ``why`` says which
    and names the fix."""

    def __init__(self, endpoint: str, waited: float, why: str) -> None:
        self.endpoint = endpoint
        self.pid = None  # a peer that refused us: not known to be our broker
        self.stopped = False
        self.reached = None
        self.uid = None
        self.why = why
        BrokerError.__init__(self, f"no reply from {endpoint} within {waited:g}s: {why}")


class BrokerRunningError(BrokerError):
    """``word`` is set when the broker was found by the namespace word in /dev/shm
    (its heartbeats), not by the lock in our runtime directory; ``elsewhere`` when
    its pid is this process's own: it is another pid namespace's (a container's)."""

    def __init__(
        self, namespace: str, pid: int | None, *, word: str | None = None, elsewhere: bool = False
    ) -> None:
        self.namespace = namespace
        self.pid = pid
        if word is not None and elsewhere:
            message = (
                f"a broker already serves namespace {namespace!r}: its namespace word "
                f"{word} beats, under pid {pid} of another pid namespace (this process "
                f"has that pid here: another container sharing this /dev/shm, its "
                f"runtime directory apart); stop that broker, in its container, and "
                f"start this one, or use another --namespace"
            )
        elif word is None:
            message = (
                f"a broker (pid {pid}) already serves namespace {namespace!r}; "
                f"stop it or use another --namespace"
            )
        else:
            message = (
                f"a broker (pid {pid}) already serves namespace {namespace!r}: its "
                f"namespace word {word} beats, though this runtime directory holds no "
                f"lock of it (its runtime directory is another one, XDG_RUNTIME_DIR or a "
                f"container's, or was removed under it, by a /tmp cleaner, which leaves it "
                f"unreachable); stop it (`kill {pid}`) and start this one, or use another "
                f"--namespace"
            )
        super().__init__(message)


class NamespaceMismatchError(BrokerError):
    """The broker at an endpoint (``--broker``, ``$SHMCAST_BROKER``, ``broker=``)
    serves another namespace than the one asked for: nothing was asked of it."""

    def __init__(self, endpoint: str, served: object, wanted: str) -> None:
        self.endpoint = endpoint
        self.served = served
        self.wanted = wanted
        super().__init__(
            f"the broker at {endpoint} serves namespace {served!r}, not {wanted!r}: give "
            f"namespace {served!r} (--namespace, $SHMCAST_NAMESPACE), or the control "
            f"endpoint of the broker of {wanted!r} (--broker, $SHMCAST_BROKER, broker=)"
        )


class ForbiddenError(BrokerError, PermissionError):
    def __init__(self, op: str, role: str, endpoint: str = "") -> None:
        self.op = op
        self.role = role
        self.endpoint = endpoint
        at = f" at {endpoint}" if endpoint else ""
        super().__init__(
            f"the broker refused {op!r} to this connection{at}: its role is {role!r}, and "
            f"{role}s may only hello, list, describe, stats, report, subscribers and topics "
            f"(and subscribe to the events); connect "
            f"to the owner's control endpoint as the namespace's owner, or list your CURVE "
            f"key in curve_clients"
        )


class RemoteError(BrokerError):
    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class ConfigError(ShmcastError, ValueError):
    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field = field
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"bad value for {field!r}{where}: {message}")
