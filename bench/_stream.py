"""stream: 1 MiB frames as fast as the publisher can fill them; the subscriber sums each.

This process publishes flat out for a fixed window, filling every frame in place (a
shmcast loan, an iceoryx2 loaned sample); one subscriber child per contender sums every
frame it gets. Delivered = frames summed and validated; lost = frames the subscriber
never saw (latest-value semantics: skipped versions, or samples iceoryx2 overwrote in a
full subscriber queue) plus torn reads. Windows of the contenders alternate.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from typing import Any

import numpy as np

from shmcast.broker import Segment

from ._common import (
    MiB,
    Run,
    children,
    drop_segment,
    fmt_ratio,
    make_segment,
    now_ns,
    print_table,
    ratio,
    stats,
)
from ._peers import iox_missing, iox_node, iox_publisher, iox_pubsub, iox_service_name

FRAME = MiB
N = FRAME // 8
SEGMENT = "stream"
SLOTS = 4
TARGET = 1.0


def _child_shm(conn: Any, namespace: str, spin: bool) -> None:
    seg = Segment.attach(SEGMENT, namespace=namespace)
    try:
        conn.send(("ready", os.getpid()))
        while True:
            kind, _ = conn.recv()
            if kind == "quit":
                return
            last = seg.version
            delivered = lost = torn = 0
            conn.send(("armed", None))
            while not conn.poll():
                if spin:
                    if seg.version == last:
                        continue
                    v = seg.version
                else:
                    v = seg.wait(last, timeout=0.05)
                    if v == last:
                        continue
                v, i, s, _ts = seg.acquire()
                total = float(seg.view(i).sum())
                if seg.validate(i, s):
                    delivered += 1
                else:
                    torn += 1
                lost += v - last - 1
                last = v
                del total
            conn.recv()
            conn.send(("done", (delivered, lost, torn)))
    finally:
        seg.close()


def _child_iox(conn: Any, service: str) -> None:
    node = iox_node()
    sub = iox_pubsub(node, service).subscriber_builder().create()
    conn.send(("ready", os.getpid()))
    try:
        while True:
            kind, _ = conn.recv()
            if kind == "quit":
                return
            while (smp := sub.receive()) is not None:
                smp.delete()
            conn.send(("armed", None))
            delivered = lost = 0
            last = -1
            while not conn.poll():
                smp = sub.receive()
                if smp is None:
                    continue
                a = np.ctypeslib.as_array((ctypes.c_double * N).from_address(smp.payload_ptr))
                seq = int(a[0])
                float(a.sum())
                del a
                smp.delete()
                delivered += 1
                if last >= 0:
                    lost += seq - last - 1
                last = seq
            conn.recv()
            conn.send(("done", (delivered, lost, 0)))
    finally:
        sub.delete()


def bench_stream(run: Run) -> dict[str, Any]:
    window = run.q(1.5, 0.3)
    rounds = run.q(3, 1)
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        seg = make_segment(run, SEGMENT, np.float64, (N,), slots=SLOTS)
        stack.callback(drop_segment, seg)
        seq = [0]

        def pub_shm() -> None:
            with seg.loan() as buf:
                seq[0] += 1
                buf.fill(seq[0])

        specs: dict[str, tuple[Any, ...]] = {
            "shmcast loan → futex wait": (_child_shm, run.namespace, False),
            "shmcast loan → busy-poll": (_child_shm, run.namespace, True),
        }
        pubs = {k: pub_shm for k in specs}
        reason = iox_missing()
        ipub = None
        if reason:
            skipped["iceoryx2"] = reason
            print(f"  stream: skipping iceoryx2: {reason}")
        else:
            node = iox_node()
            name = iox_service_name(run.namespace, "stream")
            ipub = iox_publisher(iox_pubsub(node, name), FRAME)
            stack.callback(ipub.delete)
            specs["iceoryx2 loan → busy receive"] = (_child_iox, name)
            iseq = [0]

            def pub_iox() -> None:
                smp = ipub.loan_slice_uninit(FRAME)
                a = np.ctypeslib.as_array((ctypes.c_double * N).from_address(smp.payload_ptr))
                iseq[0] += 1
                a.fill(iseq[0])
                del a
                smp.assume_init().send()

            pubs["iceoryx2 loan → busy receive"] = pub_iox
        names = list(specs)
        kids = dict(
            zip(names, stack.enter_context(children([specs[k] for k in names])), strict=True)
        )
        if ipub is not None:
            ipub.update_connections()
        rates: dict[str, list[float]] = {k: [] for k in names}
        pub_rates: dict[str, list[float]] = {k: [] for k in names}
        totals = {k: {"published": 0, "delivered": 0, "lost": 0, "torn": 0} for k in names}
        for r in range(rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                kid, pub = kids[k], pubs[k]
                kid.send("go")
                kid.expect("armed", 30)
                n = 0
                t0 = now_ns()
                end = t0 + int(window * 1e9)
                while now_ns() < end:
                    pub()
                    n += 1
                dt = (now_ns() - t0) / 1e9
                kid.send("stop")
                delivered, _lost, torn = kid.expect("done", 30)
                rates[k].append(delivered / dt)
                pub_rates[k].append(n / dt)
                tot = totals[k]
                tot["published"] += n
                tot["delivered"] += delivered
                tot["lost"] += n - delivered
                tot["torn"] += torn
                time.sleep(0.05)
    s = {k: stats(v) for k, v in rates.items()}
    base_key = "iceoryx2 loan → busy receive"
    base = s[base_key]["median"] if base_key in s else None
    rows = []
    for k in names:
        t = totals[k]
        rows.append(
            [
                k,
                f"{s[k]['median']:.0f}",
                f"{s[k]['p10']:.0f} - {s[k]['p90']:.0f}",
                f"{np.median(pub_rates[k]):.0f}",
                t["lost"],
                f"{100 * t['lost'] / max(t['published'], 1):.1f}%",
                t["torn"],
                fmt_ratio(ratio(s[k]["median"], base)),
            ]
        )
    for k, why in skipped.items():
        rows.append([k, "skipped", why[:60], "", "", "", "", ""])
    print_table(
        f"stream: 1 MiB frames, publisher fills each in place, subscriber sums each "
        f"({rounds} x {window} s windows, alternating; shmcast slots={SLOTS})",
        [
            "contender",
            "delivered/s",
            "p10 - p90",
            "published/s",
            "lost",
            "lost %",
            "torn",
            "vs iox2",
        ],
        rows,
    )
    targets = []
    for k in names:
        if k.startswith("shmcast"):
            rr = ratio(s[k]["median"], base)
            targets.append(
                {
                    "target": f"stream {k}: delivered/s >= {TARGET}x iceoryx2",
                    "value": rr,
                    "met": None if rr is None else rr >= TARGET,
                }
            )
    return {
        "frame_bytes": FRAME,
        "slots": SLOTS,
        "window_s": window,
        "delivered_per_s": s,
        "published_per_s": {k: stats(v) for k, v in pub_rates.items()},
        "totals": totals,
        "skipped": skipped,
        "targets": targets,
    }
