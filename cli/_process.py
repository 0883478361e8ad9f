"""shmcast commands as real processes (used by the demo and by tests).

:func:`start` runs ``python -m shmcast.cli <args>``, waits for its single
``shmcast <command> ready: {json}`` line, and raises with the captured stderr if
the process dies first; :meth:`ShmcastProcess.stop` tears down with
terminate -> wait -> kill. Output is drained by threads, so a chatty child
never blocks on a full pipe.

Each child also gets a lifeline: the read end of a pipe whose write end only this
process holds (its number in ``SHMCAST_LIFELINE_FD``). When this process ends,
however it ends (SIGKILL included), the pipe reads end-of-file and the child stops
itself with SIGTERM, cleaning up as on any stop (:func:`follow_lifeline`). A
killed demo or test run therefore leaves no publisher or broker running on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

_ISSUED: set[str] = set()

log = logging.getLogger(__name__)

#: The environment variable naming a child's end of its lifeline pipe.
LIFELINE_ENV = "SHMCAST_LIFELINE_FD"


def unique_namespace(prefix: str = "t") -> str:
    """A namespace no other test or run uses (remembered: see :func:`issued_namespaces`)."""
    ns = f"{prefix}{uuid.uuid4().hex[:12]}"
    _ISSUED.add(ns)
    return ns


def issued_namespaces() -> frozenset[str]:
    """The namespaces :func:`unique_namespace` handed out in this process."""
    return frozenset(_ISSUED)


def wait_for(predicate: Any, timeout: float, interval: float = 0.01, what: str = "") -> Any:
    """Poll ``predicate()`` until it returns something truthy, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class ShmcastProcess:
    """A running ``shmcast`` command with its output collected line by line."""

    def __init__(
        self, args: Sequence[str], proc: subprocess.Popen[str], lifeline: int = -1
    ) -> None:
        self.args = list(args)
        self.proc = proc
        self._lifeline = lifeline  # our end: closing it (or dying) stops the child
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ready: dict[str, Any] = {}
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._drain, args=(proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._drain, args=(proc.stderr, "stderr"), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream: IO[str] | None, name: str) -> None:
        if stream is None:
            return
        for line in stream:
            line = line.rstrip("\n")
            getattr(self, name).append(line)
            self._lines.put((name, line))
        stream.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The first output line (either stream) starting with ``prefix``."""
        seen = [ln for ln in self.stdout + self.stderr if ln.startswith(prefix)]
        if seen:
            return seen[0]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.args}: no line {prefix!r} in {timeout}s; {self._tail()}")
            try:
                _, line = self._lines.get(timeout=min(left, 0.1))
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    for t in self._threads:
                        t.join(1)
                    seen = [ln for ln in self.stdout + self.stderr if ln.startswith(prefix)]
                    if seen:
                        return seen[0]
                    raise RuntimeError(
                        f"{self.args} exited with {self.proc.returncode} before {prefix!r}; "
                        f"{self._tail()}"
                    ) from None
                continue
            if line.startswith(prefix):
                return line

    def _tail(self) -> str:
        return "stderr:\n" + "\n".join(self.stderr[-30:])

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return rc

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """terminate -> wait -> kill; returns the exit code."""
        if self.proc.poll() is None:
            self.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        self.cut_lifeline()
        return self.proc.returncode

    def cut_lifeline(self) -> None:
        """Close our end of the child's lifeline, as our own death would: the child
        stops itself (:func:`follow_lifeline`). Idempotent."""
        fd, self._lifeline = self._lifeline, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.cut_lifeline()


def start(
    args: Sequence[str],
    *,
    ready: str | None = None,
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> ShmcastProcess:
    """Start ``shmcast <args>`` and (with ``ready``) wait for its ready line.

    Args:
        args: the command line after ``shmcast``.
        ready: the ready-line prefix, e.g. ``"shmcast broker ready: "``; the JSON
            after it becomes ``.ready``. ``None`` does not wait.
        timeout: seconds to wait for the ready line.
        env: extra environment variables.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    theirs, ours = os.pipe()  # both close-on-exec: only `theirs` is passed on
    full_env[LIFELINE_ENV] = str(theirs)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmcast.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            pass_fds=(theirs,),
        )
    except BaseException:
        os.close(ours)
        raise
    finally:
        os.close(theirs)
    sp = ShmcastProcess(args, proc, ours)
    if ready is not None:
        try:
            line = sp.wait_line(ready, timeout)
        except BaseException:
            sp.stop(timeout=5, sig=signal.SIGKILL)
            raise
        sp.ready = json.loads(line[len(ready) :])
    return sp


@contextmanager
def running(
    args: Sequence[str],
    *,
    ready: str | None = None,
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[ShmcastProcess]:
    """:func:`start` as a context manager that always stops the process."""
    sp = start(args, ready=ready, timeout=timeout, env=env)
    try:
        yield sp
    finally:
        sp.stop()


#: Seconds at most a broker started with a lifeline waits, once its parent is gone,
#: for its publishers (which stop at once) to let their segments go: it then unlinks
#: them as orphans. Stopping together with them, it kept those whose publisher had
#: not exited yet, and they stayed in /dev/shm after a killed demo.
LIFELINE_BROKER_GRACE = 5.0


def follow_lifeline(grace: float = 0.0, settled: Callable[[], bool] | None = None) -> None:
    """In a child :func:`start` made: stop (SIGTERM to ourselves) when the parent is
    gone, seen as end-of-file on the lifeline pipe; with ``grace``, once ``settled()``
    is true or ``grace`` seconds later. A daemon thread blocks on the read; no
    polling until then. Does nothing without ``SHMCAST_LIFELINE_FD``."""
    raw = os.environ.pop(LIFELINE_ENV, None)
    if raw is None:
        return
    try:
        fd = int(raw)
        os.set_inheritable(fd, False)  # our own children get their own lifelines
    except (ValueError, OSError):
        return  # not ours (a stale variable): nothing to follow

    def watch() -> None:
        try:
            while os.read(fd, 64):
                pass
        except OSError:
            return
        if grace > 0:
            log.info("parent gone: stopping once settled, at most %gs from now", grace)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not (settled is None or settled()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="shmcast-lifeline", daemon=True).start()
