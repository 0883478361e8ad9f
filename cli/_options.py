"""Options several commands share, and how the command line resolves them.

The libraries read one environment variable (``SHMCAST_NAMESPACE``, when a
namespace is not given); the command line adds ``SHMCAST_BROKER``, the broker's
control endpoint, as the default of every ``--broker``.
"""

from __future__ import annotations

import argparse
import os

from shmcast.broker.client import (
    reader_endpoint,
    resolve_endpoint,
    resolve_namespace,
    validate_seconds,
)

__all__ = ["BROKER_ENV", "add_broker_option", "broker_endpoint", "positive_seconds", "seconds"]

BROKER_ENV = "SHMCAST_BROKER"


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
    try:
        return validate_seconds("seconds", float(text), positive=positive)
    except ValueError:
        bound = "> 0" if positive else ">= 0"
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a finite number of seconds {bound}"
        ) from None
