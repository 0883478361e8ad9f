"""Wire messages of the control plane and the announcements (ZeroMQ + msgpack).

Control (client DEALER -> broker ROUTER): one frame, a msgpack map
``{"op": str, "id": int, ...}``; the reply is one frame
``{"id": int, "ok": True, ...}`` or ``{"id": int, "ok": False, "error": kind,
"message": str}``. ``commit`` is one-way unless it carries ``"ack": True``;
``report`` (a subscriber's counters, about once a second) is always one-way, and
``subscribers`` returns the reports heard in the last few seconds.

Events (broker PUB -> SUB): two frames, ``[topic, body]``. The topic is the
segment name followed by a NUL byte (``b"ticks\\0"``), so a subscription to
``a`` (``b"a\\0"``) never matches ``ab``; broker-wide messages use
``BROKER_TOPIC``, which no segment name can spell. The body is a msgpack map
``{"kind", "segment", "version", "ts", "epoch", "seq", "tseq"}``: ``seq`` counts
every event of the broker, ``tseq`` the events of one topic, so a subscriber sees
gaps in what it subscribed to.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from ._names import runtime_dir
from .errors import (
    BrokerUnavailableError,
    ClosedError,
    InvalidNameError,
    LayoutConflictError,
    LayoutError,
    RemoteError,
    SegmentExistsError,
    SegmentNotFoundError,
    ShmcastError,
    ShmSpaceError,
    WriterBusyError,
)

MAX_REQUEST = 64 * 1024
BROKER_TOPIC = b"@broker\0"


def topic(segment: str) -> bytes:
    return segment.encode("utf-8") + b"\0"


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes, limit: int = MAX_REQUEST) -> dict[str, Any]:
    """Decode one message body; raises ValueError for anything but a bounded str-keyed map."""
    if len(data) > limit:
        raise ValueError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage
        raise ValueError(f"not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"expected a map, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class Endpoints:
    """Where a namespace's broker listens."""

    control: str
    events: str

    @classmethod
    def default(cls, namespace: str) -> Endpoints:
        d = runtime_dir(namespace)
        return cls(control=f"ipc://{d}/control.sock", events=f"ipc://{d}/events.sock")


def error_reply(exc: BaseException) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    for attr in ("segment", "existing", "requested", "pid", "needed", "free"):
        val = getattr(exc, attr, None)
        if isinstance(val, (int, str)):
            reply[attr] = val
    return reply


def raise_remote(reply: dict[str, Any]) -> None:
    """Turn an error reply back into the error the broker raised, where we know it."""
    kind = str(reply.get("error", "RemoteError"))
    msg = str(reply.get("message", "the broker reported an error"))
    seg = str(reply.get("segment", "?"))
    exc: ShmcastError
    if kind == "LayoutConflictError":
        exc = LayoutConflictError(seg, str(reply.get("existing")), str(reply.get("requested")))
    elif kind == "WriterBusyError":
        pid = reply.get("pid")
        exc = WriterBusyError(seg, pid if isinstance(pid, int) else None)
    elif kind == "ShmSpaceError":
        exc = ShmSpaceError(seg, int(reply.get("needed", 0)), int(reply.get("free", 0)))
    elif kind == "SegmentNotFoundError":
        exc = SegmentNotFoundError(seg, str(reply.get("namespace", "?")))
        exc.args = (msg,)
    elif kind == "SegmentExistsError":
        exc = SegmentExistsError(seg, "?")
        exc.args = (msg,)
    elif kind in ("LayoutError", "ArrayMismatchError"):
        exc = LayoutError(msg)
    elif kind == "InvalidNameError":
        exc = InvalidNameError("segment", seg, msg)
        exc.args = (msg,)
    else:
        exc = RemoteError(kind, msg)
    raise exc


class ControlClient:
    """A DEALER connection to a broker's control endpoint (requests with timeouts).

    Args:
        endpoint: the broker's control endpoint.
        timeout: seconds to wait for each reply.
        context: the ZeroMQ context (the process-wide one by default).
        curve: optional ``(server_public, client_public, client_secret)`` keys (z85).
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
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                if time.monotonic() >= deadline:
                    # The request may still sit in our queue: drop the socket's backlog
                    # by reconnecting so a late broker does not see stale requests.
                    self._reconnect()
                    raise BrokerUnavailableError(self.endpoint, wait)
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
            sock.close(0)
            raise BrokerUnavailableError(self.endpoint, 0) from exc
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


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint, else None."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://") :]
    return None


def pid_of_lock(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None
