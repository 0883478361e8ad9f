"""``shmcast rm``: delete segments through the broker."""

from __future__ import annotations

import argparse
import sys

from shmcast.broker.client import ControlClient, check_broker_namespace, resolve_namespace
from shmcast.broker.errors import SegmentNotFoundError, ShmcastError, WriterBusyError

from ._options import add_broker_option, add_curve_option, broker_endpoint, curve_keys

HELP = "delete segments through the broker (refused while a writer holds one)"
EXAMPLES = """\
examples:
  shmcast rm frames                  delete segment 'frames' of namespace 'default'
  shmcast rm -n lab ticks frames     several at once
  shmcast rm frames --force          even while a publisher writes it

The broker unlinks the segment and announces it deleted; subscribers follow a
segment created again under the name (a new incarnation, versions from 1).
With --force a live writer goes on writing into the unlinked object, which no
new reader can find (rm names its pid on stderr): stop it first when you can.
Exit code 0 when every segment was deleted, 1 otherwise.
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("segments", nargs="+", metavar="SEGMENT", help="segment names")
    p.add_argument(
        "--force", action="store_true", help="delete even while a writer holds the lease"
    )
    add_broker_option(p)
    add_curve_option(p)


def run(args: argparse.Namespace) -> int:
    ns = resolve_namespace(args.namespace)
    rc = 0
    curve = curve_keys(args)  # ConfigError: exit 2
    with ControlClient(broker_endpoint(args), timeout=5.0, curve=curve) as client:
        check_broker_namespace(client, ns)  # $SHMCAST_BROKER may be another namespace's
        for name in args.segments:
            # One request: the broker checks the writer lease as it deletes (a
            # describe first would leave a writer time to arrive in between). With
            # --force the describe only says whose writing is cut off.
            writer = _live_writer(client, name) if args.force else None
            try:
                client.request("delete", name=name, force=args.force)
            except SegmentNotFoundError:
                print(f"shmcast rm: no segment {name!r} in namespace {ns!r}", file=sys.stderr)
                rc = 1
                continue
            except WriterBusyError as exc:
                print(
                    f"shmcast rm: segment {name!r} of namespace {ns!r} has a live writer "
                    f"(pid {exc.pid}); stop it first, or delete anyway with --force",
                    file=sys.stderr,
                )
                rc = 1
                continue
            print(f"deleted {name}")
            if writer is not None:
                print(
                    f"shmcast rm: segment {name!r} had a live writer (pid {writer}): it goes "
                    f"on writing into the unlinked object, which no reader finds; stop it "
                    f"(a new publisher makes the segment anew)",
                    file=sys.stderr,
                )
    return rc


def _live_writer(client: ControlClient, name: str) -> int | None:
    """The pid of the live writer of ``name``, if the broker knows of one."""
    try:
        info = client.request("describe", name=name)
    except ShmcastError:
        return None  # no such segment: the delete says so
    pid = info.get("writer_pid")
    return pid if info.get("writer_alive") and isinstance(pid, int) else None
