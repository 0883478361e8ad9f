"""A stand-in for production, for ``test_isolation.py``: run inside a private mount
namespace with its own ``/dev/shm`` (so nothing real is at stake), as
``python -m tests._production TESTS...`` from the repository root.

It starts what a user runs on the machine while ``make test`` runs: ``shmcast
broker`` serving the ``default`` namespace from the user's runtime directory,
and a publisher that keeps creating segments there. Then it runs pytest on the
given tests, with the user's environment, and reports (``RESULT {json}``)
whether the production broker, its runtime directory and every segment it
created are still there, untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from shmcast.broker.client import ControlClient
from shmcast.cli.testing import BROKER_READY, ShmcastProcess, start

PUBLISHER = """
import os, sys, time
import numpy as np
from shmcast.publisher import Publisher
pubs = []
for i in range(int(sys.argv[1])):
    p = Publisher(f"prod-{i}", dtype="f8", shape=(4,))
    p.publish(np.ones(4))
    pubs.append(p)
    print(f"MADE prod-{i} {os.stat(p.segment.path).st_ino}", flush=True)
    if i == 0:
        print("READY", flush=True)
    for q in pubs:
        q.publish(np.ones(4))
    time.sleep(0.1)  # the pace of this stand-in workload, not a synchronisation
print("ALL", flush=True)
for _ in iter(sys.stdin.readline, ""):
    pass
"""


def _made(pub: ShmcastProcess) -> dict[str, int]:
    out = {}
    for line in list(pub.stdout):
        if line.startswith("MADE "):
            _, name, ino = line.split()
            out[name] = int(ino)
    return out


def main(tests: list[str]) -> dict[str, Any]:
    xdg = tempfile.mkdtemp(prefix="shmcast-production-xdg-")
    # The user's environment: the real runtime dir, no namespace of the suite's
    # (this process, and all it starts, drop what the outer test session set).
    for key in [k for k in os.environ if k.startswith(("SHMCAST_", "PYTEST_"))]:
        del os.environ[key]
    os.environ["XDG_RUNTIME_DIR"] = xdg
    user = dict(os.environ)
    procs: list[ShmcastProcess] = []
    try:
        broker = start(["broker"], ready=BROKER_READY, env=user)
        procs.append(broker)
        env = {**user, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, "200"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        pub = ShmcastProcess(["production publisher"], popen)
        procs.append(pub)
        pub.wait_line("READY", 20)
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
            env=user,
            capture_output=True,
            text=True,
            timeout=600,
        )
        made = _made(pub)
        gone = []
        for name, ino in made.items():
            try:
                if os.stat(f"/dev/shm/shmcast.default.{name}").st_ino != ino:
                    gone.append(name)
            except FileNotFoundError:
                gone.append(name)
        with ControlClient(broker.ready["control"], timeout=5) as ctl:
            served = {s["name"] for s in ctl.request("list")["segments"]}
        rdir = Path(xdg) / "shmcast" / "default"
        return {
            "pytest_rc": run.returncode,
            "pytest_tail": run.stdout[-2000:] + run.stderr[-2000:],
            "made": len(made),
            "gone": gone,
            "not_served": sorted(set(made) - served),
            "broker_alive": broker.proc.poll() is None,
            "runtime_dir": sorted(p.name for p in rdir.iterdir()) if rdir.is_dir() else None,
            "runtime_root": sorted(p.name for p in rdir.parent.iterdir()),
        }
    finally:
        for p in reversed(procs):
            p.stop(timeout=10)
        shutil.rmtree(xdg, ignore_errors=True)


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1:])), flush=True)
