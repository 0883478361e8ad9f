"""``shmcast broker``: run the data server of a namespace."""

from __future__ import annotations

import argparse
import logging
import resource
from typing import Any

from shmcast.broker import Broker, resolve_config

from ._options import add_metrics_options, positive_seconds
from ._runner import serve

log = logging.getLogger("shmcast.broker")

READY = "shmcast broker ready: "
HELP = "run the broker: owns the namespace's segments, serves the control API, announces versions"
EXAMPLES = """\
examples:
  shmcast broker                                  ipc endpoints in the runtime dir, no config
  shmcast broker --metrics-port 9100              Prometheus metrics on 127.0.0.1:9100
  shmcast broker --config configs/broker.toml     endpoints, permissions, declared segments
  shmcast broker --events tcp://127.0.0.1:5556    announcements over TCP (loopback:
                                                  every local user can follow them)
  shmcast broker --data tcp://10.0.0.1:5557 --tcp-open
                                                  data stream for relays on other hosts
                                                  (plain TCP: a trusted network; else CURVE)

It prints one line 'shmcast broker ready: {json}' with its endpoints when serving.
SIGTERM, SIGINT (Ctrl-C) or SIGHUP (terminal closed): stop serving. Segments whose
publisher is still running stay in /dev/shm: the publisher goes on, subscribers
go on reading, and the next broker adopts them (a restart is seamless). Segments
with no running publisher are unlinked; --unlink-on-exit unlinks all of them.
A restarted broker adopts the valid segments a stopped or crashed one left behind.
It raises its soft open-files limit to the hard one (ulimit -Hn) at start.
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration (see configs/broker.toml)")
    p.add_argument(
        "--control",
        metavar="ENDPOINT",
        help="control endpoint of writers, the owner (default: ipc://.../control.sock in "
        "the namespace's runtime directory)",
    )
    p.add_argument(
        "--control-ro",
        metavar="ENDPOINT",
        help="control endpoint of readers, read-only (default: ipc://.../control-ro.sock)",
    )
    p.add_argument(
        "--events",
        metavar="ENDPOINT",
        help="announcement endpoint (default: ipc://.../events.sock)",
    )
    p.add_argument(
        "--data", metavar="ENDPOINT", help="data stream for relays, tcp://ADDR:PORT (default: none)"
    )
    add_metrics_options(p, layered=True)
    p.add_argument(
        "--heartbeat", type=positive_seconds, metavar="S", help="heartbeat interval (0.5)"
    )
    p.add_argument("--mode", metavar="OCTAL", help="permissions of segments (default 0600)")
    p.add_argument("--group", metavar="NAME", help="group owning segments and sockets")
    p.add_argument(
        "--tcp-open",
        action="store_true",
        default=None,
        help="accept a plain TCP control endpoint (no CURVE; on 127.0.0.1 too: every local "
        "user then writes) and other plain TCP endpoints beyond loopback: anyone who reaches "
        "them writes (control), reads every segment (data), or sees names and versions",
    )
    p.add_argument(
        "--unlink-on-exit",
        action="store_true",
        default=None,
        help="on a clean stop unlink every segment, even those a publisher still writes",
    )


def run(args: argparse.Namespace) -> int:
    flags: dict[str, Any] = {
        "namespace": args.namespace,
        "control": args.control,
        "control_ro": args.control_ro,
        "events": args.events,
        "data": args.data,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "heartbeat_interval": args.heartbeat,
        "mode": args.mode,
        "group": args.group,
        "unlink_on_exit": args.unlink_on_exit,
        "tcp_open": args.tcp_open,
    }
    config = resolve_config(flags, config_file=args.config)  # ConfigError: exit 2
    raise_open_files_limit()
    serve(Broker(config), READY)
    return 0


def raise_open_files_limit() -> None:
    """Raise this process's soft open-files limit to its hard limit (the hard one
    itself is left alone). libzmq (4.3.5) aborts the whole process when its ipc
    listener's ``accept`` meets ``EMFILE`` ("Too many open files
    (src/ipc_listener.cpp:297)"): a broker under a soft limit of 64 was killed by
    SIGABRT at the 60th connection to its read-only endpoint, one under 1024 (a
    shell's, systemd's, Docker's) at about the 1000th (some 500 ``events``
    subscribers), where systemd's hard limit is 524288. The hard limit still ends it
    (docs/RELIABILITY.md)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # (Linux allows any soft limit up to the hard)
        log.warning("cannot raise the open-files limit from %s to %s: %s", soft, hard, exc)
        return
    log.info("open-files limit raised from %s to %s, the hard limit", soft, hard)
