"""``shmcast replay``: publish a recording's versions again, at its pace or flat out."""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time

from shmcast.publisher import Replayer

from ._options import add_broker_option, add_curve_option, broker_endpoint, curve_keys
from ._runner import print_ready, stop_on_signals

READY = "shmcast replay ready: "
DONE = "shmcast replay done: "

HELP = "replay a recording: recreate its segments and publish its versions in order"
EXAMPLES = """\
examples:
  shmcast replay run1.h5                           at the recorded pace
  shmcast replay run1.h5 --speed 10 -n test        ten times faster, into namespace 'test'
  shmcast replay run1.h5 --segments frames --max   one segment, as fast as possible
  shmcast replay ticks.parquet --loop              again and again until Ctrl-C

The segments are created with the recorded dtype and shape (an existing segment
of the same layout is used; one of another layout, or with a live writer, is an
error, checked before any segment is created, and is left as it is; so is a
recording that holds no version of the segments to replay). Versions
keep their recorded numbers where the segment allows it, and the data is
bit-identical. Lines on stdout: 'shmcast replay ready: {json}' and
'shmcast replay done: {json}' (published per segment, seconds, rate).
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="recording file(s)")
    p.add_argument("--segments", nargs="+", metavar="SEGMENT", help="replay only these")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="the recorded pace times X, a finite number > 0 (default 1)",
    )
    pace.add_argument("--max", action="store_true", help="as fast as possible")
    p.add_argument("--loop", action="store_true", help="start again after the last version")
    add_broker_option(p)
    add_curve_option(p)


def run(args: argparse.Namespace) -> int:
    if not args.max and not (args.speed > 0 and math.isfinite(args.speed)):
        print(
            "shmcast replay: error: --speed must be a finite number > 0 (--max: flat out)",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    with (
        stop_on_signals(stop.set),
        Replayer(
            args.files,
            segments=args.segments,
            namespace=args.namespace,
            broker=broker_endpoint(args),
            curve=curve_keys(args),
            speed=None if args.max else args.speed,
            loop=args.loop,
        ) as rep,
    ):
        print_ready(
            READY,
            {
                "segments": rep.segments,
                "namespace": rep.namespace,
                "versions": len(rep),
                "speed": rep.speed,
                "loop": rep.loop,
            },
        )
        start = time.monotonic()
        stats = rep.run(stop)
        elapsed = time.monotonic() - start
        total = sum(st.published for st in stats.values())
        print_ready(
            DONE,
            {
                "seconds": round(elapsed, 3),
                "rate": round(total / elapsed, 1) if elapsed > 0 else None,
                "segments": {
                    name: {
                        "published": st.published,
                        "first_version": st.first_version,
                        "last_version": st.last_version,
                        "passes": st.passes,
                    }
                    for name, st in stats.items()
                },
            },
        )
    return 0
