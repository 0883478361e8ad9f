"""The service across real processes: broker, publishers, subscribers (issue 3)."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from shmcast.broker import (
    Broker,
    LayoutConflictError,
    Segment,
    WriterBusyError,
)
from shmcast.broker.client import ControlClient, pack, runtime_dir, unpack
from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    ShmcastProcess,
    start,
    wait_for,
)
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber


@pytest.fixture
def broker(namespace: str) -> Iterator[ShmcastProcess]:
    sp = start(
        ["broker", "-n", namespace, "--heartbeat", "0.1", "--metrics-port", "0"],
        ready=BROKER_READY,
    )
    try:
        yield sp
    finally:
        sp.stop()


def _collect(sub: Subscriber, until_version: int, segment: str, timeout: float = 10) -> list[int]:
    seen = []
    for up in sub.updates(timeout=timeout):
        if up.segment == segment:
            seen.append(up.version)
            if up.version >= until_version:
                break
    return seen


def _pump_until(sub: Subscriber, cond: object, timeout: float) -> None:
    """Let the subscriber process announcements until ``cond()`` holds."""

    def pumped() -> bool:
        for _ in sub.updates(timeout=0.05):
            pass
        return bool(cond())  # type: ignore[operator]

    wait_for(pumped, timeout=timeout, interval=0, what="subscriber state")


def test_end_to_end_publish_announce_read(namespace: str, broker: ShmcastProcess) -> None:
    with (
        Subscriber("frame", namespace=namespace) as sub,
        Publisher("frame", dtype=np.float64, shape=(64, 64), namespace=namespace) as pub,
    ):
        for i in range(1, 6):
            assert pub.publish(np.full((64, 64), i, np.float64)) == i
        versions = _collect(sub, 5, "frame")
        assert versions[-1] == 5
        assert sub.stats["frame"].updates + sub.stats["frame"].missed == 5
        with sub.read("frame") as snap:
            assert snap.version == 5
            assert snap.array.min() == snap.array.max() == 5.0
            assert not snap.array.flags.writeable


def test_publish_process_to_subscriber_with_content(namespace: str, broker: ShmcastProcess) -> None:
    with Subscriber("ticks", namespace=namespace) as sub:
        pub = start(
            [
                "publish",
                "ticks",
                "-n",
                namespace,
                "--source",
                "ticks",
                "--count",
                "50",
                "--rate",
                "500",
            ],
            ready=PUBLISH_READY,
        )
        try:
            versions = _collect(sub, 50, "ticks")
            assert pub.wait(10) == 0
        finally:
            pub.stop()
        assert versions[-1] == 50
        assert versions == sorted(set(versions))
        snap = sub.latest("ticks")
        assert snap.version == 50
        assert (snap.array["ask"] > snap.array["bid"]).all()
        assert snap.array["symbol"].tolist() == list(range(256))


def test_topics_are_exact_a_never_receives_ab(namespace: str, broker: ShmcastProcess) -> None:
    with (
        Publisher("a", dtype="i8", shape=1, namespace=namespace) as pa,
        Publisher("ab", dtype="i8", shape=1, namespace=namespace) as pab,
        Subscriber("a", namespace=namespace) as sub,
    ):
        for _ in range(20):
            pab.publish(np.zeros(1, "i8"))
        pa.publish(np.ones(1, "i8"))
        got = [u.segment for u in sub.updates(timeout=1.0)]
    assert got == ["a"]
    assert sub.bad_messages == 0


def test_late_joiner_gets_snapshot_then_newer_updates(
    namespace: str, broker: ShmcastProcess
) -> None:
    with Publisher("late", dtype="f4", shape=(8,), namespace=namespace) as pub:
        for i in range(10):
            pub.publish(np.full(8, i, "f4"))
        with Subscriber("late", namespace=namespace) as sub:
            # The snapshot already holds version 10: nothing older is replayed.
            assert sub.stats["late"].last_version == 10
            assert sub.latest("late").array[0] == 9
            pub.publish(np.full(8, 10, "f4"))
            versions = _collect(sub, 11, "late", timeout=5)
    assert versions == [11]


def test_subscriber_before_segment_exists(namespace: str, broker: ShmcastProcess) -> None:
    with (
        Subscriber("later", namespace=namespace) as sub,
        Publisher("later", dtype="u1", shape=(4,), namespace=namespace) as pub,
    ):
        pub.publish(np.arange(4, dtype="u1"))
        assert _collect(sub, 1, "later", timeout=5) == [1]
        assert sub.latest("later").array.tolist() == [0, 1, 2, 3]


def test_conflicting_layout_is_an_error(namespace: str, broker: ShmcastProcess) -> None:
    with Publisher("c", dtype="f8", shape=(4,), namespace=namespace):
        with pytest.raises(LayoutConflictError, match="shape=\\[5\\]"):
            Publisher("c", dtype="f8", shape=(5,), namespace=namespace)
        with pytest.raises(LayoutConflictError):
            Publisher("c", dtype="f4", shape=(4,), namespace=namespace)


def test_second_writer_refused_and_dead_writers_lease_freed(
    namespace: str, broker: ShmcastProcess
) -> None:
    with Publisher("w", dtype="f8", shape=(4,), namespace=namespace) as first:
        first.publish(np.ones(4))
        with pytest.raises(WriterBusyError, match=str(os.getpid())):
            Publisher("w", dtype="f8", shape=(4,), namespace=namespace)
    writer = start(
        ["publish", "w", "-n", namespace, "--dtype", "f8", "--shape", "4", "--rate", "100"],
        ready=PUBLISH_READY,
    )
    try:
        with pytest.raises(WriterBusyError, match=str(writer.pid)):
            Publisher("w", dtype="f8", shape=(4,), namespace=namespace)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        with Publisher("w", dtype="f8", shape=(4,), namespace=namespace) as heir:
            before = heir.version
            assert heir.publish(np.zeros(4)) == before + 1
    finally:
        writer.stop()


def test_broker_sigterm_leaves_nothing_behind(namespace: str) -> None:
    sp = start(["broker", "-n", namespace], ready=BROKER_READY)
    try:
        with Publisher("x", dtype="f8", shape=(1024,), namespace=namespace) as pub:
            pub.publish(np.ones(1024))
            assert Segment.list(namespace) == ["x"]
        assert runtime_dir(namespace).is_dir()
    finally:
        assert sp.stop() == 0
    assert Segment.list(namespace) == []
    assert not runtime_dir(namespace).exists()


def test_broker_sigkill_restart_adopts_and_subscribers_resume(namespace: str) -> None:
    args = ["broker", "-n", namespace, "--heartbeat", "0.1"]
    first = start(args, ready=BROKER_READY)
    second = None
    try:
        with (
            Publisher("k", dtype="i8", shape=(16,), namespace=namespace) as pub,
            Subscriber("k", namespace=namespace, heartbeat_timeout=0.5) as sub,
        ):
            for i in range(1, 4):
                pub.publish(np.full(16, i, "i8"))
            assert _collect(sub, 3, "k")[-1] == 3
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            # The publisher keeps writing while the broker is dead; the subscriber
            # notices the silence and reads the mapped header instead.
            for i in range(4, 7):
                pub.publish(np.full(16, i, "i8"))
            assert _collect(sub, 6, "k")[-1] == 6
            _pump_until(sub, lambda: sub.broker_up is False, timeout=5)
            old_epoch = sub.epoch
            second = start(args, ready=BROKER_READY)
            assert second.ready["segments"] == ["k"]  # adopted, not recreated
            for i in range(7, 9):
                pub.publish(np.full(16, i, "i8"))
            assert _collect(sub, 8, "k")[-1] == 8
            _pump_until(sub, lambda: sub.epoch != old_epoch, timeout=5)
            assert sub.broker_up is True
            with sub.read("k") as snap:
                assert snap.version == 8
                assert (snap.array == 8).all()
            with ControlClient(second.ready["control"]) as c:
                assert c.request("describe", name="k")["version"] == 8
    finally:
        if second is not None:
            second.stop()
        first.stop()
    assert Segment.list(namespace) == []


def test_malformed_control_messages_get_errors_and_broker_keeps_serving(
    namespace: str, broker: ShmcastProcess
) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.ready["control"])
    try:
        bad = [
            b"\xc1garbage",
            pack({"no": "op"}),
            pack({"op": "frobnicate", "id": 1}),
            pack({"op": "create", "id": 2, "name": "../etc", "dtype": "f8", "shape": [1]}),
            pack({"op": "create", "id": 3, "name": "ok", "dtype": "nonsense", "shape": [1]}),
            pack({"op": "create", "id": 4, "name": "ok", "dtype": "f8", "shape": [-1]}),
            pack({"op": "create", "id": 5, "name": "ok", "dtype": "O", "shape": [1]}),
            pack({"op": "create", "id": 6, "name": "ok", "dtype": "f8", "shape": [10**15]}),
            pack({"op": "commit", "id": 7, "name": "ok", "version": "x", "ack": True}),
            msgpack_list(),
        ]
        for body in bad:
            sock.send(body)
            assert sock.poll(5000), f"no reply to {body!r}"
            reply = unpack(sock.recv())
            assert reply["ok"] is False, reply
            assert reply["message"]
        assert Segment.list(namespace) == []
        with ControlClient(broker.ready["control"]) as c:
            assert c.request("create", name="ok", dtype="f8", shape=[2])["shape"] == [2]
            stats = c.request("stats")
            assert sum(stats["errors"].values()) >= len(bad)
    finally:
        sock.close(0)


def msgpack_list() -> bytes:
    import msgpack

    return msgpack.packb([1, 2, 3])  # type: ignore[no-any-return]


def test_metrics_show_what_happened(namespace: str, broker: ShmcastProcess) -> None:
    from shmcast.subscriber import serve_metrics

    with (
        Publisher("m", dtype="f8", shape=(4,), namespace=namespace) as pub,
        Subscriber("m", namespace=namespace) as sub,
    ):
        server = serve_metrics(sub, 0, name="probe")
        url = server.url
        try:
            for _ in range(7):
                pub.publish(np.ones(4))
            assert _collect(sub, 7, "m")[-1] == 7
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            received = _sample(text, "shmcast_updates_received_total", segment="m")
            missed = _sample(text, "shmcast_versions_missed_total", segment="m")
            assert received + missed == 7
            assert _sample(text, "shmcast_broker_up") == 1.0
            assert 'le="1e-06"' in text
            assert 'le="0.1"' in text
        finally:
            server.close()

        def broker_published() -> float:
            page = urllib.request.urlopen(broker.ready["metrics"], timeout=5).read().decode()
            return _sample(page, "shmcast_versions_published_total", segment="m")

        wait_for(lambda: broker_published() == 7, timeout=5, what="broker counted 7 versions")
        page = urllib.request.urlopen(broker.ready["metrics"], timeout=5).read().decode()
        assert _sample(page, "shmcast_broker_segments") == 1
        assert _sample(page, "shmcast_shm_free_bytes") > 0


def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


@pytest.mark.parametrize("mode", ["futex", "spin"])
def test_direct_wait_modes_need_no_broker(namespace: str, mode: str) -> None:
    seg = Segment.create("d", "f8", (4,), namespace=namespace)
    try:
        with Subscriber("d", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
            seg.write(np.full(4, 1.0))
            seg.write(np.full(4, 2.0))
            ups = list(sub.updates(timeout=0.3))
            assert ups
            assert ups[-1].version == 2
            assert sum(u.missed for u in ups) + len(ups) == 2
    finally:
        seg.unlink()
        seg.close()


def test_publisher_without_announcements_is_announced_by_the_broker_tick(
    namespace: str, broker: ShmcastProcess
) -> None:
    with (
        Publisher("q", dtype="f8", shape=(2,), namespace=namespace, announce=False) as pub,
        Subscriber("q", namespace=namespace) as sub,
        ControlClient(broker.ready["control"]) as control,
    ):
        requests_before = control.request("stats")["requests"]
        for i in range(1, 6):
            pub.publish(np.full(2, i, "f8"))
        assert _collect(sub, 5, "q", timeout=5)[-1] == 5
        st = sub.stats["q"]
        assert st.updates + st.missed == 5
        # No commit message per version: what reached the broker meanwhile is our
        # stats request and the subscriber's once-a-second reports, fewer than the
        # five commits an announcing publisher would have sent.
        requests_after = control.request("stats")["requests"]
        assert requests_after - requests_before < 5


@pytest.mark.parametrize("bad", [float("nan"), -1, 0, float("inf"), "5", True, None])
def test_a_publishers_bad_timeout_is_refused_naming_the_argument(
    namespace: str, thread_broker: Broker, bad: object
) -> None:
    """-1 and 0 blamed the running broker ("no broker answered ... within -1s"); NaN,
    inf, a string and None failed deep inside with ValueError, OverflowError or
    TypeError naming neither the argument nor the fix."""
    with pytest.raises(ValueError, match=r"^timeout must be a finite number of seconds > 0"):
        Publisher("t", dtype="f8", shape=(2,), timeout=bad)  # type: ignore[arg-type]
    assert Segment.list(namespace) == []


def test_the_broker_announces_every_version_without_commit_messages(namespace: str) -> None:
    """The broker's commit watcher learns of each commit from the segment's notify
    word: no commit message, no heartbeat tick (30 s here) needed, and a burst that
    laps the 2-slot ring before the broker looks is still announced version by version."""
    from shmcast.broker import Broker, BrokerConfig

    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=30)).start()
    try:
        assert b.endpoints is not None
        with (
            Publisher("w", dtype="i8", shape=(2,), namespace=namespace) as pub,
            Subscriber("w", namespace=namespace, wait="events") as sub,
            ControlClient(b.endpoints.control) as control,
        ):
            requests = control.request("stats")["requests"]
            pub.publish(np.full(2, 1, "i8"))
            first = next(sub.updates(timeout=5))  # well before any tick
            assert first.version == 1
            for i in range(2, 21):  # a burst: the ring holds 2 of them
                pub.publish(np.full(2, i, "i8"))
            got = [first.version] + [u.version for u in sub.updates(timeout=1)]
            assert got == list(range(1, 21))  # every one announced, none missed
            st = sub.stats["w"]
            assert st.missed == 0
            assert st.updates == 20  # delivered as news (not read)
            # No request per version reached the broker (ours, and the subscriber's
            # once-a-second report, at most).
            assert control.request("stats")["requests"] - requests <= 3
            assert control.request("describe", name="w")["published"] == 20
    finally:
        b.close()


def test_a_segment_made_beside_a_running_broker_is_adopted_once_named(
    thread_broker: Broker,
) -> None:
    """``Segment.create`` while a broker runs makes an object the broker did not
    know: no Publisher could take its name (SegmentExistsError), ``shmcast rm`` said
    there was no such segment, and only a broker restart helped. The first request
    naming it adopts it now, its versions going on."""
    ns = thread_broker.namespace
    with Segment.create("beside", "i8", (2,), namespace=ns) as w:
        w.write(np.array([1, 2]))
    with Publisher("beside", dtype="i8", shape=(2,), namespace=ns) as pub:
        assert pub.publish(np.array([3, 4])) == 2
    with Segment.create("gone", "i8", (2,), namespace=ns):
        pass
    with ControlClient(f"ipc://{runtime_dir(ns)}/control.sock") as c:
        assert [e["name"] for e in c.request("list")["segments"]] == ["beside"]
        c.request("delete", name="gone")
        assert c.request("describe", name="beside")["version"] == 2
    assert Segment.list(ns) == ["beside"]


def test_a_segment_made_beside_a_broker_is_no_mirror_to_claim(thread_broker: Broker) -> None:
    """A mirror's create (with a ``source``) of a name held by a segment made beside
    the broker was let through before the broker knew the segment: it was relabelled
    a mirror, and a relay's or bridge's next run deleted it as its own leftover."""
    ns = thread_broker.namespace
    with Segment.create("z", "i8", (2,), namespace=ns) as w:
        w.write(np.array([1, 2]))
        with ControlClient(f"ipc://{runtime_dir(ns)}/control.sock") as c:
            with pytest.raises(LayoutConflictError, match="local segment"):
                c.request(
                    "create", name="z", dtype="<i8", shape=[2], slots=2,
                    source="zenoh:shmcast/evil/z",
                )  # fmt: skip
            assert c.request("describe", name="z")["source"] == "local"
    Segment.remove("z", namespace=ns)
