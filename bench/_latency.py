"""latency: publish → the subscriber holds the version, 64-byte payloads at fixed rates.

This process publishes; every contender has one subscriber child, idle between chunks.
A chunk: the parent sends ``go``, the child arms (drains, records the current version)
and answers ``armed``, the parent publishes ``n`` messages on a fixed schedule (absolute
deadlines, sleeping, timer slack 1 µs) and then a stop message; the child answers with
its latencies. Chunks of all contenders alternate, the order rotating, so each one sees
the same machine. A message carries the publisher's ``monotonic_ns`` taken just before
the publish call; the child stamps ``monotonic_ns`` once it holds the data (for a
segment: after acquire, reading the stamp from the view, and validate) and keeps the
difference. Skipped versions (latest-value semantics) are counted as lost; for a peer
that numbers nothing, lost is what was sent and never received.

shmcast runs at two levels: the engine (``Segment`` in the subscriber, ``Segment.write``
in this process; the plain calls and the ``wait_acquire`` fast path) and the service
(a broker process, ``Publisher.publish`` here, ``Subscriber(wait=...)`` in the child
iterating ``updates()`` and reading each version exactly with ``read(update)``: what
users call; the asyncio row iterates ``aupdates()`` on an asyncio loop instead). For
the service rows ``lost`` counts every version sent but not read: skipped, lapped
before its read, or torn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import zmq

from shmcast.broker import Segment

from ._common import (
    Child,
    ChildError,
    Run,
    children,
    drop_segment,
    fmt_ratio,
    fmt_time,
    make_segment,
    now_ns,
    print_table,
    ratio,
    sleep_until,
    tail,
    tight_timers,
)
from ._peers import (
    iox_duration,
    iox_event,
    iox_missing,
    iox_node,
    iox_publisher,
    iox_pubsub,
    iox_read_stamp,
    iox_send_stamp,
    iox_service_name,
    redis_missing,
    redis_server,
)

PAYLOAD = 64
STAMP = struct.Struct("<QQ48x")
SEGMENT = "latency"
SVC_SEGMENT = "latency-svc"
FUTEX = "shmcast futex (Segment.wait)"
SPIN = "shmcast busy-poll (seg.version)"
FAST_FUTEX = "shmcast futex (wait_acquire)"
FAST_SPIN = "shmcast busy-poll (wait_acquire spin)"
SVC_SHM = "shmcast Subscriber() (wait='shm', the default)"
SVC_ASYNC = "shmcast Subscriber() aupdates() on asyncio (shm)"
SVC_EVENTS = "shmcast Subscriber(wait='events') + broker"
SVC_FUTEX = "shmcast Subscriber(wait='futex')"
SVC_SPIN = "shmcast Subscriber(wait='spin')"
#: A spin subscriber on a ring as deep as the iceoryx2 subscriber's buffer (16):
#: at 100 kHz a 2-slot ring keeps a version for 10 µs, less than a scheduler hiccup.
SVC_SPIN_DEEP = "shmcast Subscriber(wait='spin'), slots=16"
DEEP_SLOTS = 16
SVC_SHM_ANNOUNCE = "shmcast Subscriber(), Publisher(announce=True)"
DISCARD = 5  # first messages of a chunk: cold caches, first wake-ups
BLOCKING_VS_ZMQ = 0.6
#: The default Subscriber delivers at least this share of the versions at 10 kHz,
#: and a spin Subscriber at 100 kHz.
DELIVERED_MIN = 0.99
#: The rate only the busy-poll rows run at (a sleep cannot pace it: its wake-up alone
#: takes tens of µs here, so the publisher busy-waits to its deadlines at this rate).
FAST_RATE = 100_000
PYZMQ = "pyzmq PUB/SUB ipc://"
IOX_POLL = "iceoryx2 busy-poll"

# A receiver returns (t_recv, t_send, flag, lost) or None when nothing came in time.
Recv = Callable[[], "tuple[int, int, int, int] | None"]


def _serve(
    conn: Any,
    arm: Callable[[], Recv],
    idle_timeout: float = 30.0,
    idle: Callable[[], None] | None = None,
    chunk: Callable[[Recv], tuple[list[int], int]] | None = None,
) -> None:
    """The child side of the chunk protocol, shared by every contender. ``idle`` runs
    between chunks while no message is waiting (an events subscriber keeps taking the
    broker's heartbeats, as a real one does, instead of finding them stale). ``chunk``
    replaces the receive loop (the asyncio contender runs its own, on a loop)."""
    tight_timers()
    conn.send(("ready", os.getpid()))
    while True:
        if idle is not None:
            while not conn.poll(0):
                idle()
        kind, _ = conn.recv()
        if kind == "quit":
            return
        recv = arm()
        conn.send(("armed", None))
        lats, lost = (chunk or partial(_receive, idle_timeout=idle_timeout))(recv)
        conn.send(("lat", (np.asarray(lats[DISCARD:], dtype=np.int64), lost)))


def _receive(recv: Recv, idle_timeout: float) -> tuple[list[int], int]:
    """Latencies and losses until the stop message."""
    lats: list[int] = []
    lost = 0
    deadline = time.monotonic() + idle_timeout
    while True:
        got = recv()
        if got is None:
            if time.monotonic() > deadline:
                raise TimeoutError("no stop message")
            continue
        t_recv, t_send, flag, gap = got
        if flag:
            return lats, lost
        lats.append(t_recv - t_send)
        lost += gap


# ----------------------------------------------------------------- shmcast children


def _read_stamp(seg: Segment, last: int, state: list[int]) -> tuple[int, int, int, int] | None:
    """Read the latest version's send stamp through a validated view:
    ``(received_ns, sent_ns, flag, versions skipped)``, or None if torn."""
    v, i, s, _ts = seg.acquire()
    a = seg.view(i)
    t_send, flag = int(a[0]), int(a[1])
    if not seg.validate(i, s):
        return None
    t = now_ns()
    state[0] = v
    return t, t_send, flag, v - last - 1


def _child_shm_futex(conn: Any, namespace: str) -> None:
    seg = Segment.attach(SEGMENT, namespace=namespace)
    state = [0]

    def arm() -> Recv:
        state[0] = seg.version

        def recv() -> tuple[int, int, int, int] | None:
            last = state[0]
            v = seg.wait(last, timeout=0.5)
            if v == last:
                return None
            return _read_stamp(seg, last, state)

        return recv

    try:
        _serve(conn, arm)
    finally:
        seg.close()


def _child_shm_spin(conn: Any, namespace: str) -> None:
    seg = Segment.attach(SEGMENT, namespace=namespace)
    state = [0]

    def arm() -> Recv:
        state[0] = seg.version

        def recv() -> tuple[int, int, int, int] | None:
            last = state[0]
            end = time.monotonic() + 0.5
            n = 0
            while seg.version == last:  # the public busy-poll: spin on seg.version
                n += 1
                if n & 0xFFFF == 0 and time.monotonic() > end:
                    return None
            return _read_stamp(seg, last, state)

        return recv

    try:
        _serve(conn, arm)
    finally:
        seg.close()


def _child_shm_fast(conn: Any, namespace: str, spin: bool) -> None:
    seg = Segment.attach(SEGMENT, namespace=namespace)
    state = [0]

    def arm() -> Recv:
        state[0] = seg.version

        def recv() -> tuple[int, int, int, int] | None:
            last = state[0]
            got = seg.wait_acquire(last, 0.5, spin=spin)
            if got is None:
                return None
            v, i, s, _ts = got
            a = seg.view(i)
            t_send, flag = int(a[0]), int(a[1])
            if not seg.validate(i, s):
                return None
            t = now_ns()
            state[0] = v
            return t, t_send, flag, v - last - 1

        return recv

    try:
        _serve(conn, arm)
    finally:
        seg.close()


def _child_subscriber(conn: Any, namespace: str, mode: str, name: str) -> None:
    from shmcast.broker.errors import TornReadError, VersionUnavailableError
    from shmcast.subscriber import Subscriber

    sub = Subscriber(name, namespace=namespace, wait=mode)  # type: ignore[arg-type]
    state = [0, 0]  # last version seen; versions lost since the last one returned
    it = [sub.updates(timeout=0.5)]

    def arm() -> Recv:
        state[0] = sub.segment(name).version
        state[1] = 0

        def recv() -> tuple[int, int, int, int] | None:
            up = next(it[0], None)
            if up is None:  # the iterator ends after 0.5 s without an update
                it[0] = sub.updates(timeout=0.5)
                return None
            last = state[0]
            if up.version <= last:  # announced before we armed
                return None
            state[0] = up.version
            state[1] += up.version - last - 1
            try:
                with sub.read(up) as snap:  # exactly this version
                    t_send, flag = int(snap.array[0]), int(snap.array[1])
            except (TornReadError, VersionUnavailableError):
                state[1] += 1
                return None
            t = now_ns()
            lost, state[1] = state[1], 0
            return t, t_send, flag, lost

        return recv

    def idle() -> None:
        # Between chunks: take what came (an events subscriber its heartbeats), then
        # sleep: never spin (a spin subscriber idling in updates() would burn a core
        # through every other contender's chunks), and wake rarely (a dozen idle
        # children waking every few ms preempt the busy-poll rows at 100 kHz).
        for _ in sub.updates(timeout=0):
            pass
        time.sleep(0.1)

    try:
        _serve(conn, arm, idle=idle)
    finally:
        sub.close()


def _child_subscriber_async(conn: Any, namespace: str, name: str) -> None:
    """The default Subscriber iterated with ``async for`` on an asyncio loop (one
    loop per chunk; the chunk protocol itself is the same as :func:`_serve`'s)."""
    from shmcast.broker.errors import TornReadError, VersionUnavailableError
    from shmcast.subscriber import Subscriber

    sub = Subscriber(name, namespace=namespace)
    state = [0]

    def arm() -> Recv:
        for _ in sub.updates(timeout=0):
            pass
        state[0] = sub.segment(name).version
        return lambda: None  # unused: the chunk runs on its own loop

    async def run(last: int) -> tuple[list[int], int]:
        lats: list[int] = []
        lost = 0
        deadline = time.monotonic() + 30
        while True:
            async for up in sub.aupdates(timeout=0.5):
                if up.version <= last:
                    continue
                lost += up.version - last - 1
                last = up.version
                try:
                    with sub.read(up) as snap:
                        t_send, flag = int(snap.array[0]), int(snap.array[1])
                except (TornReadError, VersionUnavailableError):
                    lost += 1
                    continue
                t = now_ns()
                if flag:
                    return lats, lost
                lats.append(t - t_send)
            if time.monotonic() > deadline:
                raise TimeoutError("no stop message")

    try:
        _serve(conn, arm, chunk=lambda _recv: asyncio.run(run(state[0])))
    finally:
        sub.close()


# -------------------------------------------------------------------- peer children


def _child_zmq(conn: Any, endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)

    def arm() -> Recv:
        while sock.poll(0):
            sock.recv()

        def recv() -> tuple[int, int, int, int] | None:
            if not sock.poll(500):
                return None
            msg = sock.recv()
            t = now_ns()
            t_send, flag = STAMP.unpack(msg)
            return t, t_send, flag, 0

        return recv

    try:
        _serve(conn, arm)
    finally:
        sock.close(0)
        ctx.term()


def _child_redis(conn: Any, port: int, channel: str) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    ps = client.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(channel)
    deadline = time.monotonic() + 10
    while not ps.subscribed or ps.get_message(timeout=0.01) is not None:
        if time.monotonic() > deadline:
            raise TimeoutError("redis subscribe")

    def arm() -> Recv:
        while ps.get_message(timeout=0.0) is not None:
            pass

        def recv() -> tuple[int, int, int, int] | None:
            msg = ps.get_message(timeout=0.5)
            if msg is None:
                return None
            t = now_ns()
            t_send, flag = STAMP.unpack(msg["data"])
            return t, t_send, flag, 0

        return recv

    try:
        _serve(conn, arm)
    finally:
        ps.close()
        client.close()


def _child_iox(conn: Any, service: str, listen: bool) -> None:
    node = iox_node()
    svc = iox_pubsub(node, service, buffer=16)
    sub = svc.subscriber_builder().buffer_size(16).create()
    listener = iox_event(node, service + ".ev").listener_builder().create() if listen else None
    wait = iox_duration(0.5)

    def arm() -> Recv:
        while (smp := sub.receive()) is not None:
            smp.delete()
        if listener is not None:
            listener.try_wait()

        def recv() -> tuple[int, int, int, int] | None:
            if listener is not None:
                smp = sub.receive()
                if smp is None:
                    listener.timed_wait(wait)
                    smp = sub.receive()
                if smp is None:
                    return None
            else:
                end = time.monotonic() + 0.5
                while (smp := sub.receive()) is None:
                    if time.monotonic() > end:
                        return None
            t = now_ns()
            t_send, flag = iox_read_stamp(smp)
            smp.delete()
            return t, t_send, flag, 0

        return recv

    try:
        _serve(conn, arm)
    finally:
        sub.delete()
        if listener is not None:
            listener.delete()


# ---------------------------------------------------------------------------- parent


def _start_service(
    run: Run, stack: contextlib.ExitStack
) -> Callable[[str], Callable[[int, int], None]]:
    """A broker process in a namespace of its own; returns a factory of Publishers, one
    segment per service row (so one row's announcements never wake another row's
    subscriber). The broker and the publishers are stopped by ``stack`` (the broker
    unlinks its segments when it stops)."""
    from shmcast.cli.testing import BROKER_READY, start
    from shmcast.publisher import Publisher

    ns = run.namespace + "svc"
    broker = start(["broker", "-n", ns], ready=BROKER_READY)
    stack.callback(broker.stop)

    def make(segment: str, announce: bool = False, slots: int = 2) -> Callable[[int, int], None]:
        publisher = Publisher(
            segment,
            dtype=np.uint64,
            shape=(PAYLOAD // 8,),
            slots=slots,
            namespace=ns,
            announce=announce,
        )
        stack.callback(publisher.close)
        buf = np.zeros(PAYLOAD // 8, dtype=np.uint64)

        def pub_svc(t: int, flag: int) -> None:
            buf[0] = t
            buf[1] = flag
            publisher.publish(buf)

        return pub_svc

    return make


def bench_latency(run: Run) -> dict[str, Any]:
    tight_timers()
    rates = [1000, 10000, FAST_RATE]
    chunks = run.q(3, 1)
    per_chunk = {1000: run.q(800, 150), 10000: run.q(3000, 400), FAST_RATE: run.q(20000, 2000)}
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        seg = make_segment(run, SEGMENT, np.uint64, (PAYLOAD // 8,))
        stack.callback(drop_segment, seg)
        buf = np.zeros(PAYLOAD // 8, dtype=np.uint64)

        def pub_shm(t: int, flag: int) -> None:
            buf[0] = t
            buf[1] = flag
            seg.write(buf)

        zctx = zmq.Context()
        stack.callback(zctx.term)
        pub = zctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        stack.callback(pub.close, 0)
        endpoint = f"ipc://{run.tmpdir}/latency.ipc"
        pub.bind(endpoint)

        def pub_zmq(t: int, flag: int) -> None:
            pub.send(STAMP.pack(t, flag))

        specs: dict[str, tuple[Any, ...]] = {
            FUTEX: (_child_shm_futex, run.namespace),
            SPIN: (_child_shm_spin, run.namespace),
            FAST_FUTEX: (_child_shm_fast, run.namespace, False),
            FAST_SPIN: (_child_shm_fast, run.namespace, True),
            PYZMQ: (_child_zmq, endpoint),
        }
        pubs: dict[str, Callable[[int, int], None]] = {
            FUTEX: pub_shm,
            SPIN: pub_shm,
            FAST_FUTEX: pub_shm,
            FAST_SPIN: pub_shm,
            PYZMQ: pub_zmq,
        }
        reason: str | None = None
        service = (
            (SVC_SHM, "shm", False, 2),
            (SVC_ASYNC, "async", False, 2),
            (SVC_EVENTS, "events", False, 2),
            (SVC_FUTEX, "futex", False, 2),
            (SVC_SPIN, "spin", False, 2),
            (SVC_SPIN_DEEP, "spin", False, DEEP_SLOTS),
            # The old default's cost, for comparison: full runs only.
            *run.q(((SVC_SHM_ANNOUNCE, "shm", True, 2),), ()),
        )
        try:
            make_pub = _start_service(run, stack)
            for label, mode, announce, slots in service:
                name = f"{SVC_SEGMENT}-{mode}{'-announce' if announce else ''}-{slots}"
                pubs[label] = make_pub(name, announce, slots)
                if mode == "async":
                    specs[label] = (_child_subscriber_async, run.namespace + "svc", name)
                else:
                    specs[label] = (_child_subscriber, run.namespace + "svc", mode, name)
        except Exception as exc:
            reason = f"broker or publisher did not start: {exc}"[:200]
        if reason:
            for label, *_ in service:
                skipped[label] = reason
                specs.pop(label, None)
                pubs.pop(label, None)

        reason = redis_missing()
        if reason:
            skipped["Redis pub/sub"] = reason
        else:
            try:
                port = stack.enter_context(redis_server())
            except Exception as exc:
                skipped["Redis pub/sub"] = f"redis-server did not start: {exc}"
            else:
                import redis

                rclient = redis.Redis(host="127.0.0.1", port=port)
                stack.callback(rclient.close)
                channel = f"bench.{run.namespace}"
                specs["Redis pub/sub"] = (_child_redis, port, channel)

                def pub_redis(t: int, flag: int) -> None:
                    rclient.publish(channel, STAMP.pack(t, flag))

                pubs["Redis pub/sub"] = pub_redis

        iox_pubs: list[Any] = []
        reason = iox_missing()
        if reason:
            skipped[IOX_POLL] = skipped["iceoryx2 blocking listener"] = reason
        else:
            node = iox_node()
            for label, what, listen in (
                (IOX_POLL, "lat-poll", False),
                ("iceoryx2 blocking listener", "lat-listen", True),
            ):
                name = iox_service_name(run.namespace, what)
                ipub = iox_publisher(iox_pubsub(node, name, buffer=16), PAYLOAD)
                stack.callback(ipub.delete)
                iox_pubs.append(ipub)
                specs[label] = (_child_iox, name, listen)
                if listen:
                    notifier = iox_event(node, name + ".ev").notifier_builder().create()
                    stack.callback(notifier.delete)

                    def pub_iox(t: int, flag: int, p: Any = ipub, n: Any = notifier) -> None:
                        iox_send_stamp(p, PAYLOAD, t, flag)
                        n.notify()
                else:

                    def pub_iox(t: int, flag: int, p: Any = ipub) -> None:
                        iox_send_stamp(p, PAYLOAD, t, flag)

                pubs[label] = pub_iox
        for label, why in skipped.items():
            print(f"  latency: skipping {label}: {why}")

        names = list(specs)
        kids_list = stack.enter_context(children([specs[k] for k in names]))
        kids = dict(zip(names, kids_list, strict=True))
        for ipub in iox_pubs:  # an iceoryx2 publisher connects to subscribers made since
            ipub.update_connections()
        # Let zmq's and redis's subscriptions propagate before the first chunk.
        time.sleep(0.2)

        results: dict[str, dict[str, Any]] = {}
        for rate in rates:
            period = 1_000_000_000 // rate
            names = list(kids)
            if rate == FAST_RATE:  # the busy-poll rows, pyzmq for reference
                busy = (SPIN, FAST_SPIN, SVC_SPIN, SVC_SPIN_DEEP, PYZMQ, IOX_POLL)
                names = [k for k in names if k in busy]
            else:  # the deep ring only where a 2-slot one cannot follow
                names = [k for k in names if k != SVC_SPIN_DEEP]
            lats: dict[str, list[np.ndarray]] = {k: [] for k in names}
            lost = {k: 0 for k in names}
            sent = {k: 0 for k in names}
            elapsed = {k: 0 for k in names}
            for c in range(chunks):
                for k in names[c % len(names) :] + names[: c % len(names)]:
                    n = per_chunk[rate]
                    a, lo, dt = _chunk(kids[k], pubs[k], n, period, busy=rate == FAST_RATE)
                    lats[k].append(a)
                    lost[k] += lo
                    sent[k] += n
                    elapsed[k] += dt
            results[str(rate)] = {
                k: {
                    "ns": tail(np.concatenate(lats[k])),
                    "sent": sent[k],
                    "received": int(sum(len(x) for x in lats[k])) + DISCARD * chunks,
                    "lost": lost[k],
                    "achieved_rate_hz": sent[k] / (elapsed[k] / 1e9) if elapsed[k] else None,
                }
                for k in names
            }
    return _report(results, skipped)


def _chunk(
    kid: Child, pub: Callable[[int, int], None], n: int, period: int, busy: bool = False
) -> tuple[np.ndarray, int, int]:
    kid.send("go")
    kid.expect("armed", 30)
    start = now_ns() + 1_000_000
    for k in range(n):
        if busy:
            due = start + k * period
            while now_ns() < due:
                pass
        else:
            sleep_until(start + k * period)
        pub(now_ns(), 0)
    end = now_ns()
    for _ in range(200):  # the stop message; repeated in case a lossy peer drops one
        sleep_until(now_ns() + 2_000_000)
        pub(now_ns(), 1)
        if kid.conn.poll(0.01):
            break
    else:
        raise ChildError(f"{kid.proc.name}: no answer to the stop message")
    arr, lost = kid.expect("lat", 30)
    return arr, int(lost), end - start


def _report(results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    targets = []
    for rate, res in results.items():
        rows = []
        zmq_p50 = res.get(PYZMQ, {}).get("ns", {}).get("p50")
        for k, r in res.items():
            t = r["ns"]
            rows.append(
                [
                    k,
                    fmt_time(t.get("p50")),
                    fmt_time(t.get("p90")),
                    fmt_time(t.get("p99")),
                    fmt_time(t.get("p99.9")),
                    fmt_ratio(ratio(t.get("p50"), zmq_p50)),
                    t.get("n", 0),
                    max(r["lost"], r["sent"] - r["received"]),  # peers count no gaps
                    f"{r['achieved_rate_hz']:.0f}",
                ]
            )
        for k, why in skipped.items():
            rows.append([k, "skipped", "", "", "", "", "", "", why[:60]])
        paced = "busy-waiting publisher, " if int(rate) == FAST_RATE else ""
        print_table(
            f"latency at {int(rate) // 1000} kHz, 64-byte payload ({paced}busy-poll rows and "
            f"pyzmq only): publish call → subscriber holds the data"
            if int(rate) == FAST_RATE
            else f"latency at {int(rate) // 1000} kHz, 64-byte payload: publish call → "
            "subscriber holds the data",
            ["contender", "p50", "p90", "p99", "p99.9", "p50/zmq", "n", "lost", "rate Hz"],
            rows,
        )
        p50 = {k: r["ns"].get("p50") for k, r in res.items()}
        khz = f"{int(rate) // 1000} kHz"
        if int(rate) == FAST_RATE:
            for label in (SVC_SPIN, SVC_SPIN_DEEP, FAST_SPIN):
                if label in res:
                    row = res[label]
                    gone = max(row["lost"], row["sent"] - row["received"])
                    share = 1.0 - gone / row["sent"] if row["sent"] else None
                    targets.append(
                        {
                            "target": f"latency {khz}: {label} delivers >= {DELIVERED_MIN:.0%} "
                            f"of the versions (slots={DEEP_SLOTS if label == SVC_SPIN_DEEP else 2}"
                            ", a consumer that only reads)",
                            "value": share,
                            "met": None if share is None else share >= DELIVERED_MIN,
                        }
                    )
            continue
        zmq_ref, iox_listen, iox_poll = (
            p50.get(PYZMQ),
            p50.get("iceoryx2 blocking listener"),
            p50.get(IOX_POLL),
        )
        for label in (FUTEX, FAST_FUTEX, SVC_SHM, SVC_ASYNC, SVC_FUTEX, SVC_SHM_ANNOUNCE):
            if label not in p50:
                continue
            r_zmq = ratio(p50[label], zmq_ref)
            targets.append(
                {
                    "target": f"latency {khz}: {label} p50 <= {BLOCKING_VS_ZMQ}x pyzmq ipc p50",
                    "value": r_zmq,
                    "met": None if r_zmq is None else r_zmq <= BLOCKING_VS_ZMQ,
                }
            )
            r_ioxl = ratio(p50[label], iox_listen)
            targets.append(
                {
                    "target": f"latency {khz}: {label} p50 < iceoryx2 listener p50 (ratio)",
                    "value": r_ioxl,
                    "met": None if r_ioxl is None else r_ioxl < 1.0,
                }
            )
        for label in (SPIN, FAST_SPIN, SVC_SPIN):
            if label not in p50:
                continue
            r_ioxp = ratio(p50[label], iox_poll)
            targets.append(
                {
                    "target": f"latency {khz}: {label} p50 <= iceoryx2 busy-poll p50 (ratio)",
                    "value": r_ioxp,
                    "met": None if r_ioxp is None else r_ioxp <= 1.0,
                }
            )
        if SVC_SHM in p50:
            p99 = {k: r["ns"].get("p99") for k, r in res.items()}
            r99 = ratio(p99[SVC_SHM], p99.get(PYZMQ))
            targets.append(
                {
                    "target": f"latency {khz}: {SVC_SHM} p99 <= pyzmq ipc p99",
                    "value": r99,
                    "met": None if r99 is None else r99 <= 1.0,
                }
            )
            row = res[SVC_SHM]
            share = 1.0 - row["lost"] / row["sent"] if row["sent"] else None
            if rate == "10000":
                targets.append(
                    {
                        "target": f"latency {khz}: {SVC_SHM} delivers >= {DELIVERED_MIN:.0%} "
                        "of the versions (slots=2, a consumer that only reads)",
                        "value": share,
                        "met": None if share is None else share >= DELIVERED_MIN,
                    }
                )
        if SVC_ASYNC in p50 and SVC_SHM in p50:
            r_async = ratio(p50[SVC_ASYNC], p50[SVC_SHM])
            targets.append(
                {
                    "target": f"latency {khz}: {SVC_ASYNC} p50 / sync iterator p50 (no target)",
                    "value": r_async,
                    "met": None,
                }
            )
        if SVC_EVENTS in p50:
            r_ev = ratio(p50[SVC_EVENTS], zmq_ref)
            targets.append(
                {
                    "target": f"latency {khz}: {SVC_EVENTS} p50 / pyzmq p50 (no target)",
                    "value": r_ev,
                    "met": None,
                }
            )
    return {"rates": results, "skipped": skipped, "targets": targets, "payload_bytes": PAYLOAD}
