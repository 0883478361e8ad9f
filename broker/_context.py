"""shmcast's own ZeroMQ context, and the sockets it opens on it.

ZeroMQ caps the sockets of a context at ``ZMQ_MAX_SOCKETS``, 1023 by default,
whatever the open-files limit: a process of about 510 ``Subscriber`` objects in
``wait="events"`` (two sockets each), 1020 in ``wait="shm"`` (one), or 340
``ControlClient`` objects waiting for a first reply (three while a handshake
monitor lives) failed with ZeroMQ's bare "Too many open files", which raising
``ulimit -n`` did not cure. The cap applies once, when a context makes its first
socket, so shmcast keeps a context of its own, made on first use with the cap
raised to the open-files limit (at most ZeroMQ's ``ZMQ_SOCKET_LIMIT``), rather
than change ``zmq.Context.instance()``, which the application's own code may share
(and may have made sockets on already). Like ``Context.instance()``, a forked child
gets a new one at its first use: the parent's is not the child's to use or close.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
import weakref
from typing import Any

import zmq

from .errors import RAISE_NOFILE, OutOfDescriptorsError

__all__ = ["context", "max_sockets", "open_socket"]

_lock = threading.Lock()
_ctx: zmq.Context[Any] | None = None
_pid = -1
#: The contexts a forked child found made by its parent: kept, never used nor
#: collected (collecting one warns that it was never closed).
_parents: list[zmq.Context[Any]] = []
#: The sockets opened through :func:`open_socket`, per context: counted when a cap is met.
_sockets: weakref.WeakKeyDictionary[zmq.Context[Any], weakref.WeakSet[zmq.Socket[Any]]] = (
    weakref.WeakKeyDictionary()
)

#: What a process opening too many sockets can do instead: out of descriptors.
SHARE = (
    "one Subscriber follows many segments (Subscriber([name, ...])): share one "
    "rather than open one per segment, and close the ones done with; or raise the "
    f"open-files limit ({RAISE_NOFILE})"
)
#: The same when shmcast's context met its cap: read from the limit only once.
SHARE_CAP = SHARE + " before the process's first shmcast socket"


def _forked() -> None:
    """In a forked child: a new lock (the parent's may have been held at the fork by
    another of its threads, and the child's first socket would wait for it for
    ever); the context is made anew at its first use (the pid differs)."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


def max_sockets(ctx: zmq.Context[Any]) -> int:
    """The socket cap for a new context: the open-files limit (each socket holds one
    descriptor at least), between ZeroMQ's default and its ``ZMQ_SOCKET_LIMIT``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = int(ctx.get(zmq.SOCKET_LIMIT))
    default = int(ctx.get(zmq.MAX_SOCKETS))
    want = top if soft == resource.RLIM_INFINITY else min(top, soft)
    return max(default, want)


def context() -> zmq.Context[Any]:
    """shmcast's process-wide ZeroMQ context, made on first use (again in a forked
    child), its socket cap raised to the open-files limit."""
    global _ctx, _pid
    ctx = _ctx
    if ctx is not None and _pid == os.getpid() and not ctx.closed:
        return ctx
    with _lock:
        if _ctx is None or _pid != os.getpid() or _ctx.closed:
            if _ctx is not None and _pid != os.getpid():
                _parents.append(_ctx)
            ctx = zmq.Context()
            # Before its first socket: libzmq reads the cap when it starts.
            ctx.set(zmq.MAX_SOCKETS, max_sockets(ctx))
            _ctx, _pid = ctx, os.getpid()
        return _ctx


def open_socket(ctx: zmq.Context[Any], kind: int, what: str) -> zmq.Socket[Any]:
    """A ``kind`` socket of ``ctx``, for ``what`` (named in the error).

    Raises:
        OutOfDescriptorsError: the context's socket cap is met (``sockets`` and
            ``max_sockets`` set), or the process is out of file descriptors; an
            ``OSError`` of errno ``EMFILE``. Before, ZeroMQ's bare
            ``ZMQError: Too many open files``.
    """
    try:
        sock: zmq.Socket[Any] = ctx.socket(kind)
    except zmq.ZMQError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        raise _out_of_sockets(ctx, exc.errno, what) from exc
    _sockets.setdefault(ctx, weakref.WeakSet()).add(sock)
    return sock


#: The fix when the context that ran out is the caller's own (``context=``): the
#: open-files limit does not raise its cap.
THEIRS = (
    "the context given (context=) is not shmcast's: its cap is its own, whatever the "
    "open-files limit; raise it (ctx.set(zmq.MAX_SOCKETS, n) before its first "
    "socket), or leave context= out for shmcast's own, capped by the open-files limit"
)


def _out_of_sockets(ctx: zmq.Context[Any], err: int, what: str) -> OutOfDescriptorsError:
    cap = int(ctx.get(zmq.MAX_SOCKETS))
    opened = sum(1 for s in _sockets.get(ctx, ()) if not s.closed)
    exc = OutOfDescriptorsError.from_os(err, what, fix=SHARE)
    if err == errno.EMFILE and (exc.open_fds is None or exc.open_fds < exc.soft - 1):
        # Descriptors to spare: the context's cap is what ran out. Its count is the
        # sockets shmcast opened on it (ZeroMQ's own, a monitor's, count too).
        exc.sockets = opened
        exc.max_sockets = cap
        exc.fix = SHARE_CAP if ctx is _ctx else THEIRS
    return exc
