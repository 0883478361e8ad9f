"""Child processes for the reading tests: ``python -m tests._reading_workers ROLE ...``.

``publish NAME COUNT RATE SLOTS``: a Publisher (through the namespace's broker,
``SHMCAST_NAMESPACE``) that prints ``READY``, waits for a line on stdin, then
publishes COUNT versions at RATE per second (absolute deadlines), each an int64
array filled with its own version number, and prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from shmcast.publisher import Publisher

SHAPE = (64,)


def publish(name: str, count: int, rate: float, slots: int) -> None:
    with Publisher(name, dtype=np.int64, shape=SHAPE, slots=slots) as pub:
        print("READY", flush=True)
        sys.stdin.readline()
        period = 1.0 / rate
        start = time.monotonic()
        for k in range(count):
            delay = start + k * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with pub.loan() as arr:
                arr[:] = pub.version + 1
        print(json.dumps({"published": count, "last": pub.version}), flush=True)


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "publish":
        publish(args[0], int(args[1]), float(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
