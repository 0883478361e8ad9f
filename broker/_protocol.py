"""Wire messages of the control plane and the announcements (ZeroMQ + msgpack).

Control (client DEALER -> broker ROUTER): one frame, a msgpack map
``{"op": str, "id": int, ...}``; the reply is one frame
``{"id": int, "ok": True, ...}`` or ``{"id": int, "ok": False, "error": kind,
"message": str}``. ``commit`` is one-way unless it carries ``"ack": True``;
``report`` (a subscriber's counters, about once a second) is always one-way, and
``subscribers`` returns the reports heard in the last few seconds (with
``stale`` true also the older ones the broker keeps, marked ``stale``); ``topics``
(``names``, ``broker``, ``reserve``, ``release``) how many of those segments' topics (and the
broker's) the events endpoint does not hold yet (``new``), beside those it holds or
has promised (``held``), ``max`` and whether they fit (``fits``); with ``reserve``
true, topics that fit are promised to the asker for a few seconds (those already
promised to another asker too: a topic stays promised until each lets go), and an
asker told they do not fit loses what was promised to it before; with ``release``
true, first the asker's promises go (a subscriber that failed to start).

Events (broker PUB -> SUB): two frames, ``[topic, body]``. The topic is the
segment name followed by a NUL byte (``b"ticks\\0"``), so a subscription to
``a`` (``b"a\\0"``) never matches ``ab``; broker-wide messages use
``BROKER_TOPIC``, which no segment name can spell. The body is a msgpack map
``{"kind", "segment", "version", "ts", "epoch", "seq", "tseq"}``: ``seq`` counts
every event of the broker, ``tseq`` the events of one topic, so a subscriber sees
gaps in what it subscribed to.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import (
    ForbiddenError,
    InvalidNameError,
    LayoutConflictError,
    LayoutError,
    OwnershipError,
    RemoteError,
    SegmentExistsError,
    SegmentNotFoundError,
    ShmcastError,
    ShmSpaceError,
    WriterBusyError,
)

__all__ = [
    "BROKER_TOPIC",
    "HELLO_ALLOWANCE",
    "MAX_REQUEST",
    "MAX_VERSION",
    "error_reply",
    "ipc_path",
    "pack",
    "pid_of_lock",
    "raise_remote",
    "topic",
    "unpack",
]

#: Largest control request (and event body) anyone accepts, bytes.
MAX_REQUEST = 64 * 1024
#: Bytes a relay's ``hello`` may take beyond the largest message its upstream's data
#: stream takes (``max_message_bytes``): the version and incarnation of 256 mirrors (a
#: relay's default ``max_mirrors``) of 128-character names, 280 bytes each in msgpack.
#: Without it a relay with its default limits could not join a broker with its own.
HELLO_ALLOWANCE = 256 * 280
#: The largest version number a sound segment can hold: a header's ``latest``
#: beyond it is corrupt (nobody commits 2**63 versions), and the segment invalid.
MAX_VERSION = 2**63 - 1
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


def error_reply(exc: BaseException) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    for attr in (
        *("segment", "existing", "requested", "pid", "needed", "free", "namespace"),
        *("path", "reason", "uid", "mode", "kind", "expected", "op", "role", "endpoint"),
    ):
        val = getattr(exc, attr, None)
        if isinstance(val, (int, str)):
            reply[attr] = val
    return reply


def raise_remote(reply: dict[str, Any], endpoint: str = "") -> None:
    """Turn an error reply back into the error the broker raised, where we know it;
    ``endpoint`` is where the request went (the broker does not know how it was
    reached)."""
    kind = str(reply.get("error", "RemoteError"))
    msg = str(reply.get("message", "the broker reported an error"))
    seg = str(reply.get("segment", "?"))
    # The broker's namespace, which its errors name (error_reply sends it): "?" only
    # from a reply without it, which no broker sends for these kinds.
    ns = str(reply.get("namespace", "?"))
    exc: ShmcastError
    if kind == "LayoutConflictError":
        exc = LayoutConflictError(
            seg,
            str(reply.get("existing")),
            str(reply.get("requested")),
            ns if ns != "?" else None,
        )
    elif kind == "WriterBusyError":
        pid = reply.get("pid")
        exc = WriterBusyError(seg, pid if isinstance(pid, int) else None)
        exc.args = (msg,)  # the broker's words (a refused delete names --force)
    elif kind == "ShmSpaceError":
        exc = ShmSpaceError(seg, int(reply.get("needed", 0)), int(reply.get("free", 0)))
    elif kind == "SegmentNotFoundError":
        exc = SegmentNotFoundError(seg, ns)
        exc.args = (msg,)
    elif kind == "SegmentExistsError":
        exc = SegmentExistsError(seg, ns)
        exc.args = (msg,)
    elif kind in ("LayoutError", "ArrayMismatchError"):
        exc = LayoutError(msg)
    elif kind == "OwnershipError":
        exc = OwnershipError(
            str(reply.get("path")),
            str(reply.get("reason")),
            uid=int(reply.get("uid", -1)),
            mode=int(reply.get("mode", 0)),
            kind=str(reply.get("kind")),
            expected=str(reply.get("expected")),
        )
    elif kind == "ForbiddenError":
        # Made here, not the broker's words: those name no endpoint (before, the
        # error's ``endpoint`` was "" and its message said not where it was refused).
        exc = ForbiddenError(str(reply.get("op")), str(reply.get("role")), endpoint)
    elif kind == "InvalidNameError":
        exc = InvalidNameError("segment", seg, msg)
        exc.args = (msg,)
    else:
        exc = RemoteError(kind, msg)
    raise exc


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
