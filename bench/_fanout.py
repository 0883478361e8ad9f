"""fan-out: one publisher, 1/2/4/8 subscriber processes, 1 MiB frames at a fixed rate.

For each subscriber count and each system, fresh subscriber children start, then this
process publishes for a fixed window at a fixed rate (so the two cores have slack and
the publisher's own cost is what shows). Publisher cost per version: the CPU time of
the whole publisher process (every thread, pyzmq's I/O thread included) over the window
divided by the versions published, and the wall time of the publish call. Every
subscriber sums every frame and reports how many it got.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import numpy as np
import zmq

from shmcast.broker import Segment

from ._common import (
    MiB,
    Run,
    children,
    cpu_ns,
    drop_segment,
    fmt_ratio,
    fmt_time,
    make_segment,
    now_ns,
    print_table,
    ratio,
    sleep_until,
    stats,
    tight_timers,
)

FRAME = MiB
N = FRAME // 8
SEGMENT = "fanout"
TARGET = 1.2


def _child_shm(conn: Any, namespace: str) -> None:
    seg = Segment.attach(SEGMENT, namespace=namespace)
    try:
        last = seg.version
        conn.send(("ready", os.getpid()))
        got = torn = lost = 0
        while not conn.poll():
            v = seg.wait(last, timeout=0.05)
            if v == last:
                continue
            v, i, s, _ts = seg.acquire()
            float(seg.view(i).sum())
            if seg.validate(i, s):
                got += 1
            else:
                torn += 1
            lost += v - last - 1
            last = v
        conn.recv()
        conn.send(("done", (got, lost, torn)))
    finally:
        seg.close()


def _child_zmq(conn: Any, endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    try:
        conn.send(("ready", os.getpid()))
        got = 0
        last = -1
        lost = 0
        while not conn.poll():
            if not sock.poll(50):
                continue
            frame = sock.recv(copy=False)
            a = np.frombuffer(frame.buffer, dtype=np.float64)
            seq = int(a[0])
            if seq == 0:  # warm-up probe
                continue
            float(a.sum())
            del a, frame
            got += 1
            if last >= 0:
                lost += seq - last - 1
            last = seq
        conn.recv()
        conn.send(("done", (got, lost, 0)))
    finally:
        sock.close(0)
        ctx.term()


def bench_fanout(run: Run) -> dict[str, Any]:
    tight_timers()
    counts = run.q([1, 2, 4, 8], [1, 2])
    rounds = run.q(2, 1)
    window = run.q(2.0, 0.4)
    rate = 200
    period = 1_000_000_000 // rate
    frame = np.zeros(N)
    results: dict[str, dict[int, dict[str, list[Any]]]] = {
        s: {n: {"cpu": [], "call": [], "rates": [], "lost": [], "torn": []} for n in counts}
        for s in ("shmcast", "pyzmq")
    }
    with contextlib.ExitStack() as stack:
        seg = make_segment(run, SEGMENT, np.float64, (N,))
        stack.callback(drop_segment, seg)
        zctx = zmq.Context()
        stack.callback(zctx.term)
        pub = zctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        stack.callback(pub.close, 0)
        endpoint = f"ipc://{run.tmpdir}/fanout.ipc"
        pub.bind(endpoint)
        seq = [0]

        def pub_shm() -> None:
            seq[0] += 1
            frame[0] = seq[0]
            seg.write(frame)

        def pub_zmq() -> None:
            seq[0] += 1
            frame[0] = seq[0]
            pub.send(frame, copy=True)

        for r in range(rounds):
            for n in counts:
                order = ["shmcast", "pyzmq"] if (r + n) % 2 == 0 else ["pyzmq", "shmcast"]
                for system in order:
                    if system == "shmcast":
                        specs = [(_child_shm, run.namespace)] * n
                        fn = pub_shm
                    else:
                        specs = [(_child_zmq, endpoint)] * n
                        fn = pub_zmq
                    with children(specs) as kids:
                        if system == "pyzmq":  # wait until every subscription is live
                            frame[0] = 0
                            time.sleep(0.2)
                            for _ in range(3):
                                pub.send(frame)
                            time.sleep(0.05)
                        calls = []
                        seq[0] = 0
                        c0 = cpu_ns()
                        start = now_ns() + 1_000_000
                        k = 0
                        while True:
                            t = start + k * period
                            if t > start + window * 1e9:
                                break
                            sleep_until(t)
                            a = time.perf_counter_ns()
                            fn()
                            calls.append(time.perf_counter_ns() - a)
                            k += 1
                        published = k
                        cpu = (cpu_ns() - c0) / published
                        time.sleep(0.05)  # let the last frames arrive
                        for kid in kids:
                            kid.send("stop")
                        dt = published * period / 1e9
                        reports = [kid.expect("done", 30) for kid in kids]
                    res = results[system][n]
                    res["cpu"].append(cpu)
                    res["call"].extend(calls)
                    res["rates"].extend(g / dt for g, _l, _t in reports)
                    res["lost"].append(sum(published - g for g, _l, _t in reports))
                    res["torn"].append(sum(t for _g, _l, t in reports))

    out: dict[str, Any] = {"rate_hz": rate, "frame_bytes": FRAME, "window_s": window}
    rows = []
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    for system, per in results.items():
        summary[system] = {}
        for n, res in per.items():
            cpu = float(np.median(res["cpu"]))
            summary[system][n] = {
                "cpu_ns_per_version": cpu,
                "call_ns": stats(res["call"]),
                "subscriber_rate_hz": stats(res["rates"]),
                "lost": int(sum(res["lost"])),
                "torn": int(sum(res["torn"])),
            }
        one = summary[system][counts[0]]["cpu_ns_per_version"]
        for n in counts:
            sm = summary[system][n]
            sm["cpu_vs_1"] = ratio(sm["cpu_ns_per_version"], one)
            rows.append(
                [
                    system,
                    n,
                    fmt_time(sm["cpu_ns_per_version"]),
                    fmt_ratio(sm["cpu_vs_1"]),
                    fmt_time(sm["call_ns"]["median"]),
                    fmt_time(sm["call_ns"]["p90"]),
                    f"{sm['subscriber_rate_hz']['min']:.0f} / "
                    f"{sm['subscriber_rate_hz']['median']:.0f}",
                    sm["lost"],
                    sm["torn"],
                ]
            )
    print_table(
        f"fan-out: 1 MiB frames at {rate} Hz to N subscriber processes that sum each "
        f"({rounds} x {window} s per cell)",
        [
            "system",
            "subs",
            "pub CPU/version",
            "vs 1 sub",
            "call p50",
            "call p90",
            "sub rate min/med Hz",
            "lost",
            "torn",
        ],
        rows,
    )
    hi = counts[-1]
    shm_x = summary["shmcast"][hi]["cpu_vs_1"]
    zmq_x = summary["pyzmq"][hi]["cpu_vs_1"]
    out["systems"] = summary
    out["targets"] = [
        {
            "target": f"fan-out: shmcast publisher CPU with {hi} subs <= {TARGET}x with 1",
            "value": shm_x,
            "met": shm_x is not None and shm_x <= TARGET,
        },
        {
            "target": f"fan-out: pyzmq publisher CPU grows with {hi} subs (ratio > 1)",
            "value": zmq_x,
            "met": zmq_x is not None and zmq_x > 1.0,
        },
    ]
    return out
