"""``shmcast subscribe``: the analytics worker on the command line."""

from __future__ import annotations

import argparse
import sys
import threading

from shmcast.subscriber import Subscriber, WaitMode, run_worker, serve_metrics

from ._options import add_broker_option, broker_endpoint
from ._runner import print_ready, stop_on_signals

READY = "shmcast subscribe ready: "
DONE = "shmcast subscribe done: "

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
    add_broker_option(p)


def run(args: argparse.Namespace) -> int:
    wait: WaitMode = "spin" if args.spin else args.wait
    stop = threading.Event()
    broker = broker_endpoint(args) if wait == "events" else None
    with (
        stop_on_signals(stop.set),
        Subscriber(
            args.segments, namespace=args.namespace, broker=broker, wait=wait, name=args.name
        ) as sub,
    ):
        server = None
        if args.metrics_port is not None:
            server = serve_metrics(sub, args.metrics_port, host=args.metrics_host, name=args.name)
        try:
            ready = {
                "segments": sub.names,
                "namespace": sub.namespace,
                "wait": wait,
                "metrics": server.url if server is not None else None,
            }
            print_ready(READY, ready, stream=sys.stderr)
            run_worker(
                sub,
                sys.stdout,
                stats=args.stats,
                as_json=args.json,
                quiet=args.quiet,
                count=args.count,
                timeout=args.timeout,
                stop=stop,
            )
        finally:
            if server is not None:
                server.close()
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
        print_ready(DONE, done, stream=sys.stderr)
    return 0


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)
