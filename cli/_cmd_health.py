"""``shmcast health``: exit 0 if the broker answers, 1 if not (container health checks)."""

from __future__ import annotations

import argparse
import sys

from shmcast.broker.client import ControlClient, namespace_from_env, resolve_namespace
from shmcast.broker.errors import ShmcastError

from ._options import (
    add_broker_option,
    add_curve_option,
    broker_endpoint,
    curve_keys,
    positive_seconds,
)

HELP = "check that a broker answers (exit 0) or not (exit 1): for HEALTHCHECK and probes"
EXAMPLES = """\
examples:
  shmcast health                                  the namespace's broker, default endpoint
  shmcast health --broker tcp://127.0.0.1:5555    a broker over TCP (compose, Kubernetes)
  shmcast health --broker tcp://127.0.0.1:5555 --curve-keys keys.toml   one with CURVE

--broker defaults to $SHMCAST_BROKER, else the namespace's ipc endpoint. With
--namespace (or $SHMCAST_NAMESPACE) set, a broker of another namespace is unhealthy.
A broker with a data stream for relays is unhealthy while that stream is down
(restarting after a failure) or cannot open a segment (e.g. out of file
descriptors); the message says which.
"""


def configure(p: argparse.ArgumentParser) -> None:
    add_broker_option(p)
    add_curve_option(p)
    p.add_argument(
        "--timeout", type=positive_seconds, default=2.0, help="seconds to wait for the reply"
    )


def run(args: argparse.Namespace) -> int:
    ns = resolve_namespace(args.namespace)
    endpoint = broker_endpoint(args, reader=True)
    curve = curve_keys(args)  # ConfigError: exit 2
    try:
        with ControlClient(endpoint, timeout=args.timeout, curve=curve) as client:
            hello = client.request("hello")
            segments = len(client.request("list")["segments"])
    except ShmcastError as exc:
        print(f"shmcast health: unhealthy: {exc}", file=sys.stderr)
        return 1
    if (args.namespace or namespace_from_env()) and hello.get("namespace") != ns:
        print(
            f"shmcast health: unhealthy: {endpoint} serves namespace "
            f"{hello.get('namespace')!r}, not {ns!r}",
            file=sys.stderr,
        )
        return 1
    data = hello.get("data_stream")
    if isinstance(data, dict) and data.get("problem"):
        print(f"shmcast health: unhealthy: {data['problem']}", file=sys.stderr)
        return 1
    print(f"ok: broker {endpoint} namespace={hello.get('namespace')} segments={segments}")
    return 0
