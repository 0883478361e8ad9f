"""Child processes for the segment engine tests: ``python -m tests._seg_workers ROLE NAME ...``.

The namespace comes from ``SHMCAST_NAMESPACE`` (set by the ``namespace`` fixture).
Each role prints ``READY``-style lines the parent waits for, and a JSON summary last.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from shmcast.broker import Segment, TornReadError, VersionUnavailableError


def _say(line: str) -> None:
    print(line, flush=True)


def _block_until_stdin_closes() -> None:
    sys.stdin.read()


def hold(name: str) -> None:
    """Take the writer lease and keep it until killed (or stdin closes)."""
    seg = Segment.attach(name, writable=True)
    _say(f"READY {os.getpid()}")
    _block_until_stdin_closes()
    seg.close()


def half_loan(name: str) -> None:
    """Open a loan for the next version, fill half of it, then wait to be killed."""
    seg = Segment.attach(name, writable=True)
    with seg.loan() as arr:
        flat = arr.reshape(-1)
        flat[: flat.size // 2] = seg.version + 1
        _say(f"HALF {seg.version + 1}")
        _block_until_stdin_closes()
    seg.close()


def half_loan_skipping(name: str) -> None:
    """Open a loan for version latest + K (what a relay does when it skips), fill half
    of it, then wait to be killed: with slot = version mod K that was the latest's slot."""
    seg = Segment.attach(name, writable=True)
    version = seg.version + seg.slots
    with seg.loan(version=version) as arr:
        flat = arr.reshape(-1)
        flat[: flat.size // 2] = version
        _say(f"HALF {version}")
        _block_until_stdin_closes()
    seg.close()


def writer(name: str) -> None:
    """Publish arrays filled with their version number as fast as possible until SIGTERM.

    Alternates copying writes and loans so that both paths race the readers.
    """
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    seg = Segment.attach(name, writable=True)
    buf = np.empty(seg.shape, seg.dtype)
    v = seg.version
    _say("READY")
    started = time.monotonic()
    while not stop:
        v += 1
        if v & 1:
            buf.fill(v)
            got = seg.write(buf)
        else:
            with seg.loan() as arr:
                arr.fill(v)
            got = seg.version
        if got != v:
            raise AssertionError(f"write returned {got}, expected {v}")
    elapsed = time.monotonic() - started
    seg.close()
    _say(json.dumps({"last": v, "seconds": elapsed}))


def reader(name: str, target: str, seconds: str) -> None:
    """Validated reads until ``target`` of them or ``seconds`` pass, alternately
    zero-copy (``seg.read()``) and copied into a bytearray (``seg.read_into``, the
    core's one-call path).

    A read that returns without TornReadError must show an array filled with
    exactly its version, and versions never go backwards. ``STALL_NS`` widens the
    compiled core's window between read_into's copy and its validation.
    """
    goal, limit = int(target), float(seconds)
    seg = Segment.attach(name)
    _stall(seg)
    if seg.wait(0, timeout=10.0) == 0:
        raise AssertionError("no version published within 10 s")
    raw = bytearray(seg.nbytes)
    copied = np.frombuffer(raw, seg.dtype)
    ok = torn = torn_inconsistent = violations = into_ok = into_torn = 0
    last = 0
    examples: list[str] = []
    deadline = time.monotonic() + limit
    attempts = 0
    while ok < goal:
        # Every attempt counts towards a look at the clock, torn ones too: a reader
        # that the writer laps on every read (a slow CPU, an emulator) still stops.
        attempts += 1
        if not attempts & 255 and time.monotonic() >= deadline:
            break
        into = bool(attempts & 1)
        try:
            if into:
                v, _ = seg.read_into(raw)
                arr = copied
                lo, hi, n = float(arr.min()), float(arr.max()), int(np.count_nonzero(arr == v))
            else:
                with seg.read() as snap:  # looked at before the validation at its exit
                    v = snap.version
                    arr = snap.array
                    lo = float(arr.min())
                    hi = float(arr.max())
                    n = int(np.count_nonzero(arr == v))
        except TornReadError as exc:
            torn += 1
            into_torn += into
            if into:
                v = exc.version
                lo, hi = float(copied.min()), float(copied.max())
            if not lo == hi == v:
                torn_inconsistent += 1  # caught: the data really was mixed
            continue
        ok += 1
        into_ok += into
        if not (lo == hi == v and n == arr.size and v >= last):
            violations += 1
            if len(examples) < 5:
                how = "read_into" if into else "read"
                examples.append(f"{how}: v={v} min={lo} max={hi} count={n} previous={last}")
        last = v
    seg.close()
    _say(
        json.dumps(
            {
                "ok": ok,
                "torn": torn,
                "torn_inconsistent": torn_inconsistent,
                "violations": violations,
                "into_ok": into_ok,
                "into_torn": into_torn,
                "examples": examples,
                "last": last,
            }
        )
    )


def tiny_writer(name: str) -> None:
    """Loan-and-commit tiny versions flat out until stdin closes (the fastest writer)."""
    import threading

    seg = Segment.attach(name, writable=True)
    done = threading.Event()
    threading.Thread(target=lambda: (_block_until_stdin_closes(), done.set()), daemon=True).start()
    _say("READY")
    n = 0
    while not done.is_set():
        with seg.loan() as arr:
            arr.fill(n)
        n += 1
    seg.close()


#: A wait that returns this long after the first version it waited for was committed
#: slept through that commit: a lost wake-up (found later by the waiter's timeout).
#: Measured from the commit, not from the call: a writer that is descheduled for a
#: while makes a wait long, not late.
LOST_S = 0.5


def _lateness(seg: Segment, after: int, newest: int) -> float:
    """Seconds from the commit of the first version after ``after`` still in the ring
    (a lower bound when the earlier ones are gone) to now."""
    now = time.monotonic_ns()
    for v in range(after + 1, newest + 1):
        try:
            _, slot, _, _ = seg.acquire(v)
        except VersionUnavailableError:
            continue
        return (now - seg.monotonic_ns(slot)) / 1e9
    return 0.0


def _stall(seg: Segment) -> None:
    stall = int(os.environ.get("STALL_NS", "0"))
    if stall and seg.core == "c":  # widen the race windows of the compiled core
        seg._ring.set_stall(stall)


def stream(name: str, count: str) -> None:
    """Commit ``count`` versions with random pauses of 0-60 µs between them, so that
    followers sometimes sleep and often race a commit. Prints a JSON summary."""
    seg = Segment.attach(name, writable=True)
    _stall(seg)
    rng = np.random.default_rng(os.getpid())
    pauses = rng.integers(0, 60_000, int(count))
    buf = np.zeros(seg.shape, seg.dtype)
    _say("READY")
    sys.stdin.readline()
    started = time.perf_counter_ns()
    for pause in pauses:
        seg.write(buf)
        until = time.perf_counter_ns() + int(pause)
        while time.perf_counter_ns() < until:
            pass
    seconds = (time.perf_counter_ns() - started) / 1e9
    info = {"last": seg.version, "seconds": seconds, "core": seg.core}
    seg.close()
    _say(json.dumps(info))


def follow(name: str, count: str) -> None:
    """Wait for every next version (``wait(last)``) until version ``count``; a wait
    that outlasts LOST_S slept through a commit. Prints a JSON summary."""
    seg = Segment.attach(name)
    _stall(seg)
    last = seg.version
    lost = waits = 0
    slowest = 0.0
    _say("READY")
    while last < int(count):
        v = seg.wait(last, timeout=2.0)
        if v > last:
            late = _lateness(seg, last, v)
            lost += late >= LOST_S
            slowest = max(slowest, late)
        waits += 1
        last = max(last, v)
    info = {"lost": lost, "waits": waits, "slowest": slowest, "core": seg.core}
    seg.close()
    _say(json.dumps(info))


def ping(name_out: str, name_in: str, rounds: str, first: str) -> None:
    """Ping-pong with another ``ping``: version k goes out on ``name_out`` and comes
    back on ``name_in``; every wait sleeps on a futex and is woken by the other side.

    A wait that outlasts LOST_S is a lost wake-up (the other side committed long
    ago): counted, and the wait goes on, so the test still ends. ``first`` is
    ``1`` for the side that writes first. Prints a JSON summary.
    """
    wait_s = 2.0
    out = Segment.attach(name_out, writable=True)
    src = Segment.attach(name_in)
    _stall(out)
    _stall(src)
    buf = np.empty(out.shape, out.dtype)
    lost = 0
    slowest = 0.0
    _say("READY")
    sys.stdin.readline()  # GO: both sides attached
    started = time.monotonic()
    for k in range(1, int(rounds) + 1):
        if first == "1":
            buf.fill(k)
            out.write(buf)
        while src.wait(k - 1, timeout=wait_s) < k:
            pass
        late = _lateness(src, k - 1, k)
        lost += late >= LOST_S
        slowest = max(slowest, late)
        if first != "1":
            buf.fill(k)
            out.write(buf)
    seconds = time.monotonic() - started
    info = {"lost": lost, "slowest": slowest, "seconds": seconds, "core": out.core}
    out.close()
    src.close()
    _say(json.dumps(info))


ROLES = {
    "tiny-writer": tiny_writer,
    "hold": hold,
    "half-loan": half_loan,
    "half-loan-skipping": half_loan_skipping,
    "writer": writer,
    "reader": reader,
    "ping": ping,
    "stream": stream,
    "follow": follow,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
