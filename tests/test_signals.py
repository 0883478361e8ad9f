"""SIGTERM, SIGINT and SIGHUP stop every long-running command the same clean way.

Closing the terminal of ``shmcast broker`` or ``shmcast demo`` (SIGHUP) used to
kill them outright, leaving segments in /dev/shm and the runtime directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from shmcast.broker import Segment
from shmcast.broker.client import runtime_dir, shm_path
from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    SUBSCRIBE_READY,
    running,
    start,
    wait_for,
)
from shmcast.publisher import Publisher

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_broker_stops_cleanly_on_each_signal(namespace: str, sig: signal.Signals) -> None:
    broker = start(["broker", "-n", namespace], ready=BROKER_READY)
    try:
        with running(
            ["publish", "s", "-n", namespace, "--source", "random", "--dtype", "u1",
             "--shape", "16", "--count", "3"],
            ready=PUBLISH_READY,
        ) as pub:  # fmt: skip
            assert pub.wait(20) == 0
        assert Segment.list(namespace) == ["s"]
        broker.send_signal(sig)
        assert broker.wait(20) == 0, broker.stderr
    finally:
        broker.stop()
    assert Segment.list(namespace) == []
    assert not runtime_dir(namespace).exists()


_SIGNAL_IN_EVENT_WAIT = """
import os, signal, threading
from shmcast.cli._runner import stop_on_signals

stop = threading.Event()
with stop_on_signals(stop.set):
    # The main thread inside Event.wait's locked part (CPython's Event: a Condition
    # over a plain Lock), as `publish` is 200 times a second between versions.
    with stop._cond:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, the lock held
            pass
    print("stopped" if stop.wait(5) else "not stopped", flush=True)
"""


def test_a_stop_signal_while_the_main_thread_is_in_its_events_wait_stops_it() -> None:
    """The stop signals' handler called ``stop()`` (``Event.set``) in the main thread,
    wherever it was: arriving while that thread held the Event's lock (in
    ``stop.wait()``, between two versions of ``publish``), it waited for that lock
    for ever: a `shmcast publish` SIGTERMed in a fresh-clone `make test` printed no
    done line in 10 s, and was killed. The handler now hands ``stop()`` to a thread
    of its own."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_IN_EVENT_WAIT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the stop signal's handler hung on the lock of the Event it sets")
    assert proc.returncode == 0, err
    assert out.strip() == "stopped"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_publish_and_subscribe_stop_cleanly_on_each_signal(
    namespace: str, sig: signal.Signals
) -> None:
    with running(["broker", "-n", namespace], ready=BROKER_READY):
        pub = start(
            ["publish", "p", "-n", namespace, "--source", "random", "--dtype", "f8",
             "--shape", "8", "--rate", "200"],
            ready=PUBLISH_READY,
        )  # fmt: skip
        sub = start(["subscribe", "p", "-n", namespace, "--quiet"], ready=SUBSCRIBE_READY)
        try:
            sub.wait_line("", 1)  # nothing to wait for: both are ready
            for proc in (sub, pub):
                proc.send_signal(sig)
                assert proc.wait(20) == 0, proc.stderr
            done = json.loads(pub.wait_line("shmcast publish done: ", 5).split(": ", 1)[1])
            assert done["published"] > 0
            assert sub.wait_line("shmcast subscribe done: ", 5)
        finally:
            sub.stop()
            pub.stop()
        # The publisher let go of its lease: a new writer takes it at once.
        with Segment.attach("p", namespace=namespace, writable=True):
            pass


def test_demo_stops_cleanly_on_sighup(namespace: str) -> None:
    demo = start(["demo", "-n", namespace, "--duration", "0", "--refresh", "0.2"])
    try:
        demo.wait_line("shmcast demo  namespace=", 60)  # the first table: all running
        demo.send_signal(signal.SIGHUP)
        assert demo.wait(60) == 0, demo.stderr
        assert any("clean exit" in line for line in demo.stdout), demo.stdout[-5:]
    finally:
        demo.stop(timeout=30)
    assert Segment.list(namespace) == []
    assert not runtime_dir(namespace).exists()


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out.update(int(c) for c in (task / "children").read_text().split())
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_killed_demo_takes_its_processes_with_it(namespace: str) -> None:
    """SIGKILL gives the demo no chance to stop what it started: each of its processes
    follows a lifeline pipe from it and stops itself, cleanly, when the pipe closes.
    (Before, a demo killed by a test's timeout left its broker, publishers and
    recorder running for good.)"""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("shmcast-demo-*"))
    demo = start(["demo", "-n", namespace, "--duration", "0", "--refresh", "0.2"])
    kids: set[int] = set()
    try:
        demo.wait_line("shmcast demo  namespace=", 60)  # the first table: all running
        kids = _children(demo.pid)
        assert len(kids) >= 4, kids  # broker, publishers, subscribers, recorder
        demo.send_signal(signal.SIGKILL)
        demo.wait(10)
        wait_for(lambda: not any(_alive(k) for k in kids), timeout=60, what="the demo's children")
    finally:
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        demo.stop(timeout=10)
        for left in set(tmp.glob("shmcast-demo-*")) - before:  # its recording: ours to remove
            shutil.rmtree(left, ignore_errors=True)
    wait_for(lambda: Segment.list(namespace) == [], timeout=20, what="the segments unlinked")
    assert not runtime_dir(namespace).exists()


def test_a_demo_whose_broker_is_killed_says_so_and_leaves_nothing(namespace: str) -> None:
    """The demo's broker SIGKILLed under it (the OOM killer, a stray `kill -9`): the
    demo says that its broker died, stops the rest and unlinks what the broker could
    not (segments, namespace word, runtime directory). Before, it said "no broker
    answered ...; start one with `shmcast broker`", exited 1 and left them all."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("shmcast-demo-*"))
    demo = start(
        [
            *("demo", "-n", namespace, "--duration", "0", "--refresh", "0.2"),
            *("--tick-rate", "50", "--frame-rate", "5"),
        ]
    )
    try:
        demo.wait_line("shmcast demo  namespace=", 60)  # the first table: all running
        brokers = [k for k in _children(demo.pid) if b" broker " in _cmdline(k)]
        assert len(brokers) == 1, brokers
        os.kill(brokers[0], signal.SIGKILL)
        assert demo.wait(60) == 1
    finally:
        demo.stop(timeout=10)
        for left in set(tmp.glob("shmcast-demo-*")) - before:
            shutil.rmtree(left, ignore_errors=True)
    err = "\n".join(demo.stderr)
    assert f"the demo's broker (pid {brokers[0]}) was killed by SIGKILL" in err, err[-2000:]
    assert "start one with" not in err
    assert Segment.list(namespace) == []
    assert not Path(shm_path(namespace, "@catalog")).exists()  # the namespace word
    assert not runtime_dir(namespace).exists()


def test_a_demo_broker_killed_by_a_real_time_signal_is_named() -> None:
    """The demo's broker killed by a signal `signal.Signals` has no name of (`kill -40`:
    the real-time ones between SIGRTMIN and SIGRTMAX end a process by default). Before,
    naming its death raised ValueError: the demo ended in a traceback, before the
    reclaim of what the broker left, which stayed in /dev/shm."""
    from types import SimpleNamespace

    from shmcast.cli._cmd_demo import _broker_gone

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(proc.pid, int(signal.SIGRTMIN) + 6)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    broker = SimpleNamespace(proc=proc, pid=proc.pid)
    said = _broker_gone(broker)  # type: ignore[arg-type]
    num = int(signal.SIGRTMIN) + 6
    assert said == (
        f"the demo's broker (pid {proc.pid}) was killed by signal {num}; stopping the demo"
    )


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except FileNotFoundError:
        return b""


def test_a_broker_whose_parent_dies_waits_for_its_publishers_to_let_go(namespace: str) -> None:
    """A broker started with a lifeline outlives its parent until its publishers
    (which stop at the same moment) let their segments go, and then unlinks them.
    Before, it stopped at once, kept each segment whose writer was still alive,
    and the segment and the namespace word stayed in /dev/shm for good."""
    broker = start(["broker", "-n", namespace, "--log-level", "INFO"], ready=BROKER_READY)
    try:
        with Publisher("s", dtype=np.uint8, shape=(16,), namespace=namespace) as pub:
            pub.publish(np.arange(16, dtype=np.uint8))
            broker.cut_lifeline()  # what the demo's SIGKILL does to its broker
            wait_for(
                lambda: (
                    broker.proc.poll() is not None
                    or any("parent gone" in line for line in broker.stderr)
                ),
                timeout=10,
                what="the broker to see its lifeline close",
            )
        # the publisher let go: the broker stops, unlinking what it kept for it
        assert broker.wait(10) == 0, broker.stderr
        wait_for(lambda: Segment.list(namespace) == [], timeout=10, what="the segment unlinked")
        assert not runtime_dir(namespace).exists()
    finally:
        broker.stop(timeout=10)  # what a failure leaves in /dev/shm, the leak check removes
