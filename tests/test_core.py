"""The engine's cores (issue 13 parts 1-3, issue 11 class 6): the compiled core is
built and agrees with the layout, the selection rules, the waiters word (no wake
syscall for a commit nobody waits for, and no wake-up ever lost), copies without
the GIL, waits on more segments than one futex_waitv takes, and the doctor's
report of the core in use."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from shmcast.broker import (
    ConfigError,
    Segment,
    _backend,
    _doctor,
    _futex,
    _layout,
    _segment,
    engine_core,
    machine_supported,
    wait_any,
)
from shmcast.broker._futex import wait_many
from shmcast.broker.client import shm_path

from ._seg_util import ROOT, kill, poll_until, read_line

CORES = ["c", "python"]


@pytest.fixture
def segs(namespace: str) -> Iterator[list[Segment]]:
    """Segments a test creates or attaches; closed and unlinked afterwards."""
    made: list[Segment] = []
    try:
        yield made
    finally:
        for seg in made:
            if seg.writable and not seg.closed:
                seg.unlink()
            seg.close()


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------ the build


def test_the_compiled_core_is_built_where_a_compiler_is() -> None:
    if sys.platform != "linux" or not (shutil.which(sysconfig.get_config_var("CC") or "cc")):
        pytest.skip("no C compiler here: the fallback is the documented path")
    mod = _backend.compiled()
    assert mod is not None, "pip install built no compiled core although a compiler is here"
    assert mod.__file__ is not None
    assert mod.__file__.endswith(".abi3.so"), mod.__file__  # one build for 3.10+
    assert engine_core() == "c"


def test_the_core_agrees_with_the_layout() -> None:
    mod = _backend.compiled()
    if mod is None:
        pytest.skip("the compiled core is not installed")
    assert mod.LAYOUT_VERSION == _layout.LAYOUT_VERSION
    assert mod.W_LATEST == _layout.W_LATEST
    assert mod.W_HEARTBEAT == _layout.W_HEARTBEAT
    assert mod.W_LATEST_SLOT == _layout.W_LATEST_SLOT
    assert mod.NOTIFY_OFF == _layout.NOTIFY_OFF
    assert mod.WAITERS_OFF == _layout.WAITERS_OFF
    assert mod.SLOT_CTL == _layout.SLOT_CTL
    assert mod.SLOT_CTL_SIZE == _layout.SLOT_CTL_SIZE
    assert mod.MAX_SLOTS == _layout.MAX_SLOTS
    assert mod.MAX_LOOKS == _segment.MAX_RETRIES


# ------------------------------------------------------------------ selection


@pytest.fixture
def no_compiled_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine where pip could not build the extension."""
    monkeypatch.setattr(_backend, "_compiled", None)
    monkeypatch.setattr(_backend, "_import_error", "No module named 'shmcast.broker._core'")
    monkeypatch.setattr(_segment, "_fallback_warned", [])


@pytest.fixture
def arm64(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on an aarch64 machine (only what the selection and the doctor look at)."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")


def test_auto_takes_the_compiled_core(namespace: str, segs: list[Segment], monkeypatch) -> None:
    if _backend.compiled() is None:
        pytest.skip("the compiled core is not installed")
    for value in (None, "", "auto", " C "):
        if value is None:
            monkeypatch.delenv("SHMCAST_CORE", raising=False)
        else:
            monkeypatch.setenv("SHMCAST_CORE", value)
        assert engine_core() == "c"
    segs.append(Segment.create("s", "f8", (4,)))
    assert segs[0].core == "c"


def test_python_is_chosen_explicitly_without_a_warning(
    namespace: str, segs: list[Segment], monkeypatch
) -> None:
    if platform.machine() not in _backend.TSO_MACHINES:
        pytest.skip("the fallback runs on x86-64 only")
    monkeypatch.setenv("SHMCAST_CORE", "python")
    segs.append(Segment.create("s", "f8", (4,)))  # warnings are errors in this suite
    segs.append(Segment.attach("s"))
    assert [s.core for s in segs] == ["python", "python"]


@pytest.mark.usefixtures("no_compiled_core")
def test_a_missing_core_falls_back_with_a_warning_on_x86(
    namespace: str, segs: list[Segment], monkeypatch
) -> None:
    if platform.machine() not in _backend.TSO_MACHINES:
        pytest.skip("the fallback runs on x86-64 only")
    monkeypatch.delenv("SHMCAST_CORE", raising=False)
    with pytest.warns(RuntimeWarning, match="compiled core is not installed.*SHMCAST_CORE=python"):
        segs.append(Segment.create("s", "f8", (4,)))
    assert segs[0].core == "python"
    segs.append(Segment.attach("s"))  # warned once per process, not per segment
    assert segs[1].core == "python"
    monkeypatch.setenv("SHMCAST_CORE", "c")
    with pytest.raises(ConfigError, match="SHMCAST_CORE=c but the compiled core is not installed"):
        Segment.attach("s")


@pytest.mark.usefixtures("no_compiled_core", "arm64")
def test_without_the_core_other_cpus_refuse(namespace: str, monkeypatch) -> None:
    monkeypatch.delenv("SHMCAST_CORE", raising=False)
    with pytest.raises(ConfigError, match=r"x86-64 only, not on aarch64.*C compiler"):
        Segment.create("s", "f8", (4,))
    assert not machine_supported()
    assert Segment.list(namespace) == []  # refused before anything was made


@pytest.mark.usefixtures("arm64")
def test_the_fallback_refuses_other_cpus_even_when_chosen(namespace: str, monkeypatch) -> None:
    monkeypatch.setenv("SHMCAST_CORE", "python")
    with pytest.raises(ConfigError, match=r"relies on x86-64's memory ordering.*aarch64"):
        Segment.create("s", "f8", (4,))
    assert Segment.list(namespace) == []


@pytest.mark.usefixtures("arm64")
def test_the_compiled_core_runs_anywhere(namespace: str, segs: list[Segment], monkeypatch) -> None:
    if _backend.compiled() is None:
        pytest.skip("the compiled core is not installed")
    monkeypatch.delenv("SHMCAST_CORE", raising=False)
    assert machine_supported()
    segs.append(Segment.create("s", "f8", (4,)))
    assert segs[0].core == "c"


_CHOOSE_EACH_CORE = """
import os
import platform
from shmcast.broker import ConfigError, Segment
from shmcast.broker._doctor import _check_machine
print(platform.machine())
for core in ("python", "auto"):
    os.environ["SHMCAST_CORE"] = core
    try:
        seg = Segment.create("choose", "f8", (4,))
    except ConfigError as exc:
        print("refused", exc)
    else:
        print("ran", seg.core)
        seg.unlink()
        seg.close()
print("doctor", [c.status for c in _check_machine() if c.check == "cpu"][0])
"""


def test_on_this_cpu_the_fallback_runs_on_x86_64_only(namespace: str) -> None:
    """The selection on the real CPU, nothing patched (a child process): on x86-64
    the fallback runs when chosen; on any other CPU (aarch64 under make test-arm64)
    it refuses, and the compiled core runs with the doctor content."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHOOSE_EACH_CORE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    machine, chosen, auto, doctor = proc.stdout.splitlines()
    assert machine == platform.machine()
    if _backend.compiled() is not None:
        assert auto == "ran c"
        assert doctor == f"doctor {_doctor.OK}"
    if machine in _backend.TSO_MACHINES:
        assert chosen == "ran python"
    else:
        assert chosen.startswith("refused "), chosen
        assert "relies on x86-64's memory ordering" in chosen
        assert f"this CPU is {machine}" in chosen


def test_an_unknown_core_is_a_config_error(namespace: str, monkeypatch) -> None:
    monkeypatch.setenv("SHMCAST_CORE", "rust")
    with pytest.raises(ConfigError, match="'rust' is not one of auto, c, python"):
        Segment.create("s", "f8", (4,))


# ------------------------------------------------------------------ the doctor


def _cpu_check() -> _doctor.Check:
    (check,) = [c for c in _doctor._check_machine() if c.check == "cpu"]
    return check


@pytest.mark.usefixtures("arm64")
def test_doctor_is_content_on_arm_with_the_compiled_core(monkeypatch) -> None:
    if _backend.compiled() is None:
        pytest.skip("the compiled core is not installed")
    monkeypatch.delenv("SHMCAST_CORE", raising=False)
    check = _cpu_check()
    assert check.status == _doctor.OK
    assert "compiled core" in check.message
    assert "aarch64" in check.message


@pytest.mark.usefixtures("arm64", "no_compiled_core")
def test_doctor_reports_arm_without_the_core_as_a_problem(monkeypatch) -> None:
    monkeypatch.delenv("SHMCAST_CORE", raising=False)
    check = _cpu_check()
    assert check.status == _doctor.PROBLEM
    assert "C compiler" in check.fix


@pytest.mark.usefixtures("no_compiled_core")
def test_doctor_warns_on_x86_without_the_core(monkeypatch) -> None:
    if platform.machine() not in _backend.TSO_MACHINES:
        pytest.skip("x86-64 only")
    monkeypatch.delenv("SHMCAST_CORE", raising=False)
    check = _cpu_check()
    assert check.status == _doctor.WARN
    assert "pure-Python fallback" in check.message
    monkeypatch.setenv("SHMCAST_CORE", "python")
    assert _cpu_check().status == _doctor.OK


# ------------------------------------------------------------------ the waiters word


@pytest.mark.usefixtures("each_core")
def test_only_a_commit_someone_waits_for_makes_the_wake_syscall(
    namespace: str, segs: list[Segment], each_core: str
) -> None:
    w = Segment.create("s", "i8", (8,))
    r = Segment.attach("s")
    segs += [w, r]
    for _ in range(100):
        w.write(np.zeros(8, "i8"))
    flag, _, commits, wakes, _ = w._ring.state()
    assert commits == 100
    # The compiled core skips the syscall when nobody announced a sleep; the
    # fallback cannot order its exchange without an atomic, so it always wakes.
    assert wakes == (0 if each_core == "c" else 100)
    # A reader announces itself when it is about to sleep ...
    assert r.wait(100, timeout=0.01) == 100
    assert r._ring.state()[0] == 1
    # ... the next commit wakes (and clears the word); those after it do not.
    for _ in range(10):
        w.write(np.zeros(8, "i8"))
    flag, _, commits, wakes, _ = w._ring.state()
    if each_core == "c":
        assert (flag, wakes) == (0, 1)
    else:
        assert wakes == 110


@pytest.mark.usefixtures("each_core")
def test_a_sleeping_reader_is_woken_at_once(namespace: str, segs: list[Segment]) -> None:
    w = Segment.create("s", "i8", (8,))
    r = Segment.attach("s")
    segs += [w, r]
    got: list[tuple[int, float]] = []
    t = threading.Thread(target=lambda: got.append((r.wait(0, timeout=20), time.monotonic())))
    t.start()
    try:
        poll_until(lambda: w._ring.state()[0] == 1, 10, "the reader to announce its sleep")
        t0 = time.monotonic()
        w.write(np.ones(8, "i8"))
        t.join(20)
    finally:
        t.join(20)
    assert got
    assert got[0][0] == 1
    assert got[0][1] - t0 < 2.0  # a lost wake-up would sleep the full 20 s


_WAITS: dict[str, Any] = {
    "wait": lambda r, r2, t: r.wait(0, t),
    "wait_acquire": lambda r, r2, t: r.wait_acquire(0, t),
    "wait_read": lambda r, r2, t: r.wait_read(0, t),
    "wait_any": lambda r, r2, t: wait_any([r, r2], [0, 0], t),
}


@pytest.mark.usefixtures("each_core")
@pytest.mark.parametrize("how", list(_WAITS))
def test_a_nan_timeout_is_refused_and_an_infinite_one_has_no_limit(
    namespace: str, segs: list[Segment], how: str
) -> None:
    """Both cores alike. Before, the fallback spun a core for ever on NaN and raised
    OverflowError on inf; the compiled core returned at once on NaN."""
    w, w2 = Segment.create("s", "i8", (8,)), Segment.create("t", "i8", (8,))
    r, r2 = Segment.attach("s"), Segment.attach("t")
    segs += [w, w2, r, r2]
    got: list[object] = []

    def waiting(timeout: float) -> None:
        try:
            got.append(_WAITS[how](r, r2, timeout))
        except Exception as exc:
            got.append(exc)

    nan = threading.Thread(target=waiting, args=(math.nan,), daemon=True)
    nan.start()
    nan.join(10)
    assert not nan.is_alive(), "a NaN timeout spins"
    assert isinstance(got[0], ValueError)
    assert "timeout=nan" in str(got[0])
    got.clear()
    inf = threading.Thread(target=waiting, args=(math.inf,))
    inf.start()
    try:
        poll_until(lambda: w._ring.state()[0] == 1, 10, "the reader to announce its sleep")
        w.write(np.ones(8, "i8"))
    finally:
        inf.join(10)
    assert len(got) == 1
    assert not isinstance(got[0], Exception), got[0]
    assert got[0]  # woken by the commit: a version, a look, or True


def _strace_wakes(code: str, env: dict[str, str]) -> int:
    """FUTEX_WAKE syscalls on the segment's notify word made by ``python -c code``
    under strace (``code`` prints the word's address, then ``DONE``)."""
    proc = subprocess.run(
        ["strace", "-f", "-e", "trace=futex", sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"strace cannot trace here: {proc.stderr[-300:]}")
    addr, done = proc.stdout.split()
    assert done == "DONE", proc.stderr[-2000:]
    return len(re.findall(rf"futex\({addr}, FUTEX_WAKE, 2147483647", proc.stderr))


_PUBLISH_1000 = """
import numpy as np
from shmcast.broker import Segment
w = Segment.create("strace", "i8", (8,))
try:
    print(hex(np.frombuffer(w._mm, np.uint8).ctypes.data + 96))
    a = np.zeros(8, "i8")
    for _ in range(1000):
        w.write(a)
finally:
    w.unlink()
    w.close()
print("DONE")
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_no_syscall_for_a_commit_nobody_waits_for(namespace: str) -> None:
    """Counted by the kernel's own account of the syscalls (strace), not by the core."""
    if _backend.compiled() is None:
        pytest.skip("the compiled core is not installed")
    env = {**os.environ, "SHMCAST_CORE": "c"}
    assert _strace_wakes(_PUBLISH_1000, env) == 0
    if platform.machine() in _backend.TSO_MACHINES:
        env["SHMCAST_CORE"] = "python"
        assert _strace_wakes(_PUBLISH_1000, env) == 1000  # the fallback: one per commit


def _worker(core: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests._seg_workers", *args],
        cwd=ROOT,
        # The compiled core widens its race windows (between its stores, and between a
        # waiter's announcement, its loads and its sleep) by 20 µs, so that the other
        # side lands in them often; the fallback's are microseconds wide by nature.
        env={**os.environ, "SHMCAST_CORE": core, "STALL_NS": "20000"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("waker", CORES)
@pytest.mark.parametrize("sleeper", CORES)
def test_no_wake_up_is_lost_between_processes(
    namespace: str, waker: str, sleeper: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two processes ping-pong versions through two segments, each side sleeping on a
    futex until the other commits: every wait is a race between the waiter's
    announce-check-sleep and the committer's store-exchange-wake. A lost wake-up
    shows as a wait that returns 0.5 s or more after the commit it waited for
    (its 2 s timeout ends it); a protocol that loses them is slow here, never hung."""
    _skip_unless(waker, sleeper)
    rounds = 3000
    for name in ("ab", "ba"):
        Segment.create(name, "i8", (8,)).close()
    procs = [
        _worker(waker, "ping", "ab", "ba", str(rounds), "1"),
        _worker(sleeper, "ping", "ba", "ab", str(rounds), "0"),
    ]
    try:
        for p in procs:
            assert read_line(p, 30) == "READY"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        results = [json.loads(read_line(p, 120)) for p in procs]
    finally:
        for p in procs:
            kill(p)
        for name in ("ab", "ba"):
            Segment.remove(name, namespace=namespace)
    assert [r["core"] for r in results] == [waker, sleeper]
    summary = ", ".join(
        f"{r['core']}: {r['lost']} lost, woken at worst {r['slowest'] * 1e3:.1f} ms after "
        f"the commit, {rounds / r['seconds']:,.0f} rounds/s"
        for r in results
    )
    with capsys.disabled():
        print(f"\n[ping-pong] {summary}")
    assert all(r["lost"] == 0 for r in results), summary


def _skip_unless(*cores: str) -> None:
    for core in cores:
        if core == "c" and _backend.compiled() is None:
            pytest.skip("the compiled core is not installed")
        if core == "python" and platform.machine() not in _backend.TSO_MACHINES:
            pytest.skip("the fallback runs on x86-64 only")


@pytest.mark.parametrize(
    ("writer", "follower"),
    [("c", "c"), ("c", "python"), ("python", "c")],
    ids=["c-c", "c-python", "python-c"],
)
def test_no_wake_up_is_lost_to_a_stream_of_commits(
    namespace: str, writer: str, follower: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer commits versions with random pauses of 0-60 µs; two followers wait
    for every next version. A follower announces itself while the writer may be
    between any two steps of a commit (its latest store, its exchange of the
    waiters word, its notify bump): one that sleeps through a commit returns 0.5 s
    or more after that commit, when a later one or its timeout wakes it."""
    _skip_unless(writer, follower)
    count = 10_000
    Segment.create("st", "i8", (8,), slots=64).close()  # the waited-for version stays
    procs = [_worker(writer, "stream", "st", str(count))]
    procs += [_worker(follower, "follow", "st", str(count))]
    try:
        for p in procs:
            assert read_line(p, 30) == "READY"
        assert procs[0].stdin is not None
        procs[0].stdin.write("GO\n")
        procs[0].stdin.flush()
        results = [json.loads(read_line(p, 120)) for p in procs]
    finally:
        for p in procs:
            kill(p)
        Segment.remove("st", namespace=namespace)
    wrote, followers = results[0], results[1:]
    assert wrote["last"] == count
    summary = "; ".join(
        f"{r['core']}: {r['lost']} lost of {r['waits']} waits, woken at worst "
        f"{r['slowest'] * 1e3:.1f} ms after the commit"
        for r in followers
    )
    summary += f"; writer ({wrote['core']}): {count / wrote['seconds']:,.0f} commits/s"
    with capsys.disabled():
        print(f"\n[stream] {summary}")
    assert all(r["lost"] == 0 for r in followers), summary


# ------------------------------------------------------------------ readers that sleep


def _maps(pid: int, path: str) -> list[tuple[str, int, int]]:
    """(permissions, offset, length) of ``pid``'s mappings of ``path``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == path:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((fields[1], int(fields[2], 16), hi - lo))
    return out


_SLEEPING_READER = """
import sys
from shmcast.broker import Segment
seg = Segment.attach("s")
seg.wait(seg.version, timeout=0.01)
print("READY", flush=True)
sys.stdin.read()
seg.close()
"""


@pytest.mark.usefixtures("each_core")
def test_a_sleeping_reader_maps_only_the_first_page_writable(
    namespace: str, segs: list[Segment]
) -> None:
    segs.append(Segment.create("s", "f8", (4096,)))
    segs[0].write(np.ones(4096))
    path = shm_path(namespace, "s")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLEEPING_READER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(proc, 30) == "READY"
        maps = _maps(proc.pid, path)
        writable = [m for m in maps if "w" in m[0]]
        assert writable == [("rw-s", 0, 4096)], maps  # the waiters word's page, nothing else
        assert any(m[0] == "r--s" and m[2] == os.path.getsize(path) for m in maps), maps
    finally:
        kill(proc)


@pytest.mark.usefixtures("each_core")
def test_a_reader_that_cannot_announce_itself_still_wakes(
    namespace: str, segs: list[Segment], monkeypatch
) -> None:
    w = Segment.create("s", "i8", (8,))
    r = Segment.attach("s")
    segs += [w, r]

    def refused(path: str, flags: int, *args: Any) -> int:
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", path)  # a read-only mount, say
        return real_open(path, flags, *args)

    real_open = os.open
    monkeypatch.setattr(_segment.os, "open", refused)
    assert r.wait(0, timeout=0.01) == 0
    monkeypatch.undo()
    assert r._ring.state()[4] == 0  # no waiters word: it polls
    got: list[float] = []
    t = threading.Thread(target=lambda: r.wait(0, timeout=20) and got.append(time.monotonic()))
    t.start()
    try:
        poll_until(lambda: _thread_sleeps(t), 10, "the reader to sleep")
        t0 = time.monotonic()
        w.write(np.ones(8, "i8"))
    finally:
        t.join(20)
    assert got
    assert got[0] - t0 < 2.0


def _thread_sleeps(t: threading.Thread) -> bool:
    tid = t.native_id
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] == b"S"


@pytest.mark.usefixtures("each_core")
def test_objects_others_may_read_are_woken_at_every_commit(
    namespace: str, segs: list[Segment], each_core: str
) -> None:
    """Readers of another user cannot write the waiters word: their writer wakes always."""
    segs.append(Segment.create("s", "i8", (8,), mode=0o640))
    for _ in range(5):
        segs[0].write(np.zeros(8, "i8"))
    assert segs[0]._ring.state()[3] == 5


@pytest.mark.usefixtures("each_core")
def test_closing_under_a_sleeping_reader_is_safe(namespace: str, segs: list[Segment]) -> None:
    segs.append(Segment.create("s", "i8", (8,)))
    r = Segment.attach("s")
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while True:
                r.wait_acquire(0, timeout=0.05)
        except Exception as exc:  # ClosedError (compiled core) or ValueError (fallback)
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    poll_until(lambda: _thread_sleeps(t), 10, "the reader to sleep")
    r.close()
    t.join(10)
    assert not t.is_alive()
    assert errors
    assert type(errors[0]).__name__ in ("ClosedError", "ValueError")


@pytest.mark.usefixtures("each_core")
@pytest.mark.parametrize("spin", [False, True], ids=["futex", "spin"])
def test_a_signal_interrupts_a_wait(namespace: str, segs: list[Segment], spin: bool) -> None:
    segs.append(Segment.create("s", "i8", (8,)))
    r = Segment.attach("s")
    segs.append(r)

    class Alarm(Exception):
        pass

    def on_alarm(signum: int, frame: Any) -> None:
        raise Alarm

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t0 = time.monotonic()
        with pytest.raises(Alarm):
            r.wait_acquire(0, timeout=20, spin=spin)
        assert time.monotonic() - t0 < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.usefixtures("each_core")
def test_wait_read_returns_both_commit_times(namespace: str, segs: list[Segment]) -> None:
    w = Segment.create("s", "i8", (8,))
    r = Segment.attach("s")
    segs += [w, r]
    assert r.wait_read(0, timeout=0.01) is None
    before = time.monotonic_ns()
    w.write(np.arange(8, dtype="i8"))
    got = r.wait_read(0, timeout=5)
    assert got is not None
    v, slot, seq, wall, mono = got
    assert (v, wall, mono) == (1, r.acquire()[3], r.monotonic_ns(slot))
    assert before <= mono <= time.monotonic_ns()
    assert np.array_equal(r.view(slot), np.arange(8))
    assert r.validate(slot, seq)


# ------------------------------------------------------------------ copies without the GIL


def _runs_mid_copy(fn: Any, rounds: int) -> tuple[float, int]:
    """(the fastest ``fn`` of ``rounds``, in how many of them a busy second Python
    thread ran in the middle 40 % of the call). The call is one copy of tens of ms:
    with the GIL held through it, that thread cannot run a line of Python there, on
    any machine; with the GIL released it runs whenever the OS gives it a CPU."""
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    t = threading.Thread(target=spin)
    t.start()
    try:
        poll_until(lambda: len(stamps) > 100, 10, "the second thread to run")
        fastest, ran = 1e9, 0
        for _ in range(rounds):
            first = len(stamps)  # the thread only appends: what it stamps from now on
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            fastest = min(fastest, t1 - t0)
            lo, hi = t0 + 0.3 * (t1 - t0), t1 - 0.3 * (t1 - t0)
            # Every stamp since the call began: a fixed tail (the last 20,000) could
            # hold only stamps from after the middle when the thread ran fast.
            ran += any(lo <= x <= hi for x in stamps[first:])
            del stamps[:-100]
    finally:
        stop.set()
        t.join(10)
    return fastest, ran


@pytest.mark.usefixtures("each_core")
def test_big_copies_let_other_threads_run(
    namespace: str, segs: list[Segment], capsys: pytest.CaptureFixture[str]
) -> None:
    """A second Python thread keeps running while a 64 MiB version is written and
    copied out, as an array or as raw bytes (the compiled core drops the GIL for the
    memcpy, the fallback's ctypes.memmove too); held through the copy, it would
    stop that thread."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # hand the GIL over quickly: what we see is the copy
    try:
        n = 64 * 2**20 // 8
        w = Segment.create("big", "f8", (n,))
        r = Segment.attach("big")
        segs += [w, r]
        data = np.random.default_rng(0).random(n)
        w.write(data)  # touch the pages once
        raw, out = data.tobytes(), bytearray(w.nbytes)
        got = {
            "write": _runs_mid_copy(lambda: w.write(data), 10),
            "latest": _runs_mid_copy(r.latest, 10),
            "write_bytes": _runs_mid_copy(lambda: w.write_bytes(raw), 10),
            "read_into": _runs_mid_copy(lambda: r.read_into(out), 10),
        }
        assert np.array_equal(r.latest().array, data)
    finally:
        sys.setswitchinterval(old)
    with capsys.disabled():
        print(
            "\n[gil] "
            + ", ".join(
                f"{k}: {v[0] * 1e3:.1f} ms, the other thread ran mid-copy in {v[1]} of 10"
                for k, v in got.items()
            )
        )
    for name, (_, ran) in got.items():
        assert ran >= 1, f"{name}: the other thread never ran in the middle of a copy"


# ------------------------------------------------------------------ more than 128 segments


def _many(count: int) -> tuple[list[Segment], list[Segment]]:
    writers = [Segment.create(f"m{k}", "i8", (1,), prefault=False) for k in range(count)]
    readers = [Segment.attach(f"m{k}", prefault=False) for k in range(count)]
    return writers, readers


def _futex_waitv_works() -> bool:
    """Whether this kernel (or emulator: qemu-user has no futex_waitv) has futex_waitv;
    without it waits on several words poll in 0.5 ms slices."""
    word = np.zeros(1, np.uint32)
    wait_many([int(word.ctypes.data)], [1], 0.0)  # the value differs: returns at once
    return _futex._waitv_ok is not False


@pytest.mark.usefixtures("each_core")
def test_an_idle_wait_on_200_segments_costs_no_cpu(
    namespace: str, segs: list[Segment], capsys: pytest.CaptureFixture[str]
) -> None:
    if not _futex_waitv_works():
        pytest.skip("no futex_waitv here (kernel before 5.16, or qemu-user): waits poll")
    writers, readers = _many(200)
    segs += writers + readers
    wait_any(readers, [0] * 200, 0.05)  # warm: the waiters pages are mapped on a first wait
    cpu0, t0 = _cpu_s(), time.monotonic()
    assert wait_any(readers, [0] * 200, 1.0) is False
    cpu, wall = _cpu_s() - cpu0, time.monotonic() - t0
    with capsys.disabled():
        print(f"\n[idle] wait_any on 200 segments: {cpu * 1e3:.1f} ms of CPU in {wall:.2f} s")
    assert wall >= 1.0
    assert cpu < 0.05, f"an idle wait on 200 segments used {cpu:.3f} s of CPU in {wall:.2f} s"


@pytest.mark.usefixtures("each_core")
@pytest.mark.parametrize(("count", "target"), [(200, 190), (300, 290)])
def test_a_commit_beyond_the_first_128_wakes_a_wait_any(
    namespace: str,
    segs: list[Segment],
    count: int,
    target: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A commit to segment #190 of 200 (second futex_waitv group) or #290 of 300
    (third) wakes the waiter at once, not at its timeout."""
    writers, readers = _many(count)
    segs += writers + readers
    woke: list[tuple[bool, float]] = []
    t = threading.Thread(
        target=lambda: woke.append((wait_any(readers, [0] * count, 20.0), time.monotonic()))
    )
    t.start()
    try:
        poll_until(lambda: writers[target]._ring.state()[0] == 1, 10, "the waiter to announce")
        poll_until(lambda: _thread_sleeps(t), 10, "the waiter to sleep")
        t0 = time.monotonic()
        writers[target].write(np.ones(1, "i8"))
    finally:
        t.join(30)
    assert woke
    assert woke[0][0] is True
    with capsys.disabled():
        print(f"\n[wake] #{target} of {count}: woken {(woke[0][1] - t0) * 1e3:.2f} ms after")
    assert woke[0][1] - t0 < 1.0, f"woken {woke[0][1] - t0:.3f} s after the commit"
