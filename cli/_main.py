"""``shmcast``: the command line, a thin layer over the libraries.

Each command lives in its own module exposing ``HELP`` (one line),
``EXAMPLES`` (shown by ``--help``), ``configure(parser)`` and ``run(args) -> int``;
and ``NAMESPACE_HELP`` when its ``--namespace`` means something else.
"""

from __future__ import annotations

import argparse
import errno
import logging
import resource
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from shmcast.broker import Segment
from shmcast.broker.client import resolve_namespace
from shmcast.broker.errors import (
    RAISE_NOFILE,
    ConfigError,
    InvalidNameError,
    OutOfDescriptorsError,
    ShmcastError,
)

from . import (
    _cmd_bridge,
    _cmd_broker,
    _cmd_demo,
    _cmd_doctor,
    _cmd_health,
    _cmd_ls,
    _cmd_publish,
    _cmd_record,
    _cmd_relay,
    _cmd_replay,
    _cmd_rm,
    _cmd_subscribe,
    _cmd_top,
)
from ._process import LIFELINE_BROKER_GRACE, follow_lifeline
from ._text import printable

#: (command, module) in the order ``shmcast --help`` lists them.
COMMANDS: tuple[tuple[str, ModuleType], ...] = (
    ("broker", _cmd_broker),
    ("publish", _cmd_publish),
    ("subscribe", _cmd_subscribe),
    ("ls", _cmd_ls),
    ("rm", _cmd_rm),
    ("top", _cmd_top),
    ("health", _cmd_health),
    ("demo", _cmd_demo),
    ("doctor", _cmd_doctor),
    ("relay", _cmd_relay),
    ("record", _cmd_record),
    ("replay", _cmd_replay),
    ("bridge", _cmd_bridge),
)

EPILOG = """\
examples:
  shmcast demo --duration 20           everything on one machine, no configuration
  shmcast broker &                     the data server of namespace 'default'
  shmcast publish frames --source frames --rate 100
  shmcast subscribe frames --stats --metrics-port 9101
  shmcast ls
  shmcast top                          live view: rates, subscribers' lag and latency
  shmcast record frames -o run1.h5     every version to HDF5 (pip install 'shmcast[record]')
  shmcast replay run1.h5 --speed 2     publish it again, twice as fast

Every command takes --namespace (default: $SHMCAST_NAMESPACE, else 'default';
doctor: else every namespace).
"""


NAMESPACE_HELP = "namespace of segments and broker (default: $SHMCAST_NAMESPACE, else 'default')"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written, and each option's default after its help
    (unless the help already names it, or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcast",
        description="Real-time pub/sub of numpy arrays through shared memory.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS:
        # No abbreviations: argparse took `--name X` (or `--names`) for --namespace
        # in every command without a --name of its own, and `shmcast rm s --name X`
        # then deleted in namespace X.
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=module.EXAMPLES,
            formatter_class=HelpFormatter,
            allow_abbrev=False,
        )
        p.add_argument(
            "--namespace",
            "-n",
            default=None,
            help=getattr(module, "NAMESPACE_HELP", NAMESPACE_HELP),
        )
        p.add_argument(
            "--log-level",
            default="WARNING",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="logging verbosity on stderr",
        )
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def _no_live_writer(namespace: str | None) -> Callable[[], bool]:
    """Whether no segment of ``namespace`` has a live writer (a lifeline's broker
    waits for that before it stops)."""

    def settled() -> bool:
        try:
            ns = resolve_namespace(namespace)
            names = Segment.list(ns)
        except (ShmcastError, OSError):
            return True
        for name in names:
            try:
                with Segment.attach(name, namespace=ns, prefault=False, wait=0.0) as seg:
                    if seg.writer_alive():
                        return False
            except (ShmcastError, OSError):
                continue
        return True

    return settled


def _out_of_descriptors(exc: OSError) -> str:
    """What running out of file descriptors means here, and the fix. Each segment a
    process attaches holds one (a subscriber or recorder of many segments, under a
    low limit: Docker's and systemd's are 1024, a shell's may be lower); before,
    the command died with a traceback of the bare ``OSError``. The library's own
    :class:`OutOfDescriptorsError` says it already (with the descriptors open)."""
    if isinstance(exc, OutOfDescriptorsError):
        return printable(str(exc))
    where = f" ({printable(str(exc.filename))})" if exc.filename else ""
    if exc.errno == errno.ENFILE:  # the whole system's table, not this process's limit
        return (
            f"out of file descriptors: {exc.strerror}{where}; the system's open-file "
            f"table is full: raise it (sysctl fs.file-max) or stop what holds so many"
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"out of file descriptors: {exc.strerror}{where}; this process's open-files "
        f"limit is {soft} (hard limit {hard}) and each segment it attaches holds one: "
        f"raise it ({RAISE_NOFILE}; `shmcast doctor` checks it), or give this command "
        f"fewer segments"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``shmcast`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Started by shmcast.cli.testing / the demo: end with the parent. A broker ends a
    # moment after its clients, which end at once: it then unlinks their segments
    # as orphans, instead of keeping them for writers that were about to stop.
    if args.command == "broker":
        follow_lifeline(LIFELINE_BROKER_GRACE, _no_live_writer(args.namespace))
    else:
        follow_lifeline()
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
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        print(f"shmcast {args.command}: error: {_out_of_descriptors(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
