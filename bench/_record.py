"""record: the recorder and replay against bare loops of the same frames on the same disk.

1 MiB frames (uint16 512x1024), three measurements:

- keep-up: a child process publishes at 200 Hz into a segment of the default two
  slots; the recorder (this process: futex wait, HDF5 without compression, in the
  run's temporary directory) records; published, recorded and missed are counted.
- write throughput: the child publishes flat out into a 64-slot segment and the
  recorder records for a window (saturated: it records what it can and counts the
  rest); frames written per second, the final flush included. Against a bare h5py
  loop in this process appending the same frame for the same window (resize,
  ``ds[i] = frame``, a flush every 0.5 s, chunk per frame, same libver) to the same
  directory, while the same child publishes flat out beside it (nobody reads it):
  the same load on the machine in both windows. Windows alternate, the order
  rotating every round; files are deleted after each window.
- replay: a recording of N frames (written once, read back from the page cache)
  published with ``Replayer(speed=None)`` (``replay --max``) against a bare
  ``Publisher.publish`` loop over the same frames held in memory; both publish into
  segments of one broker process (namespace ``<run>rec``) and announce each version.
  Rounds alternate; versions per second.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import numpy as np

from shmcast.broker import Segment
from shmcast.broker.recording import SegmentLayout, open_writer

from ._common import (
    MiB,
    Run,
    children,
    fmt_ratio,
    now_ns,
    print_table,
    ratio,
    sleep_until,
    stats,
    tight_timers,
)

SHAPE = (512, 1024)
DTYPE = np.dtype("<u2")
RATE = 200.0
TARGET = 0.8
FLUSH = 0.5


def _child_publisher(conn: Any, namespace: str, name: str, slots: int) -> None:
    """Create ``name`` and publish 1 MiB frames on request: ("go", (rate or 0, seconds))."""
    tight_timers()
    seg = Segment.create(name, DTYPE, SHAPE, slots=slots, namespace=namespace)
    try:
        frame = np.random.default_rng(7).integers(0, 4096, SHAPE, dtype=np.uint16)
        conn.send(("ready", os.getpid()))
        while True:
            kind, payload = conn.recv()
            if kind == "quit":
                return
            rate, seconds = payload
            period = int(1e9 / rate) if rate else 0
            t0 = now_ns()
            end = t0 + int(seconds * 1e9)
            nxt = t0
            n = 0
            while now_ns() < end:
                frame[0, 0] = n
                seg.write(frame)
                n += 1
                if period:
                    nxt += period
                    sleep_until(nxt)
            conn.send(("done", (n, (now_ns() - t0) / 1e9)))
    finally:
        seg.close()
        seg.unlink()


def _record_window(
    run: Run, kid: Any, segment: str, rate: float, window: float, path: str
) -> dict[str, Any]:
    """One recorder window: publish for ``window`` s at ``rate`` (0: flat out)."""
    from shmcast.subscriber import Recorder

    rec = Recorder(segment, path, namespace=run.namespace, wait="futex")
    stop = threading.Event()
    t0 = now_ns()
    kid.send("go", (rate, window))
    try:
        timer = threading.Timer(window + 0.05, stop.set)
        timer.start()
        try:
            rec.run(stop=stop)  # closes the file: the final flush is timed too
        finally:
            timer.cancel()
        elapsed = (now_ns() - t0) / 1e9
        published, _ = kid.expect("done", 30)
    finally:
        rec.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    st = rec.stats()[segment]
    return {
        "published": published,
        "recorded": st.recorded,
        "missed": st.missed,
        "lapped": st.lapped,
        "dropped": st.dropped,
        "seconds": elapsed,
        "fps": st.recorded / elapsed,
    }


def _bare_h5py(window: float, path: str) -> dict[str, Any]:
    """A bare append loop: the same 1 MiB frame appended for ``window`` seconds."""
    import h5py

    frame = np.random.default_rng(7).integers(0, 4096, SHAPE, dtype=np.uint16)
    t0 = now_ns()
    end = t0 + int(window * 1e9)
    n = 0
    with h5py.File(path, "w", libver=("v110", "latest")) as f:
        ds = f.create_dataset(
            "data", shape=(0, *SHAPE), maxshape=(None, *SHAPE), dtype=DTYPE, chunks=(1, *SHAPE)
        )
        f.swmr_mode = True
        next_flush = t0 + int(FLUSH * 1e9)
        while now_ns() < end:
            frame[0, 0] = n
            ds.resize(n + 1, axis=0)
            ds[n] = frame
            n += 1
            if now_ns() >= next_flush:
                f.flush()
                next_flush = now_ns() + int(FLUSH * 1e9)
    elapsed = (now_ns() - t0) / 1e9
    os.unlink(path)
    return {"written": n, "seconds": elapsed, "fps": n / elapsed}


def _bench_replay(run: Run, frames: int, rounds: int) -> dict[str, Any]:
    from shmcast.cli.testing import BROKER_READY, start
    from shmcast.publisher import Publisher, Replayer

    ns = run.namespace + "rec"
    path = os.path.join(run.tmpdir, "replay.h5")
    data = [np.full(SHAPE, i, dtype=DTYPE) for i in range(frames)]
    layout = SegmentLayout("replayed", DTYPE, SHAPE)
    with open_writer(path, [layout]) as w:
        for i, a in enumerate(data):
            w.append("replayed", [a], [i + 1], [i * 5_000_000])
    rates: dict[str, list[float]] = {"replay --max": [], "Publisher loop": []}
    broker = start(["broker", "-n", ns], ready=BROKER_READY)
    try:
        with Publisher("bare", dtype=DTYPE, shape=SHAPE, namespace=ns) as pub:

            def bare() -> float:
                t0 = now_ns()
                for a in data:
                    pub.publish(a)
                return frames / ((now_ns() - t0) / 1e9)

            def replayed() -> float:
                with Replayer(path, namespace=ns, speed=None) as rep:
                    t0 = now_ns()
                    n = sum(1 for _ in rep)
                    return n / ((now_ns() - t0) / 1e9)

            fns = {"replay --max": replayed, "Publisher loop": bare}
            names = list(fns)
            for fn in fns.values():  # warm-up: pages, caches, code paths
                fn()
            for r in range(rounds):
                for k in names[r % 2 :] + names[: r % 2]:
                    rates[k].append(fns[k]())
    finally:
        broker.stop()
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {k: stats(v) for k, v in rates.items()}


def bench_record(run: Run) -> dict[str, Any]:
    tight_timers()
    keep_window = run.q(5.0, 1.0)
    window = run.q(2.0, 0.5)
    rounds = run.q(3, 2)
    replay_frames = run.q(400, 40)
    replay_rounds = run.q(6, 3)
    out: dict[str, Any] = {"frame_bytes": int(np.prod(SHAPE)) * DTYPE.itemsize}

    specs = [
        (_child_publisher, run.namespace, "rec_keep", 2),
        (_child_publisher, run.namespace, "rec_fast", 64),
    ]
    with children(specs) as (keep_kid, fast_kid):
        keep = _record_window(
            run, keep_kid, "rec_keep", RATE, keep_window, os.path.join(run.tmpdir, "keep.h5")
        )
        fps: dict[str, list[float]] = {"recorder": [], "bare h5py loop": []}
        windows: list[dict[str, Any]] = []
        names = list(fps)
        for r in range(rounds):
            for k in names[r % 2 :] + names[: r % 2]:
                path = os.path.join(run.tmpdir, f"w{r}.h5")
                if k == "recorder":
                    res = _record_window(run, fast_kid, "rec_fast", 0, window, path)
                    windows.append(res)
                else:
                    # The same flat-out publisher runs beside the bare loop: the same
                    # load on the machine in both windows.
                    fast_kid.send("go", (0, window))
                    res = _bare_h5py(window, path)
                    fast_kid.expect("done", 30)
                fps[k].append(res["fps"])
                time.sleep(0.05)
    write = {k: stats(v) for k, v in fps.items()}
    write_ratio = ratio(write["recorder"]["median"], write["bare h5py loop"]["median"])
    rep = _bench_replay(run, replay_frames, replay_rounds)
    replay_ratio = ratio(rep["replay --max"]["median"], rep["Publisher loop"]["median"])

    print_table(
        f"record keep-up: 1 MiB frames at {RATE:.0f} Hz into 2 slots for {keep_window} s, "
        f"recorder (futex) to HDF5",
        ["published", "recorded", "missed", "lapped", "dropped", "recorded/s"],
        [
            [
                keep["published"],
                keep["recorded"],
                keep["missed"],
                keep["lapped"],
                keep["dropped"],
                f"{keep['fps']:.0f}",
            ]
        ],
    )
    mib = out["frame_bytes"] / MiB
    print_table(
        f"record write throughput: 1 MiB frames, {rounds} x {window} s windows alternating "
        f"(recorder saturated by a flat-out publisher into 64 slots)",
        ["contender", "frames/s", "p10 - p90", "MiB/s", "vs bare"],
        [
            [
                k,
                f"{s['median']:.0f}",
                f"{s['p10']:.0f} - {s['p90']:.0f}",
                f"{s['median'] * mib:.0f}",
                fmt_ratio(ratio(s["median"], write["bare h5py loop"]["median"])),
            ]
            for k, s in write.items()
        ],
    )
    print_table(
        f"replay: {replay_frames} frames of 1 MiB, {replay_rounds} rounds alternating",
        ["contender", "versions/s", "p10 - p90", "vs Publisher loop"],
        [
            [
                k,
                f"{s['median']:.0f}",
                f"{s['p10']:.0f} - {s['p90']:.0f}",
                fmt_ratio(ratio(s["median"], rep["Publisher loop"]["median"])),
            ]
            for k, s in rep.items()
        ],
    )
    kept_up = keep["missed"] == 0 and keep["recorded"] == keep["published"]
    out.update(
        {
            "keep_up": keep,
            "write_fps": write,
            "write_windows": windows,
            "replay_vps": rep,
            "targets": [
                {
                    "target": f"record: 1 MiB frames at {RATE:.0f} Hz, 0 missed",
                    "value": keep["missed"],
                    "met": kept_up,
                },
                {
                    "target": f"record: write throughput >= {TARGET}x a bare h5py append loop",
                    "value": write_ratio,
                    "met": None if write_ratio is None else write_ratio >= TARGET,
                },
                {
                    "target": f"replay --max: rate >= {TARGET}x a bare Publisher loop",
                    "value": replay_ratio,
                    "met": None if replay_ratio is None else replay_ratio >= TARGET,
                },
            ],
        }
    )
    return out
