"""``shmcast relay``: mirror an upstream broker's segments into this host's broker."""

from __future__ import annotations

import argparse

from shmcast.publisher import Relay, resolve_relay_config

from ._options import (
    add_broker_option,
    add_curve_option,
    add_metrics_options,
    curve_keys,
    positive_seconds,
)
from ._runner import serve

READY = "shmcast relay ready: "
HELP = "mirror an upstream broker's segments (over TCP) into this host's broker"
EXAMPLES = """\
examples:
  shmcast relay --upstream tcp://10.0.0.1:5557                    every segment
  shmcast relay --upstream tcp://10.0.0.1:5557 --segments 'frames*' ticks
  shmcast relay --config configs/relay.toml                       CURVE keys, metrics

Needs a broker of the local namespace (shmcast broker) and an upstream broker
started with --data. Prints 'shmcast relay ready: {json}' when running.
Catalog: relayed segments have source 'relay:<upstream>' and upstream_up.
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration (see configs/relay.toml)")
    p.add_argument("--upstream", metavar="ENDPOINT", help="upstream data stream, tcp://HOST:PORT")
    p.add_argument("--segments", nargs="+", metavar="PATTERN", help="fnmatch patterns (all)")
    add_broker_option(p, "the local broker's")
    # The LOCAL broker's keys: the upstream's are curve_* in --config's file.
    add_curve_option(
        p, "the local broker", note="(the upstream's keys are curve_* in --config's file) "
    )
    p.add_argument("--window", type=int, metavar="N", help="messages in flight (8)")
    p.add_argument(
        "--heartbeat-timeout",
        type=positive_seconds,
        metavar="S",
        help="seconds of silence before the upstream is called down (default: 3 upstream "
        "heartbeats + 0.2 s)",
    )
    add_metrics_options(p, layered=True)
    p.add_argument(
        "--max-mirrors",
        type=int,
        metavar="N",
        help="most segments mirrored at once (256); versions of more are refused, counted",
    )
    p.add_argument(
        "--max-mirror-bytes",
        type=int,
        metavar="B",
        help="largest mirror, all slots (1073741824); versions of larger ones are refused, "
        "and of one that would leave less than 10%% of /dev/shm free",
    )


def run(args: argparse.Namespace) -> int:
    flags = {
        "namespace": args.namespace,
        "upstream": args.upstream,
        "segments": args.segments,
        "broker": args.broker,
        "window": args.window,
        "heartbeat_timeout": args.heartbeat_timeout,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "max_mirrors": args.max_mirrors,
        "max_mirror_bytes": args.max_mirror_bytes,
    }
    config = resolve_relay_config(flags, config_file=args.config)  # ConfigError: exit 2
    serve(Relay(config, broker_curve=curve_keys(args)), READY)
    return 0
