"""The life cycle every long-running shmcast service shares (broker, relay, bridge).

A service object collects its configuration in ``__init__`` and creates nothing;
:meth:`Service.run` creates its sockets and segments, serves in the calling
thread until :meth:`Service.stop`, and releases everything in ``finally``;
:meth:`Service.start` does the same in a background thread and returns once the
service is ready (raising what ``run`` raised while starting). :meth:`Service.close`
stops it and waits for the shutdown. A service runs once.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ClosedError

__all__ = ["Service"]

S = TypeVar("S", bound="Service")

#: Seconds :meth:`Service.close` waits for the serving thread.
CLOSE_TIMEOUT = 30.0


class Service:
    """Base of the services: subclasses implement :meth:`_serve_all`."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._serving = False
        self._closed = False

    def _serve_all(self, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
        """Set up, call :meth:`_set_ready`, serve until stopped, release (in ``finally``)."""
        raise NotImplementedError

    def _set_ready(
        self, on_ready: Callable[[dict[str, Any]], None] | None, info: dict[str, Any]
    ) -> None:
        self._ready.set()
        if on_ready is not None:
            on_ready(info)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or :meth:`run` has returned."""
        return self._closed

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to return (thread- and signal-safe; returns at once)."""
        self._stop.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until serving (or failed to start); True if that happened in time."""
        return self._ready.wait(timeout)

    def run(self, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Serve in this thread until :meth:`stop`; ``on_ready`` gets the ready information.

        Raises:
            ClosedError: the service was closed or has served already.
            ShmcastError: what the service raises when it cannot start.
        """
        if self._closed or self._serving:
            raise ClosedError(self._what)
        self._serving = True
        try:
            self._serve_all(on_ready)
        finally:
            self._ready.set()
            self._closed = True

    def start(self: S, timeout: float = 10.0) -> S:
        """Serve in a background thread; return self once ready.

        Raises:
            TimeoutError: not ready within ``timeout`` seconds (the service is closed).
            ClosedError: the service was closed or has served already.
            ShmcastError: what :meth:`run` raised while starting.
        """
        if self._closed:
            raise ClosedError(self._what)
        if self._thread is not None:
            return self

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=target, name=f"shmcast {self._what}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise TimeoutError(f"{self._what} not ready within {timeout}s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def close(self) -> None:
        """Stop serving and, when started with :meth:`start`, wait for the shutdown.

        Idempotent; a service that never ran is simply marked closed.
        """
        self.stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_TIMEOUT)
        if not self._serving:
            self._closed = True

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is None or not thread.is_alive():
            return
        warnings.warn(f"{self._what} was not closed", ResourceWarning, source=self, stacklevel=2)
        with contextlib.suppress(Exception):
            self.stop()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("serving" if self._serving else "new")
        return f"<{type(self).__name__} {self._what} {state}>"
