"""``shmcast record``: write every version of segments to an HDF5 or Parquet file."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from prometheus_client import CollectorRegistry

from shmcast.broker import MetricsServer, start_metrics_server
from shmcast.broker.client import CurveKeyTriple
from shmcast.subscriber import Recorder, RecorderCollector

from ._options import (
    add_broker_option,
    add_curve_option,
    add_metrics_options,
    broker_endpoint,
    curve_keys,
    label_name,
    positive_seconds,
    seconds,
    whole_number,
)
from ._runner import print_ready, stop_on_signals

READY = "shmcast record ready: "
DONE = "shmcast record done: "

HELP = "record segments to an HDF5 (or Parquet) file: every version, gaps counted"
EXAMPLES = """\
examples:
  shmcast record frames --output run1.h5                    until Ctrl-C
  shmcast record frames ticks -o run2.h5 --duration 60 --compression lzf
  shmcast record ticks -o ticks.parquet                     Parquet (the suffix): a row per record
  shmcast record frames -o run1.h5 --overwrite              replace an existing file
  shmcast record frames -o run1.h5 --metrics-port 9102      Prometheus metrics (0 picks a port)

HDF5: a group per segment with datasets data (N, *shape), version and
timestamp_ns, and the attribute 'missed'; written in SWMR mode and flushed at
least once a second, so `h5py.File(path, "r", swmr=True)` reads it while it
grows, or after the recorder was killed. Parquet: one-dimensional record dtypes
without a field named version or timestamp_ns (its own columns) or of 0 bytes,
one file per segment (<stem>.<segment>.parquet when several are recorded);
a bool byte other than 0 and 1 comes back as 1 (HDF5 keeps it).
Needs the extra: pip install 'shmcast[record]'.

Metrics (--metrics-port), labelled recorder=--name: per segment, versions
recorded, missed (by cause), bytes recorded, times deleted, the latest version
and the versions waiting for the disk; the seconds since the last flush and the
file's size.

Lines on stdout: 'shmcast record ready: {json}' (with the metrics URL) once
recording, and 'shmcast record done: {json}' (per segment: recorded, missed and
why, times deleted while recorded; bytes).
Exit code 1 when writing failed (a full disk): the file keeps what was written.
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("segments", nargs="+", metavar="SEGMENT", help="segment names")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the recording file")
    p.add_argument(
        "--format",
        choices=["hdf5", "parquet"],
        help="default: from the output's suffix (.parquet or .pq: parquet), else hdf5",
    )
    p.add_argument(
        "--count",
        type=whole_number,
        default=0,
        help="stop after N versions, all segments together (0: never)",
    )
    p.add_argument(
        "--duration", type=positive_seconds, help="stop after S seconds (default: until stopped)"
    )
    p.add_argument(
        "--compression",
        choices=["none", "gzip", "lzf", "snappy", "zstd"],
        help="HDF5: gzip or lzf (default none); Parquet: gzip, snappy (default) or zstd",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (not one a running recorder writes)",
    )
    p.add_argument(
        "--wait",
        choices=["futex", "events", "spin"],
        default="futex",
        help="how to learn of versions: the segments' futex (default, no broker needed), "
        "the broker's announcements, or busy-polling",
    )
    p.add_argument(
        "--flush-interval",
        type=positive_seconds,
        default=0.5,
        metavar="S",
        help="seconds between flushes, at most 1 (default 0.5)",
    )
    p.add_argument(
        "--segment-timeout",
        type=seconds,
        default=2.0,
        metavar="S",
        help="seconds to wait for the segments to exist (default 2)",
    )
    add_metrics_options(p)
    p.add_argument(
        "--name",
        type=label_name,
        default="recorder",
        help="'recorder' label of the metrics (tells two recorders on one host apart), "
        "and the name `shmcast top` shows (--wait events)",
    )
    add_broker_option(p)
    add_curve_option(p)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.flush_interval <= 1:
        print("shmcast record: error: --flush-interval must be in (0, 1]", file=sys.stderr)
        return 2
    stop = threading.Event()
    # Let the reading thread take the GIL back from the writing thread within 0.5 ms
    # (default 5 ms) when a version arrives; restored at the end (tests call main()).
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, 0.0005))
    try:
        return _record(args, stop)
    finally:
        sys.setswitchinterval(switch)


#: The --compression values each format takes.
COMPRESSIONS = {"hdf5": ("none", "gzip", "lzf"), "parquet": ("none", "gzip", "snappy", "zstd")}

#: Output suffixes that name a format.
SUFFIXES = {".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".parquet": "parquet", ".pq": "parquet"}


def output_format(output: str, given: str | None) -> str:
    """The format to write: ``--format``, else the output's suffix, else HDF5.

    Raises:
        ValueError: ``--format`` and the suffix name different formats (a file
            named .parquet holding HDF5 misleads every tool that reads it).
    """
    named = SUFFIXES.get(os.path.splitext(output)[1].lower())
    if given is not None and named is not None and given != named:
        raise ValueError(
            f"--format {given} but {output} is named as {named}: name the file "
            f"{os.path.splitext(output)[0]}{'.h5' if given == 'hdf5' else '.parquet'}, "
            f"or drop --format"
        )
    return given or named or "hdf5"


def _record(args: argparse.Namespace, stop: threading.Event) -> int:
    try:
        args.format = output_format(args.output, args.format)
    except ValueError as exc:
        print(f"shmcast record: error: {exc}", file=sys.stderr)
        return 2
    takes = COMPRESSIONS[args.format]
    if args.compression is not None and args.compression not in takes:
        print(
            f"shmcast record: error: --compression {args.compression} is not one of "
            f"{args.format}'s: {', '.join(takes)}",
            file=sys.stderr,
        )
        return 2
    curve = curve_keys(args)  # ConfigError: exit 2, whatever --wait
    # The metrics endpoint before the recorder: a port it cannot bind must fail before
    # the output file is made (an empty file left behind refuses the next run).
    registry = CollectorRegistry(auto_describe=True)
    server = None
    if args.metrics_port is not None:
        server = start_metrics_server(registry, args.metrics_port, host=args.metrics_host)
    try:
        return _run_recorder(args, stop, curve, registry, server)
    finally:
        if server is not None:
            server.close()


def _run_recorder(
    args: argparse.Namespace,
    stop: threading.Event,
    curve: CurveKeyTriple | None,
    registry: CollectorRegistry,
    server: MetricsServer | None,
) -> int:
    with stop_on_signals(stop.set):
        rec = Recorder(
            args.segments,
            args.output,
            format=args.format,
            namespace=args.namespace,
            broker=broker_endpoint(args) if args.wait == "events" else None,
            curve=curve if args.wait == "events" else None,
            wait=args.wait,
            compression=args.compression,
            overwrite=args.overwrite,
            flush_interval=args.flush_interval,
            segment_timeout=args.segment_timeout,
            name=args.name,
        )
        with rec:
            registry.register(RecorderCollector(rec))
            print_ready(
                READY,
                {
                    "segments": rec.names,
                    "namespace": rec.namespace,
                    "format": rec.format,
                    "paths": rec.paths,
                    "metrics": server.url if server is not None else None,
                },
            )
            start = time.monotonic()
            error: BaseException | None = None
            try:
                rec.run(count=args.count, duration=args.duration, stop=stop)
            except Exception as exc:  # reported below, with what the file kept
                error = exc
            error = error or rec.failure
        stats = rec.stats()
        done = {
            "seconds": round(time.monotonic() - start, 3),
            "paths": rec.paths,
            "bytes": rec.size(),
            "segments": {
                name: {
                    "recorded": st.recorded,
                    "missed": st.missed,
                    "lapped": st.lapped,
                    "torn": st.torn,
                    "dropped": st.dropped,
                    "unwritten": st.unwritten,
                    "deleted": st.deleted,
                    "first_version": st.first_version,
                    "last_version": st.last_version,
                }
                for name, st in stats.items()
            },
            "error": None if error is None else str(error),
        }
        print_ready(DONE, done)
    if error is not None:
        print(f"shmcast record: error: {error}", file=sys.stderr)
        return 1
    return 0
