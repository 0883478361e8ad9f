"""The broker: owns a namespace's segments, serves the control API, announces versions.

A service object: :class:`Broker` collects its configuration, then :meth:`run`
creates the sockets and segments, serves until :meth:`stop` (or SIGTERM/SIGINT
in the CLI), and in ``finally`` closes the sockets and unlinks the segments.
Tests run it in a thread; production runs it as a process (``shmcast broker``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import grp
import logging
import math
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ._auth import CurveKeys, make_curve_server, start_authenticator
from ._catalog import Catalog, CatalogEntry
from ._config import BrokerConfig
from ._context import context as shmcast_context
from ._datastream import DataStream, DataStreamStats
from ._events import Events, bind_endpoint
from ._layout import dtype_str, normalize_layout, parse_dtype, segment_size
from ._lease import ProcessId, forget, keep_from_children, open_for_lease, pid_running
from ._metrics import BrokerCollector, BrokerStats, MetricsServer, start_metrics_server
from ._names import (
    SHM_DIR,
    list_segment_names,
    owned_problem,
    resolve_namespace,
    runtime_dir,
    share_runtime_dir,
    shm_path,
    validate_segment_name,
)
from ._nsword import NamespaceWord
from ._protocol import (
    BROKER_TOPIC,
    MAX_VERSION,
    error_reply,
    pack,
    pid_of_lock,
    topic,
    unpack,
)
from ._segment import Segment
from ._service import Service
from ._watch import CommitWatcher, commit_count
from .client import Endpoints
from .errors import (
    RAISE_NOFILE,
    BrokerError,
    BrokerRunningError,
    ForbiddenError,
    LayoutConflictError,
    LayoutError,
    LayoutVersionError,
    NotASegmentError,
    OutOfDescriptorsError,
    SegmentExistsError,
    ShmcastError,
    WriterBusyError,
)

__all__ = ["Broker"]

log = logging.getLogger(__name__)

#: Seconds a subscriber's report stays in the ``subscribers`` table.
REPORT_TTL = 5.0
#: Seconds an older report is kept for ``subscribers`` asked with ``stale``, marked
#: stale (``shmcast top`` shows it while its process is alive and stopped).
REPORT_KEEP = 86400.0
#: Segments one report may carry (the rest are dropped).
REPORT_SEGMENTS = 64
#: What a subscriber's report may hold per segment (anything else is dropped): counts,
#: ints from 0 to 2**63-1; and latency percentiles, finite seconds >= 0 or None.
REPORT_COUNTS = frozenset({"last_version", "updates", "missed", "overrun", "torn"})
REPORT_SECONDS = frozenset({"p50", "p99"})
#: Reporters kept at most (the least recent go first).
MAX_REPORTS = 1024
#: The largest process id (``pid_t`` is a 32-bit signed int).
MAX_PID = 2**31 - 1
#: The requests a reader may make: nothing that changes the namespace.
READER_OPS = frozenset({"hello", "list", "describe", "stats", "report", "subscribers", "topics"})
WRITER, READER = "writer", "reader"
#: Seconds the leases of the segments unlinked at a clean stop are held (a
#: writer's attach retries its lease for 0.2 s).
UNLINK_HOLD = 0.3
#: Times the namespace lock is taken again when its file was unlinked meanwhile.
LOCK_ATTEMPTS = 10
#: Seconds between looks at whether each segment's path still names its object
#: (at most: once a heartbeat when that is slower).
LOOK_INTERVAL = 1.0
#: Frames a control request has at most: the routing id, an envelope (a REQ
#: socket's empty frame, a proxy's ids) and the body. ``MAXMSGSIZE`` bounds each
#: frame, not their number: one message of a million empty frames (2 MB sent) made
#: a million Python objects, stalled the broker over 5 s, took 330 MiB and was
#: echoed back whole as the reply's envelope.
MAX_REQUEST_FRAMES = 8
#: Frames of a message over :data:`MAX_REQUEST_FRAMES` thrown away per pass of the
#: serving loop: the rest waits for the next pass, so heartbeats stay on time.
DISCARD_BUDGET = 10_000


def _is_segment_name(name: object) -> bool:
    """Whether a report's key names a segment as a segment may be named (at most 128
    letters, digits, ``_``, ``-`` or ``.``): anything else, control characters
    included, is no segment anyone reads and is not kept (one such key of 128
    characters, printed escaped, made every row of ``shmcast top`` 1,600 wide)."""
    try:
        validate_segment_name(name)
    except ShmcastError:
        return False
    return True


def _pid(req: dict[str, Any]) -> int | None:
    """The ``pid`` a request names: None when it has none.

    Raises:
        ValueError: one that is no process id (1 to 2**31-1; a bool is none, though
            Python takes ``True`` for 1, the pid of a container's first process).
    """
    pid = req.get("pid")
    if pid is None:
        return None
    if type(pid) is not int or not 0 < pid <= MAX_PID:
        raise ValueError(f"'pid' must be a process id, an integer from 1 to {MAX_PID}")
    return pid


def _report_value(key: object, value: object) -> bool:
    """Whether a report may keep ``key: value`` (what ``shmcast top`` can show)."""
    if isinstance(value, bool):
        return False
    if key in REPORT_COUNTS:
        return isinstance(value, int) and 0 <= value <= MAX_VERSION
    if key in REPORT_SECONDS:
        return value is None or (
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        )
    return False


def _cleanup(what: str, step: Callable[[], object]) -> None:
    """One step of the broker's shutdown: what it raises is logged, not propagated."""
    try:
        step()
    except Exception:
        log.exception("broker shutdown: closing %s failed", what)


def _layout_text(dtype: str, shape: tuple[int, ...], slots: int) -> str:
    return f"dtype={dtype} shape={list(shape)} slots={slots}"


class Broker(Service):
    """The data server of one namespace.

    A service object: the constructor only records the configuration; :meth:`run`
    serves in the calling thread until :meth:`stop`, :meth:`start` serves in a
    background thread. Either way the sockets, the namespace lock and the
    segments are released when serving ends, whatever ends it.

    Args:
        config: a :class:`BrokerConfig` (``None``: the defaults). Its namespace of
            ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``, read now.
    """

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self.namespace = resolve_namespace(self.config.namespace)
        super().__init__(f"broker of namespace {self.namespace!r}")
        self.epoch = secrets.randbits(63)
        self._lock = threading.Lock()
        self._catalog = Catalog(self.namespace)
        self._seq = 0
        self._tseq: dict[bytes, int] = {}
        self._requests = 0
        self._errors: dict[str, int] = {}
        self._clients: dict[bytes, float] = {}
        #: Who sent the request being answered (its endpoint's role and routing id):
        #: the events endpoint's promises are kept per asker (Events.room).
        self._asker = b""
        #: (name, pid) -> (when, report, vouched: sent by that very process).
        self._reports: dict[tuple[str, int], tuple[float, dict[str, Any], bool]] = {}
        self._started = time.time()
        self.endpoints: Endpoints | None = None
        self.metrics_url: str | None = None
        self._data: DataStream | None = None
        self._events: Events | None = None
        self._word: NamespaceWord | None = None
        self._watch: zmq.Socket[Any] | None = None
        self._commits: dict[str, int] = {}  # segment -> its notify word when last announced
        self._next_look = 0.0  # monotonic time of the next look at the segments' paths
        #: Leases of deleted segments, held until a monotonic time (see _op_delete).
        self._held: list[tuple[float, Segment]] = []
        #: Control sockets in the middle of a message of too many frames (see
        #: _recv_request): its rest is read and dropped before the next request.
        self._discarding: set[zmq.Socket[Any]] = set()
        #: Control sockets bound on ipc, whose peers the kernel names (SO_PEERCRED).
        self._ipc_controls: set[zmq.Socket[Any]] = set()

    # ------------------------------------------------------------------ public

    @property
    def catalog(self) -> Catalog:
        """The segments this broker owns."""
        return self._catalog

    def data_stats(self) -> DataStreamStats | None:
        """Counters of the relay data stream, or None when it is off."""
        data = self._data
        return None if data is None or data.closed else data.stats()

    def stats(self) -> BrokerStats:
        infos = []
        published: dict[str, int] = {}
        sources: dict[str, str] = {}
        for name, entry in self._catalog.items():
            with contextlib.suppress(ShmcastError, ValueError):
                infos.append(entry.seg.info())
            published[name] = entry.published
            sources[name] = entry.source
        with self._lock:
            now = time.monotonic()
            clients = sum(1 for t in self._clients.values() if now - t < 30)
            errors = dict(self._errors)
        st = shutil.disk_usage(SHM_DIR) if os.path.isdir(SHM_DIR) else None
        return BrokerStats(
            namespace=self.namespace,
            epoch=self.epoch,
            seq=self._seq,
            segments=tuple(infos),
            published=published,
            sources=sources,
            requests=self._requests,
            errors=errors,
            clients=clients,
            shm_used=sum(i.size for i in infos),
            shm_free=st.free if st else 0,
            shm_total=st.total if st else 0,
            started=self._started,
            subscriptions=self._events.topics if self._events is not None else 0,
        )

    def run(self, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Serve until :meth:`stop`. ``on_ready`` gets the endpoints once serving.

        Raises:
            BrokerRunningError: another live broker serves this namespace.
            EndpointError: an endpoint cannot be bound (the message names it).
            ClosedError: the broker was closed, or has served already.
            OutOfDescriptorsError: out of file descriptors; among other things,
                reading the namespace word that says whether another broker serves
                the namespace (an ``OSError``, no ``ShmcastError``).
        """
        super().run(on_ready)

    def _serve_all(self, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
        cfg = self.config
        lock_fd = -1
        rdir: Path | None = None
        ctx: zmq.Context[Any] | None = None
        auth: Any = None
        socks: list[zmq.Socket[Any]] = []
        events: Events | None = None
        metrics: MetricsServer | None = None
        watcher: CommitWatcher | None = None
        bound_paths: list[str] = []
        served = False  # a start that failed unlinks nothing it adopted
        exposure = cfg.exposure_warning()
        if exposure is not None:  # a library's broker says it too, not only the command
            log.warning("%s", exposure)
        made_rdir = not runtime_dir(self.namespace).exists()
        try:
            rdir = runtime_dir(self.namespace, create=True)
            lock_fd = self._take_namespace_lock(rdir)
            self._refuse_a_beating_word()
            if cfg.group is not None:
                share_runtime_dir(rdir, grp.getgrnam(cfg.group).gr_gid)
            else:
                os.chmod(rdir, 0o700)  # a group's access from an earlier run ends here
            curve = self._curve_keys()
            # CURVE: a private context, because its ZAP handler (the allow-list of
            # client keys) is per context and must run before the first connection.
            # Else shmcast's own (its clients' in this process: inproc endpoints too).
            ctx = zmq.Context() if curve is not None else shmcast_context()
            auth = start_authenticator(ctx, curve.clients) if curve is not None else None
            control = ctx.socket(zmq.ROUTER)
            control_ro = ctx.socket(zmq.ROUTER)
            socks = [control, control_ro]
            defaults = Endpoints.default(self.namespace)
            for sock in socks:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
                sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
                if curve is not None:
                    make_curve_server(sock, curve)
            # Each socket file is ours to remove from its own bind on: a later
            # bind that fails must not leave the earlier ones behind.
            control_ep = self._bind(
                control, "control", cfg.control or defaults.control, False, rdir, bound_paths
            )
            control_ro_ep = self._bind(
                control_ro,
                "control_ro",
                cfg.control_ro or defaults.control_ro or "",
                True,
                rdir,
                bound_paths,
            )
            events = Events(
                ctx,
                cfg.events or defaults.events,
                group=cfg.group,
                curve=curve,
                max_subscriptions=cfg.max_subscriptions,
                owned_dir=rdir,
            )
            self._events = events
            events_ep = events.bind()
            self.endpoints = Endpoints(
                control=control_ep, events=events_ep, control_ro=control_ro_ep
            )
            if cfg.metrics_port is not None:  # bound before anything is adopted
                metrics = self._start_metrics(cfg.metrics_port, cfg.metrics_host)
            self._word = self._open_word()
            self._adopt_existing()
            for spec in cfg.segments:
                self._declare(spec.name, spec.dtype, spec.shape, spec.slots)
            if cfg.data:
                self._data = DataStream(
                    self._catalog,
                    cfg.data,
                    epoch=self.epoch,
                    interval=cfg.heartbeat_interval,
                    curve=curve,
                    max_message=cfg.max_message_bytes,
                    max_relays=cfg.max_relays,
                    max_patterns=cfg.max_relay_patterns,
                )
                self._data.start()
            ready = {
                "namespace": self.namespace,
                "pid": os.getpid(),
                "epoch": self.epoch,
                "control": control_ep,
                "control_ro": control_ro_ep,
                "events": events_ep,
                "metrics": self.metrics_url,
                "data": self._data.endpoint if self._data else None,
                "segments": self._catalog.names(),
            }
            watcher = self._start_watcher(ctx, socks)
            served = True
            self._set_ready(on_ready, ready)
            self._ipc_controls = {
                s for s, ep in ((control, control_ep), (control_ro, control_ro_ep))
                if ep and ep.startswith("ipc://")
            }  # fmt: skip
            self._serve({control: WRITER, control_ro: READER})
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # A ZeroMQ socket or context out of descriptors: wrapped where it enters,
            # as every other descriptor is (a bare ZMQError named no limit, no fix).
            raise OutOfDescriptorsError.from_os(exc.errno, "a ZeroMQ socket") from exc
        finally:
            # Each step on its own: one that fails (EMFILE...) is logged, and the
            # rest still run (sockets and lock out of the runtime dir, word stopped).
            if watcher is not None:
                _cleanup("the commit watcher", watcher.close)
            if lock_fd >= 0:  # the segments are ours only while we hold the lock
                _cleanup("the segments", functools.partial(self._shutdown, served))
            _cleanup("the namespace word", self._close_word)
            if self._data is not None:
                _cleanup("the data stream", self._data.close)
            for sock in socks:
                _cleanup("a socket", functools.partial(sock.close, 0))
            if events is not None:
                _cleanup("the events socket", events.close)
            if auth is not None and ctx is not None:  # the private context of CURVE
                _cleanup("the authenticator", auth.stop)
                _cleanup("the CURVE context", ctx.term)
            if metrics is not None:
                _cleanup("the metrics server", metrics.close)
            for path in bound_paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if lock_fd >= 0 and rdir is not None:
                with contextlib.suppress(OSError):
                    os.unlink(rdir / "broker.lock")
                forget(lock_fd)  # before the close: the number may be reused at once
                os.close(lock_fd)
                with contextlib.suppress(OSError):
                    rdir.rmdir()
            elif made_rdir and rdir is not None:  # no lock taken (out of descriptors)
                with contextlib.suppress(OSError):
                    rdir.rmdir()  # only while empty: another broker's file keeps it

    # ------------------------------------------------------------------ set-up

    def _curve_keys(self) -> CurveKeys | None:
        """The server's keys; the allow-list holds writers' and readers' keys alike
        (the role is decided per request, from the key the ZAP handler reports)."""
        cfg = self.config
        if not cfg.curve_secret_key:
            return None
        allowed = tuple(dict.fromkeys(cfg.curve_clients + cfg.curve_readers))
        return CurveKeys(cfg.curve_secret_key, cfg.curve_public_key, allowed)

    def _role(self, endpoint_role: str, frame: zmq.Frame) -> str:
        """The role of one request: the endpoint's, narrowed by the CURVE key."""
        cfg = self.config
        if endpoint_role == READER or not cfg.curve_secret_key:
            return endpoint_role
        try:
            key = frame.get("User-Id")
        except zmq.ZMQError:
            return READER
        if key in cfg.curve_readers:
            return READER
        if key in cfg.curve_clients or not (cfg.curve_clients or cfg.curve_readers):
            return WRITER
        return READER

    def _take_namespace_lock(self, rdir: Path) -> int:
        """Lock ``broker.lock``; the descriptor holding the lock.

        A stopping broker unlinks the file before it closes it: a lock taken on a
        file opened just before that is a lock on nothing anyone else can find (the
        next broker makes a new file and locks that). So the lock counts only while
        the path still names the file locked; otherwise it is taken again.
        """
        path = rdir / "broker.lock"
        for _ in range(LOCK_ATTEMPTS):
            # A child forked by another thread of this process (the application's
            # worker) closes its copy, from the open on: the lock dies with us.
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                fd = open_for_lease(str(path), flags, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                what = f"the lock of namespace {self.namespace!r}"
                raise OutOfDescriptorsError.from_os(exc.errno, what, str(path)) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                keep_from_children(fd)
                mine = os.fstat(fd)
                try:
                    there = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    there = None
                if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                    forget(fd)
                    os.close(fd)  # the file of a broker that stopped meanwhile
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BlockingIOError:
                forget(fd)
                os.close(fd)
                raise BrokerRunningError(self.namespace, pid_of_lock(str(path))) from None
            except BaseException:
                forget(fd)
                os.close(fd)
                raise
            return fd
        raise BrokerRunningError(self.namespace, pid_of_lock(str(path)))

    def _refuse_a_beating_word(self) -> None:
        """Refuse to serve a namespace another live broker serves though our runtime
        directory's lock was free: its runtime directory was removed under it (a
        /tmp cleaner: it runs on, unreachable) or is another one. Its namespace word
        in /dev/shm says so: heartbeats from a running process that is not this one.
        Before, a second broker started beside it, adopted its segments, and the
        first one's stop later unlinked what the second one served.

        A broker killed a moment ago (its pid gone) or stopped cleanly (pid 0) does
        not count: the next one takes the word over, as ever. Nor does one whose pid
        names a live process here that stamps no heartbeat within one and a half of
        its intervals: in a container sharing /dev/shm with the killed broker's (a
        pid namespace of its own), its pid may be another process (pid 1, the
        init), and that restart was refused until the beats went stale. A word
        under our own pid is waited for the same way: no broker of this process
        beats it (ours would hold our runtime directory's lock), but one of another
        pid namespace may (two containers, each broker its pid 1). Before, that
        pid counted as ours, and the second broker started beside the first.

        Raises:
            BrokerRunningError: naming that broker's pid and its word.
            OutOfDescriptorsError: the word could not be read (or another
                ``OSError``): whether a broker serves the namespace is not known, so
                this one does not start. (Taken for no word, it started beside one.)
        """
        try:
            word = NamespaceWord.attach(self.namespace)
        except ShmcastError:
            return  # no word we trust: the one we make replaces it, as before
        if word is None:
            return
        with word:
            pid, path = word.pid, word.path
            ours = pid == os.getpid()  # only another pid namespace's broker can beat
            if pid <= 0 or not word.broker_up() or not (ours or pid_running(pid)):
                return
            beat = word.heartbeat_ns
            deadline = time.monotonic() + 1.5 * word.interval + 0.1
            while (now := word.heartbeat_ns) == beat:
                if time.monotonic() >= deadline:
                    return  # no broker stamps it any more
                time.sleep(0.02)
            if not now or word.pid <= 0:
                return  # it stopped cleanly meanwhile (its last act): nothing serves now
        raise BrokerRunningError(self.namespace, pid, word=path, elsewhere=ours)

    def _bind(
        self,
        sock: zmq.Socket[Any],
        role: str,
        endpoint: str,
        shared: bool,
        rdir: Path,
        bound_paths: list[str],
    ) -> str:
        """Bind ``sock``; an ipc socket file goes on ``bound_paths`` (removed at the end)."""
        bound, path = bind_endpoint(
            sock, role, endpoint, group=self.config.group, shared=shared, owned_dir=rdir
        )
        if path is not None:
            bound_paths.append(path)
        return bound

    def _trusted(self, name: str) -> bool:
        """Whether the object of ``name`` is ours to adopt; our own bad ones are reclaimed.

        Opened with ``O_NOFOLLOW`` and checked on that descriptor: a regular file of
        ours (or root's) that nobody else may write. ``/dev/shm`` is sticky, so
        nobody else can swap the file we checked for another before we attach it.
        """
        path = shm_path(self.namespace, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:  # ELOOP: a symbolic link; EACCES: another user's
            fd = -1
        try:
            st = os.fstat(fd) if fd >= 0 else os.lstat(path)
        except FileNotFoundError:
            return False
        finally:
            if fd >= 0:
                os.close(fd)
        problem = owned_problem(path, st, os.getuid())
        if problem is None:
            return True
        self._count_error("OwnershipError")
        if st.st_uid == os.getuid() and not stat.S_ISREG(st.st_mode):
            log.warning("reclaiming %s: %s", name, problem)
            with contextlib.suppress(OSError):
                os.unlink(path)
        else:
            log.error("not adopting %s: %s", name, problem)
        return False

    def _adopt_existing(self) -> None:
        """Adopt the valid segments a previous broker left; reclaim the invalid ones.

        Only objects that pass :meth:`_trusted` are attached; another user's objects
        are left alone (and refused), whatever they hold.
        """
        names = list_segment_names(self.namespace)
        for name in names:
            try:
                validate_segment_name(name)
            except ShmcastError as exc:
                # Anyone's name (sticky, world-writable /dev/shm), logged only as the
                # exception writes it (a literal): written raw, an escape sequence in
                # it reached the terminal of the broker's log.
                log.warning("ignoring an object in /dev/shm: %s", exc)
                continue
            if not self._trusted(name):
                continue
            try:
                seg = Segment.attach(name, namespace=self.namespace, wait=0.2, prefault=False)
            except (NotASegmentError, LayoutVersionError, ShmcastError) as exc:
                log.warning("reclaiming %s: %s", name, exc)
                with contextlib.suppress(ShmcastError, OSError):
                    Segment.remove(name, namespace=self.namespace)
                continue
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                raise BrokerError(
                    f"the broker of namespace {self.namespace!r} ran out of file descriptors "
                    f"adopting segment {name!r} ({exc.strerror}; it holds one per segment, "
                    f"{len(names)} here): raise the open-files limit ({RAISE_NOFILE}; "
                    f"`shmcast doctor` checks it); no segment was unlinked"
                ) from exc
            v = seg.version
            if v > MAX_VERSION:
                log.warning("reclaiming %s: its latest version word is corrupt (%d)", name, v)
                seg.unlink()
                seg.close()
                continue
            self._reset_access(name, seg._fd)
            self._catalog.add(name, CatalogEntry(seg=seg, announced=v, adopted=True))
            log.info("adopted segment %s at version %d", name, v)

    def _reset_access(self, name: str, fd: int, mode: int | None = None) -> None:
        """Give an object taken over from an earlier broker this broker's mode and
        group: a group that broker shared it with loses it when this one has none.
        Narrowed to the owner first, so nobody gains access on the way."""
        cfg = self.config
        gid = grp.getgrnam(cfg.group).gr_gid if cfg.group is not None else os.getegid()
        try:
            os.fchmod(fd, 0o600)
            os.fchown(fd, -1, gid)
            os.fchmod(fd, cfg.mode if mode is None else mode)
        except OSError as exc:  # root's object, adopted by another user
            log.warning("cannot reset the access of %s: %s", name, exc.strerror or exc)

    def _open_word(self) -> NamespaceWord:
        """The namespace word: readers wait on it for catalog changes and heartbeats."""
        cfg = self.config
        gid = grp.getgrnam(cfg.group).gr_gid if cfg.group is not None else None
        word = NamespaceWord.serve(
            self.namespace,
            epoch=self.epoch,
            interval=cfg.heartbeat_interval,
            mode=cfg.mode & 0o644,
            gid=gid,
        )
        self._reset_access("the namespace word", word._fd, cfg.mode & 0o644)  # taken over
        return word

    def _start_watcher(self, ctx: zmq.Context[Any], socks: list[zmq.Socket[Any]]) -> CommitWatcher:
        """The commit watcher (see ``_watch``) and the PAIR socket it wakes us on
        (put on ``socks``, closed with the others). Both ends are made here: a
        broker that cannot make them does not start (one whose watcher died would
        serve on, announcing versions only at its ticks).

        Raises:
            OutOfDescriptorsError: naming the watcher's socket and the limit.
        """
        endpoint = f"inproc://shmcast-watch-{id(self):x}-{self.epoch:x}"
        try:
            ours = ctx.socket(zmq.PAIR)
            socks.append(ours)
            ours.setsockopt(zmq.LINGER, 0)
            ours.bind(endpoint)
            self._watch = ours
            theirs = ctx.socket(zmq.PAIR)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            what = "the commit watcher's ZeroMQ socket"
            raise OutOfDescriptorsError.from_os(exc.errno, what) from exc
        try:
            theirs.setsockopt(zmq.LINGER, 0)
            theirs.setsockopt(zmq.SNDHWM, 1)  # one pending wake-up says it all
            theirs.connect(endpoint)
            return CommitWatcher(self._catalog, theirs, self._wants_every_version).start()
        except BaseException:  # the watcher's thread never started: the socket is ours
            theirs.close(0)
            raise

    def _wants_every_version(self, name: str) -> bool:
        """Whether someone wants each version of ``name`` announced as it is committed
        (an ``events`` subscriber of its topic, or a relay): the commit watcher's set.
        (Called from the watcher's thread: both lookups only read.)"""
        events, data = self._events, self._data
        if events is not None and events.subscribed(topic(name)):
            return True
        return data is not None and not data.closed and data.wanted(name)

    def _catalog_changed(self) -> None:
        if self._word is not None:
            self._word.catalog_changed()

    def _close_word(self) -> None:
        word, self._word = self._word, None
        if word is not None:
            try:
                word.catalog_changed()  # readers look again at what was unlinked
                word.stopped()
            finally:
                # Closed first: a broker at its open-files limit has the word's own
                # descriptor for the look at /dev/shm below (else the word stayed).
                word.close()
            word.unlink_if_alone()

    def _start_metrics(self, port: int, host: str) -> MetricsServer:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=True)
        registry.register(BrokerCollector(self.stats, self.data_stats))
        server = start_metrics_server(registry, port, host=host)
        self.metrics_url = server.url
        return server

    # ------------------------------------------------------------------ serving

    def _serve(self, controls: dict[zmq.Socket[Any], str]) -> None:
        events = self._events
        assert events is not None
        poller = zmq.Poller()
        for sock in controls:
            poller.register(sock, zmq.POLLIN)
        poller.register(events.sock, zmq.POLLIN)
        watch = self._watch
        if watch is not None:
            poller.register(watch, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        next_beat = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._tick()
                next_beat = now + interval
            if self._held and now >= self._held[0][0]:
                self._release_held(now)
            timeout = max(0.0, min(next_beat - time.monotonic(), 0.1))
            for sock, _ in poller.poll(int(timeout * 1000)):
                if sock is watch:  # the commit watcher: versions were committed
                    with contextlib.suppress(zmq.Again):
                        while True:
                            watch.recv(zmq.NOBLOCK)
                    self._announce_committed()
                    continue
                if sock not in controls:
                    old = events.sock
                    if events.drain():
                        self._count_error("events_reset")
                        poller.unregister(old)
                        poller.register(events.sock, zmq.POLLIN)
                    continue
                role = controls[sock]
                # Drain what is queued, bounded so heartbeats stay on time: in count,
                # and in time (half an interval), as one request may cost 0.1 s (a
                # 'subscribers' of 1024 kept reports of 64 segments): 1000 of them,
                # pipelined by one client, stopped the heartbeats for over a minute.
                until = time.monotonic() + interval / 2
                for _ in range(1000):
                    if time.monotonic() > until:
                        break  # the rest on the next pass, after the tick if due
                    try:
                        frames = self._recv_request(sock)
                    except zmq.Again:
                        break
                    if frames is None:
                        if sock in self._discarding:
                            break  # the rest of that message on the next pass
                        continue
                    self._handle(sock, frames, self._role(role, frames[-1]))

    def _recv_request(self, sock: zmq.Socket[Any]) -> list[zmq.Frame] | None:
        """The frames of the next request on ``sock``, or None for a message of more
        than :data:`MAX_REQUEST_FRAMES` frames: dropped (counted ``too_many_frames``),
        its frames read and thrown away as they come, :data:`DISCARD_BUDGET` a call.

        Raises:
            zmq.Again: nothing is queued.
        """
        if sock in self._discarding:
            self._discard(sock)
            return None
        frames = [sock.recv(zmq.NOBLOCK, copy=False)]
        while frames[-1].more:  # libzmq delivers a message whole: no Again in it
            if len(frames) == MAX_REQUEST_FRAMES:
                self._count_error("too_many_frames")
                self._discarding.add(sock)
                self._discard(sock)
                return None
            frames.append(sock.recv(zmq.NOBLOCK, copy=False))
        return frames

    def _discard(self, sock: zmq.Socket[Any]) -> None:
        """Throw away up to :data:`DISCARD_BUDGET` frames of the message being dropped."""
        for _ in range(DISCARD_BUDGET):
            if not sock.getsockopt(zmq.RCVMORE):
                self._discarding.discard(sock)
                return
            sock.recv(zmq.NOBLOCK)

    def _tick(self) -> None:
        if self._data is not None:
            self._data.sync()
        now = time.monotonic()
        look = now >= self._next_look
        if look:
            self._next_look = now + LOOK_INTERVAL
        for name, entry in self._catalog.items():
            if look and not self._still_linked(entry):
                self._forget(name, entry, "its object was unlinked behind the broker")
                continue
            with contextlib.suppress(ShmcastError):
                if entry.seg.version > MAX_VERSION:
                    self._reclaim(name, entry, "its latest version word is corrupt")
        # Versions the watcher has not reported yet (a publisher writing while we were
        # down, a watcher behind): nothing goes unannounced.
        self._announce_committed()
        self._emit(BROKER_TOPIC, "heartbeat", "", 0, time.time_ns())
        if self._word is not None:
            self._word.heartbeat()

    def _announce_committed(self) -> None:
        """Announce what the headers say was committed since the last announcement of
        each segment, one event per version, oldest first, with its commit time.

        The notify word counts commits: when as many commits as version numbers
        went by, every number was published and each is announced, also those the
        writer lapped before we looked (their news, as a commit message would have
        carried it). Otherwise (a relay skips numbers) the versions still in the
        ring are; subscribers count the others missed."""
        for name, entry in self._catalog.items():
            seg = entry.seg
            try:
                v = seg.version
                notify = commit_count(seg)
            except (ShmcastError, ValueError):
                continue
            seen = self._commits.get(name)
            self._commits[name] = notify
            if v <= entry.announced or v > MAX_VERSION:  # corrupt: the tick reclaims it
                continue
            commits = None if seen is None else (notify - seen) & 0xFFFFFFFF
            every = commits is not None and commits >= v - entry.announced
            ring: dict[int, int] = {}  # version -> commit time, of those still in the ring
            for u in range(max(entry.announced + 1, v - seg.slots + 1), v + 1):
                with contextlib.suppress(ShmcastError):
                    ring[u] = seg.acquire(u)[3]
            # A lapped version's time is not known any more: the oldest one in the ring's.
            lapped_ts = min(ring.values(), default=time.time_ns())
            for u in range(entry.announced + 1 if every else min(ring, default=v), v + 1):
                if u in ring or every or u == v:
                    self._announce_version(name, entry, u, ring.get(u, lapped_ts))

    @staticmethod
    def _still_linked(entry: CatalogEntry) -> bool:
        """Whether the segment's path still names the object we hold (one ``stat``)."""
        seg = entry.seg
        try:
            if entry.inode is None:
                st = os.fstat(seg._fd)
                entry.inode = (st.st_dev, st.st_ino)
            there = os.stat(seg.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError:  # EMFILE, or closed under us: not evidence that it is gone
            return True
        return (there.st_dev, there.st_ino) == entry.inode

    @staticmethod
    def _names_ours(seg: Segment) -> bool:
        """Whether the segment's path names the very object ``seg`` maps (what has the
        name after someone unlinked ours is not ours to unlink)."""
        try:
            there = os.stat(seg.path, follow_symlinks=False)
            mine = os.fstat(seg._fd)
        except OSError:
            return False
        return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

    def _forget(self, name: str, entry: CatalogEntry, why: str) -> None:
        """Drop a segment someone unlinked behind the broker (``Segment.remove``, ``rm``
        of its path): announced deleted, as :meth:`_op_delete` does, and its name free
        for a new segment. Whatever now has its name is not ours to touch."""
        log.warning("dropping segment %s: %s", name, why)
        self._catalog.pop(name)
        self._commits.pop(name, None)
        entry.seg.close()
        self._catalog_changed()
        self._emit(topic(name), "deleted", name, entry.announced, time.time_ns())

    def _reclaim(self, name: str, entry: CatalogEntry, why: str) -> None:
        """Drop a segment whose header went bad under us (a corrupt ``latest``): it is
        unlinked and announced deleted, as an invalid object found at start would be."""
        log.error("reclaiming segment %s: %s", name, why)
        self._count_error("NotASegmentError")
        if self._names_ours(entry.seg):
            entry.seg.unlink()  # by name: only while the name is still this object
        # Out of the catalog only once the name is free: whoever sees it gone there
        # (a publisher making it again, a test) finds no object under it either.
        self._catalog.pop(name)
        self._commits.pop(name, None)
        entry.seg.close()
        self._catalog_changed()
        self._emit(topic(name), "deleted", name, entry.announced, time.time_ns())

    def _emit(self, tpc: bytes, kind: str, segment: str, version: int, ts: int) -> None:
        self._seq += 1
        tseq = self._tseq.get(tpc, 0) + 1
        self._tseq[tpc] = tseq
        body = {
            "kind": kind,
            "segment": segment,
            "version": version,
            "ts": ts,
            "epoch": self.epoch,
            "seq": self._seq,
            "tseq": tseq,
        }
        if self._events is not None:
            self._events.send(tpc, pack(body))

    def _announce_version(self, name: str, entry: CatalogEntry, version: int, ts: int) -> None:
        entry.published += max(0, version - entry.announced)
        entry.announced = version
        self._emit(topic(name), "version", name, version, ts)
        if self._data is not None:
            self._data.notify(name)

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame], role: str) -> None:
        self._requests += 1
        ident = frames[0].bytes
        self._asker = role.encode() + b"\0" + ident
        self._clients[ident] = time.monotonic()
        if len(self._clients) > 10_000:
            cutoff = time.monotonic() - 30
            self._clients = {k: t for k, t in self._clients.items() if t >= cutoff}
        body = frames[-1].bytes
        envelope = frames[:-1]
        rid: Any = None
        try:
            req = unpack(body, self.config.max_message_bytes)
            rid = req.get("id")
            op = req.get("op")
            if not isinstance(op, str):
                raise ValueError("request has no 'op' string")
            handler = self._OPS.get(op)
            if handler is None:
                raise ValueError(f"unknown op {op!r}; known: {', '.join(sorted(self._OPS))}")
            if role != WRITER and op not in READER_OPS:
                raise ForbiddenError(op, role)
            if op == "report":
                req = self._vouched(sock, frames[-1], req)
            reply = handler(self, req)
            if reply is None:
                return
            reply["ok"] = True
        except ShmcastError as exc:
            self._count_error(type(exc).__name__)
            reply = error_reply(exc)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            self._count_error("BadRequest")
            reply = {"ok": False, "error": "BadRequest", "message": f"bad request: {exc}"}
        except Exception as exc:  # the broker keeps serving whatever a request does
            log.exception("request failed")
            self._count_error("InternalError")
            reply = {"ok": False, "error": "InternalError", "message": str(exc)}
        reply["id"] = rid if isinstance(rid, int) else None
        try:
            sock.send_multipart([*envelope, pack(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self._count_error("reply_dropped")

    def _vouched(
        self, sock: zmq.Socket[Any], frame: zmq.Frame, req: dict[str, Any]
    ) -> dict[str, Any]:
        """A report with ``vouched`` set (whatever the client sent there) to whether
        the kernel says its sender is the process it names: an ipc connection whose
        peer's pid (SO_PEERCRED, which libzmq appends to the peer's address) is the
        report's ``pid``. An unvouched report loses ``pidns`` and ``started`` (which
        let top keep a stopped subscriber's row): before, any client, read-only ones
        included, could name another process (a stranger's stopped one, its start
        time read from ``/proc``) and top showed it as a stopped subscriber, for a
        day, from one message. Over TCP, or from a pid namespace whose pids differ
        from the broker's, nothing is vouched (the row goes after
        :data:`REPORT_TTL`, as before); :meth:`_op_report` keeps a vouched row from
        the others."""
        peer: int | None = None
        if sock in self._ipc_controls:
            with contextlib.suppress(zmq.ZMQError, ValueError, IndexError):
                peer = int(str(frame.get("Peer-Address")).rsplit(":", 3)[3])
        vouched = peer is not None and peer == req.get("pid")
        if vouched:
            return {**req, "vouched": True}
        return {k: v for k, v in req.items() if k not in ("pidns", "started")} | {"vouched": False}

    # ------------------------------------------------------------------ requests

    @staticmethod
    def _name(req: dict[str, Any]) -> str:
        return validate_segment_name(req.get("name"))

    def _entry(self, name: str) -> CatalogEntry:
        entry = self._catalog.get(name)
        if entry is None:
            entry = self._adopt_made_beside(name)
        return entry if entry is not None else self._catalog.entry(name)  # not found

    def _adopt_made_beside(self, name: str) -> CatalogEntry | None:
        """A valid segment of ours made beside this broker (``Segment.create`` while
        it runs) is adopted at the first request that names it, as a restarted broker
        adopts what it finds. Before, no Publisher could take the name, ``shmcast rm``
        said there was no such segment, and the object stayed for ever. An object
        that is no valid segment (yet: it may still be being made) is left alone;
        ``shmcast doctor --fix`` removes it."""
        path = shm_path(self.namespace, name)
        try:
            if owned_problem(path, os.lstat(path), os.getuid()) is not None:
                return None  # another user's, or a link: refused where it is used
            seg = Segment.attach(name, namespace=self.namespace, wait=0.0, prefault=False)
        except (ShmcastError, OSError):
            return None
        v = seg.version
        if v > MAX_VERSION:
            seg.close()
            return None
        self._reset_access(name, seg._fd)
        entry = CatalogEntry(seg=seg, announced=v)
        self._catalog.add(name, entry)
        self._catalog_changed()
        self._emit(topic(name), "created", name, 0, time.time_ns())
        log.info("adopted segment %s, made beside the broker, at version %d", name, v)
        return entry

    def _describe(self, name: str) -> dict[str, Any]:
        entry = self._entry(name)
        return {
            **entry.seg.info().catalog_entry(),
            "published": entry.published,
            "source": entry.source,
            **entry.extra,
        }

    def _create(self, name: str, dtype: Any, shape: Any, slots: Any) -> dict[str, Any]:
        validate_segment_name(name)
        if not isinstance(dtype, str):
            raise LayoutError(f"dtype must be a string, got {type(dtype).__name__}")
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in shape
        ):
            raise LayoutError(f"shape must be a list of integers, got {shape!r}")
        if not isinstance(slots, int) or isinstance(slots, bool):
            raise LayoutError(f"slots must be an integer, got {slots!r}")
        dt, shp = normalize_layout(parse_dtype(dtype), tuple(shape))
        wanted = _layout_text(dtype_str(dt), shp, slots)
        entry = self._catalog.get(name) or self._adopt_made_beside(name)
        if entry is not None:
            seg = entry.seg
            have = _layout_text(dtype_str(seg.dtype), seg.shape, seg.slots)
            if have != wanted:
                raise LayoutConflictError(name, have, wanted, self.namespace)
            return self._describe(name)
        limit = self.config.max_segment_bytes
        size = segment_size(int(dt.itemsize) * math.prod(shp), slots)
        if limit is not None and size > limit:
            raise LayoutError(
                f"segment {name!r} would take {size} bytes, over this broker's "
                f"max_segment_bytes={limit}"
            )
        try:
            writer = Segment.create(
                name,
                dt,
                shp,
                slots=slots,
                namespace=self.namespace,
                mode=self.config.mode,
                epoch=self.epoch,
                prefault=False,
            )
        except SegmentExistsError:
            # Not in the catalog yet taken: someone else's object squats the name.
            path = shm_path(self.namespace, name)
            with contextlib.suppress(FileNotFoundError):
                problem = owned_problem(path, os.lstat(path), os.getuid())
                if problem is not None:
                    raise problem from None
            raise
        try:
            if self.config.group is not None:
                os.chown(writer.path, -1, grp.getgrnam(self.config.group).gr_gid)
            reader = Segment.attach(name, namespace=self.namespace, prefault=False)
        except BaseException:
            writer.unlink()
            writer.close()
            raise
        writer.close()  # the broker owns the segment; publishers take the lease
        self._commits.pop(name, None)  # no commit count of an earlier incarnation
        self._catalog.add(name, CatalogEntry(seg=reader))
        self._catalog_changed()
        self._emit(topic(name), "created", name, 0, time.time_ns())
        return self._describe(name)

    def _declare(self, name: str, dtype: str, shape: tuple[int, ...], slots: int) -> None:
        """A segment of the configuration: made, or checked against the one adopted.

        Raises:
            LayoutError: an object of the name holds another layout. Its hint works
                with no broker serving (``shmcast rm`` needs one).
        """
        try:
            self._create(name, dtype, shape, slots)
        except LayoutConflictError as exc:
            path = shm_path(self.namespace, name)
            raise LayoutError(
                f"the configuration declares segment {name!r} as {exc.requested}, but "
                f"namespace {self.namespace!r} holds it as {exc.existing} ({path}, left by "
                f"an earlier broker; this one did not start and unlinked nothing): declare "
                f"that layout, or stop its writer and remove the object (`rm {path}`)"
            ) from exc

    def _op_hello(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.endpoints is not None
        return {
            "namespace": self.namespace,
            "epoch": self.epoch,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "control": self.endpoints.control,
            "control_ro": self.endpoints.control_ro,
            "events": self.config.advertise_events or self.endpoints.events,
            "data": self._data.endpoint if self._data else None,
            "heartbeat_interval": self.config.heartbeat_interval,
            "max_subscriptions": self.config.max_subscriptions,
            "subscriptions": self._events.held() if self._events is not None else 0,
            "max_message_bytes": self.config.max_message_bytes,
            "data_stream": self._data_health(),
        }

    def _data_health(self) -> dict[str, Any] | None:
        """The data stream's state for ``hello`` and ``stats`` (``shmcast health``)."""
        st = self.data_stats()
        if st is None:
            return None
        return {
            "up": st.up,
            "problem": st.problem(),
            "restarts": st.restarts,
            "failures": st.failures,
            "missing": list(st.missing),
        }

    def _op_create(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        if req.get("existing") is True:
            # A relay or bridge telling of a mirror it holds: a mirror deleted here
            # meanwhile (`shmcast rm --force`) stays deleted, never made again empty.
            self._entry(name)  # SegmentNotFoundError when it is gone
        source, up = req.get("source"), req.get("upstream_up")
        mirror = isinstance(source, str) and bool(source)  # a relay or bridge's mirror
        if mirror:
            self._check_feeder(name, str(source)[:256], _pid(req))
        reply = self._create(name, req.get("dtype"), req.get("shape"), req.get("slots", 2))
        if not mirror:
            entry = self._catalog.get(name)
            if entry is not None and entry.source == "local":
                entry.adopted = False  # a local publisher's: no mirror may claim it now
        else:  # it says where the data comes from
            entry = self._entry(name)
            entry.source = str(source)[:256]
            entry.adopted = False
            if isinstance(up, bool):
                entry.extra["upstream_up"] = up
            inc = req.get("upstream_incarnation")
            if type(inc) is int and 0 < inc < 1 << 64:
                # The upstream incarnation it copies: a restarted relay or bridge
                # takes over a mirror it left of that same incarnation (not a new one).
                entry.extra["upstream_incarnation"] = inc
            reply = self._describe(name)
        return reply

    def _check_feeder(self, name: str, source: str, pid: int | None) -> None:
        """A mirror is made by its relay or bridge, never taken over: a segment fed
        by anyone else (a local publisher, another upstream) is refused to it, before
        anything about the segment changes. A segment adopted at start may be claimed
        once (the broker that knew its feeder is gone): by its live writer (a relay
        telling a restarted broker about its mirrors), or by anyone if it has none."""
        entry = self._catalog.get(name) or self._adopt_made_beside(name)
        if entry is None or entry.source == source:
            return
        if entry.adopted:
            info = entry.seg.info()
            if not info.writer_alive or info.writer_pid in (0, pid):
                return
        fed = "a local segment" if entry.source == "local" else f"the mirror of {entry.source}"
        raise LayoutConflictError(name, fed, f"a mirror of {source}", self.namespace)

    def _op_describe(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._describe(self._name(req))

    def _op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "seq": self._seq,
            "segments": [self._describe(n) for n in self._catalog.names()],
        }

    def _op_delete(self, req: dict[str, Any]) -> dict[str, Any]:
        """Unlink a segment; refused while a live writer holds its lease, unless
        ``force`` (the writer then goes on writing into an object nobody finds)."""
        name = self._name(req)
        entry = self._entry(name)
        if req.get("force") is not True:
            # The lease is taken and held a while (as at a clean stop): a writer
            # attaching at this very moment is refused, instead of leasing the object
            # just unlinked and writing where nobody reads.
            info = entry.seg.info()
            try:
                if info.writer_alive:
                    raise WriterBusyError(name, info.writer_pid)
                held = Segment.attach(name, namespace=self.namespace, writable=True, wait=0.0)
            except WriterBusyError as exc:
                busy = WriterBusyError(name, exc.pid)
                busy.args = (
                    f"segment {name!r} has a live writer (process {exc.pid}); stop it first, "
                    f"or delete anyway with force (`shmcast rm {name} -n {self.namespace} "
                    f"--force`: the writer then goes on writing into an object nobody finds)",
                )
                raise busy from None
            except ShmcastError:  # gone or damaged meanwhile: nothing to hold
                pass
            else:
                self._held.append((time.monotonic() + UNLINK_HOLD, held))
        entry.seg.unlink()
        self._catalog.pop(name)  # after the name is free, as in _reclaim
        self._commits.pop(name, None)  # a segment made again counts its own commits
        entry.seg.close()
        self._catalog_changed()
        self._emit(topic(name), "deleted", name, entry.announced, time.time_ns())
        return {"name": name}

    def _release_held(self, now: float) -> None:
        while self._held and (now >= self._held[0][0] or self._stop.is_set()):
            _, seg = self._held.pop(0)
            with contextlib.suppress(Exception):
                seg.close()

    def _op_lease(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        entry = self._entry(name)
        info = entry.seg.info()
        pid = _pid(req)
        if info.writer_alive and info.writer_pid not in (0, pid):
            raise WriterBusyError(name, info.writer_pid)
        if entry.source == "local":
            entry.adopted = False  # a local writer feeds it: no mirror may claim it now
        return {"name": name, "version": info.version}

    def _op_commit(self, req: dict[str, Any]) -> dict[str, Any] | None:
        name = self._name(req)
        entry = self._entry(name)
        version = req.get("version")
        ts = req.get("ts")
        # type(...) is int: a bool is an int to Python, and `version: true` was taken
        # as 1, announced as the bool true (to subscribers and relays) and kept as
        # the segment's last announced version.
        if type(version) is not int or version < 1 or type(ts) is not int:
            raise ValueError(
                "commit needs 'version', an integer from 1 (a version committed), and "
                "'ts', an integer"
            )
        if version > entry.announced:
            # Announced only what the header shows: a version beyond it was never
            # written (a bug, or a forged message), and would hide the real ones.
            latest = entry.seg.version
            if latest > MAX_VERSION:
                self._reclaim(name, entry, f"its latest version word is corrupt ({latest})")
                raise NotASegmentError(name, entry.seg.path, "its latest version is corrupt")
            if version > latest:
                raise ValueError(
                    f"commit of version {version} of {name!r}, beyond its header's latest "
                    f"({latest}): refused; commit a version after writing it"
                )
            try:
                ts = entry.seg.acquire(version)[3]  # the slot's own commit time
            except ShmcastError:
                ts = time.time_ns()  # lapped since: the version is gone, not its news
            self._announce_version(name, entry, version, ts)
        return {"version": version} if req.get("ack") else None

    def _op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.stats()
        return {
            "namespace": st.namespace,
            "epoch": st.epoch,
            "seq": st.seq,
            "segments": len(st.segments),
            "published": st.published,
            "requests": st.requests,
            "errors": st.errors,
            "clients": st.clients,
            "shm_used": st.shm_used,
            "shm_free": st.shm_free,
            "shm_total": st.shm_total,
            "subscriptions": st.subscriptions,
            "uptime": time.time() - st.started,
            "data_stream": self._data_health(),
        }

    def _op_report(self, req: dict[str, Any]) -> None:
        """One-way: a subscriber's counters (name, pid, per-segment lag and latency),
        or with ``gone`` true its goodbye (its row leaves the table).

        Anyone who may connect, read-only clients included, may report: only the
        known counters are kept, as numbers, and only the :data:`MAX_REPORTS` most
        recent reporters (a 61 KB message of nested lists held 4 MiB of objects, and
        nothing expired below 1024 reporters)."""
        name, segs = req.get("name"), req.get("segments")
        try:
            pid = _pid(req)
        except ValueError:
            pid = None
        if not isinstance(name, str) or pid is None or not isinstance(segs, dict):
            raise ValueError(
                f"report needs 'name' (str), 'pid' (a process id: an integer from 1 to "
                f"{MAX_PID}) and 'segments' (map)"
            )
        key = (name[:64], pid)
        vouched = req.get("vouched") is True  # set by _vouched, never by the client
        if not vouched and self._sent_by_its_process(key):
            # Another client naming a subscriber that reports for itself: before, its
            # goodbye removed that row (until the next report), and its report
            # replaced the row's counts and dropped what marks it stopped.
            self._count_error("report_refused")
            return
        if req.get("gone") is True:  # a subscriber closing: its row goes now
            self._reports.pop(key, None)
            return
        clean: dict[str, dict[str, int | float | None]] = {}
        for seg, counts in list(segs.items())[:REPORT_SEGMENTS]:
            if _is_segment_name(seg) and isinstance(counts, dict):
                clean[seg] = {k: v for k, v in counts.items() if _report_value(k, v)}
        now = time.monotonic()
        body: dict[str, Any] = {"name": name[:64], "pid": pid, "segments": clean}
        # Who the process is, for top to tell a stopped one (see reporter_identity).
        for k in ("pidns", "started"):
            v = req.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_VERSION:
                body[k] = v
        self._reports.pop(key, None)  # re-inserted last: the table is oldest first
        self._reports[key] = (now, body, vouched)
        if len(self._reports) > MAX_REPORTS:
            self._expire_reports(now)
            while len(self._reports) > MAX_REPORTS:
                del self._reports[next(iter(self._reports))]

    def _sent_by_its_process(self, key: tuple[str, int]) -> bool:
        """Whether the row ``key`` was reported by the very process it names
        (vouched) and that process still lives (its start time, when the report
        gave it, still ``pid``'s): only it may change or remove that row. A pid
        used again by another process (another pid namespace's, say) is not
        held off by a dead one's row."""
        row = self._reports.get(key)
        if row is None or not row[2]:
            return False
        started = row[1].get("started")
        if not isinstance(started, int):
            return pid_running(key[1])
        return ProcessId(key[1], started).alive()

    def _expire_reports(self, now: float) -> None:
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] < REPORT_KEEP}

    def _op_subscribers(self, req: dict[str, Any]) -> dict[str, Any]:
        """The reports of the last :data:`REPORT_TTL` seconds; with ``stale`` true
        also the older ones kept (at most :data:`MAX_REPORTS` reporters, for
        :data:`REPORT_KEEP` seconds), marked ``"stale": true``: a subscriber that
        stopped reporting is gone, or stopped (SIGSTOP, a debugger), which only a
        client in its pid namespace can tell."""
        now = time.monotonic()
        self._expire_reports(now)
        stale = req.get("stale") is True
        subs = [
            {**body, "age": now - t} | ({"stale": True} if now - t >= REPORT_TTL else {})
            for t, body, _ in self._reports.values()
            if stale or now - t < REPORT_TTL
        ]
        return {"subscribers": sorted(subs, key=lambda r: (r["name"], r["pid"]))}

    def _op_topics(self, req: dict[str, Any]) -> dict[str, Any]:
        """How many of the topics of ``names`` (and, with ``broker`` true, the
        broker's own) the events endpoint does not hold yet, beside the topics it
        holds and may hold: an ``events`` subscriber that would take it past
        ``max_subscriptions`` (and into a reset per resubscription, for ever,
        everyone's announcements lost) is refused before it subscribes. With
        ``reserve`` true, topics that fit are promised to the asker for a few seconds
        (:meth:`Events.room`): a second subscriber asking before the first one's
        subscriptions arrive counts them (``fits`` false when they do not). A
        refused asker's earlier promises (its other chunks of names) are let go, and
        so are an asker's with ``release`` true (it failed to start)."""
        names = req.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("topics needs 'names', a list of segment names")
        events = self._events
        assert events is not None
        tpcs = {topic(n) for n in names}
        if req.get("broker") is True:
            tpcs.add(BROKER_TOPIC)
        if req.get("release") is True:  # the asker failed to start: no subscriptions
            events.release(self._asker)
        held, new, fits = events.room(tpcs, req.get("reserve") is True, self._asker)
        return {"held": held, "max": events.max_subscriptions, "new": new, "fits": fits}

    _OPS: dict[str, Callable[[Broker, dict[str, Any]], dict[str, Any] | None]] = {  # noqa: RUF012
        "hello": _op_hello,
        "create": _op_create,
        "describe": _op_describe,
        "list": _op_list,
        "delete": _op_delete,
        "lease": _op_lease,
        "commit": _op_commit,
        "stats": _op_stats,
        "report": _op_report,
        "subscribers": _op_subscribers,
        "topics": _op_topics,
    }

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self, served: bool = True) -> None:
        """A clean stop (SIGTERM, SIGINT, SIGHUP, :meth:`stop`, :meth:`close`).

        A segment whose writer lease is held stays in ``/dev/shm``: its publisher
        goes on writing where readers are, and the next broker adopts it (versions
        continue). Orphans (no writer) are unlinked, and so is everything with
        ``unlink_on_exit``. The broker takes an orphan's lease before unlinking it
        and holds it a while, so a publisher attaching at that very moment is
        refused (``WriterBusyError``) instead of writing into an unlinked object.

        A start that failed (``served`` false) unlinks nothing it adopted: those
        segments are a crashed broker's, kept for the next one to adopt.
        """
        self._release_held(math.inf)  # the leases of deleted segments
        held: list[Segment] = []
        kept: list[str] = []
        for name, entry in self._catalog.clear():
            seg = entry.seg
            unlink_all = self.config.unlink_on_exit
            try:
                if entry.adopted and not served:
                    kept.append(name)
                    continue
                if seg.writer_alive() and not unlink_all:
                    kept.append(name)
                    continue
                cut: int | None = None  # the live writer unlink_on_exit cuts off
                try:
                    # No wait for a header being written: ours was complete when we
                    # took it; one gone blank since is damaged, not in the making.
                    held.append(
                        Segment.attach(name, namespace=self.namespace, writable=True, wait=0)
                    )
                except WriterBusyError as exc:
                    if not unlink_all:
                        kept.append(name)  # a writer took the lease meanwhile
                        continue
                    cut = exc.pid or 0
                except (NotASegmentError, LayoutVersionError) as exc:
                    # Its header went bad behind us (zeroed, overwritten): no publisher
                    # attaches it again and no next broker adopts it, so it is reclaimed
                    # now, as one found at start is. Before, it stayed, and with it the
                    # namespace word, after a stop that said only "at shutdown".
                    if self._names_ours(seg):
                        why = (
                            exc.reason
                            if isinstance(exc, NotASegmentError)
                            else f"layout version {exc.found}"
                        )
                        log.warning("reclaiming segment %s: its header went bad (%s)", name, why)
                        seg.unlink()
                    continue
                seg.unlink()
                if cut is None:
                    log.info("unlinked segment %s", name)
                else:
                    # As `shmcast rm --force` says it: before, only an INFO line
                    # (unseen at the default level) told that a publisher went on
                    # writing versions no reader would ever find.
                    log.warning(
                        "unlinked segment %s although it had a live writer (pid %s), as "
                        "unlink_on_exit asks: it goes on writing into the unlinked object, "
                        "which no reader finds; stop it (a new publisher makes the segment "
                        "anew), or stop the broker without --unlink-on-exit to keep it",
                        name,
                        cut or "unknown",
                    )
            except Exception as exc:  # the other segments are still seen to
                log.warning("segment %s at shutdown: %s", name, exc)
            finally:
                with contextlib.suppress(Exception):
                    seg.close()
        if kept:
            log.info(
                "left %d segment(s) for the next broker: %s",
                len(kept),
                ", ".join(kept[:20]),
            )
        if held:
            time.sleep(UNLINK_HOLD)  # outlast a racing writer's attach retries
            for seg in held:
                seg.close()
