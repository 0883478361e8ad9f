"""Zenoh bridge benchmark: shmcast through two bridges vs. bare zenoh-python, on loopback.

``python -m bench --only bridge`` (needs the zenoh extra; skipped with the reason
otherwise). One Zenoh router on 127.0.0.1; every role is its own process.

Paths, from a writer to a reader through the same router:

- bridge: a shmcast Publisher -> namespace A's segment -> ``shmcast bridge zenoh
  --export`` -> router -> ``shmcast bridge zenoh --import`` -> namespace B's
  mirror -> a reader woken by the mirror's futex (zero-copy read).
- zenoh: a zenoh-python publisher ``put`` -> router -> a zenoh-python subscriber.

Payloads carry ``time.monotonic_ns()`` in their first 8 bytes (one clock: one
host). Latency: 64-byte payloads paced at 200/s, p50/p99 at the reader.
Throughput: 1 MiB frames offered at the same rate by both writers
(:data:`THROUGHPUT_RATE`, above what either path carries), what the reader got
per second (the bridge skips to the latest version when it falls behind, so
skipped versions are not counted). Both writers copy every frame once, whole:
the zenoh-python writer's bytearray into ``put``, the shmcast writer's into a slot
with ``publish_bytes``. The shmcast writer is paced because nothing pushes back on a
segment's writer: unpaced, it spun a core committing 170,000 versions/s of which
the bridge could carry a few hundred, and on 2 cores that starved the exporter.
Both paths use congestion control ``block`` for throughput (the bridge's
default is ``drop``: same wire, fewer waits) and the contenders alternate, round
by round.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import numpy as np

from ._common import Run, attach_within, fmt_ratio, fmt_time, print_table, ratio, stats

READY = "bench ready: "
RESULT = "bench result: "
LATENCY_RATE = 200.0
#: Frames per second both writers offer in the throughput runs: several times
#: what bare zenoh-python carries of 1 MiB frames on loopback (690-800/s on 2
#: cores), so both paths run saturated; the report says when one is not.
THROUGHPUT_RATE = 2000.0
FRAME = 1 << 20
TICK = 64


def _say(prefix: str, obj: Any) -> None:
    print(f"{prefix}{json.dumps(obj)}", flush=True)


def _zconf(mode: str, endpoint: str) -> Any:
    import zenoh

    conf: dict[str, Any] = {
        "mode": mode,
        ("listen" if mode == "router" else "connect"): {"endpoints": [endpoint]},
        "scouting": {"multicast": {"enabled": False}, "gossip": {"enabled": False}},
        "transport": {"shared_memory": {"enabled": False}},
    }
    return zenoh.Config.from_json5(json.dumps(conf))


# ---------------------------------------------------------------------- peers


def _peer_router(endpoint: str) -> None:
    import zenoh

    session = zenoh.open(_zconf("router", endpoint))
    _say(READY, {})
    sys.stdin.read()  # until the parent closes our stdin
    session.close()


def _peer_zenoh_pub(endpoint: str, size: int, rate: float, seconds: float) -> None:
    import zenoh

    session = zenoh.open(_zconf("client", endpoint))
    pub = session.declare_publisher("bench/zenoh", congestion_control=zenoh.CongestionControl.BLOCK)
    _say(READY, {})
    time.sleep(1.0)  # the subscriber's declaration reaches the router
    buf = bytearray(size)
    n = 0
    period = 1.0 / rate if rate else 0.0
    start = next_t = time.monotonic()
    while time.monotonic() - start < seconds:
        buf[:8] = time.monotonic_ns().to_bytes(8, "little")
        # Zenoh copies the bytearray in put: the one copy of the frame, as the shmcast
        # writer's into its slot. A new bytes per frame (bytes(buf)) cost a second copy
        # and a fresh 1 MiB allocation that glibc gave back to the kernel at each free
        # and faulted in again: 470 frames/s carried instead of 690-800.
        pub.put(buf)
        n += 1
        if period:
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
    _say(RESULT, {"sent": n})
    time.sleep(0.5)
    session.close()


def _peer_zenoh_sub(endpoint: str, seconds: float) -> None:
    import zenoh

    session = zenoh.open(_zconf("client", endpoint))
    lat: list[int] = []
    marks: list[float] = []
    got = [0]

    def on_sample(sample: Any) -> None:
        now = time.monotonic_ns()
        data = sample.payload.to_bytes()  # the reader has the bytes: as a mirror would
        lat.append(now - int.from_bytes(data[:8], "little"))
        got[0] += 1
        marks.append(time.monotonic())

    sub = session.declare_subscriber(
        "bench/zenoh", zenoh.handlers.Callback(on_sample, indirect=False)
    )
    _say(READY, {})
    time.sleep(seconds)
    sub.undeclare()
    session.close()
    _say(RESULT, _summary(lat, marks))


def _peer_shm_pub(segment: str, size: int, rate: float, seconds: float) -> None:
    from shmcast.publisher import Publisher

    # Four slots: the writer must not lap the exporter's copy of a 1 MiB frame.
    with Publisher(segment, dtype=np.uint8, shape=(size,), slots=4) as pub:
        _say(READY, {})
        pub.publish_bytes(bytes(size))  # a first version: the far side creates its mirror
        time.sleep(1.5)
        buf = bytearray(size)
        n = 0
        period = 1.0 / rate if rate else 0.0
        start = next_t = time.monotonic()
        while time.monotonic() - start < seconds:
            buf[:8] = time.monotonic_ns().to_bytes(8, "little")
            # The frame's bytes copied in once, whole, as the zenoh writer's put(buf).
            pub.publish_bytes(buf)
            n += 1
            if period:
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))
        _say(RESULT, {"sent": n})


def _peer_shm_read(segment: str, seconds: float) -> None:
    _say(READY, {})
    deadline = time.monotonic() + seconds
    seg = attach_within(segment, deadline)
    lat: list[int] = []
    marks: list[float] = []
    if seg is not None:
        # Each slot's stamp as an int64 view, made once, as a reader holds its views:
        # made per version (a slice and a view), numpy's calls ran cold after every
        # wake and were counted as the bridge's latency.
        stamps = [seg.view(i)[:8].view(np.int64) for i in range(seg.slots)]
        last = seg.version
        while time.monotonic() < deadline:
            got = seg.wait_acquire(last, 0.1)
            # The reader has the version: the clock is read before its bytes are
            # touched, as the zenoh subscriber reads it on entering its callback.
            now = time.monotonic_ns()
            if got is None:
                continue
            v, slot, seq, _ = got
            stamp = int(stamps[slot][0])
            ok = seg.validate(slot, seq)
            last = v
            if ok and stamp:
                lat.append(now - stamp)
                marks.append(time.monotonic())
        stamps.clear()  # the views go before the mapping
        seg.close()
    _say(RESULT, _summary(lat, marks))


def _summary(lat: list[int], marks: list[float]) -> dict[str, Any]:
    arr = np.array(lat, dtype=np.float64)
    span = marks[-1] - marks[0] if len(marks) > 1 else 0.0
    return {
        "received": len(lat),
        "p50_ns": float(np.percentile(arr, 50)) if arr.size else None,
        "p99_ns": float(np.percentile(arr, 99)) if arr.size else None,
        "per_s": (len(marks) - 1) / span if span > 0 else None,
    }


PEERS = {
    "router": _peer_router,
    "zenoh-pub": _peer_zenoh_pub,
    "zenoh-sub": _peer_zenoh_sub,
    "shm-pub": _peer_shm_pub,
    "shm-read": _peer_shm_read,
}


# ---------------------------------------------------------------------- orchestration


class _Proc:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        import os

        full = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=full,
        )  # fmt: skip

    def line(self, prefix: str, timeout: float) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if not ready:
                if self.proc.poll() is not None:
                    break
                continue
            text = self.proc.stdout.readline()
            if not text:
                break
            seen.append(text.rstrip())
            if text.startswith(prefix):
                body = text[len(prefix) :].strip()
                return dict(json.loads(body)) if body.startswith("{") else {}
        raise RuntimeError(f"no {prefix!r} from {self.proc.args}: {seen[-10:]}")

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _peer(role: str, *args: Any, env: dict[str, str] | None = None) -> _Proc:
    return _Proc([sys.executable, "-m", "bench._bridge", "--peer", role, *map(str, args)], env)


def _shmcast(args: list[str], namespace: str) -> _Proc:
    return _Proc([sys.executable, "-m", "shmcast.cli", *args], {"SHMCAST_NAMESPACE": namespace})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one(
    run: Run, path: str, mode: str, endpoint: str, ns: tuple[str, str], k: int
) -> dict[str, Any]:
    seconds = run.q(5.0, 1.0)
    size = TICK if mode == "latency" else FRAME
    rate = LATENCY_RATE if mode == "latency" else THROUGHPUT_RATE
    with ExitStack() as stack:
        procs: list[_Proc] = []
        stack.callback(lambda: [p.stop() for p in reversed(procs)])
        if path == "zenoh":
            procs.append(_peer("zenoh-sub", endpoint, seconds + 3))
            procs[-1].line(READY, 30)
            procs.append(_peer("zenoh-pub", endpoint, size, rate, seconds))
            procs[-1].line(READY, 30)
            sent = procs[-1].line(RESULT, seconds + 60)
            got = procs[0].line(RESULT, seconds + 60)
        else:
            a, b = ns
            seg = f"{mode}{k}"
            congestion = "drop" if mode == "latency" else "block"
            for args, namespace in (
                (["bridge", "zenoh", "--connect", endpoint, "--import", f"shmcast/{a}/{seg}"], b),
                (["bridge", "zenoh", "--connect", endpoint, "--export", seg,
                  "--congestion", congestion], a),
            ):  # fmt: skip
                procs.append(_shmcast(args, namespace))
                procs[-1].line("shmcast bridge ready: ", 30)
            procs.append(_peer("shm-read", seg, seconds + 5, env={"SHMCAST_NAMESPACE": b}))
            procs[-1].line(READY, 30)
            procs.append(_peer("shm-pub", seg, size, rate, seconds, env={"SHMCAST_NAMESPACE": a}))
            procs[-1].line(READY, 30)
            sent = procs[-1].line(RESULT, seconds + 60)
            got = procs[-2].line(RESULT, seconds + 60)
        return {"path": path, "mode": mode, "sent": sent["sent"], **got}


def bench_bridge(run: Run) -> dict[str, Any]:
    try:
        import zenoh  # noqa: F401
    except ImportError:
        why = "eclipse-zenoh is not installed (pip install 'shmcast[zenoh]')"
        return {"skipped": {"bridge": why}, "targets": []}
    endpoint = f"tcp/127.0.0.1:{_free_port()}"
    ns = (run.namespace + "za", run.namespace + "zb")
    rounds = run.q(3, 1)
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        router = _peer("router", endpoint)
        stack.callback(router.stop)
        router.line(READY, 30)
        for namespace in ns:
            broker = _shmcast(["broker"], namespace)
            stack.callback(broker.stop)
            broker.line("shmcast broker ready: ", 30)
        for k in range(rounds):
            for mode in ("latency", "throughput"):
                for path in ("zenoh", "bridge"):
                    results.append(_one(run, path, mode, endpoint, ns, k))
    return _report(results)


def _report(results: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(path: str, mode: str, key: str) -> list[float]:
        return [r[key] for r in results if r["path"] == path and r["mode"] == mode and r.get(key)]

    out: dict[str, Any] = {"runs": results}
    rows = []
    for mode, key, what in (
        ("latency", "p50_ns", "latency p50 (64 B, 200/s)"),
        ("latency", "p99_ns", "latency p99 (64 B, 200/s)"),
        ("throughput", "per_s", f"frames/s (1 MiB, {THROUGHPUT_RATE:.0f}/s offered)"),
    ):
        z, b = stats(pick("zenoh", mode, key)), stats(pick("bridge", mode, key))
        r = ratio(b.get("median"), z.get("median"))
        out[f"{mode}_{key}"] = {"zenoh": z, "bridge": b, "ratio": r}
        rows.append((what, _fmt(z, mode), _fmt(b, mode), fmt_ratio(r)))
    lat = out["latency_p50_ns"]["ratio"]
    tput = out["throughput_per_s"]["ratio"]
    carried = max(
        pick("zenoh", "throughput", "per_s") + pick("bridge", "throughput", "per_s"), default=0
    )
    # A path that carries nearly all it is offered was not saturated: its ratio
    # then says more about THROUGHPUT_RATE than about the path.
    out["throughput_saturated"] = carried < 0.8 * THROUGHPUT_RATE
    out["targets"] = [
        {
            "target": "bridge: 64 B latency p50 <= 1.3x bare zenoh-python's",
            "value": lat,
            "met": None if lat is None else lat <= 1.3,
        },
        {
            "target": "bridge: 1 MiB throughput >= 0.8x bare zenoh-python put/subscribe",
            "value": tput,
            "met": None if tput is None else tput >= 0.8,
        },
    ]
    print_table(
        "bridge: shmcast through two Zenoh bridges vs bare zenoh-python, one router on loopback",
        ("measure", "bare zenoh", "bridge", "bridge/zenoh"),
        rows,
    )
    if not out["throughput_saturated"]:
        print(f"note: a path carried {carried:.0f} of {THROUGHPUT_RATE:.0f} frames/s offered: "
              "raise THROUGHPUT_RATE for a throughput ratio")  # fmt: skip
    return out


def _fmt(s: dict[str, float], mode: str) -> str:
    """Median and the p10-p90 range over the rounds."""
    if not s.get("n"):
        return "-"
    if mode == "latency":
        return f"{fmt_time(s['median'])} ({fmt_time(s['p10'])} - {fmt_time(s['p90'])})"
    return f"{s['median']:.0f}/s ({s['p10']:.0f} - {s['p90']:.0f})"


def _arg(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--peer":
        PEERS[sys.argv[2]](*[_arg(a) for a in sys.argv[3:]])  # type: ignore[operator]
    else:
        raise SystemExit("run it with: python -m bench --only bridge")
