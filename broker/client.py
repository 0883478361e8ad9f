"""The client side of a broker: what publishers, subscribers, relays and tools use.

- :class:`ControlClient`: requests to a broker's control endpoint, with timeouts.
- :class:`Endpoints` and :func:`resolve_endpoint`: where a namespace's broker listens
  (its runtime directory checked first: :func:`trusted_runtime_dir`);
  :func:`reader_endpoint`: the read-only control socket for a reader who may not
  open the owner's.
- :func:`check_broker_namespace`: the ``hello`` that tells a broker of another
  namespace (an endpoint given explicitly) before anything is asked of it.
- :func:`resolve_namespace`: ``None`` means ``$SHMCAST_NAMESPACE``, else ``"default"``
  (the one place the environment is read, at call time).
- Names and places: :func:`shm_path` of a segment's object in :data:`SHM_DIR`,
  :func:`runtime_dir` of a namespace (its sockets and lock).
- The announcement wire format: :func:`topic`, :data:`BROKER_TOPIC`, :func:`unpack`.

Every name here is public; nothing outside ``shmcast.broker`` imports its
private modules.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, NoReturn

import zmq
from zmq.utils import z85

from ._auth import is_z85_key
from ._closing import Closing
from ._context import context as shmcast_context
from ._context import open_socket
from ._lease import pid_namespace, process_start_time, process_stat, process_state, process_uid
from ._names import (
    DEFAULT_NAMESPACE,
    NAMESPACE_ENV,
    SHM_DIR,
    namespace_from_env,
    object_name,
    resolve_namespace,
    runtime_dir,
    runtime_root,
    shm_path,
    trusted_runtime_dir,
    validate_metrics_host,
    validate_namespace,
    validate_seconds,
    validate_segment_name,
)
from ._protocol import (
    BROKER_TOPIC,
    HELLO_ALLOWANCE,
    MAX_REQUEST,
    MAX_VERSION,
    ipc_path,
    pack,
    raise_remote,
    topic,
    unpack,
)
from .errors import (
    BrokerHandshakeError,
    BrokerUnavailableError,
    ClosedError,
    ConfigError,
    NamespaceMismatchError,
    OutOfDescriptorsError,
)

__all__ = [
    "BROKER_TOPIC",
    "CONTROL_RO_SOCK",
    "CONTROL_SOCK",
    "DEFAULT_NAMESPACE",
    "EVENTS_SOCK",
    "HELLO_ALLOWANCE",
    "MAX_REQUEST",
    "MAX_VERSION",
    "NAMESPACE_ENV",
    "SHM_DIR",
    "ControlClient",
    "CurveKeyTriple",
    "Endpoints",
    "check_broker_namespace",
    "client_curve",
    "namespace_from_env",
    "object_name",
    "open_socket",
    "pack",
    "reader_endpoint",
    "reporter_identity",
    "reporter_stopped",
    "resolve_endpoint",
    "resolve_namespace",
    "runtime_dir",
    "runtime_root",
    "shm_path",
    "shmcast_context",
    "topic",
    "trusted_runtime_dir",
    "unpack",
    "validate_metrics_host",
    "validate_namespace",
    "validate_seconds",
    "validate_segment_name",
]


#: File names of the default ipc endpoints in a namespace's runtime directory.
CONTROL_SOCK, CONTROL_RO_SOCK, EVENTS_SOCK = "control.sock", "control-ro.sock", "events.sock"


@dataclass(frozen=True)
class Endpoints:
    """Where a namespace's broker listens: ``control`` serves every request to the
    namespace's owner (writers), ``control_ro`` only the requests of readers."""

    control: str
    events: str
    control_ro: str | None = None

    @classmethod
    def default(cls, namespace: str) -> Endpoints:
        d = runtime_dir(namespace)
        return cls(
            control=f"ipc://{d}/{CONTROL_SOCK}",
            events=f"ipc://{d}/{EVENTS_SOCK}",
            control_ro=f"ipc://{d}/{CONTROL_RO_SOCK}",
        )


def resolve_endpoint(broker: str | None, namespace: str) -> str:
    """The control endpoint to use: ``broker`` when given, else the namespace's ipc one.

    The default lives in this user's runtime directory, which is checked first
    (made owner-only when missing), so a directory someone else made cannot lead
    us to their broker.

    Raises:
        OwnershipError: the runtime directory is not this user's own, owner-only.
    """
    if broker:
        return broker
    trusted_runtime_dir(namespace)
    return Endpoints.default(namespace).control


def reader_endpoint(endpoint: str) -> str:
    """The control endpoint a reader can open: ``endpoint``, or for an ipc owner
    socket this process may not open (a reader of a group the broker shares its
    namespace with), the read-only socket beside it."""
    path = ipc_path(endpoint)
    if path is None or os.path.basename(path) != CONTROL_SOCK or os.access(path, os.W_OK):
        return endpoint
    ro = os.path.join(os.path.dirname(path), CONTROL_RO_SOCK)
    return f"ipc://{ro}" if os.access(ro, os.W_OK) else endpoint


#: A client's CURVE keys: ``(server_public, client_public, client_secret)``, each
#: z85 text (what :func:`~shmcast.broker.curve_keypair` makes) or its ASCII bytes.
CurveKeyTriple = tuple[str | bytes, str | bytes, str | bytes]


def client_curve(curve: object) -> tuple[bytes, bytes, bytes] | None:
    """``curve`` (a :data:`CurveKeyTriple`, or None) as ZeroMQ takes it: bytes.

    Raises:
        ConfigError: not three keys, or one that is not a 40-character z85 key
            (named), or a client_public that is not client_secret's. Before, text
            keys (``curve_keypair()``'s, as the README shows) failed with ZeroMQ's
            TypeError "unicode not allowed".
    """
    if curve is None:
        return None
    names = ("server_public", "client_public", "client_secret")
    if not isinstance(curve, (tuple, list)) or len(curve) != 3:
        raise ConfigError(
            "curve", "give (server_public, client_public, client_secret): three z85 keys"
        )
    keys: list[bytes] = []
    for name, key in zip(names, curve, strict=True):
        if isinstance(key, bytes) and len(key) == 32:  # a binary key, as ZeroMQ takes it
            keys.append(key)
            continue
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not is_z85_key(text):
            raise ConfigError("curve", f"{name} is not a 40-character z85 CURVE key")
        keys.append(text.encode("ascii"))
    public, secret = (k if len(k) == 40 else z85.encode(k) for k in keys[1:])
    if zmq.has("curve") and zmq.curve_public(secret) != public:
        # Every handshake then fails, and the broker can only close the connection:
        # before, the timeout asked whether the *server* key was right.
        raise ConfigError(
            "curve",
            "client_public is not the public key of client_secret (keys of two pairs, "
            "or the two swapped): give one pair, as curve_keypair() makes it (a keys "
            "file's curve_public_key and curve_secret_key)",
        )
    return keys[0], keys[1], keys[2]


#: The events a connection's monitor reports: its handshakes' outcomes, and whether
#: a peer took the connection at all (connected, disconnected).
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
)
#: ZMTP_MECHANISM_MISMATCH: one side speaks CURVE, the other not.
_MECHANISM_MISMATCH = int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)


_monitor_ids = itertools.count(1)
#: Seconds between two reads of a connection's handshake events by ``send`` (a
#: publisher's commits, a subscriber's reports): a client that only sends keeps few;
#: and by the process's reader of idle clients' events (:class:`_IdleMonitors`).
DRAIN_EVERY = 1.0


class _IdleMonitors:
    """One thread per process, alive while some client's handshake monitor is, that
    reads the monitor events of the clients that read none themselves (neither a
    request nor a send: a client made and kept for later, or one whose request
    timed out, which made a new monitor), every :data:`DRAIN_EVERY` seconds.

    The pipe from ZeroMQ's I/O thread to a monitor has no bound (it must have none:
    see :func:`_handshake_monitor`), and each reconnection queues about three
    events: an idle client at an endpoint that accepts and drops every connection
    (a port forwarder whose broker is down, a broker restarting over and over) grew
    by about 680 bytes a reconnection (7 a second at ZeroMQ's default interval), for
    as long as it lived. A client's own thread reading its events meanwhile is left
    to it (its lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: weakref.WeakSet[ControlClient] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def forked(self) -> None:
        """In a forked child: the parent's clients are not its own to read (their
        sockets are the parent's), nor is the parent's thread here, and the lock may
        have been held by that thread at the fork (a new one, or the child's first
        client waited for ever)."""
        self._lock = threading.Lock()
        self._clients = weakref.WeakSet()
        self._thread = None
        self._pid = os.getpid()

    def watch(self, client: ControlClient) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self.forked()  # (a fork hook that did not run: os.fork is not all)
            self._clients.add(client)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="shmcast-handshakes", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(DRAIN_EVERY)
            with self._lock:
                live = [c for c in self._clients if c._monitor is not None]
                if not live:
                    self._clients = weakref.WeakSet()
                    self._thread = None
                    return
                self._clients = weakref.WeakSet(live)
            for client in live:
                client._drain_idle()
            # No reference kept while asleep: a client dropped by its user meanwhile
            # is collected (and closed) as it would be without this thread.
            del live, client


_idle_monitors = _IdleMonitors()
os.register_at_fork(after_in_child=_idle_monitors.forked)


def _handshake_monitor(sock: zmq.Socket[Any]) -> zmq.Socket[Any] | None:
    """A PAIR socket receiving ``sock``'s handshake events, or None (a libzmq without
    monitors: a failed handshake then reads as no reply). Its address is unique in
    the process: pyzmq's default names it after the socket's descriptor, which a
    socket made while a closed one's monitor is still being torn down may reuse
    (the address in use: no monitor)."""
    addr = f"inproc://shmcast.handshakes.{os.getpid()}.{next(_monitor_ids)}"
    try:
        sock.monitor(addr, _HANDSHAKE_EVENTS)
    except zmq.ZMQError:
        return None
    try:
        mon = open_socket(sock.context, zmq.PAIR, "a handshake monitor")
    except (zmq.ZMQError, OutOfDescriptorsError):  # the socket cap met: none, as above
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        return None
    mon.setsockopt(zmq.LINGER, 0)
    # No high-water mark on the way to us (0 on either end of an inproc pipe: none).
    # ZeroMQ's I/O thread sends each event with a blocking send: once the pipe held
    # its 2000 (a client left open at an endpoint that accepts and drops every
    # connection, each reconnect a failed handshake), that thread blocked, and every
    # socket of the process's context with it, for ever. Our end reads the events
    # at each request and send (ControlClient._drain_handshakes), and those of a
    # client doing neither once a second (_IdleMonitors), so few wait.
    mon.setsockopt(zmq.RCVHWM, 0)
    try:
        mon.connect(addr)
    except zmq.ZMQError:
        mon.close(0)
        return None
    return mon


class ControlClient(Closing):
    """A DEALER connection to a broker's control endpoint (requests with timeouts).

    Args:
        endpoint: the broker's control endpoint.
        timeout: seconds to wait for each reply.
        context: the ZeroMQ context (by default shmcast's own, process-wide: its
            socket cap raised to the open-files limit; see ``_context``). One given
            keeps its own cap (``zmq.MAX_SOCKETS``, 1023 unless set): a client takes
            3 sockets of it while its handshake monitor lives, 1 after.
        curve: optional ``(server_public, client_public, client_secret)`` keys (z85
            text or bytes: :data:`CurveKeyTriple`).

    A TCP or ipc endpoint's connection is watched for a failed ZeroMQ handshake (a
    ZeroMQ socket monitor: handshakes, connections made and lost; stopped at the
    first reply): a request that times out after one raises
    :class:`BrokerHandshakeError`, saying what to fix (a CURVE broker and no
    keys given, keys it does not allow, keys for a broker without CURVE, or an
    endpoint that is no broker's control endpoint), rather than "no broker
    answered".

    Close it (``close()``, or a ``with`` block). One collected while still open
    warns (``ResourceWarning``) and closes then as ``close()`` does, its handshake
    monitor stopped first: before, the collection closed the monitor's end before
    its socket, and a handshake reported in between (a connection being made again)
    hung ZeroMQ's I/O thread, and every socket of the process with it.

    Raises:
        ConfigError: ``endpoint`` is not an address ZeroMQ can connect to.
        OutOfDescriptorsError: the context's socket cap is met, or the process's
            file descriptors (an ``OSError``, errno ``EMFILE``).
        ValueError: ``timeout`` is not a finite number of seconds > 0 (nor a
            request's).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 5.0,
        context: zmq.Context[Any] | None = None,
        curve: CurveKeyTriple | None = None,
    ) -> None:
        self._closed = True
        self.endpoint = endpoint
        # Before: NaN raised "cannot convert float NaN to integer" at the first
        # request, and a timeout <= 0 said the live broker was "busy or hung" (kill it).
        self.timeout = validate_seconds("timeout", timeout, positive=True)
        self._curve = client_curve(curve)
        self._monitor: zmq.Socket[Any] | None = None
        #: The latest handshake failure the monitor reported on this connection
        #: (event, value), None when none did or one succeeded after it.
        self._handshake: tuple[int, int] | None = None
        #: How far the connection got, as the monitor last said: None (no peer took
        #: it, or it was lost), "connected" (a peer took it: no ZeroMQ greeting yet),
        #: "handshake" (ZeroMQ's handshake done).
        self._link: str | None = None
        self._next_drain = 0.0
        self._pid = os.getpid()
        #: Held to read or stop the handshake monitor: the process's reader of idle
        #: clients' events (_IdleMonitors) may be at it. Reentrant: close() from a
        #: signal handler may interrupt a read of this thread's.
        self._mon_lock = threading.RLock()
        sock = self._new_socket(context or shmcast_context())
        self._sock = sock
        self._ids = itertools.count(1)
        self.dropped = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send a request and return the reply map.

        Raises:
            BrokerUnavailableError: no reply within the timeout.
            ShmcastError: the broker's error, rebuilt (see :func:`raise_remote`).
            ValueError: ``timeout`` is not a finite number of seconds > 0.
        """
        if self._closed:
            raise ClosedError(f"control connection to {self.endpoint}")
        if self._monitor is not None:
            self._drain_handshakes()
        wait = (
            self.timeout if timeout is None else validate_seconds("timeout", timeout, positive=True)
        )
        rid = next(self._ids)
        try:
            return self._request(pack({"op": op, "id": rid, **fields}), rid, wait)
        except zmq.ZMQError:
            # close() from a signal handler interrupting this wait (or from another
            # thread): before, ZeroMQ's "Socket operation on non-socket" came out.
            if self._closed:
                raise ClosedError(f"control connection to {self.endpoint}") from None
            raise

    def _request(self, msg: bytes, rid: int, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        self._send_by(msg, deadline, wait)
        while True:
            left = deadline - time.monotonic()
            # In slices: a timeout of 1e300 s is a long wait, not an OverflowError.
            if left <= 0 or not self._sock.poll(int(min(left, 60.0) * 1000) + 1, zmq.POLLIN):
                if time.monotonic() >= deadline:
                    self._no_reply(wait)
                continue
            reply = unpack(self._sock.recv(), limit=64 * 2**20)
            if self._monitor is not None:
                # A broker answered: the handshake monitor has served (it explains a
                # request that timed out before any reply). Kept, it queued one event
                # per reconnection unread, and ZeroMQ's I/O thread, which sends them
                # with a blocking send, hung once the queue was full (about 2000
                # reconnections: a flapping broker), and every socket of the process
                # with it. A reconnect after a timeout makes a new one.
                self._stop_monitor(self._sock)
            if reply.get("id") != rid:
                continue  # a late reply to an earlier, timed-out request
            if not reply.get("ok"):
                raise_remote(reply, self.endpoint)
            return reply

    def _send_by(self, msg: bytes, deadline: float, wait: float) -> None:
        """Queue ``msg``, waiting until ``deadline`` at most. A DEALER whose
        connection failed its handshake for a protocol error (a CURVE broker and a
        client without keys) has no pipe to queue on: a blocking send waited for
        ever there (``shmcast top`` hung on its second request)."""
        while True:
            try:
                self._sock.send(msg, zmq.NOBLOCK)
                return
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._no_reply(wait)
                self._sock.poll(int(min(left, 60.0) * 1000) + 1, zmq.POLLOUT)

    def _no_reply(self, wait: float) -> NoReturn:
        if self._closed:
            # Closed under the wait (a signal handler): no new socket (it would be
            # left open, its handshake monitor live, by a closed client).
            raise ClosedError(f"control connection to {self.endpoint}")
        why = self._handshake_problem()
        link = self._link
        # The request may still sit in our queue: drop the socket's backlog by
        # reconnecting so a late broker does not see stale requests.
        self._reconnect()
        path = ipc_path(self.endpoint)
        if why is None and path is not None and os.path.basename(path) == EVENTS_SOCK:
            # A broker's events socket (ZeroMQ refuses a DEALER there, reporting no
            # handshake): before, this said the live broker holding the lock beside it
            # was "busy or hung" and to kill it.
            control = os.path.join(os.path.dirname(path), CONTROL_SOCK)
            why = (
                f"{EVENTS_SOCK} is a broker's events endpoint, which takes no requests: "
                f"give its control endpoint, ipc://{control}"
            )
        if why is not None:
            raise BrokerHandshakeError(self.endpoint, wait, why)
        pid, stopped = _silent_broker(self.endpoint)
        # A peer that took the connection (a TCP broker SIGSTOPped, hung): before,
        # "no broker answered ...; start one", as for an address nobody listens on.
        reached = link if pid is None else None
        # Another user's broker: `kill -CONT` takes that user or root (before, the
        # advice was given as if the caller could).
        uid = process_uid(pid) if pid is not None else None
        raise BrokerUnavailableError(
            self.endpoint, wait, pid=pid, stopped=stopped, reached=reached, uid=uid
        )

    def send(self, op: str, **fields: Any) -> bool:
        """Fire and forget (``commit``); never blocks. Returns False when dropped."""
        if self._closed:
            raise ClosedError(f"control connection to {self.endpoint}")
        if self._monitor is not None and time.monotonic() >= self._next_drain:
            self._next_drain = time.monotonic() + DRAIN_EVERY
            self._drain_handshakes()
        try:
            self._sock.send(pack({"op": op, **fields}), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        return True

    def _new_socket(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        sock = open_socket(ctx, zmq.DEALER, f"a control connection to {self.endpoint}")
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        # Before the connect: from its first handshake. ipc too: a CURVE broker's
        # default endpoints (ipc) refuse a client without keys as its TCP ones do.
        if self.endpoint.startswith(("tcp://", "ipc://")):
            with self._mon_lock:
                self._monitor = _handshake_monitor(sock)
            if self._monitor is not None:
                _idle_monitors.watch(self)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            # connect() refuses at once only what is no endpoint ("garbage", "tcp//h",
            # "foo://x", an ipc path too long): a broker that does not answer is a
            # timeout later. Before, this said "no broker answered ... within 0s;
            # start one", the wrong cause and the wrong fix.
            self._close_socket(sock)
            raise ConfigError(
                "broker",
                f"{self.endpoint!r} is not an endpoint ZeroMQ can connect to "
                f"({exc.strerror}); give the broker's control endpoint as "
                f"ipc:///PATH or tcp://HOST:PORT",
            ) from exc
        return sock

    def _handshake_problem(self) -> str | None:
        """What the latest failed handshake of this connection says (the monitor's
        events so far, read without waiting), or None: none failed, or one succeeded
        after."""
        if self._monitor is None:
            return None
        self._drain_handshakes()
        if self._handshake is None:
            return None
        event, value = self._handshake
        fix = (
            "give the broker's public key and a client key pair it lets in "
            "(shmcast: --curve-keys FILE or $SHMCAST_CURVE_KEYS; the library: "
            "curve=(server_public, client_public, client_secret))"
        )
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                f"the broker refused this client's CURVE key (ZAP status {value}): list "
                "its public key in the broker's curve_clients (or curve_readers)"
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            if self._curve is not None:
                return (
                    "the endpoint does not speak CURVE: connect without CURVE keys "
                    "(shmcast: no --curve-keys, and $SHMCAST_CURVE_KEYS unset; the "
                    "library: curve=None)"
                )
            return (
                "the endpoint wants CURVE (a broker with curve_secret_key) and this "
                f"client gave no CURVE keys: {fix}"
            )
        # Any other failure: the peer closed the connection during the handshake, or
        # spoke no ZeroMQ. Before, this said only "it is likely a broker with
        # curve_secret_key" (or, with keys, only to check the server key), where the
        # endpoint may be a port forwarder whose broker is down, another service, or
        # a broker's events endpoint.
        elsewhere = (
            "another service, a broker's events endpoint, or a "
            "port forwarder (docker-proxy, ssh -L) whose broker is down"
        )
        if self._curve is None:
            # A CURVE broker's ipc endpoint may close a connection before ZeroMQ
            # reads its mechanism (a mismatch), so either cause is named.
            return (
                "the endpoint closed the connection during ZeroMQ's handshake: either "
                "it wants CURVE (a broker with curve_secret_key) and this client gave no "
                f"CURVE keys: {fix}; or it is no broker's control endpoint ({elsewhere}): "
                "give the broker's control endpoint, and check that the broker runs"
            )
        return (
            "the endpoint refused the CURVE handshake: is the server key the broker's "
            "public key (curve_public_key of its curve_secret_key)? Else it is no "
            f"broker's control endpoint ({elsewhere})"
        )

    def _drain_handshakes(self) -> None:
        """Read the monitor's events so far, without waiting, into ``_handshake``: the
        pipe from ZeroMQ's I/O thread has no bound (see :func:`_handshake_monitor`),
        and what we read is not kept there."""
        with self._mon_lock:
            self._drain_locked()

    def _drain_idle(self) -> None:
        """Read the events so far for a client whose thread reads none (from
        :class:`_IdleMonitors`' thread), unless that thread is at it."""
        if self._pid != os.getpid() or not self._mon_lock.acquire(blocking=False):
            return
        try:
            self._drain_locked()
        finally:
            self._mon_lock.release()

    def _drain_locked(self) -> None:
        mon = self._monitor
        if mon is None:
            return
        try:
            while mon.poll(0, zmq.POLLIN):
                frames = mon.recv_multipart(zmq.NOBLOCK)
                event, value = struct.unpack("=HI", frames[0][:6])
                if event == zmq.EVENT_CONNECTED:
                    self._link = "connected"
                elif event == zmq.EVENT_DISCONNECTED:
                    self._link = None
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._link = "handshake"
                    self._handshake = None
                elif event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL or self._handshake is None:
                    # A connection closed with no detail does not hide what an earlier
                    # one told (a CURVE broker's ipc endpoint does both).
                    self._handshake = (event, value)
        except (zmq.ZMQError, struct.error):
            pass

    def _close_socket(self, sock: zmq.Socket[Any], linger: int = 0) -> None:
        """Close ``sock`` (``linger`` ms) and its handshake monitor, which is stopped
        first: ``disable_monitor`` returns once the socket will send it no more
        events. Before, our end was closed while the socket's connection could still
        report a handshake from ZeroMQ's I/O thread, and that thread then hung,
        taking every socket of the process's context with it: after about 50
        clients timing out against a CURVE endpoint, no new connection was made
        and none closed (the file descriptors of each left open)."""
        self._stop_monitor(sock)
        sock.close(linger)

    def _stop_monitor(self, sock: zmq.Socket[Any]) -> None:
        """Stop ``sock``'s handshake monitor, then close our end of it."""
        with self._mon_lock:
            mon, self._monitor = self._monitor, None
            self._handshake = self._link = None  # the next connection's starts afresh
            if mon is not None:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
                mon.close(0)

    def _reconnect(self) -> None:
        ctx = self._sock.context
        self._close_socket(self._sock)
        self._sock = self._new_socket(ctx)

    def close(self, linger: float = 0.0) -> None:
        """Close the connection; what is still queued may take ``linger`` seconds to
        leave, in ZeroMQ's I/O thread (this returns at once).

        Raises:
            ValueError: ``linger`` is not a finite number of seconds >= 0; the
                connection stays open. Before, NaN or infinity raised from the
                conversion after the client was marked closed: its socket (and
                handshake monitor) stayed open for good, a second close() doing
                nothing.
        """
        if self._closed:
            return
        ms = int(min(validate_seconds("linger", linger) * 1000, 2**31 - 1))
        self._closed = True
        if os.getpid() != self._pid:
            # A forked child's copy (closed, or collected at its exit): the sockets
            # are the parent's, which pyzmq's close leaves alone; stopping the
            # monitor called into libzmq on them (its locks as the fork found them).
            return
        self._close_socket(self._sock, ms)

    def _unclosed(self) -> str:
        return f"control connection to {self.endpoint} was not closed"


def _silent_broker(endpoint: str) -> tuple[int | None, bool]:
    """The pid of the live process holding the broker lock (``broker.lock``) beside
    an ipc control ``endpoint``, and whether it is stopped; ``(None, False)`` when
    none does (no broker: the usual "start one" is right).

    Read from ``/proc/locks`` (the kernel's table of ``flock`` locks, by device and
    inode), never by taking the lock: a probe holding it for a moment would make a
    broker starting just then refuse to start.
    """
    if not endpoint.startswith("ipc://"):
        return None, False
    lock = os.path.join(os.path.dirname(endpoint[len("ipc://") :]), "broker.lock")
    try:
        st = os.stat(lock, follow_symlinks=False)
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return None, False
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (a waiter's has "->" second)
        parts = line.split()
        if len(parts) < 6 or parts[1:4] != ["FLOCK", "ADVISORY", "WRITE"] or parts[5] != where:
            continue
        try:
            pid = int(parts[4])
        except ValueError:
            return None, False
        state = process_state(pid)
        if state is None or state == b"Z":
            return None, False
        return pid, state in (b"T", b"t")
    return None, False


_identity: tuple[int, dict[str, int]] | None = None


def reporter_identity() -> dict[str, int]:
    """What a subscriber's report adds to its pid so that ``shmcast top`` can tell,
    once the reports stop, whether that very process is stopped (SIGSTOP, Ctrl-Z, a
    debugger) rather than gone: ``pidns``, the inode of its pid namespace, and
    ``started``, its start time in clock ticks since boot (a pid used again is
    another process). Either is left out when ``/proc`` cannot tell it."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:  # taken once per process (a fork: again)
        ident: dict[str, int] = {}
        ns = pid_namespace()
        if ns is not None:
            ident["pidns"] = ns
        with contextlib.suppress(OSError, ValueError, IndexError):
            ident["started"] = process_start_time(pid)
        _identity = (pid, ident)
    return dict(_identity[1])


def reporter_stopped(report: dict[str, Any]) -> bool:
    """Whether the process of a subscriber's report (the broker's ``subscribers``
    reply) is alive and stopped (state ``T`` or ``t``), seen from this process: its
    ``pidns`` is ours and its pid's start time is its ``started``. False when any of
    it is missing or differs (another pid namespace, a report of an older
    subscriber): this process cannot see that one."""
    pid, ns, started = report.get("pid"), report.get("pidns"), report.get("started")
    if not (isinstance(pid, int) and isinstance(ns, int) and isinstance(started, int)):
        return False
    if isinstance(pid, bool) or pid <= 0 or ns != pid_namespace():
        return False
    try:
        state, start = process_stat(pid)  # one read: the state is that process's
    except (OSError, ValueError, IndexError):
        return False
    return start == started and state in (b"T", b"t")


def check_broker_namespace(client: ControlClient, namespace: str) -> dict[str, Any]:
    """Send ``hello``; the reply, once it names ``namespace``.

    Call it once, right after connecting, where a client acts on a namespace
    through a broker: an endpoint given explicitly (``broker=``,
    ``$SHMCAST_BROKER``) may be another namespace's broker, which would then
    create, delete or list its own segments in place of the ones asked for.

    Raises:
        NamespaceMismatchError: the broker serves another namespace.
        BrokerUnavailableError: no reply within the client's timeout.
    """
    hello = client.request("hello")
    served = hello.get("namespace")
    if served != namespace:
        raise NamespaceMismatchError(client.endpoint, served, namespace)
    return hello
