"""Publisher and checker processes of the relay tests (run inside a test "host").

``publish SEGMENT N RATE``: publish float64 arrays of N elements, every element
equal to the version, RATE times a second, until SIGTERM.
``check SEGMENT``: read the local segment's latest version (validated copy) every
20 ms and print ``peer check: {"version", "checked", "bad"}`` whenever the version
changes and twice a second; ``bad`` counts versions whose content was not intact.

CURVE keys (server public, client public, client secret) come from
``SHMCAST_TEST_CURVE`` (three z85 keys separated by commas) when set.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np


def _curve() -> tuple[bytes, bytes, bytes] | None:
    raw = os.environ.get("SHMCAST_TEST_CURVE")
    if not raw:
        return None
    a, b, c = (k.encode() for k in raw.split(","))
    return a, b, c


def publish(segment: str, n: int, rate: float, stop: threading.Event) -> None:
    from shmcast.publisher import Publisher

    with Publisher(segment, dtype=np.float64, shape=(n,), curve=_curve()) as pub:
        print("peer publish ready: {}", flush=True)
        period = 1.0 / rate
        next_t = time.monotonic()
        while not stop.is_set():
            with pub.loan() as arr:
                arr.fill(pub.version + 1)
            next_t += period
            stop.wait(max(0.0, next_t - time.monotonic()))


def check(segment: str, stop: threading.Event) -> None:
    from shmcast.broker import Segment
    from shmcast.broker.errors import ShmcastError

    seg = None
    checked = bad = last = 0
    next_print = 0.0
    print("peer check ready: {}", flush=True)
    while not stop.is_set():
        if seg is None:
            try:
                seg = Segment.attach(segment)
            except ShmcastError:
                stop.wait(0.02)
                continue
        version = seg.version
        if version:
            snap = seg.latest()
            checked += 1
            if not (snap.array == snap.version).all():
                bad += 1
            version = snap.version
        now = time.monotonic()
        if version != last or now >= next_print:
            last = version
            next_print = now + 0.5
            status = {"version": version, "checked": checked, "bad": bad}
            print(f"peer check: {json.dumps(status)}", flush=True)
        stop.wait(0.02)
    if seg is not None:
        seg.close()


def main(argv: list[str]) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if argv[0] == "publish":
        publish(argv[1], int(argv[2]), float(argv[3]), stop)
    elif argv[0] == "check":
        check(argv[1], stop)
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
