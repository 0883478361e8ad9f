"""The suite never touches what it did not create (issue 11, class 8).

A broker serving the ``default`` namespace from the user's runtime directory,
and a publisher creating segments there, stand in for production while part of
the suite runs beside them with the user's environment. Before, the suite
treated ``default`` as its own: it unlinked the segments that appeared while a
test ran, and worked in the user's runtime directory. It all runs in a private
mount namespace with a ``/dev/shm`` of its own, so no real ``default`` is at stake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Tests that create and clean up namespaces, run the doctor's --fix, start and
#: stop brokers by signal, and look up the default namespace.
TESTS = [
    "tests/test_doctor.py",
    "tests/test_signals.py::test_broker_stops_cleanly_on_each_signal",
    "tests/test_cli.py::test_ls_json_from_the_broker_and_from_dev_shm",
    "tests/test_segment_api.py::test_namespace_defaults_to_default",
]


@pytest.mark.root
def test_a_production_default_namespace_is_left_alone() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /dev/shm")
    script = (
        "mount -t tmpfs -o size=256m tmpfs /dev/shm && "
        f"exec {sys.executable} -m tests._production {' '.join(TESTS)}"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    if "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()[:200]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    print(f"FIGURES isolation {json.dumps({k: v for k, v in out.items() if k != 'pytest_tail'})}")
    assert out["pytest_rc"] == 0, out["pytest_tail"]
    assert out["made"] >= 10, "the production publisher made too few segments to mean much"
    assert out["gone"] == [], "the suite unlinked segments of the production broker"
    assert out["not_served"] == []
    assert out["broker_alive"]
    assert set(out["runtime_dir"]) >= {"broker.lock", "control.sock", "events.sock"}
    assert out["runtime_root"] == ["default"], "the suite worked in the user's runtime dir"
