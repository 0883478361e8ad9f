"""The broker's announcements endpoint, with its subscriptions bounded.

A PUB socket keeps every topic its subscribers send in a trie of its own, with
no limit: one 10 MB subscription costs the broker about 500 MB, and 200 000
short ones about 2 GB, none of it returned. So the endpoint is an XPUB
(``XPUB_VERBOSER``: every subscription message reaches us) with:

- ``MAXMSGSIZE`` just above the longest topic there is (a segment name of 128
  characters and its NUL): a longer subscription ends its connection before
  anything is stored;
- a bound on the distinct topics held (``max_subscriptions``), read from
  libzmq itself (``ZMQ_TOPICS_COUNT``, so unsubscribe messages cannot fool the
  count) every :data:`CHECK_EVERY` subscriptions: past it, the socket is closed
  and bound again, which frees the trie;
- a receive high-water mark of a few messages: libzmq adds subscriptions to the
  trie while it hands them to us, reading its pipe until it is empty while the
  I/O thread refills it, so with the default (1000) one call took in tens of
  thousands of topics before we could count them; a short pipe makes the
  connection wait for us instead (backpressure, nothing is dropped).
  Subscribers reconnect and subscribe again by themselves (ZeroMQ does it); the
  announcements sent meanwhile show as gaps in their sequence numbers and the
  versions are found in the headers, so nothing is lost silently.
  The mark counts messages, not frames: a multipart message of subscriptions
  (no SUB socket sends one; a raw XSUB may) is taken in whole, every frame a
  subscription, before we see its first frame (1M topics in one 14 MB message
  held 350 MiB until the reset). libzmq has no bound on the frames of a message
  (``ZMQ_ONLY_FIRST_SUBSCRIBE``, a draft option, is refused by the libzmq pyzmq
  ships).

libzmq cannot tell which connection sent a subscription, so the bound is on
the socket, not per connection: an abusive peer makes the endpoint reset
(counted, and logged with its address) rather than grow. Connections
themselves are bounded by the open-files limit.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq

from ._auth import CurveKeys, make_curve_server
from ._protocol import ipc_path
from .errors import EndpointError, OutOfDescriptorsError

__all__ = ["MAX_TOPIC", "Events", "bind_endpoint", "clear_ipc_path"]

log = logging.getLogger(__name__)

#: The longest topic: a segment name (128 characters) and its NUL.
MAX_TOPIC = 129
#: Inbound messages on the events socket are subscriptions: a flag byte and a topic.
MAX_SUBSCRIPTION_MESSAGE = 1 + MAX_TOPIC
#: Seconds to retry binding a TCP port the closed socket still holds.
REBIND_TIMEOUT = 5.0
#: Subscription messages queued per connection before its peer must wait.
SUBSCRIPTION_HWM = 16
#: Subscriptions taken in between two looks at the number of topics held.
CHECK_EVERY = 64
#: Seconds the topics a subscriber was told it has room for stay promised to it
#: (:meth:`Events.room`): it subscribes right after the answer.
RESERVE_SECONDS = 5.0
#: Askers a topic is promised to by name, at most (any reader may ask): those
#: beyond keep it promised until it expires, whoever lets go.
MAX_ASKERS = 8
#: Stands for the askers beyond :data:`MAX_ASKERS` (no asker is named so: askers
#: are a role, a NUL and a ZeroMQ routing id).
_OTHERS = b"*"
#: The fix an error about what sits at an ipc path names.
_FIX_PATH = "give another ipc:// path, or remove what is there yourself if it may go"


def bind_endpoint(
    sock: zmq.Socket[Any],
    role: str,
    endpoint: str,
    *,
    group: str | None,
    shared: bool,
    owned_dir: Path | None = None,
) -> tuple[str, str | None]:
    """Bind ``sock``; returns the bound endpoint and, for ipc, its socket file.

    An ipc socket file is owner-only, or group-owned 0660 when ``shared`` with
    the configured ``group`` (connecting needs write access to the file). What
    sits at the path first is cleared by :func:`clear_ipc_path` (libzmq would
    unlink it, whatever it is).

    Args:
        owned_dir: the directory the caller's namespace lock guards (its runtime
            directory): a file left there is stale and removed.

    Raises:
        EndpointError: the endpoint cannot be bound, or its path holds something
            that is not ours to remove.
        OutOfDescriptorsError: no descriptor for the bind (naming the limit).
    """
    path = ipc_path(endpoint)
    clear_ipc_path(role, endpoint, owned_dir=owned_dir)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            # No address to pick again: the limit is what to raise (before, an
            # EndpointError said "pick another address or port").
            raise OutOfDescriptorsError.from_os(
                exc.errno, f"the {role} endpoint {endpoint}"
            ) from exc
        raise EndpointError(role, endpoint, exc.strerror) from exc
    actual: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if path is not None:
        share = shared and group is not None
        os.chmod(path, 0o660 if share else 0o600)
        if share and group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
    return actual, path


def clear_ipc_path(role: str, endpoint: str, *, owned_dir: Path | None = None) -> None:
    """Make way at the path of an ``ipc://`` endpoint before it is bound.

    Binding unlinks what is at the path (libzmq does, to drop a socket file a
    crashed process left), so it is checked first. Inside ``owned_dir`` (the
    namespace's runtime directory, which its lock guards) anything left is stale
    and removed. Elsewhere only a socket file nobody listens on (a connect is
    refused) is removed; a regular file, a directory, a link or a live socket
    (another broker's, say) is refused.

    Raises:
        EndpointError: the path holds something not ours to remove (the message
            names the path and the fix).
    """
    path = ipc_path(endpoint)
    if path is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise EndpointError(role, endpoint, f"cannot look at {path}: {exc.strerror}") from exc
    mine = owned_dir is not None and os.path.realpath(
        os.path.dirname(os.path.abspath(path))
    ) == os.path.realpath(owned_dir)
    if not mine:
        _check_stale_socket(role, endpoint, path, st)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a directory in the runtime directory, say
        raise EndpointError(
            role, endpoint, f"cannot remove {path}: {exc.strerror}", fix=_FIX_PATH
        ) from exc


def _check_stale_socket(role: str, endpoint: str, path: str, st: os.stat_result) -> None:
    """Raise unless ``path`` (outside our runtime directory) is a socket nobody listens on."""
    if stat.S_ISDIR(st.st_mode):
        kind = "a directory"
    elif stat.S_ISLNK(st.st_mode):
        kind = "a symbolic link"
    elif stat.S_ISREG(st.st_mode):
        kind = "a regular file"
    elif not stat.S_ISSOCK(st.st_mode):
        kind = "a special file"
    else:
        kind = ""
    if kind:
        raise EndpointError(
            role, endpoint, f"{path} exists and is {kind}, not a socket", fix=_FIX_PATH
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return  # a socket file its process left: stale
    except FileNotFoundError:
        return
    except OSError as exc:
        raise EndpointError(
            role,
            endpoint,
            f"cannot tell whether the socket {path} is in use ({exc.strerror or exc})",
            fix=_FIX_PATH,
        ) from exc
    finally:
        probe.close()
    raise EndpointError(
        role,
        endpoint,
        f"a running process listens on {path} (another broker?)",
        fix="stop it, or give another ipc:// path",
    )


class Events:
    """The XPUB the broker announces on; see the module docstring.

    Args:
        ctx: the broker's ZeroMQ context.
        endpoint: where to bind.
        group: the group the namespace is shared with (ipc socket mode), or None.
        curve: the broker's CURVE keys, or None.
        max_subscriptions: distinct topics held before the endpoint resets.
        owned_dir: the namespace's runtime directory (see :func:`bind_endpoint`).
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        group: str | None,
        curve: CurveKeys | None,
        max_subscriptions: int,
        owned_dir: Path | None = None,
    ) -> None:
        self._ctx = ctx
        self._owned_dir = owned_dir
        self.configured = endpoint
        self.endpoint = endpoint
        self.path: str | None = None
        self._group = group
        self._curve = curve
        self.max_subscriptions = max_subscriptions
        self.resets = 0
        self.topics = 0
        self._received = 0  # subscriptions since the last reset (when TOPICS_COUNT fails)
        self._peers: Counter[str] = Counter()
        self._subscribed: Counter[bytes] = Counter()  # topic -> subscriptions held
        #: topic -> {asker: until}: promised while any asker's promise is live.
        self._promised: dict[bytes, dict[bytes, float]] = {}
        self.sock = self._socket()

    def _socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_MESSAGE)
        sock.setsockopt(zmq.RCVHWM, SUBSCRIPTION_HWM)
        if self._curve is not None:
            make_curve_server(sock, self._curve)
        return sock

    def bind(self) -> str:
        """Bind the configured endpoint; returns the bound one.

        Raises:
            EndpointError: it cannot be bound.
        """
        self.endpoint, self.path = bind_endpoint(
            self.sock,
            "events",
            self.configured,
            group=self._group,
            shared=True,
            owned_dir=self._owned_dir,
        )
        return self.endpoint

    def send(self, tpc: bytes, body: bytes) -> None:
        """Announce; a subscriber whose queue is full misses it (and sees the gap)."""
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart([tpc, body], zmq.NOBLOCK)

    def drain(self) -> bool:
        """Take in the subscriptions that arrived; reset past the bound.

        Returns:
            True when the socket was replaced (poll the new ``sock``).
        """
        for i in range(10_000):
            try:
                msg = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            data = msg.bytes
            if data[:1] == b"\x01":
                self._received += 1
                self._subscribed[data[1:]] += 1
                with contextlib.suppress(zmq.ZMQError, KeyError):
                    self._peers[str(msg.get("Peer-Address"))] += 1
            elif data[:1] == b"\x00" and self._subscribed[data[1:]] > 0:
                self._subscribed[data[1:]] -= 1  # XPUB_VERBOSER passes unsubscriptions too
                if not self._subscribed[data[1:]]:
                    del self._subscribed[data[1:]]
            if i % CHECK_EVERY == CHECK_EVERY - 1 and self._count() > self.max_subscriptions:
                break
        if self._count() <= self.max_subscriptions:
            if len(self._peers) > 1024:
                self._peers.clear()
            return False
        self.reset()
        return True

    def subscribed(self, tpc: bytes) -> bool:
        """Whether some subscriber holds ``tpc`` (a segment's topic): the broker then
        announces each of its versions as it is committed, not only at its ticks."""
        return self._subscribed.get(tpc, 0) > 0

    def room(self, tpcs: set[bytes], promise: bool, asker: bytes = b"") -> tuple[int, int, bool]:
        """Whether the topics ``tpcs`` not held yet fit beside those held and those
        promised to subscribers about to subscribe; if they do and ``promise``,
        they are promised to ``asker`` for :data:`RESERVE_SECONDS` (or until they are
        held). The broker answers one request at a time, so of two subscribers
        starting at the same instant that fit alone, not together, the second is
        told so: both were told they fit before, subscribed, and the endpoint reset
        over and over. An asker told that ``tpcs`` do not fit will not subscribe:
        what was promised to it before (the other chunks of its names) is let go.
        Before, those promises stayed for their 5 s, and a subscriber that fitted
        beside the topics held was refused for topics nobody would take. A topic
        already promised to another asker is promised to this one too: it stays
        promised until each lets go (or its promise expires). Before, it stayed
        the first asker's alone, and when that one failed and let go, the second
        one's topics were counted nowhere until its subscriptions came: a third
        subscriber was let in over ``max_subscriptions``.

        Returns:
            (topics held or promised, topics of ``tpcs`` that are neither,
            whether those fit within ``max_subscriptions``).
        """
        now = time.monotonic()
        promised: dict[bytes, dict[bytes, float]] = {}
        for t, askers in self._promised.items():
            if not self.subscribed(t) and (live := {a: u for a, u in askers.items() if u > now}):
                promised[t] = live
        self._promised = promised
        held = self._count() + len(promised)
        new = [t for t in tpcs if not self.subscribed(t) and t not in promised]
        fits = held + len(new) <= self.max_subscriptions
        if promise and fits:
            until = now + RESERVE_SECONDS
            for t in tpcs:
                if not self.subscribed(t):
                    askers = promised.setdefault(t, {})
                    who = asker if asker in askers or len(askers) < MAX_ASKERS else _OTHERS
                    askers[who] = until
        elif promise:
            self.release(asker)
        return held, len(new), fits

    def release(self, asker: bytes) -> None:
        """Let go of what was promised to ``asker`` (:meth:`room`): a subscriber that
        failed to start after its answer will not subscribe."""
        for t, askers in list(self._promised.items()):
            if askers.pop(asker, None) is not None and not askers:
                del self._promised[t]

    def held(self) -> int:
        """The distinct topics the endpoint holds now."""
        return self._count()

    def _count(self) -> int:
        try:
            self.topics = int(self.sock.getsockopt(zmq.TOPICS_COUNT))
        except zmq.ZMQError:  # a libzmq without it: count what was received instead
            self.topics = self._received
        return self.topics

    def reset(self) -> None:
        """Close the socket (freeing its subscriptions) and bind a new one in its place."""
        worst = self._peers.most_common(1)
        log.warning(
            "events endpoint %s holds %d topics (max_subscriptions=%d); resetting it "
            "(most subscriptions from %s)",
            self.endpoint,
            self.topics,
            self.max_subscriptions,
            worst[0] if worst else "?",
        )
        self.resets += 1
        self.sock.close(0)
        self.sock = self._socket()
        self._received = 0
        self._peers.clear()
        self._subscribed.clear()  # its subscribers subscribe again to the new socket
        self.topics = 0
        target = self.endpoint  # the port picked for tcp://...:0 stays the same
        deadline = time.monotonic() + REBIND_TIMEOUT
        while True:
            try:
                self.endpoint, self.path = bind_endpoint(
                    self.sock,
                    "events",
                    target,
                    group=self._group,
                    shared=True,
                    owned_dir=self._owned_dir,
                )
                return
            except (EndpointError, OutOfDescriptorsError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)  # the closed socket's listener lets go asynchronously

    def close(self) -> None:
        self.sock.close(0)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
