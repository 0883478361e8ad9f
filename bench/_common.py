"""Shared helpers of the benchmark suite: run settings, statistics, tables, child processes.

Every cross-process timestamp in the suite is ``time.monotonic_ns()``: CLOCK_MONOTONIC
is one system-wide clock on Linux, so a stamp taken in the publisher and one taken in
the subscriber can be subtracted.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import secrets
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmcast.broker import Segment
from shmcast.broker.client import SHM_DIR

CTX = mp.get_context("spawn")
now_ns = time.monotonic_ns

MiB = 1 << 20
KiB = 1 << 10


@dataclass
class Run:
    """Settings of one suite run, handed to every benchmark."""

    quick: bool
    namespace: str = field(default_factory=lambda: "bench" + secrets.token_hex(5))
    tmpdir: str = ""
    skipped: dict[str, str] = field(default_factory=dict)

    def q(self, full: Any, quick: Any) -> Any:
        """Pick the full-size or the quick-mode value."""
        return quick if self.quick else full


# ---------------------------------------------------------------------- statistics


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, p10/p90, quartiles, min/max and count of a sample (floats, same unit)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {
        "n": int(a.size),
        "median": float(p50),
        "p10": float(p10),
        "p25": float(p25),
        "p75": float(p75),
        "p90": float(p90),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def tail(values: Sequence[float]) -> dict[str, float]:
    """Latency percentiles p50/p90/p99/p99.9 plus count and max."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    return {
        "n": int(a.size),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p99.9": float(p999),
        "max": float(a.max()),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return float(a) / float(b)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


# -------------------------------------------------------------------------- output


def fmt_time(ns: float | None) -> str:
    """A duration in ns as a short human string."""
    if ns is None or (isinstance(ns, float) and math.isnan(ns)):
        return "-"
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.0f}x" if r >= 100 else f"{r:.2f}x"


def fmt_size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000} MB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def spread(s: dict[str, float]) -> str:
    """The p10-p90 range of a ``stats`` dict, as durations."""
    if not s.get("n"):
        return "-"
    return f"{fmt_time(s['p10'])} - {fmt_time(s['p90'])}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    for k, r in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if k == 0:
            print(line)


# ------------------------------------------------------------------ child processes


class ChildError(RuntimeError):
    """A benchmark child process failed, timed out or died."""


def _child_entry(fn: Callable[..., None], conn: Any, args: tuple[Any, ...]) -> None:
    try:
        fn(conn, *args)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        with contextlib.suppress(Exception):
            conn.close()


class Child:
    """A spawned child process with a duplex pipe; messages are ``(kind, payload)``."""

    def __init__(self, fn: Callable[..., None], *args: Any, name: str = "bench-child") -> None:
        self.conn, child_conn = CTX.Pipe(duplex=True)
        self.proc = CTX.Process(
            target=_child_entry, args=(fn, child_conn, args), name=name, daemon=True
        )
        self.proc.start()
        child_conn.close()

    def send(self, kind: str, payload: Any = None) -> None:
        self.conn.send((kind, payload))

    def expect(self, kind: str, timeout: float) -> Any:
        """Wait for a message of ``kind`` and return its payload."""
        if not self.conn.poll(timeout):
            raise ChildError(f"{self.proc.name}: no {kind!r} within {timeout:.0f} s")
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise ChildError(
                f"{self.proc.name}: died (exit code {self.proc.exitcode}) before {kind!r}"
            ) from None
        if got == "error":
            raise ChildError(f"{self.proc.name} failed:\n{payload}")
        if got != kind:
            raise ChildError(f"{self.proc.name}: expected {kind!r}, got {got!r}")
        return payload

    def stop(self, timeout: float = 5.0) -> None:
        """Join, then terminate, then kill: never leaves the process behind."""
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)
        with contextlib.suppress(Exception):
            self.conn.close()


@contextlib.contextmanager
def children(
    specs: Sequence[tuple[Any, ...]], *, ready_timeout: float = 60.0
) -> Iterator[list[Child]]:
    """Start one child per ``(fn, *args)`` spec, wait for each one's ``ready``, and always
    stop them all on exit. The ``ready`` payloads are stored on ``child.info``."""
    kids: list[Child] = []
    try:
        for k, (fn, *args) in enumerate(specs):
            kids.append(Child(fn, *args, name=f"{getattr(fn, '__name__', 'child')}-{k}"))
        for kid in kids:
            kid.info = kid.expect("ready", ready_timeout)  # type: ignore[attr-defined]
        yield kids
    finally:
        for kid in kids:
            with contextlib.suppress(Exception):
                kid.send("quit")
        for kid in kids:
            kid.stop()


# ---------------------------------------------------------------------- resources


def make_segment(run: Run, name: str, dtype: Any, shape: Any, **kw: Any) -> Segment:
    """Segment.create in the run's namespace."""
    return Segment.create(name, dtype, shape, namespace=run.namespace, **kw)


def drop_segment(seg: Segment) -> None:
    """Close and unlink a segment made by ``make_segment``."""
    seg.close()
    seg.unlink()


def unlink_namespace(namespace: str) -> list[str]:
    """Remove every ``/dev/shm/shmcast.<namespace>.*`` object; return what was removed."""
    gone = []
    prefixes = (f"shmcast.{namespace}.",)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(SHM_DIR):
            if entry.startswith(prefixes):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, entry))
                    gone.append(entry)
    return gone


@contextlib.contextmanager
def run_resources(run: Run) -> Iterator[Run]:
    """A private temp dir (ipc:// sockets) and the namespace, both removed at the end."""
    from ._peers import iox_objects

    run.tmpdir = tempfile.mkdtemp(prefix="shmcast-bench-")
    try:
        with iox_objects(run.namespace, run.tmpdir):
            yield run
    finally:
        unlink_namespace(run.namespace)
        shutil.rmtree(run.tmpdir, ignore_errors=True)


def attach_within(segment: str, deadline: float) -> Segment | None:
    """The segment (of ``$SHMCAST_NAMESPACE``) once it exists, retried until the
    monotonic ``deadline``; None if it never appeared (a peer's reader)."""
    from shmcast.broker import ShmcastError

    while time.monotonic() < deadline:
        try:
            return Segment.attach(segment)
        except ShmcastError:
            time.sleep(0.01)
    return None


def sleep_until(t_ns: int) -> None:
    """Sleep (no busy core) until the monotonic clock reaches ``t_ns``."""
    left = t_ns - now_ns()
    if left > 0:
        time.sleep(left / 1e9)


def cpu_ns() -> int:
    """CPU time (user + system) of this whole process, every thread included."""
    return time.process_time_ns()


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise ChildError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.001)


def tight_timers() -> None:
    """Shrink this process's timer slack (default 50 µs) to 1 µs so that short sleeps
    used for pacing end on time (Linux prctl PR_SET_TIMERSLACK; ignored elsewhere)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)
