"""The namespace word (``/dev/shm/shmcast.<ns>.@catalog``): the broker bumps it on
catalog changes and heartbeats, readers wait on it beside the segments' words,
and nothing that lists, adopts, reclaims or sweeps segments mistakes it for one."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np
import pytest

from shmcast.broker import (
    Broker,
    BrokerConfig,
    NamespaceWord,
    NotASegmentError,
    Segment,
    wait_segments,
)
from shmcast.broker._layout import W_LATEST
from shmcast.broker.client import ControlClient, shm_path
from shmcast.broker.errors import AccessError
from shmcast.cli import main
from shmcast.cli.testing import BROKER_READY, start, wait_for
from shmcast.publisher import Publisher


def _word_path(namespace: str) -> str:
    return shm_path(namespace, "@catalog")


def test_broker_makes_bumps_and_removes_the_word(namespace: str) -> None:
    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.05)).start()
    try:
        word = NamespaceWord.attach(namespace)
        assert word is not None
        with word:
            assert word.epoch == b.epoch
            assert word.pid == os.getpid()
            assert word.broker_up()
            assert word.interval == pytest.approx(0.05)
            # Heartbeats move the notify word, not the generation.
            n, gen = word.notify, word.generation
            wait_for(lambda: word.notify != n, timeout=5, what="a heartbeat")
            assert word.generation == gen
            with Publisher("a", dtype="f8", shape=2, namespace=namespace):
                assert word.generation == gen + 1
                assert Segment.list(namespace) == ["a"]  # the word is not a segment
            with ControlClient(b.endpoints.control) as c:  # type: ignore[union-attr]
                c.request("delete", name="a")
            assert word.generation == gen + 2
            # Read-only mapping: a reader cannot move the broker's words.
            assert os.stat(word.path).st_mode & 0o777 == 0o600
        b.close()
        # A clean stop: readers learn it at once; nothing is left in /dev/shm.
        assert not os.path.exists(_word_path(namespace))
    finally:
        b.close()


def test_a_reclaimed_segment_moves_the_generation(namespace: str) -> None:
    """A segment whose header went bad is unlinked by the broker: its readers learn
    it from the word at once, as of any other delete. Before, the reclaim alone left
    the generation as it was, and a reader waiting in ``wait='shm'`` mode saw the
    segment gone only at its next periodic look at the paths."""
    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.05)).start()
    try:
        word = NamespaceWord.attach(namespace)
        assert word is not None
        with word, Publisher("c", dtype="f8", shape=4, namespace=namespace) as pub:
            pub.publish(np.ones(4))
            gen = word.generation
            fd = os.open(shm_path(namespace, "c"), os.O_RDWR)
            try:
                os.pwrite(fd, (2**64 - 1).to_bytes(8, "little"), 8 * W_LATEST)
            finally:
                os.close(fd)
            wait_for(lambda: "c" not in b.catalog, 10, what="the reclaim")
            assert not os.path.exists(shm_path(namespace, "c"))
            wait_for(lambda: word.generation > gen, 5, what="the generation to move")
    finally:
        b.close()


def test_a_stopping_broker_tells_its_readers_at_once(namespace: str) -> None:
    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=10)).start()
    word = NamespaceWord.attach(namespace)
    assert word is not None
    try:
        assert word.broker_up()
        b.close()
        assert not word.broker_up()  # no need to wait for three missed heartbeats
        assert word.pid == 0
    finally:
        word.close()
        b.close()


def test_a_killed_brokers_word_is_taken_over_by_the_next_and_fixed_by_doctor(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["broker", "-n", namespace, "--heartbeat", "0.05"]
    first = start(args, ready=BROKER_READY)
    second = None
    try:
        word = NamespaceWord.attach(namespace)
        assert word is not None
        with word:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            wait_for(lambda: not word.broker_up(), timeout=5, what="heartbeats to stop")
            assert os.path.exists(word.path)  # left behind by the kill
            assert main(["doctor", "-n", namespace]) == 0
            assert "@catalog is left from a broker" in capsys.readouterr().out
            second = start(args, ready=BROKER_READY)
            # Taken over, not made anew: readers already on it go on waiting on it.
            assert not word.replaced()
            wait_for(word.broker_up, timeout=5, what="the new broker's heartbeats")
            assert word.epoch == second.ready["epoch"] != first.ready.get("epoch", 0)
            second.send_signal(signal.SIGKILL)
            second.wait(10)
        assert main(["doctor", "-n", namespace, "--fix"]) in (0, 1)
        assert f"unlinked {_word_path(namespace)}" in capsys.readouterr().out
        assert not os.path.exists(_word_path(namespace))
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_foreign_or_planted_words_are_refused_and_replaced(
    namespace: str, tmp_path: object
) -> None:
    path = _word_path(namespace)
    os.symlink("/etc/passwd", path)
    try:
        with pytest.raises(NotASegmentError, match="symbolic link"):
            NamespaceWord.attach(namespace)
    finally:
        os.unlink(path)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)
    os.fchmod(fd, 0o666)
    os.ftruncate(fd, 4096)
    os.close(fd)
    try:
        with pytest.raises(AccessError, match="lets others write it"):
            NamespaceWord.attach(namespace)
        planted = os.stat(path).st_ino
        b = Broker(BrokerConfig(namespace=namespace)).start()
        try:  # the broker never serves a word others can write: it makes its own
            st = os.stat(path)
            assert st.st_ino != planted
            assert st.st_mode & 0o777 == 0o600
        finally:
            b.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_wait_segments_wakes_on_a_version_or_on_the_word(namespace: str) -> None:
    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=60)).start()
    try:
        with (
            Publisher("w", dtype="i8", shape=1, namespace=namespace) as pub,
            Segment.attach("w", namespace=namespace) as seg,
        ):
            word = NamespaceWord.attach(namespace)
            assert word is not None
            with word:
                seen = word.notify
                t0 = time.monotonic()
                assert not wait_segments([seg], [0], 0.05, word=word, seen=seen)
                assert time.monotonic() - t0 >= 0.04  # slept: nothing happened
                threading.Timer(0.05, pub.publish, (np.ones(1, "i8"),)).start()
                assert wait_for(
                    lambda: wait_segments([seg], [0], 2.0, word=word, seen=seen) and seg.version,
                    timeout=5,
                )
                # A catalog change wakes a reader whose segments are quiet.
                maker = threading.Timer(
                    0.05, Publisher("x", dtype="i8", shape=1, namespace=namespace).close
                )
                maker.start()
                assert wait_for(
                    lambda: (
                        wait_segments([seg], [1], 2.0, word=word, seen=seen) and word.notify != seen
                    ),
                    timeout=5,
                )
                # "x" was made at once; only its close is delayed. The broker must stop
                # after that close, or it keeps "x" for its live writer (a leak).
                maker.join(5)
    finally:
        b.close()


_CLOSE_WHILE_WAITING = """
import sys, threading, time
import numpy as np
from shmcast.broker import Broker, BrokerConfig, NamespaceWord, Segment, wait_segments
from shmcast.publisher import Publisher

ns = sys.argv[1]
b = Broker(BrokerConfig(namespace=ns, heartbeat_interval=0.02)).start()
pub = Publisher("w", dtype="i8", shape=1, namespace=ns)
seg = Segment.attach("w", namespace=ns)
word = NamespaceWord.attach(ns)
stop = threading.Event()
errors = []

def waiter():
    while not stop.is_set():
        try:
            wait_segments([seg], [seg.version], 0.05, word=word, seen=word.notify)
        except Exception as exc:  # closed under it: what a subscriber's helper sees
            errors.append(type(exc).__name__)
            time.sleep(0.001)

t = threading.Thread(target=waiter)
t.start()
time.sleep(0.2)
word.close()            # from this thread, while the other sleeps on the word
time.sleep(0.3)         # heartbeats keep bumping the word: the sleeper wakes and looks again
stop.set()
t.join(5)
seg.close(); pub.close(); b.close()
print("ok", sorted(set(errors)))
"""


def test_closing_the_word_under_a_sleeping_thread_is_safe(namespace: str, each_core: str) -> None:
    """A subscriber's helper thread (``aupdates``) sleeps on the word's address without
    the GIL while another thread closes the subscriber: the mapping must outlive the
    sleep (it segfaulted before the word was pinned for the wait)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _CLOSE_WHILE_WAITING, namespace],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.startswith("ok"), out.stdout
    assert "ClosedError" in out.stdout  # the waits after the close say so


OUT_OF_FDS_WORD = """
import errno, os, resource, sys
from shmcast.broker import NamespaceWord
from shmcast.broker.errors import OutOfDescriptorsError

resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.dup(0))  # every descriptor the limit allows, taken
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
try:
    NamespaceWord.attach(sys.argv[1])
except OutOfDescriptorsError as exc:
    print("RESULT", exc.errno, exc)
except OSError as exc:
    print("RESULT bare", type(exc).__name__, exc)
"""


def test_a_namespace_word_out_of_descriptors_names_the_limit(thread_broker: Broker) -> None:
    """A process with no descriptor left attaching the namespace word (a
    ``Subscriber`` of ``wait="shm"`` does): ``OutOfDescriptorsError``, an ``OSError``
    of errno ``EMFILE`` still (its callers that skip an untrusted word, catching
    ``OSError``, are as before), naming the limit and the fix. Before, the bare
    "[Errno 24] Too many open files"."""
    import errno
    import subprocess
    import sys

    argv = [sys.executable, "-c", OUT_OF_FDS_WORD, thread_broker.namespace]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    assert line.startswith(f"RESULT {errno.EMFILE} out of file descriptors opening the "), line
    assert "open-files limit is 64 (RLIMIT_NOFILE" in line
    assert "ulimit -n" in line
