"""A segment deleted and created again under its name (issue 11, class 3): its
versions start over at 1, and every reader must notice the new incarnation,
re-attach, and deliver or count its versions; a relay's mirror must follow."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np
import pytest

from shmcast.broker import Broker, Segment, SegmentNotFoundError
from shmcast.broker.client import ControlClient
from shmcast.cli._cmd_relay import READY as RELAY_READY
from shmcast.cli.testing import BROKER_READY, running, unique_namespace, wait_for
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber, Update

MODES = ["shm", "events", "futex", "spin"]


def _take(sub: Subscriber, name: str, until: object, timeout: float = 10) -> list[Update]:
    """Updates (each read exactly when still there) until ``until(stats)`` holds."""
    got: list[Update] = []

    def pumped() -> bool:
        for up in sub.updates(timeout=0.05):
            got.append(up)
        return bool(until(sub.stats[name]))  # type: ignore[operator]

    wait_for(pumped, timeout=timeout, interval=0, what=f"{name}: {sub.stats[name]}")
    return got


@pytest.mark.parametrize("mode", MODES)
def test_every_reader_follows_a_recreated_segment(
    namespace: str, thread_broker: Broker, mode: str
) -> None:
    assert thread_broker.endpoints is not None
    first = Publisher("r", dtype="i8", shape=4, namespace=namespace)
    with first, Subscriber("r", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
        old = first.segment.incarnation
        for i in (1, 2, 3):
            first.publish(np.full(4, i, "i8"))
        _take(sub, "r", lambda st: st.last_version == 3)
        first.close()
        with ControlClient(thread_broker.endpoints.control) as c:
            c.request("delete", name="r")
        with Publisher("r", dtype="i8", shape=4, namespace=namespace) as second:
            new = second.segment.incarnation
            assert new != old
            got: list[Update] = []
            for i in (1, 2, 3, 4, 5):  # versions start over: 1..5 again
                second.publish(np.full(4, 100 + i, "i8"))
                got += _take(
                    sub, "r", lambda st, v=i: st.incarnation == new and st.last_version == v
                )
            st = sub.stats["r"]
            assert st.incarnations == 2
            # Not left on the unlinked object: the handle is the new incarnation's.
            assert sub.segment("r").incarnation == new
            fresh = [u for u in got if u.incarnation == new]
            assert [u.version for u in fresh] == sorted({u.version for u in fresh})
            assert fresh
            assert fresh[-1].version == 5
            with sub.read(fresh[-1]) as snap:
                assert (snap.array == 105).all()
            # Three versions of the first incarnation and five of the second.
            assert st.updates + st.missed + st.overrun + st.torn == 3 + 5


@pytest.mark.parametrize("mode", MODES)
def test_counts_add_up_across_a_new_incarnation_made_while_the_reader_was_lapped(
    namespace: str, thread_broker: Broker, mode: str
) -> None:
    """The reader looks at nothing while 10 versions go into a ring of 2, the segment
    is deleted and made again, and 7 more are published: each of the 17 versions
    ends in one of the four counters, the old incarnation's from its handle (still
    mapped), the new one's from 0."""
    assert thread_broker.endpoints is not None
    first = Publisher("r", dtype="i8", shape=4, namespace=namespace)
    with first, Subscriber("r", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
        for i in range(1, 11):
            first.publish(np.full(4, i, "i8"))
        first.close()
        with ControlClient(thread_broker.endpoints.control) as c:
            c.request("delete", name="r")
        with Publisher("r", dtype="i8", shape=4, namespace=namespace) as second:
            new = second.segment.incarnation
            for i in range(1, 8):
                second.publish(np.full(4, 100 + i, "i8"))
            got = _take(sub, "r", lambda st: st.incarnation == new and st.last_version == 7)
            st = sub.stats["r"]
            assert st.incarnations == 2
            assert [u.version for u in got if u.incarnation == new] == [6, 7]
            assert st.accounted == 10 + 7, st
            with ControlClient(thread_broker.endpoints.control) as c:
                second.close()
                c.request("delete", name="r")


@pytest.mark.parametrize("mode", ["futex", "spin"])
def test_brokerless_readers_follow_a_recreated_segment(namespace: str, mode: str) -> None:
    w = Segment.create("d", "i8", (2,), namespace=namespace)
    try:
        with Subscriber("d", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
            w.write(np.full(2, 1, "i8"))
            _take(sub, "d", lambda st: st.last_version == 1)
            w.unlink()
            w.close()
            w = Segment.create("d", "i8", (2,), namespace=namespace)
            w.write(np.full(2, 7, "i8"))
            got = _take(sub, "d", lambda st: st.incarnations == 2 and st.last_version == 1)
            assert got[-1].incarnation == w.incarnation
            with sub.read(got[-1]) as snap:
                assert (snap.array == 7).all()
    finally:
        w.unlink()
        w.close()


def test_a_relay_mirror_follows_a_recreated_upstream_segment() -> None:
    """The new upstream incarnation starts above the mirror's version: comparing
    version numbers (or creation times) cannot tell; incarnation ids can."""
    up_ns, down_ns = unique_namespace(), unique_namespace()
    with (
        running(
            ["broker", "--data", "tcp://127.0.0.1:0", "--heartbeat", "0.1"],
            ready=BROKER_READY,
            env={"SHMCAST_NAMESPACE": up_ns},
        ) as upstream,
        running(
            ["broker", "--heartbeat", "0.1"], ready=BROKER_READY, env={"SHMCAST_NAMESPACE": down_ns}
        ) as local,
    ):
        with Publisher("m", dtype=np.int64, shape=(8,), namespace=up_ns) as pub:
            pub.publish(np.full(8, 1, np.int64))
            pub.publish(np.full(8, 2, np.int64))
        with (
            running(
                ["relay", "--upstream", upstream.ready["data"]],
                ready=RELAY_READY,
                env={"SHMCAST_NAMESPACE": down_ns},
            ),
        ):

            def mirror_at(version: int) -> int:
                try:
                    with Segment.attach("m", namespace=down_ns) as seg:
                        return seg.incarnation if seg.version == version else 0
                except Exception:
                    return 0

            before = wait_for(lambda: mirror_at(2), 10, what="the mirror at version 2")
            with Subscriber("m", namespace=down_ns, broker=local.ready["control"]) as sub:
                with ControlClient(upstream.ready["control"]) as c:
                    c.request("delete", name="m")
                with Publisher("m", dtype=np.int64, shape=(8,), namespace=up_ns) as again:
                    again.publish(np.full(8, 10, np.int64), version=10)
                    after = wait_for(lambda: mirror_at(10), 10, what="the mirror at version 10")
                    assert after != before  # a new local incarnation, not version 10 of the old
                    got = _take(
                        sub, "m", lambda st: st.incarnation == after and st.last_version == 10
                    )
                    with sub.read(got[-1]) as snap:
                        assert (snap.array == 10).all()
                    assert sub.stats["m"].incarnations == 2


def test_a_segment_made_again_is_announced_only_its_own_versions(
    namespace: str, thread_broker: Broker
) -> None:
    """The broker's commit count of the deleted incarnation (5 commits) made it take
    the new one's first commit, at version 10 (a relay or replay skips numbers), for
    ten: it announced versions 1-9 that never existed."""
    import zmq

    from shmcast.broker.client import unpack

    assert thread_broker.endpoints is not None
    with Publisher("x", dtype="f8", shape=(2,), namespace=namespace) as pub:
        for _ in range(5):
            pub.publish(np.zeros(2))
    # The heartbeat tick has recorded the segment's commit count.
    wait_for(lambda: "x" in thread_broker._commits, 5, what="a tick")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(thread_broker.endpoints.events)
    sub.subscribe(b"x\0")
    try:
        # The broker holds the topic (ZeroMQ's slow joiner): a deleted event sent
        # before was lost, and the segment was gone, so no delete made another.
        events = thread_broker._events
        assert events is not None
        wait_for(lambda: events.subscribed(b"x\0"), 5, what="the SUB's subscription")
        with ControlClient(thread_broker.endpoints.control, timeout=5) as c:
            # Deleted until the SUB hears it: subscribed before the new commits.
            def deleted() -> bool:
                with contextlib.suppress(SegmentNotFoundError):
                    c.request("delete", name="x")
                while sub.poll(50):
                    if unpack(sub.recv_multipart()[-1], 4096)["kind"] == "deleted":
                        return True
                return False

            wait_for(deleted, 5, interval=0, what="the deleted event")
            with Publisher("x", dtype="f8", shape=(2,), namespace=namespace) as again:
                again.publish(np.ones(2), version=10)
            versions: list[int] = []
            while 10 not in versions and sub.poll(5000):
                body = unpack(sub.recv_multipart()[-1], 4096)
                if body["kind"] == "version":
                    versions.append(body["version"])
            assert versions == [10]
    finally:
        sub.close(0)


class _Made:
    """Segments of a namespace made and deleted behind a subscriber's back (no broker)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.segments: list[Segment] = []

    def make(self, name: str, value: int) -> None:
        seg = Segment.create(name, "i8", (2,), namespace=self.namespace)
        self.segments.append(seg)
        seg.write(np.full(2, value, "i8"))

    def drop(self) -> None:
        for seg in self.segments:
            with contextlib.suppress(FileNotFoundError):
                seg.unlink()
            seg.close()
        self.segments.clear()


@pytest.fixture
def made(namespace: str) -> Iterator[_Made]:
    objects = _Made(namespace)
    try:
        yield objects
    finally:
        objects.drop()


def test_reads_of_the_latest_never_come_from_a_deleted_object(namespace: str, made: _Made) -> None:
    """A dashboard reads ``sub.latest(name)`` or ``sub.read(name)`` without iterating
    the updates. Before, after its segment was deleted and created again it read the
    deleted object's last version for ever (so did a name it does not follow, even
    while the updates were iterated), and after a deletion too."""
    make, drop = made.make, made.drop
    try:
        make("d", 1)
        make("x", 2)
        with Subscriber("d", namespace=namespace, wait="futex") as sub:
            assert sub.latest("d").array.tolist() == [1, 1]
            assert sub.latest("x").array.tolist() == [2, 2]
            drop()
            make("d", 7)
            make("x", 8)
            assert sub.latest("d").array.tolist() == [7, 7]
            with sub.read("d") as snap:
                assert snap.array.tolist() == [7, 7]
            assert sub.latest("x").array.tolist() == [8, 8]
            drop()
            with pytest.raises(SegmentNotFoundError):
                sub.latest("d")
            with pytest.raises(SegmentNotFoundError), sub.read("x"):
                pass
    finally:
        drop()


def test_a_read_of_the_latest_outlives_the_handle_being_replaced(
    namespace: str, made: _Made
) -> None:
    """Reads of the latest replace the handle of a deleted object, and closed the old
    one at once: a read of it still running (a ``with sub.read(name)`` block, or
    another thread's read) failed with ``ClosedError: segment is closed``, and two
    threads replacing it at once raised ``KeyError``. The old handle is now closed
    only at the next replacement."""
    make, drop = made.make, made.drop
    try:
        make("d", 1)
        make("x", 2)
        with Subscriber("d", namespace=namespace, wait="futex") as sub:
            for value, name in enumerate(["x", "d", "x", "d"], start=3):
                with sub.read(name) as snap:  # a followed name, and one not followed
                    seen = snap.array.tolist()
                    drop()
                    make("d", value)
                    make("x", value)
                    assert sub.latest(name).array.tolist() == [value, value]
                assert seen == [value - 1, value - 1]  # the object read before
    finally:
        drop()


def test_a_handle_replaced_for_reads_of_the_latest_is_let_go(
    namespace: str, made: _Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replaced handle maps a deleted object, whose shared memory stays taken while
    it is mapped: it is closed once its grace (for reads of it still running) is over,
    at the next look, not kept until the name is replaced again."""
    import shmcast.subscriber._subscriber as subscriber_module

    monkeypatch.setattr(subscriber_module, "REPLACED_GRACE", 0.0, raising=False)
    made.make("d", 0)
    made.make("x", 1)
    with Subscriber("d", namespace=namespace, wait="futex") as sub:
        old = sub.segment("x")  # read for its latest only
        assert sub.latest("x").array.tolist() == [1, 1]
        made.segments[1].unlink()
        made.make("x", 2)
        assert sub.latest("x").array.tolist() == [2, 2]  # replaces old
        assert sub.latest("x").array.tolist() == [2, 2]  # a look: its grace is over
        assert old.closed


def test_the_first_commit_of_a_segment_made_again_is_announced_at_once(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit watcher slept on the deleted object; when it looked again, the new
    incarnation had as many commits (1) as the old one had had, so it took nothing
    for new and version 1 waited for the broker's next tick (a heartbeat interval,
    0.5 s by default; 60 s here) before events subscribers and relays heard of it."""
    import zmq

    import shmcast.broker._watch as watch
    from shmcast.broker import BrokerConfig
    from shmcast.broker.client import unpack

    monkeypatch.setattr(watch, "SLICE", 0.5)  # the watcher sleeps on the old one meanwhile
    broker = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=60)).start()
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        assert broker.endpoints is not None
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(broker.endpoints.events)
        sub.subscribe(b"r\0")

        def announced(version: int, within: float = 10) -> bool:
            deadline = time.monotonic() + within
            while (left := deadline - time.monotonic()) > 0 and sub.poll(int(left * 1000)):
                body = unpack(sub.recv_multipart()[-1], 4096)
                if body["kind"] == "version" and body["version"] == version:
                    return True
            return False

        with Publisher("r", dtype="i8", shape=2, namespace=namespace) as pub:
            # Published until the subscription has reached the broker.
            def heard() -> bool:
                pub.publish(np.zeros(2, "i8"))
                return announced(pub.version, within=1)

            wait_for(heard, 10, 0, "the first incarnation's announcement")
            before = pub.version
        with ControlClient(broker.endpoints.control) as c:
            c.request("delete", name="r")
        with Publisher("r", dtype="i8", shape=2, namespace=namespace) as again:
            for _ in range(before):  # as many commits as the old incarnation had
                again.publish(np.ones(2, "i8"))
            assert announced(before)
    finally:
        sub.close(0)
        broker.close()


def test_an_incarnation_made_and_deleted_between_two_looks_is_in_no_counter(
    namespace: str,
) -> None:
    """The counting contract's one exception, as documented in ``_stats.py``: an
    incarnation that came and went while the subscriber did not look (here: its
    consumer between two ``updates()`` loops) was never seen. Its versions are in
    no counter and it is not in ``incarnations``: nothing left says how many it had."""
    made: list[Segment] = []

    def make() -> Segment:
        made.append(Segment.create("g", "i8", (2,), slots=8, namespace=namespace))
        return made[-1]

    try:
        first = make()
        with Subscriber("g", namespace=namespace, wait="futex") as sub:
            for i in range(4):
                first.write(np.full(2, i, "i8"))
            _take(sub, "g", lambda st: st.last_version == 4)
            first.unlink()
            unseen = make()
            for i in range(5):
                unseen.write(np.full(2, i, "i8"))
            unseen.unlink()
            last = make()
            for i in range(3):
                last.write(np.full(2, i, "i8"))
            got = _take(sub, "g", lambda st: st.incarnations == 2 and st.last_version == 3)
            st = sub.stats["g"]
        assert {up.incarnation for up in got} == {last.incarnation}
        assert (st.updates, st.missed, st.overrun, st.torn) == (7, 0, 0, 0)
        assert st.accounted == 4 + 3  # of the 12 published: the unseen one's 5 in none
    finally:
        for seg in made:
            with contextlib.suppress(SegmentNotFoundError):
                seg.unlink()
            seg.close()
