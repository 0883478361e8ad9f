"""``shmcast demo``: the whole system on one machine, with no configuration.

A broker, the ``ticks`` and ``frames`` feeds, two analytics subscribers (each
with its own Prometheus endpoint) and a recorder writing both feeds to a
temporary HDF5 file, as real processes; a live table; and a clean exit (nothing
left in /dev/shm, the recording reported and removed unless kept) on Ctrl-C or
when the time is up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

from shmcast.broker import Segment, diagnose
from shmcast.broker.client import ControlClient, resolve_namespace
from shmcast.broker.errors import ShmcastError

from ._cmd_broker import READY as BROKER_READY
from ._cmd_publish import READY as PUBLISH_READY
from ._cmd_record import DONE as RECORD_DONE
from ._cmd_record import READY as RECORD_READY
from ._cmd_subscribe import READY as SUBSCRIBE_READY
from ._options import per_second, port_number, positive_seconds, seconds
from ._process import ShmcastProcess, start
from ._runner import stop_on_signals

HELP = "run a broker, two feeds, two analytics subscribers and a recorder, with a live table"
EXAMPLES = """\
examples:
  shmcast demo                      30 seconds, then a clean exit
  shmcast demo --duration 0         until Ctrl-C
  shmcast demo -n mydemo --tick-rate 5000 --frame-rate 200
  shmcast demo --keep-recording     keep the recorder's HDF5 file (path printed at the end)

Prints the Prometheus URLs of the broker and of each subscriber at start.
SIGTERM, SIGINT (Ctrl-C) or SIGHUP (terminal closed) stop every process and
leave nothing in /dev/shm. The recorder (`shmcast record`, lzf-compressed HDF5
in a temporary directory) needs the extra: pip install 'shmcast[record]'.
"""

SUBSCRIBERS = (
    ("strategy", ["ticks"], "shm"),
    ("viewer", ["frames"], "futex"),
)
RECORDED = ["ticks", "frames"]
DEMO_SLOTS = 8

#: The one-line legend under the subscribers' table: what each counter counts (per
#: segment the four add up to the versions published while the subscriber ran).
LEGEND = (
    "UPDATES delivered | MISSED never seen | OVERRUN lapped before read | TORN overwritten, dropped"
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--duration", type=seconds, default=30.0, help="seconds to run (0: until Ctrl-C)"
    )
    p.add_argument("--tick-rate", type=per_second, default=1000.0, help="ticks versions per second")
    p.add_argument("--frame-rate", type=per_second, default=100.0, help="frames per second")
    p.add_argument(
        "--metrics-port", type=port_number, default=0, help="broker metrics port (0: any)"
    )
    p.add_argument(
        "--refresh", type=positive_seconds, default=1.0, help="seconds between table refreshes"
    )
    p.add_argument(
        "--keep-recording",
        action="store_true",
        help="keep the recorder's file (default: reported, then removed)",
    )


def _scrape(url: str) -> dict[str, Any]:
    """Counters and latency quantiles of one subscriber, from its /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=2).read().decode()
    out: dict[str, Any] = {
        "updates": 0.0,
        "missed": 0.0,
        "overrun": 0.0,
        "torn": 0.0,
        "buckets": {},
    }
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "shmcast_updates_received_total":
                out["updates"] += s.value
            elif s.name == "shmcast_versions_missed_total":
                out["missed"] += s.value
            elif s.name == "shmcast_versions_overrun_total":
                out["overrun"] += s.value
            elif s.name == "shmcast_torn_reads_total":
                out["torn"] += s.value
            elif s.name == "shmcast_publish_to_read_latency_seconds_bucket":
                le = float(s.labels["le"])
                out["buckets"][le] = out["buckets"].get(le, 0.0) + s.value
    return out


def _quantile(buckets: dict[float, float], q: float) -> float | None:
    """Quantile ``q`` of a cumulative histogram, interpolated linearly inside the
    bucket that holds it (as Prometheus's ``histogram_quantile`` does)."""
    if not buckets:
        return None
    total = buckets.get(float("inf"), max(buckets.values()))
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in sorted(buckets):
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower  # beyond the largest finite bound: report that bound
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return None


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return ">100ms"
    return f"{x * 1e6:.0f}us" if x < 1e-3 else f"{x * 1e3:.1f}ms"


def _render(
    ns: str,
    rows: list[dict[str, Any]],
    subs: list[tuple[str, dict[str, Any]]],
    t: float,
    recording: str | None = None,
) -> str:
    lines = [f"shmcast demo  namespace={ns}  t={t:5.1f}s  (Ctrl-C to stop)", ""]
    lines.append(f"{'SEGMENT':10} {'DTYPE':14} {'SHAPE':9} {'VERSION':>8} {'RATE/s':>8} {'AGE':>8}")
    for r in rows:
        dtype = "ticks record" if str(r["dtype"]).startswith("[") else str(r["dtype"])
        shape = "x".join(str(n) for n in r["shape"])
        lines.append(
            f"{r['name']:10} {dtype:14} {shape:9} {r['version']:>8} "
            f"{r.get('rate', 0):>8.0f} {_fmt_s(r.get('age')):>8}"
        )
    lines.append("")
    lines.append(
        f"{'SUBSCRIBER':10} {'UPDATES':>8} {'MISSED':>7} {'OVERRUN':>8} {'TORN':>5} "
        f"{'~P50':>7} {'~P99':>7}"
    )
    for name, m in subs:
        if "error" in m:
            lines.append(f"{name:10} (metrics unavailable: {m['error']})")
            continue
        lines.append(
            f"{name:10} {m['updates']:>8.0f} {m['missed']:>7.0f} {m['overrun']:>8.0f} "
            f"{m['torn']:>5.0f} {_fmt_s(_quantile(m['buckets'], 0.5)):>7} "
            f"{_fmt_s(_quantile(m['buckets'], 0.99)):>7}"
        )
    lines.append(LEGEND)
    if recording is not None:
        lines.append("")
        lines.append(f"recorder   {', '.join(RECORDED)} -> {recording} ({_size(recording)})")
    return "\n".join(lines)


def _size(path: str) -> str:
    try:
        return f"{os.path.getsize(path) / 2**20:.1f} MiB"
    except OSError:
        return "-"


def _start_recorder(ns: str, tmpdir: str) -> tuple[ShmcastProcess | None, str | None]:
    """The recorder as a process, or (None, None) with a warning without the extra."""
    if importlib.util.find_spec("h5py") is None:
        print(
            "warning: no recorder: it needs h5py, install the extra: pip install 'shmcast[record]'",
            file=sys.stderr,
        )
        return None, None
    path = os.path.join(tmpdir, "demo.h5")
    sp = start(
        ["record", *RECORDED, "-n", ns, "--output", path, "--compression", "lzf"],
        ready=RECORD_READY,
    )
    return sp, path


def _stop_together(procs: list[ShmcastProcess], timeout: float) -> None:
    """SIGTERM every process of ``procs``, wait for all, kill what is left."""
    for sp in procs:
        with contextlib.suppress(Exception):
            sp.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for sp in procs:
        with contextlib.suppress(Exception):
            sp.stop(timeout=max(0.1, deadline - time.monotonic()))


def _report_recording(sp: ShmcastProcess, path: str, keep: bool) -> None:
    done = [ln for ln in sp.stdout if ln.startswith(RECORD_DONE)]
    summary = ""
    if done:
        segs = json.loads(done[-1][len(RECORD_DONE) :])["segments"]
        summary = ", ".join(
            f"{name} {st['recorded']} versions ({st['missed']} missed)" for name, st in segs.items()
        )
    print(f"recording: {path}, {_size(path)}{': ' + summary if summary else ''}")
    if keep:
        print("  kept (read it with h5py, or `shmcast replay` it)")
    else:
        print("  removed (--keep-recording keeps it)")


def run(args: argparse.Namespace) -> int:
    ns = resolve_namespace(args.namespace)
    stop = threading.Event()
    with stop_on_signals(stop.set):
        return _run(args, ns, stop)


def _run(args: argparse.Namespace, ns: str, stop: threading.Event) -> int:
    procs: list[ShmcastProcess] = []
    tty = sys.stdout.isatty()
    tmpdir = tempfile.mkdtemp(prefix="shmcast-demo-")
    recorder: ShmcastProcess | None = None
    recording: str | None = None
    error = False
    try:
        broker = start(
            ["broker", "-n", ns, "--metrics-port", str(args.metrics_port)], ready=BROKER_READY
        )
        procs.append(broker)
        # Eight slots: a version stays in the ring for seven publish intervals (7 ms of
        # ticks), time enough for the recorder to copy every one of them out.
        for seg, rate in (("ticks", args.tick_rate), ("frames", args.frame_rate)):
            procs.append(
                start(
                    [
                        *("publish", seg, "-n", ns, "--source", seg, "--rate", str(rate)),
                        *("--slots", str(DEMO_SLOTS)),
                    ],
                    ready=PUBLISH_READY,
                )
            )
        subs: list[tuple[str, ShmcastProcess]] = []
        for name, segs, wait in SUBSCRIBERS:
            sp = start(
                [
                    "subscribe",
                    *segs,
                    "-n",
                    ns,
                    "--stats",
                    "--quiet",
                    "--wait",
                    wait,
                    "--metrics-port",
                    "0",
                    "--name",
                    name,
                ],
                ready=SUBSCRIBE_READY,
            )
            procs.append(sp)
            subs.append((name, sp))
        recorder, recording = _start_recorder(ns, tmpdir)
        if recorder is not None:
            procs.append(recorder)
        print(f"broker metrics:     {broker.ready['metrics']}")
        for name, sp in subs:
            print(f"{name + ' metrics:':19} {sp.ready['metrics']}")
        print(flush=True)
        client = ControlClient(broker.ready["control"], timeout=2)
        start_t = time.monotonic()
        last = {r["name"]: r["version"] for r in client.request("list")["segments"]}
        last_t = start_t
        try:
            while args.duration <= 0 or time.monotonic() - start_t < args.duration:
                pause = args.refresh
                if args.duration > 0:  # the last refresh comes at --duration, not after it
                    pause = min(pause, args.duration - (time.monotonic() - start_t))
                if stop.wait(max(pause, 0.0)):
                    print("\nstopping", flush=True)
                    break
                now = time.monotonic()
                rows = client.request("list")["segments"]
                for r in rows:
                    prev = last.get(r["name"], r["version"])
                    r["rate"] = (r["version"] - prev) / max(now - last_t, 1e-9)
                    last[r["name"]] = r["version"]
                last_t = now
                metrics = []
                for name, sp in subs:
                    try:
                        metrics.append((name, _scrape(sp.ready["metrics"])))
                    except OSError as exc:
                        metrics.append((name, {"error": str(exc)}))
                table = _render(ns, rows, metrics, now - start_t, recording)
                print(("\x1b[H\x1b[2J" if tty else "") + table + ("" if tty else "\n"), flush=True)
        finally:
            client.close()
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    except (ShmcastError, RuntimeError, TimeoutError) as exc:
        failed = _broker_gone(procs[0]) if procs else None
        print(f"shmcast demo: error: {failed or exc}", file=sys.stderr)
        error = True
    finally:
        # Readers first, then writers, then the broker (which unlinks the segments);
        # each stage signalled at once, so the wait is the slowest's, not the sum.
        writers = {id(sp) for sp in procs[1:3]}
        readers = [sp for sp in procs[1:] if id(sp) not in writers]
        for stage in (readers, [sp for sp in procs if id(sp) in writers], procs[:1]):
            _stop_together(stage, timeout=15)
        if recorder is not None and recording is not None:
            _report_recording(recorder, recording, args.keep_recording)
        if not (args.keep_recording and recording is not None):
            shutil.rmtree(tmpdir, ignore_errors=True)
    if not procs:
        return 1  # our broker never started (another serves ns?): nothing here is ours
    if procs[0].proc.returncode != 0:
        _reclaim(ns)
    left = Segment.list(ns)
    if left:
        print(f"warning: left in /dev/shm: {left}", file=sys.stderr)
        return 1
    if error:
        return 1
    print(f"clean exit: nothing of namespace {ns!r} left in /dev/shm")
    return 0


def _broker_gone(broker: ShmcastProcess) -> str | None:
    """Why the demo's broker is gone, once it is; ``None`` while it runs. A reply that
    did not come from a dead broker is no reason to start one (what the client's
    error suggests): the demo says what happened to its own."""
    code = broker.proc.poll()
    if code is None:
        return None
    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with {code}"
    return f"the demo's broker (pid {broker.pid}) {how}; stopping the demo"


def _signal_name(num: int) -> str:
    """``SIGKILL`` for 9; ``signal 40`` for a number ``signal.Signals`` has no name of
    (the real-time signals between SIGRTMIN and SIGRTMAX). Before, such a death
    raised ValueError here: a traceback, and the broker's leftovers stayed."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _reclaim(ns: str) -> None:
    """Unlink what the demo's broker left when it did not stop cleanly (killed: no
    stop of its own unlinked the segments, the namespace word or its runtime
    directory), once every other process of the demo has stopped: what
    ``shmcast doctor --fix`` does for a dead broker's namespace, which never touches
    a live broker's or a live writer's."""
    for check in diagnose(namespace=ns, fix=True):
        if check.check == "fixed":
            print(f"  {check.message}")
