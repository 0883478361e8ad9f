"""The foreground runner: how every long-running command meets the signals.

``shmcast broker``, ``relay``, ``publish``, ``subscribe`` and ``demo`` run until
SIGTERM (a service manager, ``docker stop``), SIGINT (Ctrl-C) or SIGHUP (the
terminal closed): all three ask the command to stop, and it then shuts down
cleanly through its ``finally`` blocks, the same way each time. A second signal
does not cut the shutdown short.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

__all__ = [
    "STOP_SIGNALS",
    "ServiceLike",
    "print_ready",
    "serve",
    "stop_on_signals",
    "stream_gone",
]

#: The signals that stop a foreground command.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ServiceLike(Protocol):
    def run(self, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None: ...

    def stop(self) -> None: ...


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Inside the block, SIGTERM, SIGINT and SIGHUP call ``stop()`` (in a thread of
    its own: :func:`_stop_apart`); the previous
    handlers come back after it. Outside the main thread (tests calling ``main``
    from a thread) signals cannot be handled there, and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, lambda signum, frame: _stop_apart(stop)) for sig in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_apart(stop: Callable[[], None]) -> None:
    """A stop signal's handler: ``stop()`` in a thread of its own. A handler runs in
    the main thread wherever it is; there ``stop()`` (an ``Event.set``) could need a
    lock that very thread holds (inside its ``stop.wait()`` between two versions),
    and waited for it for ever. A bare ``_thread`` thread takes none of
    ``threading``'s locks to start."""
    _thread.start_new_thread(stop, ())


def print_ready(prefix: str, info: dict[str, Any], *, stream: Any = None) -> None:
    """The one ready line a command prints once it serves: ``<prefix>{json}`` (or
    its done line). A reader gone (``| head -1`` had the line it wanted) is no
    error: the line goes with the stream (:func:`stream_gone`), and the command's
    work and exit code stand."""
    out = stream or sys.stdout
    try:
        print(f"{prefix}{json.dumps(info)}", file=out, flush=True)
    except BrokenPipeError:
        stream_gone(out)


def stream_gone(stream: Any) -> None:
    """Send what is still buffered for ``stream`` (a pipe whose reader is gone), and
    its flush at exit, nowhere: ``/dev/null`` takes the descriptor's place."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (tests capture it)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def serve(service: ServiceLike, ready_prefix: str) -> None:
    """Run ``service`` in this thread until a stop signal, printing its ready line."""
    with stop_on_signals(service.stop):
        service.run(on_ready=lambda info: print_ready(ready_prefix, info))
