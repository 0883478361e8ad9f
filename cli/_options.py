"""Options several commands share, and how the command line resolves them.

The libraries read one environment variable (``SHMCAST_NAMESPACE``, when a
namespace is not given); the command line adds ``SHMCAST_BROKER``, the broker's
control endpoint, as the default of every ``--broker``, and
``SHMCAST_CURVE_KEYS``, a file of CURVE keys, as the default of ``--curve-keys``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import stat
import sys
from typing import Any

from shmcast.broker import MAX_SLOTS, ConfigError, curve_keypair, curve_public, is_z85_key
from shmcast.broker.client import (
    reader_endpoint,
    resolve_endpoint,
    resolve_namespace,
    validate_metrics_host,
    validate_seconds,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (Python 3.10)
    import tomli as tomllib

__all__ = [
    "BROKER_ENV",
    "CURVE_ENV",
    "MAX_RATE",
    "MAX_SECONDS",
    "add_broker_option",
    "add_curve_option",
    "broker_endpoint",
    "curve_keys",
    "per_second",
    "port_number",
    "positive_seconds",
    "ring_slots",
    "seconds",
    "whole_number",
]

BROKER_ENV = "SHMCAST_BROKER"
CURVE_ENV = "SHMCAST_CURVE_KEYS"
#: The keys of a --curve-keys file (the names configs/relay.toml gives them).
CURVE_FIELDS = ("curve_server_key", "curve_public_key", "curve_secret_key")
#: The longest wait or interval the command line takes (11.6 days): far beyond it
#: the clocks overflow, and ZeroMQ's millisecond timeouts (C ints) from 24.8 days.
MAX_SECONDS = 1e6
#: The highest --rate: far beyond what a version's write allows (about 1e6 per s).
MAX_RATE = 1e9


def add_metrics_options(p: argparse.ArgumentParser, *, layered: bool = False) -> None:
    """``--metrics-port`` and ``--metrics-host``. ``layered``: a service whose flags
    go over its config file and environment (no default here: 127.0.0.1 comes last)."""
    p.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics on this port, 0 picks one (default: none)",
    )
    p.add_argument(
        "--metrics-host",
        type=metrics_host,
        default=None if layered else "127.0.0.1",
        metavar="ADDR",
        help="metrics address (default 127.0.0.1)",
    )


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


def add_curve_option(p: argparse.ArgumentParser, what: str = "a broker", note: str = "") -> None:
    p.add_argument(
        "--curve-keys",
        metavar="FILE",
        help=f"CURVE keys, for {what} with curve_secret_key: a TOML file of "
        "curve_server_key (the broker's public key), curve_public_key and "
        "curve_secret_key (this client's pair; a new one when both are left out); "
        "0600: refused when others may write it, or read its secret key "
        f"{note}(default: ${CURVE_ENV})",
    )


def curve_keys(args: argparse.Namespace) -> tuple[bytes, bytes, bytes] | None:
    """``--curve-keys``, else ``$SHMCAST_CURVE_KEYS``: ``(server_public,
    client_public, client_secret)`` as :class:`ControlClient` takes them, or None.

    Raises:
        ConfigError: the file cannot be read, is not TOML, has other keys, or a key
            that is not a CURVE key (40 characters of z85), or a public key that is
            not the secret key's; others may write it, or read the secret key in it;
            it is no regular file; ``--curve-keys ""``.
    """
    field = "--curve-keys"
    given = getattr(args, "curve_keys", None)
    if given == "":  # `--curve-keys "$UNSET"`: not "no keys"
        raise ConfigError(field, "an empty path: give the file of CURVE keys")
    path = given or os.environ.get(CURVE_ENV) or None
    if path is None:
        return None
    try:
        # O_NONBLOCK: a FIFO is refused below, not waited on for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(field, f"{path} is not a regular file", path)
            data: dict[str, Any] = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(field, f"not valid TOML: {exc}", path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            field, f"not valid TOML: not UTF-8 text (byte {exc.start})", path
        ) from None
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}", path) from None
    unknown = sorted(set(data) - set(CURVE_FIELDS))
    if unknown:
        raise ConfigError(field, f"unknown keys {unknown}: give {', '.join(CURVE_FIELDS)}", path)
    for name, value in data.items():
        if not is_z85_key(value):
            raise ConfigError(name, "expected a 40-character z85 CURVE key", path)
    server = data.get("curve_server_key")
    if server is None:
        raise ConfigError("curve_server_key", "missing: give the broker's public key", path)
    public, secret = data.get("curve_public_key"), data.get("curve_secret_key")
    if (public is None) != (secret is None):
        raise ConfigError(
            "curve_secret_key", "give both curve_public_key and curve_secret_key, or neither", path
        )
    mode = stat.S_IMODE(st.st_mode)
    chmod = f"chmod 600 {shlex.quote(path)}"
    if mode & 0o022:  # another user could put a key of theirs in it: the broker's
        raise ConfigError(field, f"others may write it (mode {mode:04o}): {chmod}", path)
    if secret is not None and mode & 0o077:  # as ssh refuses an open private key
        raise ConfigError(
            field,
            f"it holds curve_secret_key and others may read it (mode {mode:04o}): {chmod}",
            path,
        )
    if public is None or secret is None:
        public, secret = curve_keypair()  # its own: for a broker that lists no clients
        return server.encode(), public.encode(), secret.encode()
    derived = curve_public(secret)  # None: a libzmq without CURVE, as the connection says
    if derived is not None and derived != public:
        raise ConfigError(
            "curve_public_key", f"not the public key of curve_secret_key (that is {derived})", path
        )
    return server.encode(), public.encode(), secret.encode()


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


def label_name(text: str) -> str:
    """argparse type: ``--name``, a non-empty string (a metrics label, the name
    ``shmcast top`` shows)."""
    if not text:
        raise argparse.ArgumentTypeError("give a non-empty name")
    return text


def metrics_host(text: str) -> str:
    """argparse type: the address a metrics endpoint binds; not empty (an unset
    ``$VARIABLE`` given as it would serve every interface)."""
    try:
        return validate_metrics_host(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
