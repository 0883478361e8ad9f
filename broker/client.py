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

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import zmq

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
from .errors import BrokerUnavailableError, ClosedError, ConfigError, NamespaceMismatchError

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
    "Endpoints",
    "check_broker_namespace",
    "namespace_from_env",
    "object_name",
    "pack",
    "reader_endpoint",
    "resolve_endpoint",
    "resolve_namespace",
    "runtime_dir",
    "runtime_root",
    "shm_path",
    "topic",
    "trusted_runtime_dir",
    "unpack",
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


class ControlClient:
    """A DEALER connection to a broker's control endpoint (requests with timeouts).

    Args:
        endpoint: the broker's control endpoint.
        timeout: seconds to wait for each reply.
        context: the ZeroMQ context (the process-wide one by default).
        curve: optional ``(server_public, client_public, client_secret)`` keys (z85).

    Raises:
        ConfigError: ``endpoint`` is not an address ZeroMQ can connect to.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 5.0,
        context: zmq.Context[Any] | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self._closed = True
        self.endpoint = endpoint
        self.timeout = timeout
        self._curve = curve
        sock = self._new_socket(context or zmq.Context.instance())
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
        """
        if self._closed:
            raise ClosedError(f"control connection to {self.endpoint}")
        rid = next(self._ids)
        wait = self.timeout if timeout is None else timeout
        self._sock.send(pack({"op": op, "id": rid, **fields}))
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            # In slices: a timeout of 1e300 s is a long wait, not an OverflowError.
            if left <= 0 or not self._sock.poll(int(min(left, 60.0) * 1000) + 1, zmq.POLLIN):
                if time.monotonic() >= deadline:
                    # The request may still sit in our queue: drop the socket's backlog
                    # by reconnecting so a late broker does not see stale requests.
                    self._reconnect()
                    pid, stopped = _silent_broker(self.endpoint)
                    raise BrokerUnavailableError(self.endpoint, wait, pid=pid, stopped=stopped)
                continue
            reply = unpack(self._sock.recv(), limit=64 * 2**20)
            if reply.get("id") != rid:
                continue  # a late reply to an earlier, timed-out request
            if not reply.get("ok"):
                raise_remote(reply)
            return reply

    def send(self, op: str, **fields: Any) -> bool:
        """Fire and forget (``commit``); never blocks. Returns False when dropped."""
        if self._closed:
            raise ClosedError(f"control connection to {self.endpoint}")
        try:
            self._sock.send(pack({"op": op, **fields}), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        return True

    def _new_socket(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            # connect() refuses at once only what is no endpoint ("garbage", "tcp//h",
            # "foo://x", an ipc path too long): a broker that does not answer is a
            # timeout later. Before, this said "no broker answered ... within 0s;
            # start one", the wrong cause and the wrong fix.
            sock.close(0)
            raise ConfigError(
                "broker",
                f"{self.endpoint!r} is not an endpoint ZeroMQ can connect to "
                f"({exc.strerror}); give the broker's control endpoint as "
                f"ipc:///PATH or tcp://HOST:PORT",
            ) from exc
        return sock

    def _reconnect(self) -> None:
        ctx = self._sock.context
        self._sock.close(0)
        self._sock = self._new_socket(ctx)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except (OSError, ValueError):
            return None, False
        state = data[data.rindex(b")") + 2 :][:1]
        if state == b"Z":
            return None, False
        return pid, state in (b"T", b"t")
    return None, False


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
