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

from shmcast.broker import Segment, TornReadError


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
    """Validated zero-copy reads until ``target`` of them or ``seconds`` pass.

    A read that leaves ``with seg.read()`` without TornReadError must show an
    array filled with exactly its version, and versions never go backwards.
    """
    goal, limit = int(target), float(seconds)
    seg = Segment.attach(name)
    if seg.wait(0, timeout=10.0) == 0:
        raise AssertionError("no version published within 10 s")
    ok = torn = torn_inconsistent = violations = 0
    last = 0
    examples: list[str] = []
    deadline = time.monotonic() + limit
    while ok < goal:
        if not ok & 1023 and time.monotonic() >= deadline:
            break
        try:
            with seg.read() as snap:
                v = snap.version
                arr = snap.array
                lo = float(arr.min())
                hi = float(arr.max())
                n = int(np.count_nonzero(arr == v))
        except TornReadError:
            torn += 1
            if not lo == hi == v:
                torn_inconsistent += 1  # caught: the data really was mixed
            continue
        ok += 1
        if not (lo == hi == v and n == arr.size and v >= last):
            violations += 1
            if len(examples) < 5:
                examples.append(f"v={v} min={lo} max={hi} count={n} previous={last}")
        last = v
    seg.close()
    _say(
        json.dumps(
            {
                "ok": ok,
                "torn": torn,
                "torn_inconsistent": torn_inconsistent,
                "violations": violations,
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


ROLES = {
    "tiny-writer": tiny_writer,
    "hold": hold,
    "half-loan": half_loan,
    "half-loan-skipping": half_loan_skipping,
    "writer": writer,
    "reader": reader,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
