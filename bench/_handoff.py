"""handoff: one large float64 array from a publisher process to a subscriber process.

This process is the publisher; each contender has its own subscriber child, alive for
the whole benchmark, which sums every array it receives. A round publishes once per
contender (the order rotates every round) and waits for the subscriber's report before
going on, so the contenders never overlap. Time = subscriber's ``monotonic_ns`` when it
holds the data (a view whose slot ``acquire`` found whole, or the unpickled array) minus
the publisher's ``monotonic_ns`` just before the publish call; the sum comes after the
stamp, so the consumer's computation is excluded. For ``loan`` the publisher produces
the array in the slot and the clock starts on the block's last line, i.e. at commit.
"""

from __future__ import annotations

import os
import queue as queue_mod
from typing import Any

import numpy as np
import zmq

from shmcast.broker import Segment

from ._common import (
    CTX,
    Child,
    Run,
    children,
    drop_segment,
    fmt_ratio,
    fmt_size,
    fmt_time,
    make_segment,
    now_ns,
    print_table,
    ratio,
    spread,
    stats,
)

COPY_TARGET = 30.0
LOAN_TARGET = 1000.0
SEGMENT = "handoff"


def _report(conn: Any, t: int, arr: Any, ok: bool = True) -> None:
    total = float(arr.sum())  # the consumer's work: after the stamp
    conn.send(("got", (t, total, ok)))


def _sub_shmcast(conn: Any, namespace: str) -> None:
    seg = Segment.attach(SEGMENT, namespace=namespace)
    try:
        last = seg.version
        conn.send(("ready", os.getpid()))
        while True:
            v = seg.wait(last, timeout=0.2)
            if v == last:
                if conn.poll():
                    return
                continue
            _v, i, s, _ts = seg.acquire()
            arr = seg.view(i)
            t = now_ns()
            total = float(arr.sum())
            conn.send(("got", (t, total, seg.validate(i, s))))
            last = _v
    finally:
        seg.close()


def _sub_queue(conn: Any, q: Any) -> None:
    conn.send(("ready", os.getpid()))
    while True:
        try:
            arr = q.get(timeout=0.2)
        except queue_mod.Empty:
            if conn.poll():
                return
            continue
        _report(conn, now_ns(), arr)
        del arr


def _sub_zmq(conn: Any, endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        conn.send(("ready", os.getpid()))
        while True:
            if not sock.poll(200):
                if conn.poll():
                    return
                continue
            frame = sock.recv(copy=False)
            arr = np.frombuffer(frame.buffer, dtype=np.float64)
            _report(conn, now_ns(), arr)
            del arr, frame
    finally:
        sock.close(0)
        ctx.term()


def bench_handoff(run: Run) -> dict[str, Any]:
    nbytes = run.q(100_000_000, 8_000_000)
    rounds = run.q(12, 4)
    src = np.random.default_rng(2).random(nbytes // 8)
    expected = float(src.sum())
    seg = make_segment(run, SEGMENT, np.float64, src.shape)
    zctx = zmq.Context()
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{run.tmpdir}/handoff.ipc"
    push.bind(endpoint)
    q = CTX.Queue()
    try:
        with children(
            [
                (_sub_shmcast, run.namespace),
                (_sub_queue, q),
                (_sub_zmq, endpoint),
            ]
        ) as (k_shm, k_queue, k_zmq):

            def pub_write() -> int:
                t0 = now_ns()
                seg.write(src)
                return t0

            def pub_loan() -> int:
                with seg.loan() as buf:
                    np.copyto(buf, src)  # production, in place: not timed
                    t0 = now_ns()
                return t0

            def pub_queue() -> int:
                t0 = now_ns()
                q.put(src)
                return t0

            def pub_zmq() -> int:
                t0 = now_ns()
                push.send(src, copy=False)
                return t0

            contenders: dict[str, tuple[Any, Child]] = {
                "shmcast write (copy)": (pub_write, k_shm),
                "shmcast loan (in place)": (pub_loan, k_shm),
                "multiprocessing.Queue": (pub_queue, k_queue),
                "pyzmq copy=False ipc://": (pub_zmq, k_zmq),
            }
            names = list(contenders)
            times: dict[str, list[float]] = {k: [] for k in names}
            bad: dict[str, int] = {k: 0 for k in names}
            timeout = run.q(60.0, 30.0)
            for r in range(rounds + 1):  # round 0 warms up (first touch of every page)
                for k in names[r % len(names) :] + names[: r % len(names)]:
                    pub, kid = contenders[k]
                    t0 = pub()
                    t, total, ok = kid.expect("got", timeout)
                    if r == 0:
                        continue
                    times[k].append(t - t0)
                    if not ok or not np.isclose(total, expected, rtol=1e-9):
                        bad[k] += 1
    finally:
        push.close(0)
        zctx.term()
        q.close()
        q.join_thread()
        drop_segment(seg)

    s = {k: stats(v) for k, v in times.items()}
    base = s["multiprocessing.Queue"]["median"]
    speedup = {k: ratio(base, s[k]["median"]) for k in names}
    rows = [
        [
            k,
            fmt_time(s[k]["median"]),
            spread(s[k]),
            fmt_ratio(speedup[k]),
            f"{nbytes / s[k]['median']:.2f}",
            bad[k],
        ]
        for k in names
    ]
    print_table(
        f"handoff: {fmt_size(nbytes)} float64, publish call → subscriber holds the data "
        f"({rounds} rounds, alternating; median, p10-p90)",
        ["contender", "median", "p10-p90", "Queue/this", "GB/s", "bad"],
        rows,
    )
    copy_x, loan_x = speedup["shmcast write (copy)"], speedup["shmcast loan (in place)"]
    targets = [
        {
            "target": f"handoff {fmt_size(nbytes)}: copy >= {COPY_TARGET:.0f}x faster than Queue",
            "value": copy_x,
            "met": copy_x is not None and copy_x >= COPY_TARGET,
        },
        {
            "target": f"handoff {fmt_size(nbytes)}: loan >= {LOAN_TARGET:.0f}x faster than Queue",
            "value": loan_x,
            "met": loan_x is not None and loan_x >= LOAN_TARGET,
        },
    ]
    return {
        "nbytes": nbytes,
        "rounds": rounds,
        "baseline": "multiprocessing.Queue",
        "ns": s,
        "speedup_vs_queue": speedup,
        "bad_reads": bad,
        "targets": targets,
    }
