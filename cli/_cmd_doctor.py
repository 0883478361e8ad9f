"""``shmcast doctor``: run the checks of :func:`shmcast.broker.diagnose` and print them."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from shmcast.broker import OK, PROBLEM, diagnose
from shmcast.broker.client import namespace_from_env, validate_namespace

from ._options import whole_number
from ._text import printable

HELP = "check /dev/shm, orphans, permissions, ownership and limits; say how to fix each"
NAMESPACE_HELP = "the namespace to check (default: $SHMCAST_NAMESPACE, else every namespace)"
EXAMPLES = """\
examples:
  shmcast doctor                                  every namespace of this user
  shmcast doctor --config configs/broker.toml     does /dev/shm hold the declared segments?
  shmcast doctor --namespace lab --fix            unlink the objects a dead broker left
                                                  and repair what shmcast refuses to trust
  shmcast doctor --json --subscribers 500         machine-readable; size the fd limit for 500

Exit code 0: all OK (warnings allowed); 1: problems found (each with what to do).
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="broker TOML config: check its segments fit")
    p.add_argument(
        "--fix",
        action="store_true",
        help="unlink orphaned and invalid objects; repair untrusted runtime dirs and objects",
    )
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument(
        "--subscribers",
        type=whole_number,
        default=256,
        metavar="N",
        help="subscribers the broker should hold (sizes the open-files check; default 256)",
    )


def run(args: argparse.Namespace) -> int:
    # Without -n (nor $SHMCAST_NAMESPACE) every namespace is checked; a name given is
    # checked first, as every command does (exit 2): '..' would reach outside the root.
    if args.namespace is not None:
        namespace: str | None = validate_namespace(args.namespace)
    else:
        namespace = namespace_from_env()
    checks = diagnose(
        namespace=namespace,
        config_file=args.config,
        fix=args.fix,
        subscribers=args.subscribers,
    )
    failed = any(c.status == PROBLEM for c in checks)
    if args.json:
        report: dict[str, Any] = {"ok": not failed, "checks": [asdict(c) for c in checks]}
        print(json.dumps(report, indent=2))
    else:
        for c in checks:
            # Paths in /dev/shm are anyone's to name (escape sequences, newlines).
            print(f"{c.status.upper():8} {c.check:12} {printable(c.message)}")
            if c.fix and c.status != OK:
                # A command: its paths are shell words quoted already (backslashes kept).
                print(f"{'':8} {'':12} -> {printable(c.fix, shell=True)}")
        print("doctor: problems found" if failed else "doctor: all OK", file=sys.stderr)
    return 1 if failed else 0
