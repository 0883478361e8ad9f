"""Restarts (issue 11, class 4): a clean stop of the broker, as a service manager
does it (SIGTERM, then a new broker), never strands a running publisher or
subscriber. Segments with a live writer stay for the next broker; orphans go;
``--unlink-on-exit`` unlinks everything, as asked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import numpy as np
import pytest

from shmcast.broker import Broker, BrokerConfig, Segment
from shmcast.broker.client import ControlClient, shm_path
from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    SUBSCRIBE_READY,
    ShmcastProcess,
    running,
    start,
    wait_for,
)
from shmcast.publisher import Publisher
from tests._procs import done as _done
from tests._procs import procs as _procs

RATE = 200


def _received(sub: ShmcastProcess) -> list[int]:
    """Versions a ``shmcast subscribe --json`` process printed so far."""
    out = []
    for line in list(sub.stdout):
        if line.startswith("{"):
            out.append(int(json.loads(line)["version"]))
    return out


def test_publisher_and_subscriber_run_across_a_broker_restart(namespace: str) -> None:
    publish = ["publish", "s", "--source", "random", "--dtype", "f4", "--shape", "64"]
    with _procs() as procs:
        broker = start(["broker", "--heartbeat", "0.1"], ready=BROKER_READY)
        procs.append(broker)
        pub = start([*publish, "--rate", str(RATE)], ready=PUBLISH_READY)
        procs.append(pub)
        sub = start(["subscribe", "s", "--json"], ready=SUBSCRIBE_READY)
        procs.append(sub)
        wait_for(lambda: len(_received(sub)) >= 20, 10, what="the first updates")
        path = shm_path(namespace, "s")
        inode = os.stat(path).st_ino

        assert broker.stop(timeout=10, sig=signal.SIGTERM) == 0
        # The publisher still writes where readers are: the object stays, versions go on.
        with Segment.attach("s") as seg:
            v_stop = seg.version
            wait_for(lambda: seg.version >= v_stop + RATE // 4, 10, what="publishing on")
        assert os.stat(path).st_ino == inode

        broker2 = start(["broker", "--heartbeat", "0.1"], ready=BROKER_READY)
        procs.append(broker2)
        assert broker2.ready["segments"] == ["s"], "the next broker did not adopt it"
        with Segment.attach("s") as seg:
            v_restart = seg.version
        wait_for(
            lambda: max(_received(sub), default=0) >= v_restart + RATE // 2,
            10,
            what="the subscriber to receive after the restart",
        )
        pub.send_signal(signal.SIGTERM)
        final = int(str(_done(pub, "shmcast publish done: ")["last_version"]))
        wait_for(lambda: max(_received(sub)) == final, 10, what="the final version")
        with ControlClient(broker2.ready["control"]) as ctl:
            wait_for(
                lambda: ctl.request("describe", name="s")["version"] == final,
                5,
                what="the restarted broker to announce the final version",
            )
        # Every version the publisher wrote went into the object readers attach.
        with Segment.attach("s") as seg:
            assert seg.version == final
            assert os.stat(path).st_ino == inode
        sub.send_signal(signal.SIGTERM)
        summary = _done(sub, "shmcast subscribe done: ")["s"]
        versions = _received(sub)
        assert versions == sorted(set(versions)), "versions went backwards or repeated"
        print(
            "FIGURES broker_sigterm_restart "
            + json.dumps(
                {
                    "version_at_stop": v_stop,
                    "version_at_restart": v_restart,
                    "final_version": final,
                    "subscriber": summary,
                }
            )
        )
    # The second broker stopped last, with no publisher left: the orphan is unlinked.
    assert not os.path.exists(path)


def test_a_clean_stop_unlinks_orphans_and_keeps_live_segments(namespace: str) -> None:
    b = Broker(BrokerConfig(namespace=namespace)).start()
    live = Publisher("live", dtype="f8", shape=(2,))
    try:
        with Publisher("done", dtype="f8", shape=(2,)) as pub:
            pub.publish(np.ones(2))
        live.publish(np.ones(2))
        b.close()
        assert Segment.list(namespace) == ["live"]
        assert os.path.exists(shm_path(namespace, "@catalog"))  # kept beside it
        assert live.publish(np.ones(2)) == 2
        with Broker(BrokerConfig(namespace=namespace)).start() as b2:
            assert b2.catalog.names() == ["live"]
            assert b2.catalog.entry("live").seg.version == 2
    finally:
        live.close()
        b.close()
        Segment.remove("live", namespace=namespace)
        _remove_word(namespace)


def test_a_clean_stop_reclaims_a_segment_whose_header_went_bad(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment whose header was zeroed behind the broker is reclaimed at a clean
    stop, and the namespace word goes with the last segment. Before, both stayed in
    /dev/shm (the stop waited 1 s on the header, then logged "at shutdown")."""
    b = Broker(BrokerConfig(namespace=namespace)).start()
    try:
        for name in ("bad", "done"):
            with Publisher(name, dtype="u1", shape=(8,)) as pub:
                pub.publish(np.ones(8, np.uint8))
        with open(shm_path(namespace, "bad"), "r+b") as f:
            f.write(bytes(8))  # magic 0
    finally:
        b.close()
    assert Segment.list(namespace) == []
    assert not os.path.exists(shm_path(namespace, "@catalog"))
    assert "reclaiming segment bad: its header went bad (header never completed" in caplog.text


def test_a_clean_stop_leaves_a_bad_object_that_took_an_owned_segments_name(
    namespace: str,
) -> None:
    """What has a segment's name after someone unlinked it behind the broker is not the
    broker's: a bad header there is left, not reclaimed."""
    b = Broker(BrokerConfig(namespace=namespace)).start()
    path = shm_path(namespace, "s")
    try:
        with Publisher("s", dtype="u1", shape=(8,)) as pub:
            pub.publish(np.ones(8, np.uint8))
        os.unlink(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.ftruncate(fd, 4096)  # a header still being written, by somebody else
        finally:
            os.close(fd)
        b.close()
        assert Segment.list(namespace) == ["s"]
    finally:
        b.close()
        _remove_all(namespace)


def _remove_all(namespace: str) -> None:
    """The segments a test left for the next broker, and the word beside them."""
    for name in Segment.list(namespace):
        Segment.remove(name, namespace=namespace)
    _remove_word(namespace)


def _remove_word(namespace: str) -> None:
    """A clean stop that kept a live segment keeps the namespace word beside it (the
    next broker takes it over); the test removed the segment, so the word too."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_path(namespace, "@catalog"))


@pytest.mark.parametrize("how", ["config", "flag"])
def test_unlink_on_exit_unlinks_everything(namespace: str, how: str) -> None:
    if how == "config":
        b = Broker(BrokerConfig(namespace=namespace, unlink_on_exit=True)).start()
        try:
            with Publisher("live", dtype="f8", shape=(2,)) as pub:
                pub.publish(np.ones(2))
                b.close()
                assert Segment.list(namespace) == []
        finally:
            b.close()
        return
    with _procs() as procs:
        broker = start(["broker", "--unlink-on-exit"], ready=BROKER_READY)
        procs.append(broker)
        with Publisher("live", dtype="f8", shape=(2,)) as pub:
            pub.publish(np.ones(2))
            assert broker.stop(timeout=10, sig=signal.SIGTERM) == 0
            assert Segment.list(namespace) == []


def test_a_restarted_broker_lets_only_a_mirrors_live_writer_claim_it(namespace: str) -> None:
    """A restarted broker does not know who fed the segments it adopts: the live
    writer of one may say it is a mirror (a relay re-registering), nobody else."""
    from shmcast.broker import LayoutConflictError
    from shmcast.broker.client import resolve_endpoint

    b = Broker(BrokerConfig(namespace=namespace)).start()
    mirror = Publisher("m", dtype="u1", shape=(2,), source="relay:tcp://h:1")
    try:
        mirror.publish(np.ones(2, np.uint8))
        b.close()
        with Broker(BrokerConfig(namespace=namespace)).start():
            with ControlClient(resolve_endpoint(None, namespace)) as c:
                layout = {"dtype": "|u1", "shape": [2], "slots": 2}
                assert c.request("describe", name="m")["source"] == "local"
                with pytest.raises(LayoutConflictError):
                    c.request("create", name="m", source="zenoh:shmcast/x/m", pid=1, **layout)
                c.request("create", name="m", source="relay:tcp://h:1", pid=os.getpid(), **layout)
                assert c.request("describe", name="m")["source"] == "relay:tcp://h:1"
            mirror.close()
    finally:
        mirror.close()
        b.close()
        with contextlib.suppress(FileNotFoundError):
            Segment.remove("m", namespace=namespace)
        _remove_word(namespace)


@pytest.mark.parametrize("why", ["metrics_port", "declared"])
def test_a_broker_that_fails_to_start_unlinks_nothing_it_adopted(namespace: str, why: str) -> None:
    """A crashed broker's segments (no writer, versions in them) outlive a broker
    that adopts them and then cannot start: the next one adopts them intact."""
    import socket

    from shmcast.broker import EndpointError, LayoutError, SegmentSpec

    for name in ("prices", "book"):
        with Segment.create(name, "f8", (4,), namespace=namespace) as seg:
            seg.write(np.full(4, 7.0))
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if why == "metrics_port":
            cfg = BrokerConfig(namespace=namespace, metrics_port=busy.getsockname()[1])
            error: type[Exception] = EndpointError
        else:
            cfg = BrokerConfig(namespace=namespace, segments=(SegmentSpec("prices", "f8", (8,)),))
            error = LayoutError
        with pytest.raises(error) as exc:
            Broker(cfg).start()
        if why == "declared":
            assert "shmcast rm" not in str(exc.value)
            assert f"`rm {shm_path(namespace, 'prices')}`" in str(exc.value)
        assert Segment.list(namespace) == ["book", "prices"]
        with Broker(BrokerConfig(namespace=namespace)).start() as b:
            assert b.catalog.names() == ["book", "prices"]
            assert b.catalog.entry("prices").seg.latest().array.tolist() == [7.0] * 4
        assert Segment.list(namespace) == []  # orphans of a broker that served go
    finally:
        busy.close()
        _remove_all(namespace)


def test_a_lock_taken_on_a_stopping_brokers_unlinked_file_is_taken_again(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopping broker unlinks ``broker.lock`` before closing it. A broker that
    opened the file just before locked a file nobody could find, and the next one
    made a new file and locked it too: two brokers served one namespace. Emulated:
    the file is unlinked between the starting broker's open and its flock."""
    import fcntl

    from shmcast.broker import BrokerRunningError
    from shmcast.broker.client import runtime_dir

    lock = runtime_dir(namespace, create=True) / "broker.lock"
    flock = fcntl.flock
    unlinked: list[int] = []

    def flock_after_a_stop(fd: int, op: int) -> None:
        if not unlinked and os.fstat(fd).st_ino == os.stat(lock).st_ino:
            unlinked.append(fd)
            os.unlink(lock)  # the stopping broker's unlink, after our open
        flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_stop)
    with Broker(BrokerConfig(namespace=namespace)).start():
        monkeypatch.undo()
        assert unlinked
        with pytest.raises(BrokerRunningError):
            Broker(BrokerConfig(namespace=namespace)).start()


def test_a_broker_out_of_descriptors_at_adoption_says_so_and_cleans_up(namespace: str) -> None:
    """More segments than the open-files limit: a clear error, exit 1, every segment
    left, the runtime dir emptied. Before: an OSError traceback, and the clean-up
    stopped at the first failing step (sockets and lock left, the word not stopped)."""
    import resource
    import subprocess
    import sys

    from shmcast.broker import NamespaceWord
    from shmcast.broker.client import runtime_dir

    names = [f"s{i:02d}" for i in range(70)]
    for name in names:
        Segment.create(name, "f8", (2,), namespace=namespace).close()

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    try:
        out = subprocess.run(
            [sys.executable, "-m", "shmcast.cli", "broker", "-n", namespace],
            preexec_fn=low_limit,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr
        assert "ran out of file descriptors" in out.stderr
        assert "ulimit -n" in out.stderr
        assert Segment.list(namespace) == names
        assert not runtime_dir(namespace).exists()
        word = NamespaceWord.attach(namespace)
        assert word is not None
        with word:
            assert word.heartbeat_age() is None  # marked stopped
    finally:
        _remove_all(namespace)


def test_a_failing_step_of_the_shutdown_leaves_the_others_done(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError for one segment (EMFILE at a stop) is logged; the other segments,
    the word, the sockets and the lock are still seen to."""
    from shmcast.broker.client import runtime_dir

    b = Broker(BrokerConfig(namespace=namespace)).start()
    try:
        for name in ("a", "b"):
            Publisher(name, dtype="f8", shape=(2,), namespace=namespace).close()
        alive = Segment.writer_alive

        def emfile(seg: Segment) -> bool:
            if seg.name == "a":
                raise OSError(24, "Too many open files")
            return alive(seg)

        monkeypatch.setattr(Segment, "writer_alive", emfile)
        b.close()
        monkeypatch.undo()
        assert Segment.list(namespace) == ["a"]  # "b", an orphan, unlinked all the same
        assert not runtime_dir(namespace).exists()
    finally:
        b.close()
        _remove_all(namespace)


def test_a_local_writer_ends_what_a_restarted_broker_may_let_a_mirror_claim(
    namespace: str,
) -> None:
    """An adopted segment may be claimed by a mirror once, while its feeder is not
    known: a local publisher that leases it since makes it known. Before, any
    relay or bridge could take it over whenever its local writer was not running."""
    from shmcast.broker import LayoutConflictError
    from shmcast.broker.client import resolve_endpoint

    b = Broker(BrokerConfig(namespace=namespace)).start()
    live = Publisher("data", dtype="u1", shape=(2,))
    try:
        live.publish(np.ones(2, np.uint8))
        b.close()  # live: kept for the next broker, which adopts it
        with Broker(BrokerConfig(namespace=namespace)).start():
            live.close()
            with Publisher("data", dtype="u1", shape=(2,)) as pub:  # a local writer again
                pub.publish(np.full(2, 2, np.uint8))
            with ControlClient(resolve_endpoint(None, namespace)) as c:
                with pytest.raises(LayoutConflictError):
                    c.request(
                        "create", name="data", dtype="|u1", shape=[2], slots=2,
                        source="zenoh:shmcast/evil/data",
                    )  # fmt: skip
                assert c.request("describe", name="data")["source"] == "local"
    finally:
        live.close()
        b.close()
        _remove_all(namespace)


@pytest.mark.parametrize("mode", ["shm", "events"])
def test_a_broker_restarted_with_a_longer_heartbeat_is_not_taken_for_down(
    namespace: str, mode: str
) -> None:
    """A subscriber took its heartbeat timeout from the first broker's interval (0.04 s:
    0.32 s) for good; the broker restarted with 0.6 s was "silent" about half the
    time: ``broker_up`` false, a warning per heartbeat, ``shmcast_broker_up`` 0."""
    import time

    from shmcast.subscriber import Subscriber

    broker = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.04)).start()
    try:
        with Subscriber("a", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
            broker.close()
            broker = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.6)).start()
            deadline = time.monotonic() + 10
            while not (sub.epoch_changes and sub.broker_up):  # the new broker heard
                assert time.monotonic() < deadline, "the restarted broker never seen up"
                list(sub.updates(timeout=0.02))
            seen = []
            until = time.monotonic() + 0.9  # a heartbeat interval and a half
            while time.monotonic() < until:
                list(sub.updates(timeout=0.02))
                seen.append(sub.broker_up)
            assert all(seen), f"taken for down in {seen.count(False)} of {len(seen)} looks"
    finally:
        broker.close()


def test_a_subscriber_that_cannot_read_a_new_brokers_word_says_so_once(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of descriptors attaching a restarted broker's namespace word (an
    ``OSError``): a ``shm`` subscriber kept the old word in silence (the new broker
    "silent", its catalog changes unseen). It says so once, naming the limit and
    the fix, and follows the new broker once it can read its word."""
    import errno
    import threading
    import time

    from shmcast.broker import OutOfDescriptorsError
    from shmcast.broker._nsword import NamespaceWord
    from shmcast.subscriber import Subscriber

    attach = NamespaceWord.attach
    failing = [False]

    def out_of_descriptors(cls: type[NamespaceWord], ns: str | None) -> NamespaceWord | None:
        if failing[0] and threading.current_thread() is threading.main_thread():
            raise OutOfDescriptorsError.from_os(errno.EMFILE, "the namespace word", "@catalog")
        return attach(ns)

    broker = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.04)).start()
    try:
        with (
            Subscriber("a", namespace=namespace, wait="shm") as sub,
            pytest.MonkeyPatch.context() as mp,
            caplog.at_level("WARNING", logger="shmcast.subscriber._subscriber"),
        ):
            mp.setattr(NamespaceWord, "attach", classmethod(out_of_descriptors))
            failing[0] = True
            broker.close()
            broker = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.04)).start()

            def told() -> list[str]:
                list(sub.updates(timeout=0.02))
                return [r.getMessage() for r in caplog.records if "new broker" in r.getMessage()]

            wait_for(told, 10, what="the subscriber saying it cannot follow")
            for _ in range(10):
                said = told()
            assert len(said) == 1, said
            assert "open-files limit" in said[0]
            failing[0] = False
            deadline = time.monotonic() + 10
            while not (sub.epoch_changes and sub.broker_up):
                assert time.monotonic() < deadline, "the restarted broker never followed"
                list(sub.updates(timeout=0.02))
    finally:
        broker.close()


def test_unlink_on_exit_warns_of_the_live_writer_it_cuts_off(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker stopped with unlink_on_exit unlinks a segment whose publisher still
    writes: it says so at WARNING, naming the writer, as `shmcast rm --force` does.
    Before, one INFO line ("unlinked segment live"), unseen at the default level,
    while the publisher went on writing versions no reader would find."""
    b = Broker(BrokerConfig(namespace=namespace, unlink_on_exit=True)).start()
    try:
        with (
            Publisher("live", dtype="f8", shape=(2,)) as pub,
            Publisher("idle", dtype="f8", shape=(2,)),
        ):
            pub.publish(np.ones(2))
            with caplog.at_level("WARNING", logger="shmcast.broker._broker"):
                b.close()
            assert Segment.list(namespace) == []
    finally:
        b.close()
    cut = [r.getMessage() for r in caplog.records if "live writer" in r.getMessage()]
    assert len(cut) == 2, cut
    assert cut[0].startswith("unlinked segment ")
    assert f"had a live writer (pid {os.getpid()})" in cut[0]
    assert "no reader finds" in cut[0]


def test_a_broker_whose_runtime_dir_was_removed_keeps_a_second_one_out(namespace: str) -> None:
    """A /tmp cleaner removes a live broker's runtime directory (its sockets and its
    lock): the broker runs on, unreachable. A second broker started then is refused,
    naming the first one's pid, from the namespace word it keeps beating in
    /dev/shm. Before, the second one started beside it and adopted its segments; the
    first one's stop then unlinked what the second one served."""
    import shutil

    from shmcast.broker import BrokerRunningError
    from shmcast.broker.client import runtime_dir

    with running(["broker", "-n", namespace], ready=BROKER_READY) as first:
        shutil.rmtree(runtime_dir(namespace))
        second = Broker(BrokerConfig(namespace=namespace))
        with pytest.raises(BrokerRunningError) as err:
            second.start(timeout=10)
        assert second.closed
        assert f"a broker (pid {first.pid}) already serves namespace" in str(err.value)
        assert "namespace word" in str(err.value)
        assert f"`kill {first.pid}`" in str(err.value)
        assert not runtime_dir(namespace).exists()  # the refused start left nothing


def test_a_word_whose_pid_is_another_live_process_stamping_nothing_lets_a_broker_start(
    namespace: str,
) -> None:
    """The namespace word of a broker killed a moment ago names a pid that is alive
    here but no broker (in a container sharing /dev/shm, its pid namespace's pid 1,
    the init): the next broker was refused until the beats went stale. It now waits
    one and a half heartbeat intervals for a beat, and starts when none comes."""
    import mmap
    import subprocess
    import sys
    import time

    from shmcast.broker._names import catalog_path
    from shmcast.broker._nsword import W_HEARTBEAT, W_PID, NamespaceWord

    NamespaceWord.serve(namespace, epoch=1, interval=0.5).close()  # a broker's word
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(catalog_path(namespace), "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
            words = memoryview(mm).cast("Q")
            words[W_PID] = other.pid  # as a killed broker left it, a beat ago
            words[W_HEARTBEAT] = time.monotonic_ns()
            words.release()
        b = Broker(BrokerConfig(namespace=namespace)).start(timeout=10)
        b.close()
    finally:
        other.kill()
        other.wait(10)


def test_a_child_forked_beside_a_running_broker_keeps_no_copy_of_its_lock(
    thread_broker: Broker, namespace: str
) -> None:
    """A process that runs a broker (``Broker(...).start()``) and forks a worker:
    the worker inherited ``broker.lock``'s descriptor, whose description holds the
    flock, so once the broker's process died (SIGKILL) every new broker of the
    namespace was refused ("a broker (pid <the dead one>) already serves") for as
    long as the worker lived. A forked child now closes its copy."""
    from shmcast.broker._names import runtime_dir

    lock = str(runtime_dir(namespace) / "broker.lock")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            kept = []
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/self/fd/{fd}") == lock:
                        kept.append(fd)
            os.write(w, (",".join(kept) or "none").encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            said = f.read().decode()
    finally:
        os.waitpid(pid, 0)
    assert said == "none", f"the child kept broker.lock (descriptors {said})"


def test_a_word_beaten_under_our_own_pid_keeps_a_second_broker_out(namespace: str) -> None:
    """Two containers sharing /dev/shm, their runtime directories apart, each broker
    its pid namespace's pid 1: the second one finds the first one's word beating
    under its own pid. Before, that pid counted as its own (nothing to refuse) and it
    started beside the first. Now it waits for a beat, as for any live pid, and is
    refused when one comes. Here: a word under this process's pid, beaten by a thread."""
    import mmap
    import threading
    import time

    from shmcast.broker import BrokerRunningError
    from shmcast.broker._names import catalog_path
    from shmcast.broker._nsword import W_HEARTBEAT, W_PID, NamespaceWord

    NamespaceWord.serve(namespace, epoch=1, interval=0.05).close()  # the other's word
    stop = threading.Event()

    def beat() -> None:  # the other container's broker, pid 1 there as here
        with open(catalog_path(namespace), "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
            words = memoryview(mm).cast("Q")
            words[W_PID] = os.getpid()
            while not stop.is_set():
                words[W_HEARTBEAT] = time.monotonic_ns()
                stop.wait(0.02)
            words.release()

    beater = threading.Thread(target=beat)
    beater.start()
    second = Broker(BrokerConfig(namespace=namespace))
    try:
        with pytest.raises(BrokerRunningError, match="of another pid namespace"):
            second.start(timeout=10)
        assert second.closed
    finally:
        second.close()  # one that started beside it (before) stops
        stop.set()
        beater.join(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(catalog_path(namespace))


def test_a_broker_stopping_out_of_descriptors_still_unlinks_its_namespace_word(
    namespace: str,
) -> None:
    """A broker at its open-files limit (``ulimit -n`` 17 to 19 in a reproducer: one
    that failed to start at its look at /dev/shm, or ran and was stopped) left its
    namespace word in /dev/shm: deciding whether the word was alone lists /dev/shm,
    which takes a descriptor, and none was free (logged, "closing the namespace word
    failed"). The word's own descriptor is let go first, and that list is made."""
    import resource

    word = shm_path(namespace, "@catalog")
    broker = Broker(BrokerConfig(namespace=namespace)).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        assert os.path.exists(word)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        with contextlib.suppress(OSError):
            while len(fillers) < 64:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        broker.close()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        broker.close()
    left = os.path.exists(word)
    if left:
        os.unlink(word)  # the broker's (this test's) own word
    assert not left


def test_a_broker_out_of_descriptors_for_a_zeromq_socket_names_the_limit(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shmcast broker`` at an open-files limit of 9, 10 or 13 (a reproducer) met it
    making a ZeroMQ socket (the control or events one): a bare ``zmq.error.ZMQError:
    Too many open files`` traceback, naming no limit and no fix. It is the
    ``OutOfDescriptorsError`` the other descriptors give, and nothing is left."""
    import errno

    import zmq

    from shmcast.broker import OutOfDescriptorsError

    real = zmq.Context.socket

    def socket(self: zmq.Context[Any], kind: int, *args: Any, **kw: Any) -> Any:
        if kind == zmq.XPUB:  # the events socket, after the control ones
            raise zmq.ZMQError(errno.EMFILE)
        return real(self, kind, *args, **kw)

    monkeypatch.setattr(zmq.Context, "socket", socket)
    with pytest.raises(OutOfDescriptorsError, match="open-files limit"):
        Broker(BrokerConfig(namespace=namespace)).start()
    assert not os.path.exists(shm_path(namespace, "@catalog"))


def test_a_broker_out_of_descriptors_for_its_commit_watcher_does_not_start(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit watcher made its socket in its own thread: at an open-files limit
    of 19 (in a reproducer) that thread died of a ``ZMQError`` and the broker served
    on, announcing versions only at its ticks (median 268 ms late at 200 versions/s,
    max 505 ms, against about 5 ms), with nothing said but a thread's traceback. Its
    socket is made before the thread starts: the broker does not start, with the
    error naming the watcher and the limit, and closes the sockets it made."""
    import errno

    import zmq

    from shmcast.broker import OutOfDescriptorsError

    real = zmq.Context.socket
    pairs: list[zmq.Socket[Any]] = []

    def socket(self: zmq.Context[Any], kind: int, *args: Any, **kw: Any) -> Any:
        if kind == zmq.PAIR and len(pairs) == 1:  # the watcher's end, after the broker's
            raise zmq.ZMQError(errno.EMFILE)
        sock = real(self, kind, *args, **kw)
        if kind == zmq.PAIR:
            pairs.append(sock)
        return sock

    monkeypatch.setattr(zmq.Context, "socket", socket)
    broker = Broker(BrokerConfig(namespace=namespace))
    try:
        with pytest.raises(OutOfDescriptorsError, match=r"commit watcher.*open-files limit"):
            broker.start(timeout=10)
    finally:
        broker.close()  # one that started without its watcher (before) stops
    assert [s.closed for s in pairs] == [True]
    assert not os.path.exists(shm_path(namespace, "@catalog"))


def test_a_word_that_cannot_be_read_for_descriptors_keeps_a_broker_from_starting(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors attaching the namespace word (an ``OSError``, no
    ``ShmcastError``: nothing wrong with the word) was taken for "no word we trust":
    a second broker started beside a live one whose runtime directory is apart
    (another container sharing /dev/shm). The check not made, it refuses to start,
    with the error naming the limit and the fix, and leaves nothing behind."""
    import errno

    from shmcast.broker import OutOfDescriptorsError
    from shmcast.broker._names import catalog_path
    from shmcast.broker._nsword import NamespaceWord
    from shmcast.broker.client import runtime_dir

    word = NamespaceWord.serve(namespace, epoch=1, interval=0.5)  # the other's, beating

    def out_of_descriptors(cls: type[NamespaceWord], ns: str | None) -> NamespaceWord | None:
        raise OutOfDescriptorsError.from_os(errno.EMFILE, "the namespace word", word.path)

    monkeypatch.setattr(NamespaceWord, "attach", classmethod(out_of_descriptors))
    second = Broker(BrokerConfig(namespace=namespace))
    try:
        with pytest.raises(OutOfDescriptorsError, match="open-files limit"):
            second.start(timeout=10)
        assert second.closed
        assert not runtime_dir(namespace).exists()  # the refused start left nothing
    finally:
        second.close()  # one that started beside it (before) stops
        word.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(catalog_path(namespace))


def test_a_broker_stopping_cleanly_while_a_start_waits_for_its_beat_lets_it_start(
    namespace: str,
) -> None:
    """A starting broker waits for a beat of the namespace word's live pid; that
    broker stops cleanly meanwhile (pid and heartbeat 0, its stop's last act on the
    word). Before, that change counted as a beat and the start was refused, naming
    a broker that no longer ran."""
    import mmap
    import subprocess
    import sys
    import threading
    import time

    from shmcast.broker._names import catalog_path
    from shmcast.broker._nsword import W_HEARTBEAT, W_PID, NamespaceWord

    NamespaceWord.serve(namespace, epoch=1, interval=0.5).close()  # a broker's word
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def stop_cleanly() -> None:  # as NamespaceWord.stopped() does, while the start waits
        time.sleep(0.3)
        with open(catalog_path(namespace), "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
            words = memoryview(mm).cast("Q")
            words[W_PID] = 0
            words[W_HEARTBEAT] = 0
            words.release()

    stopper = threading.Thread(target=stop_cleanly)
    try:
        with open(catalog_path(namespace), "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
            words = memoryview(mm).cast("Q")
            words[W_PID] = other.pid  # a live broker's, a beat ago
            words[W_HEARTBEAT] = time.monotonic_ns()
            words.release()
        stopper.start()
        Broker(BrokerConfig(namespace=namespace)).start(timeout=10).close()
    finally:
        if stopper.ident is not None:  # started
            stopper.join(10)
        other.kill()
        other.wait(10)
