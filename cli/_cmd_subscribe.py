"""``shmcast subscribe``: the analytics worker on the command line."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TextIO, cast

from shmcast.broker import Segment
from shmcast.broker.client import ControlClient, resolve_namespace
from shmcast.broker.errors import SegmentNotFoundError, SegmentUnreachableError, ShmcastError
from shmcast.subscriber import Subscriber, WaitMode, run_worker, serve_metrics

from ._options import (
    add_broker_option,
    add_curve_option,
    add_metrics_options,
    broker_endpoint,
    curve_keys,
    label_name,
    seconds,
    whole_number,
)
from ._runner import print_ready, stop_on_signals, stream_gone
from ._text import printable

READY = "shmcast subscribe ready: "
DONE = "shmcast subscribe done: "

HELP = "subscribe to segments: print updates, compute stats in place, export metrics"
EXAMPLES = """\
examples:
  shmcast subscribe ticks --stats                     mean/std/max of each version, in place
  shmcast subscribe ticks frames --json --count 100   one JSON object per update
  shmcast subscribe frames --wait events              the broker's announcements (ZeroMQ)
  shmcast subscribe frames --wait futex               no broker at all: the segment must exist
  shmcast subscribe ticks --spin                      busy-poll: lowest latency, one core
  shmcast subscribe ticks --metrics-port 9101         Prometheus metrics (0 picks a port)
  shmcast subscribe ticks --timeout 5                 exit 1 if nothing arrives within 5 s

Each version is read exactly (the one announced, not the latest). A segment that does
not exist yet is waited for; after a second the subscriber says so and names the
segments that do exist. Lines on stderr: 'shmcast subscribe ready: {json}' (with the
metrics URL) at start, 'shmcast subscribe done: {json}' (the four counters per segment:
updates, missed, overrun, torn; latency percentiles) at the end.
Exit code 0, or 1 when --timeout passed with nothing received (or on an error). A
closed stdout (a reader such as 'head' that has what it wanted) stops it as --count does,
stderr closed with it too ('2>&1 | head'); a stdout it cannot write (a full disk) stops
it with exit 1, the summary line first.
"""

#: Seconds before a subscriber waiting for a segment that does not exist says so.
MISSING_AFTER = 1.0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("segments", nargs="+", metavar="SEGMENT", help="segment names")
    p.add_argument("--stats", action="store_true", help="mean, std and max of each version")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per update on stdout (NaN and infinities as null)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no line per update (metrics only)")
    p.add_argument("--count", type=whole_number, default=0, help="stop after N updates (0: never)")
    p.add_argument(
        "--timeout",
        type=seconds,
        help="stop after S seconds without an update (exit 1 if none came at all)",
    )
    p.add_argument(
        "--wait",
        choices=["shm", "events", "futex", "spin"],
        help="how to learn of versions: shared memory (futex on the segments and the "
        "namespace word), the broker's announcements, futex without a broker, busy-poll "
        "(default: shm)",
    )
    p.add_argument("--spin", action="store_true", help="same as --wait spin")
    add_metrics_options(p)
    p.add_argument(
        "--name",
        type=label_name,
        default="subscriber",
        help="'subscriber' label of the metrics, and the name `shmcast top` shows",
    )
    add_broker_option(p)
    add_curve_option(p)


def run(args: argparse.Namespace) -> int:
    if args.spin and args.wait not in (None, "spin"):
        # Before, --spin won silently: `--wait events --spin` busy-polled a core.
        print(
            f"shmcast subscribe: error: --spin is --wait spin: give one of --spin and "
            f"--wait {args.wait}",
            file=sys.stderr,
        )
        return 2
    wait: WaitMode = "spin" if args.spin else (args.wait or "shm")
    stop = threading.Event()
    endpoint = broker_endpoint(args)
    broker = endpoint if wait in ("shm", "events") else None
    curve = curve_keys(args)  # ConfigError: exit 2
    try:
        sub = Subscriber(
            args.segments,
            namespace=args.namespace,
            broker=broker,
            curve=curve,
            wait=wait,
            name=args.name,
            timeout=2.0 if wait in ("futex", "spin") else 5.0,
        )
    except SegmentUnreachableError:
        raise  # main() prints it: not a missing segment, a /dev/shm that is not shared
    except SegmentNotFoundError as exc:  # futex/spin: the segment must exist already
        ns = resolve_namespace(args.namespace)
        print(
            f"shmcast subscribe: error: {_missing(exc.segment, ns, endpoint, curve)}",
            file=sys.stderr,
        )
        return 1
    told = False
    unwritable: OSError | None = None

    def idle(elapsed: float) -> None:
        nonlocal told
        absent = sub.absent()
        if told or not absent or elapsed < MISSING_AFTER:
            return
        told = True
        for name in absent:
            print(
                f"shmcast subscribe: {_missing(name, sub.namespace, endpoint, curve)}",
                file=sys.stderr,
            )

    with stop_on_signals(stop.set), sub:
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
            try:
                handled = run_worker(
                    sub,
                    cast(TextIO, _Output(sys.stdout)),
                    stats=args.stats,
                    as_json=args.json,
                    quiet=args.quiet,
                    count=args.count,
                    timeout=args.timeout,
                    stop=stop,
                    idle=idle,
                )
            except BrokenPipeError:
                # The reader of stdout is gone (`shmcast subscribe ... | head`): a
                # stop like --count's, with the summary on stderr.
                _stdout_gone()
                handled = -1
            except _OutputError as exc:
                # A full disk (or an I/O error) where stdout goes: the updates cannot
                # be written. Before, a traceback, and no summary of the counters.
                _stdout_gone()
                unwritable = exc.error
                handled = -1
        finally:
            if server is not None:
                server.close()
    # After the close, which counts the versions learnt of but never handed out.
    done = {
        name: {
            "updates": st.updates,
            "missed": st.missed,
            "overrun": st.overrun,
            "torn": st.torn,
            "p50_us": _us(st.percentile(50)),
            "p99_us": _us(st.percentile(99)),
        }
        for name, st in sub.stats.items()
    }
    # A closed stderr too (`2>&1 | head`): print_ready drops the line with it.
    print_ready(DONE, done, stream=sys.stderr)
    if unwritable is not None:
        try:
            print(
                f"shmcast subscribe: error: cannot write the updates to stdout: "
                f"{unwritable.strerror or unwritable}; give stdout room (or another "
                f"file), or use --quiet (no line per update, metrics only)",
                file=sys.stderr,
                flush=True,
            )
        except BrokenPipeError:
            stream_gone(sys.stderr)
        return 1
    if handled == 0 and args.timeout is not None and not stop.is_set():
        try:
            print(
                f"shmcast subscribe: nothing received from {', '.join(args.segments)} "
                f"in {args.timeout:g} s",
                file=sys.stderr,
                flush=True,
            )
        except BrokenPipeError:
            stream_gone(sys.stderr)
        return 1
    return 0


class _OutputError(Exception):
    """A write to stdout failed for another reason than its reader going away."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Output:
    """stdout for the worker, its failures told apart from the worker's own
    ``OSError`` (out of descriptors attaching a segment, say): a failed write or
    flush is :class:`_OutputError`; a reader gone stays ``BrokenPipeError``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputError(exc) from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputError(exc) from exc


def _stdout_gone() -> None:
    """Send what is still buffered for stdout, and its flush at exit, nowhere."""
    stream_gone(sys.stdout)


def _missing(
    name: str, namespace: str, endpoint: str, curve: tuple[bytes, bytes, bytes] | None = None
) -> str:
    """ "no segment 'frame' in namespace 'lab' yet; existing: frames, ticks"."""
    try:
        with ControlClient(endpoint, timeout=1.0, curve=curve) as client:
            names = [str(s["name"]) for s in client.request("list")["segments"]]
    except ShmcastError:
        names = Segment.list(namespace)
    # Names read from /dev/shm are anyone's to choose (an escape sequence): escaped.
    return (
        f"no segment {name!r} in namespace {namespace!r} yet; "
        f"existing: {printable(', '.join(names)) if names else 'none'}"
    )


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)
