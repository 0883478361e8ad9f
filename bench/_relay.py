"""Relay benchmark: shmcast through a relay vs. direct pyzmq PUB/SUB, across a veth link.

``python -m bench._relay [--quick] [--json PATH]`` (root: it makes two network
namespaces joined by a veth pair, each with its own /dev/shm; see bench/_netns.py).

Paths, both from host A to a reader on host B:

- relay: publisher -> A's segment -> A's broker data stream (TCP) -> relay on B
  -> B's segment -> a reader woken by the segment's futex (zero-copy read).
- zmq: a pyzmq PUB on A (``send(copy=False)``) -> SUB on B.

Payloads: 1 KiB ticks and 1 MiB frames, each stamped with ``time.monotonic_ns()``
in its first 8 bytes (one system-wide clock: both namespaces share it). Latency is
measured paced (200/s ticks, 50/s frames); throughput with both writers offering
the same load (20 000 ticks/s, 2 000 frames/s, paced by sleeping, so the offer is
what a sleep can pace; ``sent`` says what went out), each copying every payload
whole once (into the loaned slot; into the ZeroMQ message), and what the reader
received per second (latest-value skips and PUB's high-water-mark drops are not
counted as delivered). An unpaced writer that touched 8 bytes per version
committed over 200 000 versions/s and took the core the relay needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PORT_DATA = 5557
PORT_ZMQ = 5558
READY = "bench ready: "
RESULT = "bench result: "
SIZES = {"1KiB": 1024, "1MiB": 1 << 20}
PACED = {"1KiB": 200.0, "1MiB": 50.0}
OFFERED = {"1KiB": 20_000.0, "1MiB": 2_000.0}
DEFAULT_JSON = Path(__file__).resolve().parent / "out" / "relay.json"


# ---------------------------------------------------------------------- peers (on a host)


def _say(prefix: str, obj: Any) -> None:
    print(f"{prefix}{json.dumps(obj)}", flush=True)


def _peer_shm_pub(segment: str, size: int, rate: float, seconds: float) -> None:
    from shmcast.publisher import Publisher

    with Publisher(segment, dtype=np.uint8, shape=(size,)) as pub:
        _say(READY, {})
        with pub.loan() as arr:  # warm-up version: creates the mirror on the far side
            arr[:8] = 0
        time.sleep(1.0)
        frame = np.full(size, 7, np.uint8)
        n = 0
        period = 1.0 / rate if rate else 0.0
        start = time.monotonic()
        next_t = start
        while time.monotonic() - start < seconds:
            with pub.loan() as arr:
                arr[:] = frame  # the whole payload, once, as the ZeroMQ writer does
                arr[:8].view(np.int64)[0] = time.monotonic_ns()
            n += 1
            if period:
                next_t += period
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        _say(RESULT, {"sent": n, "seconds": time.monotonic() - start})


def _peer_shm_read(segment: str, seconds: float) -> None:
    from shmcast.broker.errors import ShmcastError

    from ._common import attach_within

    _say(READY, {})
    deadline = time.monotonic() + seconds
    seg = attach_within(segment, deadline)
    lat: list[int] = []
    first = last_t = 0.0
    got = nbytes = 0
    if seg is not None:
        last = seg.version
        while time.monotonic() < deadline:
            v = seg.wait(last, timeout=0.1)
            if v <= last:
                continue
            try:
                v, slot, seq, _ = seg.acquire()
                stamp = int(seg.view(slot)[:8].view(np.int64)[0])
                ok = seg.validate(slot, seq)
            except ShmcastError:
                continue
            now = time.monotonic_ns()
            last = v
            if ok and stamp:
                lat.append(now - stamp)
                got += 1
                nbytes += seg.nbytes
                last_t = time.monotonic()
                if not first:
                    first = last_t
        seg.close()
    _say(RESULT, _summary(lat, got, nbytes, last_t - first))


def _peer_zmq_pub(addr: str, size: int, rate: float, seconds: float) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://{addr}:{PORT_ZMQ}")
    _say(READY, {})
    time.sleep(1.5)  # the subscriber connects (slow joiner)
    buf = np.full(size, 7, np.uint8)
    n = 0
    period = 1.0 / rate if rate else 0.0
    start = time.monotonic()
    next_t = start
    while time.monotonic() - start < seconds:
        buf[:8].view(np.int64)[0] = time.monotonic_ns()
        sock.send(buf, copy=True)  # the whole payload, once, into the message
        n += 1
        if period:
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    _say(RESULT, {"sent": n, "seconds": time.monotonic() - start})
    time.sleep(1.0)
    sock.close(0)


def _peer_zmq_sub(addr: str, seconds: float) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"tcp://{addr}:{PORT_ZMQ}")
    _say(READY, {})
    deadline = time.monotonic() + seconds
    lat: list[int] = []
    first = last_t = 0.0
    got = nbytes = 0
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        frame = sock.recv(copy=False)
        now = time.monotonic_ns()
        stamp = int(np.frombuffer(frame.buffer, np.int64, count=1)[0])
        lat.append(now - stamp)
        got += 1
        nbytes += len(frame.buffer)
        last_t = time.monotonic()
        if not first:
            first = last_t
    sock.close(0)
    _say(RESULT, _summary(lat, got, nbytes, last_t - first))


def _summary(lat: list[int], got: int, nbytes: int, span: float) -> dict[str, Any]:
    arr = np.array(lat, dtype=np.float64) / 1e3
    return {
        "received": got,
        "p50_us": float(np.percentile(arr, 50)) if arr.size else None,
        "p99_us": float(np.percentile(arr, 99)) if arr.size else None,
        "per_s": got / span if span > 0 else None,
        "mb_per_s": nbytes / span / 1e6 if span > 0 else None,
    }


# ---------------------------------------------------------------------- the orchestrator


def _case(a: Any, b: Any, path: str, label: str, mode: str, seconds: float, ns: dict[str, str]):
    size = SIZES[label]
    rate = PACED[label] if mode == "latency" else OFFERED[label]
    tag = f"{path}-{label}-{mode}"
    me = ["-m", "bench._relay", "--peer"]
    if path == "relay":
        seg = f"{label.lower()}_{mode}"
        b.start(f"r-{tag}", [*me, "shm-read", seg, str(seconds + 4)], ns["b"], READY)
        a.start(f"p-{tag}", [*me, "shm-pub", seg, str(size), str(rate), str(seconds)], ns["a"],
                READY)  # fmt: skip
    else:
        a.start(f"p-{tag}", [*me, "zmq-pub", a.addr, str(size), str(rate), str(seconds)], {},
                READY)  # fmt: skip
        b.start(f"r-{tag}", [*me, "zmq-sub", a.addr, str(seconds + 3)], {}, READY)
    sent = json.loads(a.wait_line(f"p-{tag}| {RESULT}", seconds + 60).split(RESULT, 1)[1])
    got = json.loads(b.wait_line(f"r-{tag}| {RESULT}", seconds + 60).split(RESULT, 1)[1])
    return {"path": path, "size": label, "mode": mode, "sent": sent["sent"], **got}


def run_all(quick: bool) -> list[dict[str, Any]]:
    from bench._netns import two_hosts, why_no_netns
    from shmcast.cli.testing import unique_namespace

    why = why_no_netns()
    if why is not None:
        raise SystemExit(f"bench._relay: {why}")
    seconds = 0.5 if quick else 4.0
    rows = []
    with two_hosts() as (a, b, _link):
        ns = {"a": {"SHMCAST_NAMESPACE": unique_namespace("ba")},
              "b": {"SHMCAST_NAMESPACE": unique_namespace("bb")}}  # fmt: skip
        data = f"tcp://{a.addr}:{PORT_DATA}"
        a.start("broker", ["-m", "shmcast.cli", "broker", "--data", data, "--tcp-open"], ns["a"],
                "shmcast broker ready: ")  # fmt: skip
        b.start("broker", ["-m", "shmcast.cli", "broker"], ns["b"], "shmcast broker ready: ")
        b.start("relay", ["-m", "shmcast.cli", "relay", "--upstream", data], ns["b"],
                "shmcast relay ready: ")  # fmt: skip
        for label in SIZES:
            for mode in ("latency", "throughput"):
                for path in ("relay", "zmq"):
                    rows.append(_case(a, b, path, label, mode, seconds, ns))
    return rows


def bench_relay(run: Any) -> dict[str, Any]:
    """The suite's entry (``python -m bench --only relay``): skipped, with the reason,
    where network namespaces cannot be made (not root, no ``ip``)."""
    from bench._netns import why_no_netns

    why = why_no_netns()
    if why is not None:
        print(f"\nrelay: skipped ({why})")
        return {"skipped": {"relay across veth": why}, "targets": []}
    rows = run_all(run.quick)
    print("\nrelay: through a relay across a veth link vs direct pyzmq PUB/SUB on it")
    print_table(rows)
    return {"rows": rows, "targets": []}


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = f"{'path':6} {'size':5} {'mode':10} {'sent':>7} {'recv':>7} {'p50 µs':>9} "
    head += f"{'p99 µs':>9} {'msg/s':>9} {'MB/s':>8}"
    print(head)
    for r in rows:
        print(
            f"{r['path']:6} {r['size']:5} {r['mode']:10} {r['sent']:7d} {r['received']:7d} "
            f"{f(r['p50_us'], '9.0f')} {f(r['p99_us'], '9.0f')} {f(r['per_s'], '9.0f')} "
            f"{f(r['mb_per_s'], '8.1f')}"
        )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--peer":
        mode, rest = args[1], args[2:]
        if mode == "shm-pub":
            _peer_shm_pub(rest[0], int(rest[1]), float(rest[2]), float(rest[3]))
        elif mode == "shm-read":
            _peer_shm_read(rest[0], float(rest[1]))
        elif mode == "zmq-pub":
            _peer_zmq_pub(rest[0], int(rest[1]), float(rest[2]), float(rest[3]))
        elif mode == "zmq-sub":
            _peer_zmq_sub(rest[0], float(rest[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench._relay", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    opts = parser.parse_args(args)
    started = time.time()
    rows = run_all(opts.quick)
    print_table(rows)
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "relay", "quick": opts.quick, "started": started, "cpus": os.cpu_count(),
           "results": rows}  # fmt: skip
    opts.json.write_text(json.dumps(out, indent=2))
    print(f"JSON: {opts.json}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench-relay"
    raise SystemExit(main())
