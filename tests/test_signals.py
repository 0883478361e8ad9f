"""SIGTERM, SIGINT and SIGHUP stop every long-running command the same clean way.

Closing the terminal of ``shmcast broker`` or ``shmcast demo`` (SIGHUP) used to
kill them outright, leaving segments in /dev/shm and the runtime directory.
"""

from __future__ import annotations

import json
import signal

import pytest

from shmcast.broker import Segment
from shmcast.broker.client import runtime_dir
from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    SUBSCRIBE_READY,
    running,
    start,
)

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
