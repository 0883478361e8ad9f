"""``shmcast publish``: write a feed into a segment at a rate."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from shmcast.broker import MAX_SLOTS, normalize_layout, parse_dtype
from shmcast.broker.client import (
    ControlClient,
    check_broker_namespace,
    resolve_namespace,
    validate_segment_name,
)
from shmcast.broker.errors import LayoutError, SegmentNotFoundError
from shmcast.publisher import Feed, Publisher, make_feed

from ._options import (
    add_broker_option,
    add_curve_option,
    broker_endpoint,
    curve_keys,
    per_second,
    ring_slots,
    whole_number,
)
from ._runner import print_ready, stop_on_signals

READY = "shmcast publish ready: "
DONE = "shmcast publish done: "

HELP = "publish a synthetic feed (ticks, frames or random) into a segment"
EXAMPLES = """\
examples:
  shmcast publish ticks --source ticks --rate 1000          market data: 256 symbols a version
  shmcast publish frames --source frames --rate 100         512x512 uint16 detector frames
  shmcast publish noise --source random --dtype float32 --shape 1024,1024 --count 10

Versions are filled in place (a zero-copy loan). It prints one line
'shmcast publish ready: {json}' when the segment is leased, and a summary at the end.
"""


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: use integers like 512,512") from None
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"shape {text!r}: use positive integers like 512,512")
    return shape


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("segment", help="segment name")
    p.add_argument(
        "--source",
        choices=["ticks", "frames", "random"],
        default="random",
        help="the feed: ticks (256 market-data records), frames (512x512 uint16), or "
        "random (needs --dtype and --shape)",
    )
    p.add_argument("--dtype", help="numpy dtype (random source), e.g. float64")
    p.add_argument("--shape", type=parse_shape, help="array shape, e.g. 512,512")
    p.add_argument(
        "--slots",
        type=ring_slots,
        help=f"ring size (2-{MAX_SLOTS}) of a segment created now; given, an existing "
        "segment must have as many (default: the existing segment's, else 2)",
    )
    p.add_argument(
        "--rate", type=per_second, default=10.0, help="versions per second (0: flat out)"
    )
    p.add_argument("--count", type=whole_number, default=0, help="stop after N versions (0: never)")
    add_broker_option(p)
    add_curve_option(p)
    p.add_argument(
        "--announce",
        action="store_true",
        help="also send the broker a commit message per version (it announces at once "
        "instead of after its watcher's 0.1 ms; ZeroMQ threads wake beside the readers)",
    )
    p.add_argument("--no-announce", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.source in ("ticks", "frames") and args.dtype:
        print(f"shmcast publish: error: --source {args.source} implies its dtype", file=sys.stderr)
        return 2
    try:
        dtype = parse_dtype(args.dtype) if args.dtype else None
        feed = make_feed(args.source, dtype, args.shape)
        normalize_layout(feed.dtype, feed.shape)  # an object dtype, say: before any broker
    except (LayoutError, ValueError) as exc:
        print(f"shmcast publish: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _publish(args, feed)
    except MemoryError:
        print(
            f"shmcast publish: error: the {args.source} feed of shape {feed.shape} does "
            f"not fit in this process's memory; give a smaller --shape",
            file=sys.stderr,
        )
        return 1


def _existing_slots(args: argparse.Namespace) -> int | None:
    """The slots of the segment as the broker describes it; ``None`` when it does
    not exist yet. Without ``--slots`` a segment declared in the broker's config
    (``frames`` with 3 slots in configs/broker.toml) is fed as it is: before, the
    default 2 was asked for and refused as another layout."""
    name = validate_segment_name(args.segment)  # before any broker is asked
    namespace = resolve_namespace(args.namespace)
    with ControlClient(broker_endpoint(args), timeout=5.0, curve=curve_keys(args)) as client:
        check_broker_namespace(client, namespace)
        try:
            info = client.request("describe", name=name)
        except SegmentNotFoundError:
            return None
    slots = info.get("slots")
    return slots if isinstance(slots, int) and not isinstance(slots, bool) else None


def _publish(args: argparse.Namespace, feed: Feed) -> int:
    stop = threading.Event()
    with stop_on_signals(stop.set):
        try:
            slots = args.slots if args.slots is not None else (_existing_slots(args) or 2)
            pub = Publisher(
                args.segment,
                dtype=feed.dtype,
                shape=feed.shape,
                slots=slots,
                namespace=args.namespace,
                broker=broker_endpoint(args),
                curve=curve_keys(args),
                announce=args.announce,
            )
        except LayoutError as exc:  # --slots the broker refuses: a bad argument (exit 2)
            print(f"shmcast publish: error: {exc}", file=sys.stderr)
            return 2
        return _run(args, feed, pub, stop)


def _run(args: argparse.Namespace, feed: Feed, pub: Publisher, stop: threading.Event) -> int:
    with pub:
        print_ready(
            READY, {"segment": pub.name, "namespace": pub.namespace, "version": pub.version}
        )
        period = 1.0 / args.rate if args.rate > 0 else 0.0
        start = time.monotonic()
        n = 0
        next_t = start
        while not stop.is_set() and (args.count <= 0 or n < args.count):
            with pub.loan() as out:
                feed.fill(out, pub.version + 1)
            n += 1  # deleted under it? the Publisher logs a warning, once
            if period:
                next_t += period
                delay = next_t - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                elif delay < -1.0:
                    next_t = time.monotonic()  # far behind: do not burst to catch up
        elapsed = time.monotonic() - start
        summary = {
            "segment": pub.name,
            "published": n,
            "last_version": pub.version,
            "seconds": round(elapsed, 3),
            "rate": round(n / elapsed, 1) if elapsed > 0 else None,
            "announcements_dropped": pub.announcements_dropped,
            "segment_deleted": pub.segment_deleted,
        }
        print_ready(DONE, summary)
    return 0
