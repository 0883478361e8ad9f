"""``shmcast``: the command line, a thin layer over the libraries.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``EXAMPLES`` (shown by ``--help``), ``configure(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from .errors import ConfigError, InvalidNameError, ShmcastError

#: (command, module) in the order ``shmcast --help`` lists them.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("broker", "broker._cmd_broker"),
    ("publish", "publisher._cli"),
    ("subscribe", "subscriber._cli"),
    ("ls", "broker._cmd_ls"),
    ("top", "broker._top"),
    ("health", "broker._cmd_health"),
    ("demo", "broker._demo"),
    ("doctor", "broker._doctor"),
    ("relay", "broker._relay"),
)

EPILOG = """\
examples:
  shmcast demo --duration 20           everything on one machine, no configuration
  shmcast broker &                     the data server of namespace 'default'
  shmcast publish frames --source frames --rate 100
  shmcast subscribe frames --stats --metrics-port 9101
  shmcast ls
  shmcast top                          live view: rates, subscribers' lag and latency

Every command takes --namespace (default: $SHMCAST_NAMESPACE, else 'default').
"""


def _modules() -> list[tuple[str, ModuleType]]:
    return [(name, importlib.import_module(mod)) for name, mod in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcast",
        description="Real-time pub/sub of numpy arrays through shared memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _modules():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=module.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--namespace",
            "-n",
            default=None,
            help="namespace of segments and broker (default: $SHMCAST_NAMESPACE, else 'default')",
        )
        p.add_argument(
            "--log-level",
            default="WARNING",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="logging verbosity on stderr (default: WARNING)",
        )
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``shmcast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return int(args._run(args))
    except (ConfigError, InvalidNameError) as exc:
        # A bad argument or config value, like argparse's own errors: exit code 2.
        print(f"shmcast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ShmcastError as exc:
        print(f"shmcast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def serve_in_foreground(
    run: Callable[[Callable[[dict[str, Any]], None]], None],
    stop: Callable[[], None],
    ready_prefix: str,
) -> None:
    """Run a service until SIGTERM/SIGINT (which call ``stop``), printing its ready
    information as the one line ``<ready_prefix>{json}``."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop())

    def on_ready(info: dict[str, Any]) -> None:
        print(f"{ready_prefix}{json.dumps(info)}", flush=True)

    run(on_ready)
