"""The benchmark suite runs end to end in quick mode and writes well-formed JSON
(``make test-bench``, which CI runs; skipped by ``make test``).

Timings are never asserted: only that every benchmark ran and reported numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shmcast.broker.client import SHM_DIR

EXPECTED = {
    "write",
    "read",
    "handoff",
    "latency",
    "stream",
    "fanout",
    "relay",
    "record",
    "bridge",
}


def _iceoryx2_leftovers() -> set[str]:
    """iceoryx2's objects in /dev/shm and its default root under the temp dir (looked
    at, never touched: they may be another program's)."""
    found = {e for e in os.listdir(SHM_DIR) if e.startswith("iox2")}
    if os.path.exists(os.path.join(tempfile.gettempdir(), "iceoryx2")):
        found.add("tmp/iceoryx2")
    return found


def _numbers(x: object) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, (int, float)):
        return [float(x)]
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return []


@pytest.mark.benchsuite
@pytest.mark.timeout(150)
def test_quick_suite_runs_and_writes_json(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "benchsuite" not in (request.config.getoption("markexpr") or ""):
        # 85-90 s of the suite's 9 minutes: its own target, which CI runs after it
        pytest.skip("the benchmark suite in quick mode: run with `make test-bench`")
    out = tmp_path / "results.json"
    iox_before = _iceoryx2_leftovers()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # iceoryx2 leaves a management object in /dev/shm and a directory in /tmp after
    # its nodes end; the suite removes what its own nodes made.
    assert _iceoryx2_leftovers() <= iox_before
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] is True
    assert set(data["benchmarks"]) == EXPECTED
    for name, res in data["benchmarks"].items():
        assert "error" not in res, name
        nums = _numbers({k: v for k, v in res.items() if k != "skipped"})
        assert nums, f"{name} reported no numbers"
        assert all(math.isfinite(n) for n in nums), name
        for t in res["targets"]:
            assert isinstance(t["target"], str)
            assert t["met"] in (True, False, None)
    assert set(data["benchmarks"]["write"]["sizes"][0]["ns"]) >= {"segment.write"}
    assert data["benchmarks"]["handoff"]["ns"]["shmcast write (copy)"]["median"] > 0
    lat = data["benchmarks"]["latency"]["rates"]
    assert set(lat) == {"1000", "10000", "100000"}
    assert "shmcast Subscriber(wait='spin')" in lat["100000"]
    assert "shmcast futex (Segment.wait)" not in lat["100000"]  # busy-poll rows only
    assert lat["1000"]["shmcast futex (Segment.wait)"]["ns"]["p50"] > 0
    record = data["benchmarks"]["record"]
    assert record["keep_up"]["published"] > 0
    assert record["write_fps"]["bare h5py loop"]["median"] > 0
    assert record["replay_vps"]["replay --max"]["median"] > 0
    relay = data["benchmarks"]["relay"]
    if "rows" in relay:  # needs network namespaces (root); else skipped with the reason
        assert {(r["path"], r["size"]) for r in relay["rows"]} == {
            (p, s) for p in ("relay", "zmq") for s in ("1KiB", "1MiB")
        }
    else:
        assert relay["skipped"]


def test_spread_lines_up_the_targets_of_several_runs(tmp_path, capsys):
    from bench._main import main

    def results(path: Path, targets: list[dict[str, object]]) -> Path:
        path.write_text(json.dumps({"benchmarks": {"x": {"targets": targets}}}))
        return path

    a = results(tmp_path / "a.json", [{"target": "t1 <= 1", "value": 0.5, "met": True}])
    b = results(
        tmp_path / "b.json",
        [
            {"target": "t1 <= 1", "value": 1.5, "met": False},
            {"target": "t2 (no target)", "value": 3.0, "met": None},
        ],
    )
    assert main(["--spread", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    t1 = next(line for line in lines if line.startswith("t1"))
    assert t1.split()[-3:] == ["0.5", "1.5", "1/2"]
    t2 = next(line for line in lines if line.startswith("t2"))
    assert t2.split()[-3:] == ["-", "3", "n/a"]
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--spread", str(tmp_path / "bad.json")]) == 2
