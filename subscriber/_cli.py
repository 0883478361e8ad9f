"""``shmcast subscribe``: the analytics worker on the command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from ._metrics import serve_metrics
from ._subscriber import Subscriber, WaitMode
from ._worker import run_worker

HELP = "subscribe to segments: print updates, compute stats in place, export metrics"
EXAMPLES = """\
examples:
  shmcast subscribe ticks --stats                     mean/std/max of each version, in place
  shmcast subscribe ticks frames --json --count 100   one JSON object per update
  shmcast subscribe frames --wait futex               block on the segment, no broker hop
  shmcast subscribe ticks --spin                      busy-poll: lowest latency, one core
  shmcast subscribe ticks --metrics-port 9101         Prometheus metrics (0 picks a port)

Lines on stderr: 'shmcast subscribe ready: {json}' (with the metrics URL) at start,
'shmcast subscribe done: {json}' (counts, latency percentiles) at the end.
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("segments", nargs="+", metavar="SEGMENT", help="segment names")
    p.add_argument("--stats", action="store_true", help="mean, std and max of each version")
    p.add_argument("--json", action="store_true", help="one JSON object per update on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no line per update (metrics only)")
    p.add_argument("--count", type=int, default=0, help="stop after N updates (0: never)")
    p.add_argument("--timeout", type=float, help="stop after S seconds without an update")
    p.add_argument(
        "--wait",
        choices=["events", "futex", "spin"],
        default="events",
        help="how to learn of versions: broker announcements (default), futex, busy-poll",
    )
    p.add_argument("--spin", action="store_true", help="same as --wait spin")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR")
    p.add_argument(
        "--name",
        default="subscriber",
        help="'subscriber' label of the metrics, and the name `shmcast top` shows",
    )
    p.add_argument("--broker", metavar="ENDPOINT", help="broker control endpoint")


def run(args: argparse.Namespace) -> int:
    wait: WaitMode = "spin" if args.spin else args.wait
    stop = threading.Event()
    with Subscriber(
        args.segments, namespace=args.namespace, broker=args.broker, wait=wait, name=args.name
    ) as sub:
        url = server = None
        if args.metrics_port is not None:
            url, server = serve_metrics(
                sub, args.metrics_port, host=args.metrics_host, name=args.name
            )
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, frame: object) -> None:
                stop.set()
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, on_signal)
        ready = {"segments": sub.names, "namespace": sub.namespace, "wait": wait, "metrics": url}
        print(f"shmcast subscribe ready: {json.dumps(ready)}", file=sys.stderr, flush=True)
        try:
            run_worker(
                sub,
                sys.stdout,
                stats=args.stats,
                as_json=args.json,
                quiet=args.quiet,
                count=args.count,
                timeout=args.timeout,
            )
        except KeyboardInterrupt:
            pass
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
        done = {
            name: {
                "updates": st.updates,
                "missed": st.missed,
                "torn": sub.torn_reads(name),
                "p50_us": _us(st.percentile(50)),
                "p99_us": _us(st.percentile(99)),
            }
            for name, st in sub.stats.items()
        }
        print(f"shmcast subscribe done: {json.dumps(done)}", file=sys.stderr, flush=True)
    return 0


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)
