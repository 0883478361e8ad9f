"""CURVE authentication of the broker's TCP endpoints (ZeroMQ's ZAP).

With ``curve_secret_key`` set, the broker's sockets are CURVE servers: traffic is
encrypted and a client must know the server's public key. ``curve_clients``
narrows that to an allow-list of client public keys, checked by a ZAP handler
(:class:`zmq.auth.thread.ThreadAuthenticator`) running in the broker. A client
that is refused gets nothing at all: no reply, no events (ZeroMQ drops the
handshake), so its requests time out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.auth import CURVE_ALLOW_ANY
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

__all__ = [
    "AllowList",
    "CurveKeys",
    "curve_keypair",
    "curve_public",
    "is_z85_key",
    "make_curve_server",
    "start_authenticator",
]

log = logging.getLogger(__name__)


def curve_keypair() -> tuple[str, str]:
    """A new ``(public, secret)`` CURVE key pair, z85 text (40 characters each)."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def is_z85_key(key: object) -> bool:
    """Whether ``key`` is a CURVE key as text: 40 characters of z85 (32 bytes)."""
    if not isinstance(key, str) or len(key) != 40:
        return False
    try:
        z85.decode(key)
    except (KeyError, ValueError, UnicodeEncodeError):
        return False
    return True


def curve_public(secret: str) -> str | None:
    """The public key of a z85 ``secret`` key (None: this libzmq has no CURVE)."""
    try:
        return zmq.curve_public(secret.encode("ascii")).decode("ascii")
    except zmq.ZMQError:
        return None


#: Seconds between two log lines about refused CURVE clients (all are counted).
DENIED_LOG_INTERVAL = 10.0


class AllowList:
    """The ZAP credentials provider: a client key is allowed iff it is listed.

    Refusals are counted (``denied``) and logged once per :data:`DENIED_LOG_INTERVAL`:
    anyone who reaches a CURVE endpoint can make a handshake with a new key per
    connection, and a line each was a flood of the broker's log (800 a second).
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = frozenset(k.encode("ascii") for k in keys)
        self.denied = 0
        self._next_log = 0.0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.denied += 1
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + DENIED_LOG_INTERVAL
            log.warning("refused a CURVE client with unknown public key %s (%d refused so "
                        "far; the next such line in %.0f s at the earliest)",
                        key.decode("ascii", "replace"), self.denied,
                        DENIED_LOG_INTERVAL)  # fmt: skip
        return False


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE server's key pair and its allow-list; the secret key never shows in a repr.

    Args:
        secret: the server's secret key (z85).
        public: its public key (z85); derived from the secret one when None.
        clients: public keys of the clients allowed in (any client when empty).
    """

    secret: str = field(repr=False)
    public: str | None = None
    clients: tuple[str, ...] = ()


def make_curve_server(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server with ``keys``."""
    secret = keys.secret.encode()
    sock.curve_server = True
    sock.curve_secretkey = secret
    sock.curve_publickey = keys.public.encode() if keys.public else zmq.curve_public(secret)


def start_authenticator(ctx: zmq.Context[Any], clients: tuple[str, ...]) -> ThreadAuthenticator:
    """Start the ZAP handler of ``ctx``: only ``clients`` (public keys) may connect.

    An empty ``clients`` allows any client that knows the server's public key.
    Stop it with ``.stop()``; one handler per context.
    """
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
    auth.start()
    if clients:
        auth.configure_curve_callback(domain="*", credentials_provider=AllowList(clients))
    else:
        auth.configure_curve(domain="*", location=CURVE_ALLOW_ANY)
    return auth
