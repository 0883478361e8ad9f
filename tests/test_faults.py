"""Process faults, on purpose: SIGKILL a publisher mid-write, the broker under load,
a subscriber holding a view; SIGSTOP a subscriber. Real processes, bounded waits.

Each test prints a ``FIGURES {json}`` line (``pytest -s``); docs/RELIABILITY.md
quotes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from shmcast.broker import Segment
from shmcast.broker.client import ControlClient, Endpoints
from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    SUBSCRIBE_READY,
    ShmcastProcess,
    start,
    wait_for,
)
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber
from tests._procs import done as _done
from tests._procs import procs as _procs


def _figures(name: str, **values: Any) -> None:
    print(f"FIGURES {name} {json.dumps(values)}")


@contextmanager
def _python(code: str, ready: str, timeout: float = 20.0) -> Iterator[ShmcastProcess]:
    """A child ``python -c code`` whose output is drained; waits for a ``ready`` line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sp = ShmcastProcess(["python", "-c", ready], proc)
    try:
        sp.wait_line(ready, timeout)
        yield sp
    finally:
        sp.stop(timeout=5, sig=signal.SIGKILL)


# ---------------------------------------------------------------------- publisher


@pytest.mark.usefixtures("each_core")  # an engine test: both cores
def test_publisher_sigkill_mid_write(namespace: str) -> None:
    """Readers keep the last committed version; the lease passes on; versions go on."""
    with _procs() as procs:
        procs.append(start(["broker"], ready=BROKER_READY))
        child = """
            import time, numpy as np
            from shmcast.publisher import Publisher
            pub = Publisher("w", dtype="f8", shape=(4096,))
            for i in range(1, 6):
                pub.publish(np.full(4096, float(i)))
            with pub.loan() as out:
                out[:2048] = -1.0  # half of version 6 written, then killed
                print("LOANED", pub.version, flush=True)
                time.sleep(600)
        """
        with _python(child, "LOANED") as writer, Segment.attach("w") as reader:
            assert reader.version == 5
            writer.send_signal(signal.SIGKILL)
            writer.wait(10)
            assert writer.proc.returncode == -signal.SIGKILL
            snap = reader.latest()
            assert snap.version == 5
            assert (snap.array == 5.0).all()
            wait_for(lambda: not reader.writer_alive(), 5, what="the kernel to drop the lease")
            with Publisher("w", timeout=5) as pub2:
                assert pub2.version == 5
                versions = [pub2.publish(np.full(4096, float(7 + k))) for k in range(3)]
            assert versions == [6, 7, 8]  # never backwards, none reused
            snap = reader.latest()
            assert snap.version == 8
            assert (snap.array == 9.0).all()
            assert reader.torn_reads == 0
        _figures("publisher_sigkill", last_committed=5, next_versions=versions)


# ---------------------------------------------------------------------- broker


class _Consumer:
    """Iterates a Subscriber's updates in a thread (the Subscriber is only used there)."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self.versions: list[int] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                for up in self.sub.updates(timeout=0.1):
                    self.versions.append(up.version)
                    if self.stop.is_set():
                        break
        except BaseException as exc:
            self.error = exc

    @property
    def last(self) -> int:
        return self.versions[-1] if self.versions else 0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_broker_sigkill_under_load_and_restart(namespace: str) -> None:
    """Segments are adopted, the publisher never stops, no committed version is lost."""
    rate = 200
    with _procs() as procs:
        broker = start(["broker", "--heartbeat", "0.2"], ready=BROKER_READY)
        procs.append(broker)
        pub = start(
            [
                "publish",
                "load",
                "--source",
                "random",
                "--dtype",
                "f8",
                "--shape",
                "4096",
                "--rate",
                str(rate),
            ],
            ready=PUBLISH_READY,
        )
        procs.append(pub)
        sub = Subscriber("load", timeout=5)
        consumer = _Consumer(sub)
        try:
            with Segment.attach("load") as seg:
                wait_for(lambda: consumer.last >= 20, 10, what="the first updates")
                broker.send_signal(signal.SIGKILL)
                broker.wait(10)
                v_kill = seg.version
                t_kill = time.monotonic()
                # The broker is gone: the publisher goes on, the subscriber polls headers.
                wait_for(lambda: sub.broker_up is False, 10, what="the subscriber to notice")
                wait_for(lambda: seg.version >= v_kill + rate // 2, 10, what="publishing on")
                wait_for(lambda: consumer.last >= v_kill + rate // 2, 10, what="reading on")
                broker2 = start(["broker", "--heartbeat", "0.2"], ready=BROKER_READY)
                procs.append(broker2)
                v_restart = seg.version
                outage = time.monotonic() - t_kill
                assert broker2.ready["segments"] == ["load"]  # adopted, not recreated
                with Segment.attach("load") as again:  # the same object, not a new one
                    assert again.info().created_ns == seg.info().created_ns
                wait_for(lambda: sub.epoch_changes >= 1 and sub.broker_up, 10, what="resync")
                wait_for(lambda: consumer.last >= v_restart + rate // 2, 10, what="after restart")
                pub.send_signal(signal.SIGTERM)
                final = _done(pub, "shmcast publish done: ")["last_version"]
                wait_for(lambda: consumer.last == final, 10, what="the final version")
                with ControlClient(Endpoints.default(namespace).control) as ctl:
                    wait_for(
                        lambda: ctl.request("describe", name="load")["version"] == final,
                        5,
                        what="the restarted broker to announce the final version",
                    )
                    published = ctl.request("describe", name="load")["published"]
        finally:
            consumer.close()
            stats = sub.stats["load"]
            sub.close()
        versions = consumer.versions
        assert versions == sorted(set(versions)), "versions went backwards or repeated"
        assert versions[-1] == final
        _figures(
            "broker_sigkill",
            outage_s=round(outage, 2),
            published_during_outage=v_restart - v_kill,
            final_version=final,
            subscriber_updates=stats.updates,
            subscriber_missed=stats.missed,
            events_missed=sub.events_missed,
            epoch_changes=sub.epoch_changes,
            restarted_broker_published=published,
        )


# ---------------------------------------------------------------------- subscribers


@pytest.mark.usefixtures("each_core")  # an engine test: both cores
def test_subscriber_sigkill_holding_a_view(namespace: str) -> None:
    """A reader killed inside a zero-copy read changes nothing for anyone else."""
    with _procs() as procs:
        procs.append(start(["broker"], ready=BROKER_READY))
        with Publisher("v", dtype="i8", shape=(1000,)) as pub, Subscriber("v") as other:
            pub.publish(np.arange(1000))
            child = """
                import time
                from shmcast.subscriber import Subscriber
                sub = Subscriber("v", wait="futex")
                with sub.read("v") as snap:
                    print("HOLDING", snap.version, int(snap.array.sum()), flush=True)
                    time.sleep(600)
            """
            with _python(child, "HOLDING") as holder:
                holder.send_signal(signal.SIGKILL)
                holder.wait(10)
            assert Segment.list() == ["v"]  # the reader's exit unlinked nothing
            for k in range(2, 40):
                assert pub.publish(np.arange(1000) * k) == k
            seen = [up.version for up in other.updates(timeout=1.0) if up.version]
            assert seen[-1] == 39
            snap = other.latest("v")
            assert snap.version == 39
            assert (snap.array == np.arange(1000) * 39).all()
            with ControlClient(Endpoints.default(namespace).control) as ctl:
                assert ctl.request("describe", name="v")["writer_pid"] == os.getpid()


def test_subscriber_sigstop(namespace: str) -> None:
    """A stopped subscriber never slows the publisher nor other subscribers, and
    counts what it missed when it resumes."""
    rate = 500
    with _procs() as procs:
        procs.append(start(["broker"], ready=BROKER_READY))
        pub = start(
            [
                "publish",
                "s",
                "--source",
                "random",
                "--dtype",
                "f4",
                "--shape",
                "256",
                "--rate",
                str(rate),
            ],
            ready=PUBLISH_READY,
        )
        procs.append(pub)
        stalled = start(["subscribe", "s", "--quiet", "--wait", "futex"], ready=SUBSCRIBE_READY)
        procs.append(stalled)
        # An events subscriber: every version reaches it through the broker (whose
        # watcher announces each commit), so any loss would be the stalled one's doing.
        healthy = start(["subscribe", "s", "--quiet", "--wait", "events"], ready=SUBSCRIBE_READY)
        procs.append(healthy)
        with Segment.attach("s") as seg:

            def rate_over(seconds: float) -> float:
                v0, t0 = seg.version, time.monotonic()
                deadline = t0 + seconds
                while time.monotonic() < deadline:
                    seg.wait(seg.version, timeout=deadline - time.monotonic())
                return (seg.version - v0) / (time.monotonic() - t0)

            before = rate_over(1.0)
            stalled.send_signal(signal.SIGSTOP)
            try:
                during = rate_over(2.0)
            finally:
                stalled.send_signal(signal.SIGCONT)
            after = rate_over(0.5)
        pub.send_signal(signal.SIGTERM)
        published = _done(pub, "shmcast publish done: ")
        for sp in (stalled, healthy):
            sp.send_signal(signal.SIGTERM)
        stalled_done = _done(stalled, "shmcast subscribe done: ")["s"]
        healthy_done = _done(healthy, "shmcast subscribe done: ")["s"]
    assert during >= 0.8 * before, (before, during)
    assert stalled_done["missed"] > 0.5 * rate  # ~2 s of versions, counted, not silent
    assert healthy_done["missed"] <= 0.01 * published["published"]
    _figures(
        "subscriber_sigstop",
        rate_before=round(before),
        rate_during_stop=round(during),
        rate_after=round(after),
        published=published["published"],
        stalled_updates=stalled_done["updates"],
        stalled_missed=stalled_done["missed"],
        healthy_updates=healthy_done["updates"],
        healthy_missed=healthy_done["missed"],
        healthy_overrun=healthy_done["overrun"],
    )


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    t0 = time.monotonic()
    yield
    assert time.monotonic() - t0 < 60, "a fault test must stay well under a minute"
