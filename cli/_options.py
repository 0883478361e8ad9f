"""Options several commands share, and how the command line resolves them.

The libraries read one environment variable (``SHMCAST_NAMESPACE``, when a
namespace is not given); the command line adds ``SHMCAST_BROKER``, the broker's
control endpoint, as the default of every ``--broker``.
"""

from __future__ import annotations

import argparse
import math
import os

from shmcast.broker import MAX_SLOTS
from shmcast.broker.client import (
    reader_endpoint,
    resolve_endpoint,
    resolve_namespace,
    validate_seconds,
)

__all__ = [
    "BROKER_ENV",
    "MAX_RATE",
    "MAX_SECONDS",
    "add_broker_option",
    "broker_endpoint",
    "per_second",
    "port_number",
    "positive_seconds",
    "ring_slots",
    "seconds",
    "whole_number",
]

BROKER_ENV = "SHMCAST_BROKER"
#: The longest wait or interval the command line takes (11.6 days): far beyond it
#: the clocks overflow, and ZeroMQ's millisecond timeouts (C ints) from 24.8 days.
MAX_SECONDS = 1e6
#: The highest --rate: far beyond what a version's write allows (about 1e6 per s).
MAX_RATE = 1e9


def add_broker_option(p: argparse.ArgumentParser, what: str = "the broker's") -> None:
    p.add_argument(
        "--broker",
        metavar="ENDPOINT",
        help=f"{what} control endpoint (default: ${BROKER_ENV}, else the namespace's ipc endpoint)",
    )


def broker_endpoint(args: argparse.Namespace, *, reader: bool = False) -> str:
    """``--broker``, else ``$SHMCAST_BROKER``, else the namespace's ipc endpoint.

    With ``reader`` (commands that only look), an owner's ipc socket this user may
    not open gives way to the read-only one beside it.
    """
    explicit = args.broker or os.environ.get(BROKER_ENV) or None
    endpoint = resolve_endpoint(explicit, resolve_namespace(args.namespace))
    return reader_endpoint(endpoint) if reader else endpoint


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0 (``nan``, ``-1`` exit 2)."""
    return _seconds(text, positive=False)


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    return _seconds(text, positive=True)


def _seconds(text: str, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    try:
        value = validate_seconds("seconds", float(text), positive=positive)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a finite number of seconds {bound}"
        ) from None
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number of seconds {bound} and at most {MAX_SECONDS:g}"
        )
    return value


def per_second(text: str) -> float:
    """argparse type: versions per second, 0 (flat out) or from one per ``MAX_SECONDS``
    to ``MAX_RATE``; ``nan``, ``inf`` and negative rates exit 2."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0 or 1 / MAX_SECONDS <= value <= MAX_RATE:
        return value
    raise argparse.ArgumentTypeError(
        f"{text!r}: give versions per second from {1 / MAX_SECONDS:g} to {MAX_RATE:g}, "
        f"or 0 for flat out"
    )


def whole_number(text: str) -> int:
    """argparse type: a count, a whole number >= 0 (``-1`` exits 2)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value >= 0:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 0")


def ring_slots(text: str) -> int:
    """argparse type: the slots of a segment's ring, 2 to ``MAX_SLOTS`` (checked
    before any broker is asked: without one, 1 was "no broker answered")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if 2 <= value <= MAX_SLOTS:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: give a ring of 2 to {MAX_SLOTS} slots")


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if 0 <= value <= 65535:
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0 (any free one) to 65535")
