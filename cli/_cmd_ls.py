"""``shmcast ls``: the catalog of a namespace."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from shmcast.broker import Segment
from shmcast.broker.client import ControlClient, check_broker_namespace, resolve_namespace
from shmcast.broker.errors import BrokerHandshakeError, BrokerUnavailableError, ShmcastError

from ._options import add_broker_option, add_curve_option, broker_endpoint, curve_keys, seconds
from ._text import printable

HELP = "list a namespace's segments: dtype, shape, slots, version, rate, age"
EXAMPLES = """\
examples:
  shmcast ls                         the catalog of namespace 'default' (from its broker)
  shmcast ls --json                  the same as JSON
  shmcast ls -n beamline --interval 1

Without a live broker it reads the segments' headers in /dev/shm directly (and
says so, naming a broker that runs but did not answer: stopped or hung).
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    add_broker_option(p)
    add_curve_option(p)
    p.add_argument(
        "--interval", type=seconds, default=0.5, help="seconds to sample for the rate (0: skip)"
    )


def catalog(
    namespace: str,
    endpoint: str,
    timeout: float = 1.0,
    curve: tuple[bytes, bytes, bytes] | None = None,
) -> tuple[str, list[Any], BrokerUnavailableError | None]:
    """``(source, segments, silent)`` from the broker at ``endpoint``, or from /dev/shm
    if none answers; ``silent``: then the error of a broker that runs (a live process
    holds the namespace's broker lock: ``pid``, ``stopped``) but did not answer.

    Raises:
        NamespaceMismatchError: the broker there serves another namespace.
        BrokerHandshakeError: something listens there but refused the handshake
            (CURVE keys missing or wrong): a broker, whose catalog /dev/shm is not.
    """
    try:
        with ControlClient(endpoint, timeout=timeout, curve=curve) as client:
            check_broker_namespace(client, namespace)
            return "broker", list(client.request("list")["segments"]), None
    except BrokerHandshakeError:
        raise
    except BrokerUnavailableError as exc:
        # A stopped or hung broker is no missing one: say which (and its pid).
        silent = exc if exc.pid is not None else None
    rows: list[dict[str, Any]] = []
    for name in Segment.list(namespace):
        try:
            with Segment.attach(name, namespace=namespace, prefault=False, wait=0) as seg:
                info = seg.info()
        except ShmcastError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        rows.append({**info.catalog_entry(), "source": "local"})
    return "shm", rows, silent


def run(args: argparse.Namespace) -> int:
    ns = resolve_namespace(args.namespace)
    endpoint = broker_endpoint(args, reader=True)
    curve = curve_keys(args)  # ConfigError: exit 2
    source, rows, silent = catalog(ns, endpoint, curve=curve)
    if args.interval > 0 and rows:
        # Two samples: the rate is their difference; VERSION and AGE are the later's.
        # A segment deleted and created again in between (another incarnation) has no
        # rate: its versions started over (the difference was negative).
        before = {r["name"]: (r.get("version", 0), r.get("incarnation")) for r in rows}
        t0 = time.monotonic()
        time.sleep(args.interval)
        source, rows, silent = catalog(ns, endpoint, curve=curve)
        elapsed = time.monotonic() - t0
        for r in rows:
            was, incarnation = before.get(r["name"], (None, None))
            if was is not None and "version" in r and incarnation == r.get("incarnation"):
                r["rate"] = round((r["version"] - was) / elapsed, 1)
    for r in rows:
        # The age the answering host measured on its monotonic clock.
        if r.get("age") is not None:
            r["age"] = round(float(r["age"]), 3)
    if args.json:
        listing: dict[str, Any] = {"namespace": ns, "from": source, "segments": rows}
        if silent is not None:
            listing.update(broker_pid=silent.pid, broker_stopped=silent.stopped)
        print(json.dumps(listing))
        return 0
    if not rows:
        if source == "broker":
            print(f"namespace {ns!r}: no segments (broker)")
        elif silent is not None:
            print(f"namespace {ns!r}: no segments in /dev/shm ({silent})")
        else:
            print(f"namespace {ns!r}: no segments (no broker)")
        return 0
    header = ("SEGMENT", "DTYPE", "SHAPE", "SLOTS", "VERSION", "RATE/s", "AGE s", "SOURCE")
    table = [header]
    for r in rows:
        dtype = str(r.get("dtype", "?"))
        table.append(
            (
                r["name"],
                dtype if len(dtype) <= 24 else dtype[:21] + "...",
                "x".join(str(n) for n in r.get("shape", [])),
                str(r.get("slots", "?")),
                str(r.get("version", "?")),
                "" if r.get("rate") is None else str(r["rate"]),
                "" if r.get("age") is None else f"{r['age']:.3f}",
                str(r.get("source", r.get("error", ""))),
            )
        )
    # Names (and the errors naming them) are read from /dev/shm: anyone's to choose.
    # An error quotes the row's name as repr writes it (escaped already): kept as is.
    quoted: list[tuple[str, ...]] = [(), *[(str(r["name"]),) for r in rows]]
    cells = [[printable(c, quoted=q) for c in row] for row, q in zip(table, quoted, strict=True)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())
    if silent is not None:
        print(f"(read from /dev/shm: {silent})")
    elif source != "broker":
        print(f"(no broker answered for namespace {ns!r}: read from /dev/shm)")
    return 0
