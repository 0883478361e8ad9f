"""The upstream side of relays: a broker's data stream over ZeroMQ (``BrokerConfig.data``).

Relays on other hosts connect a DEALER to this ROUTER and are sent the bytes of
every announced version, with its number and commit timestamp, straight from the
segment's read-only slot (``copy=False``: libzmq reads the shared memory itself).

Messages (each a multipart message; relay -> broker bodies are msgpack maps)::

    relay  -> broker  [b"hello", {patterns, window, have: {segment: version},
                                  incarnations: {segment: id}}]
                      [b"ack",   {mids: [int, ...]}]       credit back
                      [b"ping",  {}]                       keeps the peer alive
    broker -> relay   [b"welcome", {epoch, namespace, heartbeat_interval}]
                      [b"data", header, payload]           header: {segment, version,
                            ts, dtype, shape, slots, seq, mid, created,
                            incarnation}; payload: the bytes
                      [b"verdict", {mid, segment, version, ok}]
                      [b"hb", {epoch, ts, latest: {segment: version or None}}]
                      [b"who", {}]                         "say hello again"
                      [b"refused", {reason}]               hello refused (limits)

Torn sends. With ``copy=False`` libzmq's I/O thread reads the slot after
``send()`` has returned, and the writer may come round to that slot meanwhile.
Each data message is therefore sent with a :class:`zmq.MessageTracker`; once the
tracker is done (libzmq has finished with the buffer) the slot's seqlock word is
validated, and a ``verdict`` follows on the same connection (ZeroMQ keeps the
order of one peer's messages). The relay holds the received frame and commits
it only on ``ok``; ``torn`` data is dropped and never reaches a local reader.
A segment whose send was torn is sent from a validated private copy for the next
second, so a writer that always laps the network cannot starve the relays (no
livelock). Copies in flight are bounded (``COPY_BUDGET``): a relay that reads
nothing holds its copy as long as it stays connected, so past the budget sends
are zero-copy again, and a torn one is voided by its verdict as always. pyzmq
copies frames under 64 KiB at ``send()`` anyway (cheaper than tracking); their
tracker is done at once and the rule is the same. While one
zero-copy send of a segment is in the air, the next version of that segment is
not sent to that peer (it would only be torn).

Latest value, bounded. Nothing is queued per version: for each peer the stream
remembers the last version sent per segment, and when the peer has credit it
sends the segment's *latest* version; versions committed meanwhile are skipped
(the relay counts the gaps). A peer has ``window`` unacknowledged data messages
at most, so the memory held in ZeroMQ's pipes is at most ``window`` frames per
peer; unacknowledged credit expires (a connection that died took its acks
along). CONFLATE would not do: it breaks multipart messages and keeps one
message per socket, not one per segment.

Late joiners. A ``hello`` (first contact, or again after the relay heard nothing
for a while) carries the versions the relay already holds; every matching
segment whose latest version is newer is sent at once, so a relay starts from
the current version of every segment. Broker heartbeats (``hb``, with the latest
versions) let the relay tell silence from idleness. They name every segment the
peer wants that the stream serves, so a relay deletes a mirror whose name is
missing: one the stream cannot open for now (out of descriptors) is named with
``None`` as its version, not left out. A peer not heard from for
``peer_timeout`` is forgotten. TCP keepalive is ZeroMQ's ZMTP heartbeat, so a
cut link is noticed and the connection rebuilt on repair. Whoever reaches the
endpoint may flood it: relay messages are taken for at most ``DRAIN_BUDGET`` at a
time, so the heartbeats and sends to the other relays go on meanwhile.

CURVE: with ``curve_secret_key`` set in the broker's configuration the data
endpoint is a CURVE server (encrypted); ``curve_clients`` is the allow-list of
relay public keys (any key that knows the server's when empty). Its ZAP handler
runs in the stream's own ZeroMQ context.

The stream runs in its own thread with its own context and read-only segment
handles; the broker only wakes it (:meth:`DataStream.notify`) when it announces
a version, and on each tick has it compare its handles with the broker's
:class:`~._catalog.Catalog` (:meth:`DataStream.sync`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack
import numpy as np
import zmq

from ._auth import CurveKeys, make_curve_server, start_authenticator
from ._catalog import Catalog
from ._events import clear_ipc_path
from ._layout import dtype_str
from ._protocol import HELLO_ALLOWANCE, MAX_VERSION, ipc_path, pack, unpack
from ._segment import Segment
from .errors import EndpointError, NotASegmentError, ShmcastError

__all__ = ["DataStream", "DataStreamStats"]

log = logging.getLogger(__name__)

#: Unacknowledged data messages a peer may have (its request is capped to this).
MAX_WINDOW = 64
#: Message ids one ack may carry (a relay acks at most the messages it was sent).
MAX_ACK_IDS = 4 * MAX_WINDOW
#: Longest segment pattern a relay may ask for (a segment name has 128 characters
#: at most; a pattern is compiled to a regular expression, its cost grows with it).
MAX_PATTERN_LENGTH = 256
#: Names a relay's match results are kept for (the catalog's, normally).
MAX_MATCHED = 16384
#: A relay's control messages (hello, ack, ping) are small.
MAX_RELAY_MESSAGE = 64 * 1024
#: After a torn send, a segment is sent from validated copies for this long (s).
COPY_AFTER_TORN = 1.0
#: Bytes of private copies the stream holds in flight at most (one copy of any size
#: is always allowed); past it, sends are zero-copy (their verdict still voids a
#: torn one). A relay that reads nothing holds its copy for as long as it is
#: connected: 20 such relays held 20 copies of a 16 MiB segment (320 MiB).
COPY_BUDGET = 256 * 1024 * 1024
#: Seconds between retries of a segment the stream could not open (EMFILE, ...).
ATTACH_RETRY = 0.5
#: Seconds between two log lines about bad messages from relays (all are counted).
BAD_LOG_INTERVAL = 10.0
#: Longest wait before the thread binds its endpoint again after a failure (s).
MAX_BACKOFF = 5.0
#: Frames of a relay's message: the routing id, the kind and the body. ``MAXMSGSIZE``
#: bounds each frame, not their number: a longer message is a bad one, its frames
#: read and dropped as they come (at most ``DISCARD_BUDGET`` a pass), never held.
MAX_RELAY_FRAMES = 3
#: Frames of a message over :data:`MAX_RELAY_FRAMES` thrown away per pass.
DISCARD_BUDGET = 10_000
#: Messages queued per relay connection in the broker; past them the sender's queue
#: fills, and a relay (which never blocks) drops the ack or ping that does not fit:
#: the credit expires, the next ping follows. A relay sends little (a hello, batched
#: acks, pings), but each message may be two frames of up to ``max_message`` +
#: ``HELLO_ALLOWANCE`` bytes: with 1000, four connections sending costly hellos
#: held 680 MiB of the broker.
RELAY_RCVHWM = 16
#: Longest time the thread spends on relays' messages before it looks at its
#: heartbeats, verdicts and sends again (s): a relay's message may cost a few ms
#: (an ack of thousands of ids, a hello with thousands of versions), and a flood
#: of them must not starve the other relays of heartbeats and data.
DRAIN_BUDGET = 0.01


@dataclass
class _Source:
    """The stream's own read-only handle on one segment."""

    seg: Segment
    ino: int
    created: int
    raw: list[np.ndarray[Any, Any]]
    incarnation: int = 0
    copy_until: float = 0.0
    torn: int = 0


@dataclass
class _Peer:
    ident: bytes
    patterns: tuple[str, ...]
    window: int
    sent: dict[str, int] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)
    inflight: dict[int, float] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)
    unsent: dict[str, int] = field(default_factory=dict)  # version its queue refused
    last_seen: float = 0.0
    mid: int = 0

    #: Patterns compiled on first use (None: not yet), and what each name asked
    #: about matched: a relay's patterns are not matched again at every tick, and
    #: never go to ``fnmatch``'s process-wide cache (32768 entries of any size).
    matchers: list[Callable[[str], object]] | None = None
    matched: dict[str, bool] = field(default_factory=dict)

    def wants(self, name: str) -> bool:
        """Whether one of the patterns matches ``name`` (stream and watcher threads)."""
        hit = self.matched.get(name)
        if hit is None:
            matchers = self.matchers
            if matchers is None:
                matchers = [re.compile(fnmatch.translate(p)).match for p in self.patterns]
                self.matchers = matchers
            hit = any(m(name) is not None for m in matchers)
            if len(self.matched) >= MAX_MATCHED:
                self.matched.clear()  # names gone long ago; the live ones come back
            self.matched[name] = hit
        return hit


@dataclass
class _Pending:
    peer: _Peer
    name: str
    version: int
    slot: int
    seq: int
    mid: int
    tracker: zmq.MessageTracker
    src: _Source | None  # None: sent from a validated copy, whole by construction
    copy_bytes: int = 0  # the copy's size, held until the tracker is done


@dataclass(frozen=True)
class DataStreamStats:
    """Counters of the data stream (the broker's metrics and ``stats`` show them).

    ``dropped`` counts versions not sent to a relay because its connection's queue
    was full (each version once per relay; it is tried again until a newer one comes).
    ``up`` is False while the stream's thread is restarting after a failure;
    ``missing`` names the segments of the catalog it could not open (retried);
    ``failures`` counts both, ``last_error`` says the latest.
    """

    endpoint: str
    peers: int
    sent: int
    sent_bytes: int
    torn: int
    copied: int
    dropped: int
    up: bool = True
    restarts: int = 0
    failures: int = 0
    last_error: str = ""
    missing: tuple[str, ...] = ()
    refused: int = 0
    bad_messages: int = 0

    @property
    def healthy(self) -> bool:
        return self.up and not self.missing

    def problem(self) -> str:
        """What is wrong, in a sentence (empty when healthy)."""
        if not self.up:
            return f"the data stream on {self.endpoint} is down, restarting: {self.last_error}"
        if self.missing:
            return (
                f"the data stream on {self.endpoint} cannot open {', '.join(self.missing)} "
                f"(retrying): {self.last_error}"
            )
        return ""


class DataStream:
    """The data endpoint of one broker: call :meth:`start`, then :meth:`close`.

    Args:
        catalog: the broker's catalog; its segments are streamed.
        endpoint: where to bind (``BrokerConfig.data``), e.g. ``tcp://127.0.0.1:5557``.
        epoch: the broker's epoch (sent to relays in ``welcome`` and ``hb``).
        interval: seconds between heartbeats to the relays.
        curve: the broker's CURVE keys, or None for a plain endpoint.
        max_message: largest message taken from a relay (bytes), but for a hello,
            which may take ``HELLO_ALLOWANCE`` more (the versions of a relay's
            mirrors); a longer one is refused, counted as a bad message (one longer
            than a hello may be ends its connection).
        max_relays: relays served at once; the hello of one more is refused.
        max_patterns: segment patterns one relay may ask for (each of
            ``MAX_PATTERN_LENGTH`` characters at most).
    """

    def __init__(
        self,
        catalog: Catalog,
        endpoint: str,
        *,
        epoch: int,
        interval: float,
        curve: CurveKeys | None = None,
        max_message: int = MAX_RELAY_MESSAGE,
        max_relays: int = 64,
        max_patterns: int = 64,
    ) -> None:
        self._closed = True
        self.max_message = max_message
        self.max_relays = max_relays
        self.max_patterns = max_patterns
        self._catalog = catalog
        self.namespace = catalog.namespace
        self.epoch = epoch
        self._curve = curve
        self.configured = endpoint
        self.endpoint = endpoint
        self.interval = interval
        self.peer_timeout = max(5.0, 10 * self.interval)
        self.ack_timeout = max(2.0, 4 * self.interval)
        self._sources: dict[str, _Source] = {}
        self._peers: dict[bytes, _Peer] = {}
        self._pending: list[_Pending] = []
        self._copy_bytes = 0  # bytes of the copies in self._pending
        self._dirty: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._auth: Any = None
        self.sent = 0
        self.sent_bytes = 0
        self.torn = 0
        self.copied = 0
        self.dropped = 0
        self.refused = 0
        self.bad_messages = 0
        self._next_bad_log = 0.0
        self.up = True
        self.restarts = 0
        self.failures = 0
        self.last_error = ""
        self._missing: dict[str, float] = {}  # segment -> when to try opening it again
        self._ipc: tuple[str, int] | None = None  # the socket file we bound, and its inode
        self._discarding = False  # in the middle of a message of too many frames

    # ------------------------------------------------------------------ control

    def start(self) -> str:
        """Bind the endpoint (errors surface here) and start the thread; return the endpoint.

        Raises:
            EndpointError: the endpoint cannot be bound (the message names it).
        """
        curve = self._curve
        ctx: zmq.Context[Any] = zmq.Context()
        self._ctx = ctx
        try:
            if curve is not None:
                self._auth = start_authenticator(ctx, curve.clients)
            router = self._bind_router(self.configured)
            self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            wake_rx = ctx.socket(zmq.PAIR)
            wake_rx.bind("inproc://wake")
            wake_tx = ctx.socket(zmq.PAIR)
            wake_tx.setsockopt(zmq.SNDHWM, 10_000)
            wake_tx.connect("inproc://wake")
        except BaseException:
            self._term()
            self._unlink_ipc()
            raise
        self._wake = wake_tx
        self._closed = False
        self._sync(self._catalog.names())  # before the thread: no shared access
        self._thread = threading.Thread(
            target=self._run, args=(router, wake_rx), name="shmcast-datastream", daemon=True
        )
        self._thread.start()
        log.info("data stream on %s", self.endpoint)
        return self.endpoint

    def _bind_router(self, endpoint: str) -> zmq.Socket[Any]:
        """A new ROUTER bound at ``endpoint``, with the limits and the peer heartbeats.

        Raises:
            EndpointError: it cannot be bound.
        """
        assert self._ctx is not None
        clear_ipc_path("data", endpoint)  # an ipc path's file goes only when stale
        router: zmq.Socket[Any] = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 4 * MAX_WINDOW + 64)
        router.setsockopt(zmq.RCVHWM, RELAY_RCVHWM)
        # A hello may be larger (HELLO_ALLOWANCE); other kinds are held to max_message
        # when they are unpacked.
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message + HELLO_ALLOWANCE)
        ivl = max(100, int(self.interval * 1000))
        router.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl)
        if self._curve is not None:
            make_curve_server(router, self._curve)
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            router.close(0)
            raise EndpointError("data", endpoint, exc.strerror) from exc
        path = ipc_path(router.getsockopt_string(zmq.LAST_ENDPOINT))
        if path is not None and not path.startswith("@"):  # "@": abstract, no file
            # Whoever connects reads every segment: the owner's alone, as control.sock
            # (libzmq leaves the file to the umask: 0775 under umask 002).
            try:
                os.chmod(path, 0o600)
                self._ipc = (path, os.stat(path).st_ino)
            except OSError as exc:
                router.close(0)
                raise EndpointError("data", endpoint, f"cannot chmod {path}: {exc}") from exc
        return router

    def _unlink_ipc(self) -> None:
        """Remove the socket file we bound (libzmq leaves it), if it is still ours."""
        bound, self._ipc = self._ipc, None
        if bound is not None:
            with contextlib.suppress(OSError):
                if os.stat(bound[0]).st_ino == bound[1]:
                    os.unlink(bound[0])

    def wanted(self, name: str) -> bool:
        """Whether a relay takes ``name`` (called from the broker's commit watcher)."""
        return any(peer.wants(name) for peer in list(self._peers.values()))

    def notify(self, name: str) -> None:
        """A version of ``name`` was announced (broker thread; never blocks)."""
        if self._closed:
            return
        with contextlib.suppress(zmq.Again):
            self._wake.send_multipart([b"v", name.encode()], zmq.NOBLOCK)

    def sync(self) -> None:
        """Tell the stream the catalog's current segment names (the broker's tick)."""
        if self._closed:
            return
        names = self._catalog.names()
        with contextlib.suppress(zmq.Again):
            self._wake.send_multipart([b"sync", msgpack.packb(names)], zmq.NOBLOCK)

    def stats(self) -> DataStreamStats:
        return DataStreamStats(
            endpoint=self.endpoint,
            peers=len(self._peers),
            sent=self.sent,
            sent_bytes=self.sent_bytes,
            torn=self.torn,
            copied=self.copied,
            dropped=self.dropped,
            up=self.up and self._thread is not None and self._thread.is_alive(),
            restarts=self.restarts,
            failures=self.failures,
            last_error=self.last_error,
            missing=tuple(sorted(self._missing)),
            refused=self.refused,
            bad_messages=self.bad_messages,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the thread, close the sockets and segment handles. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with contextlib.suppress(zmq.ZMQError):
            self._wake.send_multipart([b"stop", b""], zmq.NOBLOCK)
        if self._thread is not None:
            self._thread.join(10)
        self._wake.close(0)
        self._term()

    def _term(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.destroy(0)
            self._ctx = None

    # ------------------------------------------------------------------ the thread

    def _run(self, router: zmq.Socket[Any], wake: zmq.Socket[Any]) -> None:
        """The thread: serve; after any failure, say so, start over on a new socket.

        Nothing a relay sends, nor a failing system call (EMFILE...), may end it
        silently: each failure is logged, counted (``failures``, ``up``: the
        broker's metrics and ``shmcast health`` show them) and followed by a
        fresh endpoint after a backoff. The peers say hello again by themselves.
        """
        backoff = 0.1
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self._serve(router, wake)
                    return
                except Exception as exc:
                    self._failed(exc)
                    log.exception("data stream on %s failed; restarting it", self.endpoint)
                if time.monotonic() - started > MAX_BACKOFF:
                    backoff = 0.1  # it had served a while: a new failure, not the same one
                router.close(0)
                self._unlink_ipc()
                self._reset_state()
                while not self._stop.wait(backoff):
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    try:
                        router = self._bind_router(self.endpoint)
                    except (EndpointError, zmq.ZMQError, OSError) as exc:
                        self._failed(exc)
                        log.error("data stream cannot bind %s again: %s", self.endpoint, exc)
                        continue
                    self.restarts += 1
                    self.up = True
                    self._sync(self._catalog.names())
                    log.warning("data stream on %s restarted", self.endpoint)
                    break
                else:
                    return
        finally:
            router.close(0)
            self._unlink_ipc()
            wake.close(0)
            self._reset_state()

    def _failed(self, exc: BaseException) -> None:
        self.up = False
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _reset_state(self) -> None:
        for src in self._sources.values():
            src.raw = []
            src.seg.close()
        self._sources.clear()
        self._peers.clear()
        self._pending.clear()
        self._copy_bytes = 0
        self._dirty.clear()
        self._discarding = False  # a new socket: no message half read

    def _serve(self, router: zmq.Socket[Any], wake: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat(router, now)
                next_beat = now + self.interval
            if self._missing and now >= min(self._missing.values()):
                for name in [n for n, t in self._missing.items() if now >= t]:
                    self._attach(name)
            timeout = min(next_beat - now, 0.1)
            if self._pending:
                # A tracker finishes when libzmq lets go of the buffer: wait on the
                # oldest briefly (no busy loop), then look at the sockets again.
                with contextlib.suppress(zmq.NotDone):
                    self._pending[0].tracker.wait(0.0005)
                timeout = 0 if self._pending[0].tracker.done else 0.001
            for sock, _ in poller.poll(max(0, int(timeout * 1000))):
                if sock is wake:
                    self._drain_wake(wake)
                else:
                    self._drain_router(router)
            self._verdicts(router)
            self._schedule(router)

    def _drain_wake(self, wake: zmq.Socket[Any]) -> None:
        for _ in range(10_000):
            try:
                kind, body = wake.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if kind == b"v":
                name = body.decode()
                if name not in self._sources:
                    self._attach(name)
            elif kind == b"sync":
                self._sync([str(n) for n in msgpack.unpackb(body)])

    def _sync(self, names: list[str]) -> None:
        wanted = set(names)
        for name in list(self._missing):
            if name not in wanted:
                del self._missing[name]
        for name in list(self._sources):
            src = self._sources[name]
            try:
                same = os.stat(src.seg.path).st_ino == src.ino
            except OSError:
                same = False
            if name not in wanted or not same:
                self._detach(name)
        for name in wanted - set(self._sources):
            self._attach(name)

    def _attach(self, name: str) -> None:
        try:
            seg = Segment.attach(name, namespace=self.namespace, prefault=False, wait=0.2)
        except ShmcastError as exc:
            self._missing.pop(name, None)  # gone or not a segment: the broker decides
            log.debug("data stream cannot attach %s: %s", name, exc)
            return
        except OSError as exc:
            # EMFILE, ENOMEM...: the broker serves the segment, we cannot: say so, retry.
            if name not in self._missing:
                log.error("data stream cannot open segment %s: %s (retrying)", name, exc)
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._missing[name] = time.monotonic() + ATTACH_RETRY
            return
        try:
            if seg.version > MAX_VERSION:
                raise NotASegmentError(name, seg.path, "its latest version word is corrupt")
            views = [seg.view(i) for i in range(seg.slots)]
            raw = [v.reshape(-1).view(np.uint8) for v in views]
            src = _Source(
                seg=seg,
                ino=os.stat(seg.path).st_ino,
                created=seg.info().created_ns,
                raw=raw,
                incarnation=seg.incarnation,
            )
        except (ShmcastError, OSError) as exc:
            seg.close()
            log.debug("data stream cannot use %s: %s", name, exc)
            return
        if self._missing.pop(name, None) is not None:
            log.warning("data stream streams segment %s again", name)
        self._sources[name] = src
        self._dirty.add(name)
        for peer in self._peers.values():
            self._forget_other_incarnation(peer, name, seg.incarnation)

    @staticmethod
    def _forget_other_incarnation(peer: _Peer, name: str, incarnation: int) -> None:
        """What a relay has of another creation of ``name`` says nothing about this
        one (whose versions started over): send it everything again."""
        if peer.incarnations.get(name, incarnation) != incarnation:
            peer.sent.pop(name, None)
            peer.incarnations.pop(name, None)

    def _detach(self, name: str) -> None:
        self._missing.pop(name, None)
        src = self._sources.pop(name, None)
        if src is not None:
            src.raw = []
            src.seg.close()  # views still in flight keep the mapping alive
        for peer in self._peers.values():
            peer.sent.pop(name, None)
            peer.unsent.pop(name, None)
            peer.matched.pop(name, None)

    def _drain_router(self, router: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        until = now + DRAIN_BUDGET
        for _ in range(1000):
            if time.monotonic() > until:
                return  # the rest waits in the socket: heartbeats and sends go first
            try:
                frames = self._recv(router, now)
            except zmq.Again:
                return
            if frames is None:
                if self._discarding:
                    return  # its rest on the next pass: heartbeats and sends go first
                continue
            if len(frames) < 2:
                continue
            ident, kind = frames[0], frames[1]
            try:
                limit = self.max_message + (HELLO_ALLOWANCE if kind == b"hello" else 0)
                body = unpack(frames[2], limit) if len(frames) > 2 else {}
                self._on_message(router, ident, kind, body, now)
            except (ValueError, TypeError, KeyError) as exc:
                self._bad(exc, now)

    def _bad(self, what: object, now: float) -> None:
        """Count a bad message, and log it once per BAD_LOG_INTERVAL: anyone who
        reaches the endpoint could otherwise fill the broker's log."""
        self.bad_messages += 1
        if now >= self._next_bad_log:
            self._next_bad_log = now + BAD_LOG_INTERVAL
            log.warning("bad message from a relay: %s (%d so far; the next such "
                        "line in %.0f s at the earliest)", what, self.bad_messages,
                        BAD_LOG_INTERVAL)  # fmt: skip

    def _recv(self, router: zmq.Socket[Any], now: float) -> list[bytes] | None:
        """The frames of the next message, or None for one of more than
        :data:`MAX_RELAY_FRAMES` frames: a bad message, dropped, its frames thrown
        away :data:`DISCARD_BUDGET` a call (``_discarding`` until they all are).

        Raises:
            zmq.Again: nothing is queued.
        """
        if self._discarding:
            self._discard(router)
            return None
        frames = [router.recv(zmq.NOBLOCK)]
        while router.getsockopt(zmq.RCVMORE):  # a message comes whole: no Again in it
            if len(frames) == MAX_RELAY_FRAMES:
                self._bad(f"a message of more than {MAX_RELAY_FRAMES} frames, dropped", now)
                self._discarding = True
                self._discard(router)
                return None
            frames.append(router.recv(zmq.NOBLOCK))
        return frames

    def _discard(self, router: zmq.Socket[Any]) -> None:
        for _ in range(DISCARD_BUDGET):
            if not router.getsockopt(zmq.RCVMORE):
                self._discarding = False
                return
            router.recv(zmq.NOBLOCK)

    def _refuse(self, router: zmq.Socket[Any], ident: bytes, reason: str) -> NoReturn:
        """Tell a relay why its hello is refused (it logs it), then count it as bad."""
        self._send(router, ident, b"refused", {"reason": reason})
        raise ValueError(f"refused a relay: {reason}")

    def _on_message(
        self, router: zmq.Socket[Any], ident: bytes, kind: bytes, body: dict[str, Any], now: float
    ) -> None:
        peer = self._peers.get(ident)
        if kind == b"hello":
            patterns = body.get("patterns") or ["*"]
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError("patterns must be a list of strings")
            if len(patterns) > self.max_patterns:
                self._refuse(router, ident, f"{len(patterns)} patterns, over this broker's "
                             f"max_relay_patterns={self.max_patterns}")  # fmt: skip
            long = [p for p in patterns if len(p) > MAX_PATTERN_LENGTH]
            if long:
                self._refuse(router, ident, f"a pattern of {len(long[0])} characters, over "
                             f"{MAX_PATTERN_LENGTH}: {long[0][:40]!r}...")  # fmt: skip
            if peer is None and len(self._peers) >= self.max_relays:
                self.refused += 1
                self._refuse(router, ident, f"already {len(self._peers)} relays, this "
                             f"broker's max_relays")  # fmt: skip
            window = body.get("window", 8)
            if not isinstance(window, int) or window < 1:
                raise ValueError("window must be a positive integer")
            have = body.get("have") or {}
            if not isinstance(have, dict):
                raise ValueError("have must be a map")
            old = peer
            peer = _Peer(ident=ident, patterns=tuple(patterns), window=min(window, MAX_WINDOW))
            if old is not None:
                # A hello again on the same connection: what is in flight still is (its
                # acks and verdicts will come), and message ids go on. A fresh window
                # per hello let a relay that never acks have one more each time.
                peer.inflight, peer.busy, peer.mid = old.inflight, old.busy, old.mid
                if old.patterns == peer.patterns:  # the usual hello again: same patterns
                    peer.matchers, peer.matched = old.matchers, old.matched
            peer.sent = {str(k): int(v) for k, v in have.items() if isinstance(v, int)}
            incs = body.get("incarnations") or {}
            if isinstance(incs, dict):
                peer.incarnations = {str(k): v for k, v in incs.items() if isinstance(v, int)}
            for name, src in self._sources.items():
                self._forget_other_incarnation(peer, name, src.incarnation)
            self._peers[ident] = peer
            # The relay's own strings (any client of the endpoint): written as literals,
            # an escape sequence in one would reach the terminal of the broker's log.
            log.info("relay %s joined for %s", ident.hex(), ", ".join(map(repr, patterns)))
            self._send(
                router,
                ident,
                b"welcome",
                {
                    "epoch": self.epoch,
                    "namespace": self.namespace,
                    "heartbeat_interval": self.interval,
                },
            )
        elif peer is None:
            self._send(router, ident, b"who", {})
            return
        elif kind == b"ack":
            mids = body.get("mids", [])
            if not isinstance(mids, list):
                raise ValueError("mids must be a list")
            if len(mids) > MAX_ACK_IDS:  # a relay acks what it was sent: a window's worth
                raise ValueError(f"an ack of {len(mids)} ids, over {MAX_ACK_IDS}")
            for mid in mids:
                peer.inflight.pop(mid, None)
        peer.last_seen = now

    def _send(self, router: zmq.Socket[Any], ident: bytes, kind: bytes, body: Any) -> bool:
        try:
            router.send_multipart([ident, kind, pack(body)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # A full queue (a peer that does not read) loses this message: a heartbeat
            # or a reply. Not counted in ``dropped``, which counts versions: any client
            # could make that count anything by sending pings and reading nothing.
            if exc.errno == zmq.EHOSTUNREACH:
                self._peers.pop(ident, None)
            return False
        return True

    def _heartbeat(self, router: zmq.Socket[Any], now: float) -> None:
        for ident, peer in list(self._peers.items()):
            if now - peer.last_seen > self.peer_timeout:
                log.info("relay %s is silent; forgotten", ident.hex())
                del self._peers[ident]
                continue
            for mid, t in list(peer.inflight.items()):
                if now - t > self.ack_timeout:
                    del peer.inflight[mid]  # its ack went down with a connection
            # A segment the stream cannot open for now is still served: named (no
            # version), or the relay would take it for deleted and delete its mirror.
            latest: dict[str, int | None] = {n: None for n in self._missing if peer.wants(n)}
            for name, src in self._sources.items():
                if peer.wants(name):
                    with contextlib.suppress(ShmcastError, ValueError):
                        v = src.seg.version
                        if v <= MAX_VERSION:
                            latest[name] = v
            self._send(
                router,
                ident,
                b"hb",
                {"epoch": self.epoch, "ts": time.time_ns(), "latest": latest},
            )

    def _schedule(self, router: zmq.Socket[Any]) -> None:
        if not self._peers:
            return
        for name, src in list(self._sources.items()):
            try:
                latest = src.seg.version
            except (ShmcastError, ValueError):
                continue
            if latest == 0 or latest > MAX_VERSION:  # nothing yet, or a corrupt header
                continue
            for peer in list(self._peers.values()):
                if (
                    latest > peer.sent.get(name, 0)
                    and name not in peer.busy
                    and len(peer.inflight) < peer.window
                    and peer.wants(name)
                ):
                    self._send_latest(router, peer, name, src)

    def _send_latest(self, router: zmq.Socket[Any], peer: _Peer, name: str, src: _Source) -> None:
        seg = src.seg
        try:
            v, slot, seq, ts = seg.acquire()
        except ShmcastError:
            return
        now = time.monotonic()
        payload: Any
        zero_copy = now >= src.copy_until or (
            self._copy_bytes > 0 and self._copy_bytes + seg.nbytes > COPY_BUDGET
        )
        if zero_copy:
            payload = src.raw[slot]
        else:
            payload = src.raw[slot].copy()
            if not seg.validate(slot, seq):
                return  # try again on the next pass, with a newer version
            self.copied += 1
        peer.mid += 1
        mid = peer.mid
        header = {
            "segment": name,
            "version": v,
            "ts": ts,
            "dtype": dtype_str(seg.dtype),
            "shape": list(seg.shape),
            "slots": seg.slots,
            "seq": seq,
            "mid": mid,
            "created": src.created,
            "incarnation": src.incarnation,
        }
        try:
            tracker = router.send_multipart(
                [peer.ident, b"data", pack(header), payload],
                zmq.NOBLOCK,
                copy=False,
                track=True,
            )
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._peers.pop(peer.ident, None)
            elif peer.unsent.get(name) != v:  # tried again at each pass: counted once
                peer.unsent[name] = v
                self.dropped += 1
            return
        assert tracker is not None
        peer.sent[name] = v
        peer.inflight[mid] = now
        peer.busy.add(name)
        self.sent += 1
        self.sent_bytes += seg.nbytes
        copy_bytes = 0 if zero_copy else seg.nbytes
        self._copy_bytes += copy_bytes
        self._pending.append(
            _Pending(peer, name, v, slot, seq, mid, tracker, src if zero_copy else None, copy_bytes)
        )

    def _verdicts(self, router: zmq.Socket[Any]) -> None:
        if not self._pending:
            return
        still = []
        for p in self._pending:
            if not p.tracker.done:
                still.append(p)
                continue
            self._copy_bytes -= p.copy_bytes  # libzmq let go of it
            ok = True
            if p.src is not None:
                try:
                    # libzmq is done reading the slot: was it rewritten meanwhile?
                    ok = p.src.seg.validate(p.slot, p.seq)
                except (ShmcastError, ValueError):
                    ok = False
                if not ok:
                    self.torn += 1
                    p.src.torn += 1
                    p.src.copy_until = time.monotonic() + COPY_AFTER_TORN
            p.peer.busy.discard(p.name)
            self._send(
                router,
                p.peer.ident,
                b"verdict",
                {"mid": p.mid, "segment": p.name, "version": p.version, "ok": ok},
            )
        self._pending = still
