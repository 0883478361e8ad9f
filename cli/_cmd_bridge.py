"""``shmcast bridge zenoh``: export local segments onto Eclipse Zenoh, import them back."""

from __future__ import annotations

import argparse
from typing import Any

from shmcast.bridge import ZenohBridge, resolve_bridge_config

from ._options import (
    add_broker_option,
    add_curve_option,
    add_metrics_options,
    curve_keys,
    positive_seconds,
)
from ._runner import serve

READY = "shmcast bridge ready: "
HELP = "bridge segments onto Eclipse Zenoh (many hosts, routers, any Zenoh client) and back"
EXAMPLES = """\
examples:
  shmcast bridge zenoh --connect tcp/10.0.0.9:7447 --export 'frames*'
        host A: put every version of frames* on shmcast/<namespace>/<segment>
  shmcast bridge zenoh --connect tcp/10.0.0.9:7447 --import 'shmcast/lab/*' -n lab
        host B: mirror every segment of namespace lab into local segments
  shmcast bridge zenoh --listen tcp/0.0.0.0:7447 --export ticks --import 'shmcast/*/frames'
        a peer that both exports and imports
  shmcast bridge zenoh --config zenoh.json5 --import 'shmcast/lab/*'
        TLS, access control, routers: a Zenoh JSON5 configuration

Needs the zenoh extra: pip install 'shmcast[zenoh]'. The wire format (key,
payload, attachment) is in docs/ZENOH.md. Prints 'shmcast bridge ready: {json}'.
SIGTERM, SIGINT or SIGHUP stop it; its imported segments stay with the broker.
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("transport", choices=["zenoh"], help="the routing engine")
    # action="extend": a repeated flag adds to the list (it replaced it before)
    many: Any = {"nargs": "+", "action": "extend"}
    p.add_argument("--connect", **many, metavar="ENDPOINT", help="Zenoh endpoints to join")
    p.add_argument("--listen", **many, metavar="ENDPOINT", help="Zenoh endpoints to listen on")
    p.add_argument("--export", **many, metavar="PATTERN", help="local segments to export")
    p.add_argument(
        "--import",
        dest="imports",
        **many,
        metavar="KEYEXPR",
        help="Zenoh key expressions to import, e.g. 'shmcast/lab/*'",
    )
    p.add_argument(
        "--config",
        metavar="ZENOH_JSON5",
        help="a Zenoh configuration file, used as it is except that the endpoints and mode "
        "given here are added and Zenoh's shared-memory transport is always turned off",
    )
    p.add_argument(
        "--connect-timeout",
        type=positive_seconds,
        metavar="S",
        help="seconds to reach --connect at start (10); later losses are retried for ever",
    )
    p.add_argument(
        "--mode",
        choices=["client", "peer", "router"],
        help="Zenoh session mode (default: client with --connect only, peer with --listen)",
    )
    p.add_argument("--slots", type=int, help="slots of the segments made for imports (4)")
    p.add_argument(
        "--max-mirrors",
        type=int,
        metavar="N",
        help="most segments made for imports (256): any peer may put on a key an --import "
        "expression matches, and each new key makes a segment; past it, a new key evicts "
        "the mirror whose exporter has been gone longest, or is refused if none is gone",
    )
    p.add_argument(
        "--max-mirror-bytes",
        type=int,
        metavar="B",
        help="largest segment made for an import, all slots (1073741824); none is made "
        "that would leave less than 10%% of /dev/shm free (docker run --shm-size)",
    )
    p.add_argument(
        "--congestion",
        choices=["drop", "block"],
        help="exports on a congested link: drop (default: only that link misses versions) "
        "or block (everyone waits for the slowest)",
    )
    add_broker_option(p, "the local broker's")
    add_curve_option(p, "the local broker")
    add_metrics_options(p, layered=True)


def run(args: argparse.Namespace) -> int:
    flags = {
        "namespace": args.namespace,
        "connect": args.connect,
        "listen": args.listen,
        "exports": args.export,
        "imports": args.imports,
        "zenoh_config": args.config,
        "mode": args.mode,
        "slots": args.slots,
        "max_mirrors": args.max_mirrors,
        "max_mirror_bytes": args.max_mirror_bytes,
        "congestion": args.congestion,
        "connect_timeout": args.connect_timeout,
        "broker": args.broker,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
    }
    config = resolve_bridge_config(flags)  # ConfigError: exit 2
    serve(ZenohBridge(config, broker_curve=curve_keys(args)), READY)
    return 0
