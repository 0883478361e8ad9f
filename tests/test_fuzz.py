"""Bad input on every interface: the control endpoint (hypothesis), event messages
reaching a subscriber, corrupted segment headers, bad CLI arguments and config files."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from shmcast.broker import Broker, BrokerConfig, Segment, _broker, _datastream
from shmcast.broker._broker import MAX_REPORTS
from shmcast.broker._metrics import BrokerCollector
from shmcast.broker.client import (
    BROKER_TOPIC,
    MAX_REQUEST,
    SHM_DIR,
    ControlClient,
    object_name,
    pack,
    topic,
    unpack,
)
from shmcast.broker.errors import NotASegmentError
from shmcast.cli._main import main
from shmcast.cli.testing import wait_for
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber


@pytest.fixture
def broker(namespace: str) -> Iterator[Broker]:
    b = Broker(BrokerConfig(namespace=namespace, max_segment_bytes=2**20))
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    try:
        assert b.wait_ready(10)
        yield b
    finally:
        b.stop()
        t.join(30)
        assert not t.is_alive()


class _Raw:
    """A DEALER sending raw frames to the control endpoint and waiting for one reply."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, payload: bytes, timeout: float = 5.0) -> dict[str, Any] | None:
        self.sock.send(payload)
        if not self.sock.poll(int(timeout * 1000)):
            return None
        reply = msgpack.unpackb(self.sock.recv(), raw=False)
        assert isinstance(reply, dict)
        return reply

    def close(self) -> None:
        self.sock.close(0)


def _check_no_half_made(b: Broker) -> None:
    """Every object of the namespace in /dev/shm is a whole segment the broker serves."""
    on_disk = set(Segment.list(b.namespace))
    assert on_disk == set(b.catalog.names()), (on_disk, b.catalog.names())
    for name in on_disk:
        with Segment.attach(name, namespace=b.namespace):
            pass


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
dtypes = st.one_of(
    st.sampled_from(
        ["O", "object", "<f8", "f8", "u1", "V0", "S0", "U0", "q", "nope", "f8,O", "(3,)O",
         "<U1000000000000", "S9999999999999", "V1099511627776", "[('a', 'O')]",
         "[('a', '<f8', (1000000000000,))]", "[('a', '<f8')", "M8[ns]", "", "\x00", "f" * 3000]
    ),
    st.text(max_size=30),
)  # fmt: skip
shapes = st.one_of(
    st.lists(st.integers(min_value=-(10**13), max_value=10**13), max_size=20),
    st.sampled_from([[10**12], [-1], [0], [2**40, 2**40], [1] * 40, [2**63 - 1]]),
    values,
)
create_requests = st.fixed_dictionaries(
    {"op": st.just("create"), "name": st.sampled_from(["ok", "a" * 200, "../x", "", 3])},
    optional={"dtype": dtypes, "shape": shapes, "slots": st.one_of(st.integers(-5, 100), values)},
)
other_requests = st.fixed_dictionaries(
    {
        "op": st.one_of(
            # Every op but create (above) and report (one-way: no reply; tested below).
            st.sampled_from(sorted(set(_broker.Broker._OPS) - {"create", "report"})),
            st.text(max_size=10),
            values,
        )
    },
    optional={
        "id": values,
        "name": st.one_of(st.just("ok"), values),
        "version": values,
        "ts": values,
        "pid": values,
        "ack": st.booleans(),
        "names": values,
        "source": values,
    },
)


def _encode(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


payloads = st.one_of(
    st.binary(max_size=300),  # random bytes
    create_requests.map(_encode),
    other_requests.map(_encode),
    values.map(_encode),  # wrong types: lists, ints, strings as the whole request
    create_requests.map(_encode).flatmap(  # truncated msgpack
        lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n])
    ),
    st.just(msgpack.packb({"op": "hello", "pad": "x" * (MAX_REQUEST - 100)})),  # near the limit
)


def test_control_endpoint_fuzz(broker: Broker) -> None:
    """Every request gets an error reply (or a valid one); the broker never dies."""
    assert broker.endpoints is not None
    raw = _Raw(broker.endpoints.control)
    t0 = time.monotonic()
    try:

        @settings(
            max_examples=400,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            derandomize=True,
        )
        @given(payloads)
        def one(payload: bytes) -> None:
            reply = raw.ask(payload)
            assert reply is not None, f"no reply to {payload[:80]!r}"
            assert isinstance(reply.get("ok"), bool)
            if not reply["ok"]:
                assert isinstance(reply["error"], str)
                assert reply["error"] != "InternalError", reply
                assert isinstance(reply["message"], str)
                assert reply["message"]

        one()
        _check_no_half_made(broker)
        with ControlClient(broker.endpoints.control) as ctl:
            assert ctl.request("hello")["namespace"] == broker.namespace
    finally:
        raw.close()
    assert time.monotonic() - t0 < 30
    assert broker.stats().errors.get("InternalError", 0) == 0


@pytest.mark.parametrize(
    "request_",
    [
        # Each was taken: a bool is an int to Python. `version: true` was announced as
        # the bool true and kept as the segment's last announced version; a reporter
        # of pid true, -1 or 2**64-1 got a row in `subscribers` (and `shmcast top`).
        pytest.param({"op": "commit", "name": "s", "version": True, "ts": 1, "ack": True},
                     id="commit-version-true"),
        pytest.param({"op": "commit", "name": "s", "version": -1, "ts": 1, "ack": True},
                     id="commit-version-negative"),
        pytest.param({"op": "commit", "name": "s", "version": 1, "ts": True, "ack": True},
                     id="commit-ts-true"),
        pytest.param({"op": "lease", "name": "s", "pid": True}, id="lease-pid-true"),
        pytest.param({"op": "create", "name": "m", "dtype": "f8", "shape": [2],
                      "source": "relay:x", "pid": True}, id="mirror-pid-true"),
        pytest.param({"op": "report", "name": "r", "pid": True, "segments": {}},
                     id="report-pid-true"),
        pytest.param({"op": "report", "name": "r", "pid": -1, "segments": {}},
                     id="report-pid-negative"),
        pytest.param({"op": "report", "name": "r", "pid": 2**64 - 1, "segments": {}},
                     id="report-pid-huge"),
        pytest.param({"op": "report", "name": "r", "pid": 0, "segments": {}, "gone": True},
                     id="goodbye-pid-0"),
    ],
)  # fmt: skip
def test_a_bool_or_impossible_version_or_pid_is_refused_and_counted(
    broker: Broker, request_: dict[str, Any]
) -> None:
    """Refused with a BadRequest reply and counted, and nothing changes: no version
    announced, no segment made, no reporter kept; the broker serves on."""
    assert broker.endpoints is not None
    with ControlClient(broker.endpoints.control) as ctl:
        ctl.request("create", name="s", dtype="f8", shape=[2], slots=2)
        with Segment.attach("s", namespace=broker.namespace, writable=True) as seg:
            seg.write(np.ones(2))
            before = broker.stats().errors.get("BadRequest", 0)
            raw = _Raw(broker.endpoints.control)
            try:
                reply = raw.ask(_encode({"id": 7, **request_}))
            finally:
                raw.close()
            assert reply is not None
            assert (reply["ok"], reply["error"], reply["id"]) == (False, "BadRequest", 7), reply
            assert "integer" in reply["message"]
            assert broker.stats().errors.get("BadRequest", 0) == before + 1
            entry = broker.catalog.get("s")
            assert entry is not None
            assert type(entry.announced) is int
            assert ctl.request("subscribers", stale=True)["subscribers"] == []
            _check_no_half_made(broker)
            assert broker.catalog.names() == ["s"]
        ctl.request("delete", name="s")


def test_oversized_frames_are_dropped(broker: Broker) -> None:
    """Frames over MAXMSGSIZE (64 KiB) cost the sender its connection; others carry on."""
    assert broker.endpoints is not None
    for size in (MAX_REQUEST + 1, 10 * MAX_REQUEST):
        big = _Raw(broker.endpoints.control)
        try:
            assert big.ask(_encode({"op": "hello", "pad": "x" * size}), timeout=0.5) is None
        finally:
            big.close()
    with ControlClient(broker.endpoints.control) as ctl:
        assert ctl.request("hello")["ok"] is True


def test_a_request_of_too_many_frames_is_dropped_and_counted(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MAXMSGSIZE`` bounds each frame, not their number: a message of a million
    empty frames became a million Python objects, stalled the broker for seconds and
    was echoed back whole as the reply's envelope. Past MAX_REQUEST_FRAMES it is
    dropped and counted, its frames thrown away a budget at a time; the same
    connection is served next, and an envelope of a few frames still is."""
    monkeypatch.setattr(_broker, "DISCARD_BUDGET", 100, raising=False)  # 50 passes
    assert broker.endpoints is not None
    raw = _Raw(broker.endpoints.control)
    try:
        raw.sock.send_multipart([b""] * 5000 + [_encode({"op": "hello", "id": 1})])
        raw.sock.send_multipart([b"", _encode({"op": "hello", "id": 2})])  # REQ's envelope
        assert raw.sock.poll(5000)
        frames = raw.sock.recv_multipart()
        assert len(frames) == 2, len(frames)  # before: the 5000 frames came back
        assert frames[0] == b""
        assert unpack(frames[1])["id"] == 2
    finally:
        raw.close()
    assert broker.stats().errors.get("too_many_frames") == 1


def test_reports_keep_known_counters_only_and_a_bounded_number_of_reporters(
    broker: Broker,
) -> None:
    """``report`` is open to read-only clients: what the broker keeps of it is
    bounded (a 61 KB report of nested lists held 4 MiB; 1100 reporters were all kept)."""
    assert broker.endpoints is not None
    junk = [[[[]] * 8] * 8] * 8
    with ControlClient(broker.endpoints.control) as ctl:
        ctl.send("report", name="r", pid=1,
                 segments={"a": {"updates": 3, "p50": 1.5, "p99": None, "junk": junk,
                                 "missed": junk, "torn": True},
                           "b": junk})  # fmt: skip
        for pid in range(2, 1102):
            deadline = time.monotonic() + 10
            while not ctl.send("report", name="many", pid=pid, segments={}):
                assert time.monotonic() < deadline, "the broker took no more reports"
                time.sleep(0.01)  # one-way sends are dropped at the high-water mark
        subs = wait_for(
            lambda: (
                (r := ctl.request("subscribers")["subscribers"])
                and any(s["pid"] == 1101 for s in r)
                and r
            ),
            10,
            what="the reports",
        )
    assert len(subs) == MAX_REPORTS
    assert not any(s["pid"] == 1 for s in subs)  # the least recent went first
    with ControlClient(broker.endpoints.control) as ctl:
        ctl.send("report", name="r", pid=1, segments={"a": {"updates": 3, "junk": junk}})
        mine = wait_for(
            lambda: [s for s in ctl.request("subscribers")["subscribers"] if s["pid"] == 1],
            10,
            what="the report",
        )
    assert mine[0]["segments"] == {"a": {"updates": 3}}


def test_garbage_on_the_data_stream_is_counted_and_logged_sparingly(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who reaches the data endpoint may send anything: every bad message is
    counted (stats and metric), the log gets one line, not one per message."""
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=0.1)
    with Broker(cfg).start() as b, caplog.at_level(logging.WARNING, "shmcast.broker"):
        data = b.data_stats()
        assert data is not None
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(data.endpoint)
        try:
            for i in range(200):
                sock.send_multipart([b"hello", _encode({"patterns": 5, "n": i})])
            wait_for(lambda: (b.data_stats() or data).bad_messages == 200, 10, what="counts")
        finally:
            sock.close(0)
        registry = CollectorRegistry()
        registry.register(BrokerCollector(b.stats, b.data_stats))
        text = generate_latest(registry).decode()
    assert re.search(r"^shmcast_data_bad_messages_total\{[^}]*\} 200\.0$", text, re.M)
    lines = [r for r in caplog.records if "bad message from a relay" in r.getMessage()]
    assert len(lines) == 1


def _dealer(endpoint: str, **opts: int) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in opts.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


def test_a_flood_of_costly_relay_messages_does_not_starve_the_heartbeats(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream took up to 1000 relay messages in a row, whatever each cost: 400
    hellos of 7000 versions each (or acks of 20000 ids) held its heartbeats back for
    seconds, and every other relay called the upstream down. Between two heartbeats
    it now takes what fits in DRAIN_BUDGET, and an ack of more ids than a relay is
    ever sent is refused unread. (100 hellos here: each costs several heartbeat
    intervals' budget, and 400 took over 30 s on a loaded 2-core host.)"""
    handled = [0]
    FLOOD = 100
    queued = threading.Event()  # the flood waits in the socket, all of it
    on_message = _datastream.DataStream._on_message

    def counted(self: _datastream.DataStream, *args: Any) -> None:
        handled[0] += 1
        if handled[0] == 4:  # the first of the flood
            queued.wait(10)
        on_message(self, *args)

    monkeypatch.setattr(_datastream.DataStream, "_on_message", counted)
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=0.02)
    with Broker(cfg).start() as b:
        data = b.data_stats()
        assert data is not None
        honest = _dealer(data.endpoint)
        flood = _dealer(data.endpoint, SNDHWM=10_000)
        seen: list[int] = []  # relay messages handled when each heartbeat came
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                if honest.poll(50) and honest.recv_multipart()[0] == b"hb":
                    seen.append(handled[0])

        listener = threading.Thread(target=listen)
        try:
            honest.send_multipart([b"hello", pack({"patterns": ["nothing"]})])
            flood.send_multipart([b"hello", pack({"patterns": ["x"]})])
            flood.send_multipart([b"ack", pack({"mids": list(range(20_000))})])
            wait_for(lambda: handled[0] >= 3, 10, what="the ack")
            listener.start()
            hello = pack({"patterns": ["x"], "have": {f"n{i:05}": 1 for i in range(7000)}})
            for _ in range(FLOOD):
                flood.send_multipart([b"hello", hello])
            time.sleep(0.2)  # on its way (no timing asserted: only the order below)
            queued.set()
            wait_for(lambda: handled[0] >= 3 + FLOOD, 60, what="the flood")
            wait_for(lambda: seen and seen[-1] >= 3 + FLOOD, 10, what="a heartbeat after it")
            refused = (b.data_stats() or data).bad_messages
        finally:
            stop.set()
            if listener.is_alive():
                listener.join(10)
            honest.close(0)
            flood.close(0)
    # Heartbeats went out while the flood was being handled, not only after it.
    assert [n for n in seen if 4 <= n < 3 + FLOOD], seen
    assert refused == 1  # the ack of 20000 ids


def test_relays_that_read_nothing_hold_no_more_copies_than_the_budget(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a torn send a segment goes out from private copies for a second, and a
    relay that reads nothing holds its copy as long as it is connected: 20 such
    relays, joining while a slow one had the sends torn, held 20 copies of a 16 MiB
    segment (the broker grew by 290 MB; 64 relays of a 1 GiB segment: 64 GiB).
    Past COPY_BUDGET bytes of copies in flight, sends are zero-copy again."""
    monkeypatch.setattr(_datastream, "COPY_BUDGET", 16 * 2**20, raising=False)
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=0.5)
    socks: list[zmq.Socket[Any]] = []
    with Broker(cfg).start() as b, Publisher("big", dtype="u1", shape=(8 * 2**20,)) as pub:
        pub.publish(np.ones(8 * 2**20, np.uint8))
        stream, data = b._data, b.data_stats()
        assert stream is not None
        assert data is not None
        src = wait_for(lambda: stream._sources.get("big"), 10, what="the stream's handle")
        src.copy_until = float("inf")  # as after a torn send
        try:
            for _ in range(6):  # each is sent the version, and never reads it
                sock = _dealer(data.endpoint, RCVHWM=1, RCVBUF=4096)
                sock.send_multipart([b"hello", pack({"patterns": ["big"], "window": 1})])
                socks.append(sock)
            wait_for(lambda: (b.data_stats() or data).sent == 6, 10, what="6 sends")
            stats = b.data_stats()
        finally:
            for sock in socks:
                sock.close(0)
    assert stats is not None
    # 16 MiB of 8 MiB copies in flight, then zero-copy (one more if the kernel's
    # buffers took a whole copy, which libzmq then let go of)
    assert stats.copied <= 3, stats


def test_a_client_that_never_reads_cannot_inflate_the_dropped_versions(
    namespace: str, tmp_path: Path
) -> None:
    """``shmcast_data_dropped_total`` ("versions not sent") counted every message
    the stream could not queue: a client that sends pings and reads nothing (not
    even a relay: no hello, no segment) made it 2000 for 0 versions."""
    cfg = BrokerConfig(namespace=namespace, data=f"ipc://{tmp_path / 'data.sock'}")
    with Broker(cfg).start() as b:
        data = b.data_stats()
        assert data is not None
        sock = _dealer(data.endpoint, RCVHWM=1, RCVBUF=1024, SNDHWM=0)
        try:
            for _ in range(3000):  # each answered "who": its queue fills after ~650
                sock.send_multipart([b"ping", pack({})])
            time.sleep(0.5)  # the stream answers them (before the fix: 2040 dropped)
            stats = b.data_stats()
        finally:
            sock.close(0)
    assert stats is not None
    assert (stats.sent, stats.dropped) == (0, 0)


def test_a_relay_message_of_too_many_frames_is_one_bad_message(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay's message is three frames (id, kind, body); one of 5000 was taken
    whole (a hello with 4997 frames after its body was welcomed). It is now a bad
    message, its frames thrown away a budget at a time, and the next hello served."""
    monkeypatch.setattr(_datastream, "DISCARD_BUDGET", 100, raising=False)
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0")
    with Broker(cfg).start() as b:
        data = b.data_stats()
        assert data is not None
        sock = _dealer(data.endpoint)
        try:
            hello = pack({"patterns": ["x"]})
            sock.send_multipart([b"hello", hello, *([b""] * 4997)])
            sock.send_multipart([b"hello", pack({"patterns": ["y"]})])
            assert sock.poll(5000)
            assert sock.recv_multipart()[0] == b"welcome"
            assert not sock.poll(200)  # one welcome: the long one was not taken
            stats = b.data_stats()
        finally:
            sock.close(0)
    assert stats is not None
    assert stats.bad_messages == 1


def test_a_data_connection_queues_few_messages_in_the_broker(
    namespace: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each relay message may be two frames of max_message + HELLO_ALLOWANCE bytes,
    and the broker queued 1000 messages per connection (four connections sending
    costly hellos held 680 MiB). With the stream busy, a sender now waits after a
    few: the broker holds RELAY_RCVHWM of them, the sender's own queue the rest."""
    busy = threading.Event()
    release = threading.Event()
    on_message = _datastream.DataStream._on_message

    def stuck(self: _datastream.DataStream, *args: Any) -> None:
        busy.set()
        release.wait(10)
        on_message(self, *args)

    monkeypatch.setattr(_datastream.DataStream, "_on_message", stuck)
    cfg = BrokerConfig(namespace=namespace, data=f"ipc://{tmp_path / 'data.sock'}")
    with Broker(cfg).start() as b:
        data = b.data_stats()
        assert data is not None
        sock = _dealer(data.endpoint, SNDHWM=1, SNDBUF=4096)
        big = b"\x00" * (MAX_REQUEST + _datastream.HELLO_ALLOWANCE - 64)
        sent = 0
        try:
            sock.send_multipart([b"ping", pack({})])
            assert busy.wait(5)
            while sent < 2000 and sock.poll(500, zmq.POLLOUT):
                sock.send_multipart([big, big], copy=False)
                sent += 1
        finally:
            release.set()
            sock.close(0)
    assert sent < 200, sent  # before: over 1000 (each 270 KB)


def test_a_relays_patterns_are_bounded_and_not_kept_by_the_process(namespace: str) -> None:
    """Patterns went through fnmatch's process-wide cache (32768 compiled patterns,
    of any length): 1000 hellos of 64 new 1000-character patterns each left the
    broker 207 MB larger for good, and every tick matched every peer's patterns
    against every segment again (64 such relays: 90 % of a core, control replies
    50 times slower). A pattern over MAX_PATTERN_LENGTH is refused; the others are
    compiled once per relay and their results kept per name."""
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=0.02)
    cached = fnmatch._compile_pattern.cache_info().currsize  # type: ignore[attr-defined]
    with Broker(cfg).start() as b, Publisher("f", dtype="u1", shape=(8,)) as pub:
        pub.publish(np.zeros(8, np.uint8))
        data = b.data_stats()
        assert data is not None
        sock = _dealer(data.endpoint)
        replies: list[tuple[bytes, dict[str, Any]]] = []

        def answered(kind: bytes) -> bool:
            while sock.poll(0):
                frames = sock.recv_multipart()
                replies.append((frames[0], unpack(frames[1])))
            return any(k == kind for k, _ in replies)

        try:
            patterns = [f"{i:03}-{'?' * 100}*" for i in range(63)]  # new ones, never "f"
            sock.send_multipart([b"hello", pack({"patterns": [*patterns, "f"]})])
            wait_for(lambda: answered(b"data"), 10, what="the data")
            replies.clear()
            wait_for(lambda: answered(b"hb"), 10, what="a heartbeat")  # every pattern met
        finally:
            sock.close(0)
    assert fnmatch._compile_pattern.cache_info().currsize < cached + 63  # type: ignore[attr-defined]


def test_an_over_long_pattern_is_refused_with_its_length(namespace: str) -> None:
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=0.5)
    with Broker(cfg).start() as b:
        data = b.data_stats()
        assert data is not None
        sock = _dealer(data.endpoint)
        try:
            sock.send_multipart([b"hello", pack({"patterns": ["f", "a" * 257]})])
            assert sock.poll(10_000), "no reply"
            kind, body = sock.recv_multipart()
        finally:
            sock.close(0)
    assert kind == b"refused"
    assert "a pattern of 257 characters, over 256" in unpack(body)["reason"]


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("<f8", [10**12]), ("u1", [2**40, 2**40]), ("<U1000000", [10**7]), ("S1", [-1]),
     # nonsense numpy's own parsers fail on with IndexError (was an InternalError reply)
     ("()", [1]), ("('<f8',)", [1]), ("u1", [2.5])],
)  # fmt: skip
def test_huge_and_negative_layouts_refused_without_a_limit(
    namespace: str, dtype: str, shape: list[int]
) -> None:
    """Even with no max_segment_bytes, terabytes, negative sizes and nonsense are an
    error reply naming the layout."""
    b = Broker(BrokerConfig(namespace=namespace))
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    try:
        assert b.wait_ready(10)
        assert b.endpoints is not None
        raw = _Raw(b.endpoints.control)
        try:
            reply = raw.ask(
                _encode({"op": "create", "name": "huge", "dtype": dtype, "shape": shape})
            )
        finally:
            raw.close()
        assert reply is not None
        assert reply["ok"] is False
        assert reply["error"] in ("ShmSpaceError", "LayoutError"), reply
        assert Segment.list(namespace) == []
    finally:
        b.stop()
        t.join(30)


# ---------------------------------------------------------------------- events


garbage_frames = st.lists(st.binary(max_size=64), max_size=4) | st.tuples(
    st.sampled_from([BROKER_TOPIC, topic("e"), b"", b"e"]),
    st.one_of(
        st.binary(max_size=64),
        values.map(_encode),
        st.fixed_dictionaries(
            {"kind": values, "epoch": values, "tseq": values},
            optional={"segment": values, "version": values, "ts": values},
        ).map(_encode),
    ),
).map(list)


def test_subscriber_survives_garbage_events(broker: Broker) -> None:
    """Malformed events are counted in bad_messages, never raised, never an update."""
    assert broker.endpoints is not None
    with (
        Publisher("e", dtype="i4", shape=(4,)) as pub,
        Subscriber("e", timeout=5, wait="events") as sub,
    ):
        pub.publish(np.arange(4, dtype="i4"))
        before = sub.stats["e"].last_version

        @settings(max_examples=300, deadline=None, derandomize=True)
        @given(garbage_frames)
        def one(frames: list[bytes]) -> None:
            sub._on_event(frames)

        one()
        assert sub.bad_messages > 0
        # Garbage that parsed as a version event of "e" may not move versions backwards.
        assert sub.stats["e"].last_version >= before
        # Over a real socket too: a PUB the subscriber is also connected to.
        rogue: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUB)
        rogue.setsockopt(zmq.LINGER, 0)
        try:
            port = rogue.bind_to_random_port("tcp://127.0.0.1")
            assert sub._sub is not None
            sub._sub.connect(f"tcp://127.0.0.1:{port}")
            bad0 = sub.bad_messages
            deadline = time.monotonic() + 10
            while sub.bad_messages == bad0:
                assert time.monotonic() < deadline, "garbage never arrived"
                rogue.send_multipart([topic("e"), b"\xc1\xff garbage"])
                rogue.send_multipart([BROKER_TOPIC, b"\x93\x01\x02"])
                rogue.send_multipart([topic("e")])
                list(sub.updates(timeout=0.05))
        finally:
            rogue.close(0)
        # ... and the real announcements still arrive.
        v = pub.publish(np.arange(4, dtype="i4") + 1)
        got = [u.version for u in sub.updates(timeout=1.0)]
        assert v in got or sub.stats["e"].last_version == v


def test_forged_version_event_does_not_wedge(broker: Broker) -> None:
    """A version beyond the header is refused: it would hide every real version after it."""
    with (
        Publisher("e", dtype="i4", shape=(4,)) as pub,
        Subscriber("e", timeout=5, wait="events") as sub,
    ):
        pub.publish(np.zeros(4, dtype="i4"))
        body = {"kind": "version", "segment": "e", "version": 10**18, "ts": 1, "seq": 1}
        sub._on_event([topic("e"), pack({**body, "epoch": sub.epoch, "tseq": 1})])
        sub._on_event([topic("e"), pack({**body, "epoch": "x", "tseq": 1})])
        assert sub.bad_messages == 2
        v = pub.publish(np.ones(4, dtype="i4"))
        got = [u.version for u in sub.updates(timeout=0.5)]
        assert got[-1] == v == sub.stats["e"].last_version


# ---------------------------------------------------------------------- headers


def _corrupt(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("offset", "data", "reason"),
    [
        (0, b"NOTSHMC\0", "wrong magic"),
        (24, (1000).to_bytes(8, "little"), "slot count"),
        (40, (2**60).to_bytes(8, "little"), "sizes"),
        (112, (99).to_bytes(8, "little"), "ndim"),
        (104, (0).to_bytes(8, "little"), "dtype"),
        (256, b"{'garbage': ", "dtype"),
    ],
)
def test_corrupted_header_attach_fails_and_broker_reclaims(
    namespace: str, offset: int, data: bytes, reason: str
) -> None:
    seg = Segment.create("c", "<f8", (100,), namespace=namespace)
    seg.close()
    ok = Segment.create("fine", "<f8", (100,), namespace=namespace)
    ok.write(np.ones(100))
    ok.close()
    path = os.path.join(SHM_DIR, object_name(namespace, "c"))
    _corrupt(path, offset, data)
    with pytest.raises(NotASegmentError, match="not a usable shmcast segment"):
        Segment.attach("c", namespace=namespace, wait=0.1)
    b = Broker(BrokerConfig(namespace=namespace))
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    try:
        assert b.wait_ready(10)
        assert not os.path.exists(path)  # reclaimed
        assert b.catalog.names() == ["fine"]  # the valid one adopted, version kept
        assert b.catalog.entry("fine").seg.version == 1
    finally:
        b.stop()
        t.join(30)


def test_truncated_object_is_not_a_segment(namespace: str) -> None:
    path = os.path.join(SHM_DIR, object_name(namespace, "short"))
    with open(path, "wb") as f:
        f.write(b"SHMCAST\0" + b"\1" * 100)
    try:
        with pytest.raises(NotASegmentError, match="smaller than any header"):
            Segment.attach("short", namespace=namespace, wait=0.1)
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------- CLI and config


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["broker", "--mode", "999"], "mode"),
        (["broker", "--mode", "0777"], "mode"),
        (["broker", "--control", "http://x"], "control"),
        (["broker", "--group", "no-such-group-xyz"], "group"),
        (["broker", "--namespace", "bad.name"], "namespace"),
        (["publish", "bad/name", "--source", "ticks", "--count", "1"], "segment"),
        (["subscribe", "bad name"], "segment"),
    ],
)
def test_bad_cli_values_exit_2(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert field in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["broker", "--metrics-port", "abc"],
        ["broker", "--metrics-port", "70000"],  # every --metrics-port: 0-65535
        ["broker", "--no-such-flag"],
        ["publish", "x", "--shape", "-1"],
        ["publish", "x", "--rate", "fast"],
        # seconds: finite, >= 0 (> 0 where 0 means nothing); NaN waited for ever
        ["broker", "--heartbeat", "0"],
        ["subscribe", "x", "--timeout", "nan"],
        ["subscribe", "x", "--timeout", "-1"],
        ["top", "--interval", "inf"],
        ["record", "x", "-o", "x.h5", "--duration", "nan"],
        ["subscribe"],
        ["nonsense"],
    ],
)
def test_bad_cli_syntax_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("nosuchkey = 1\n", "nosuchkey"),
        ("mode = 'rw'\n", "mode"),
        ("heartbeat_interval = 'soon'\n", "heartbeat_interval"),
        ("metrics_port = -1\n", "metrics_port"),
        ("control = 5\n", "control"),
        ("curve_clients = 'abc'\n", "curve_clients"),
        ("this is = not toml [\n", "--config"),
        ("[[segments]]\nname = 'a'\ndtype = 'O'\nshape = [1]\n", "segments[0].dtype"),
        ("[[segments]]\nname = 'a'\ndtype = 'f8'\nshape = [-1]\n", "segments[0].dtype"),
        ("[[segments]]\nname = 'a'\ndtype = 'f8'\nshape = 'big'\n", "segments[0].shape"),
        ("[[segments]]\nname = 'a/b'\ndtype = 'f8'\nshape = [1]\n", "segments[0].name"),
        ("[[segments]]\nname = 'a'\ndtype = 'f8'\nshape = [1]\nslots = 1\n", "segments[0].slots"),
        ("[[segments]]\nname = 'a'\ndtype = 'f8'\nshape = [1]\ncolor = 1\n", "segments[0].color"),
        ("segments = 3\n", "segments"),
    ],
)
def test_bad_config_files_exit_2(
    tmp_path: Any, text: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    assert main(["broker", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert "error" in err


def test_missing_config_file_exit_2(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_costly_requests_pipelined_leave_heartbeats_their_turn(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client pipelines requests that each cost the broker a while (a
    ``subscribers`` of a full table of kept reports costs 0.1 s; 20 ms here): the
    serving loop takes them for at most half a heartbeat interval before it
    ticks. Before, it took up to 1000 in one pass: 40 such requests stopped the
    heartbeats for 2.8 s (1000, over a minute), and every subscriber took the
    broker for down."""
    ticks: list[int] = []
    tick, hello = Broker._tick, Broker._OPS["hello"]

    def counted_tick(self: Broker) -> None:
        ticks.append(self._requests)
        tick(self)

    def costly_hello(self: Broker, req: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.02)  # the cost of one request, not a wait for anything
        return hello(self, req)

    monkeypatch.setattr(Broker, "_tick", counted_tick)
    monkeypatch.setitem(Broker._OPS, "hello", costly_hello)
    cfg = BrokerConfig(namespace=namespace, heartbeat_interval=0.05)
    with Broker(cfg).start() as b:
        assert b.endpoints is not None
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(b.endpoints.control)
        try:
            for i in range(30):
                sock.send(pack({"id": i, "op": "hello"}))
            for _ in range(30):
                assert sock.poll(10_000), "a reply"
                sock.recv()
        finally:
            sock.close()
    # Ticks between the pipelined requests (the requests served so far), not only
    # before and after them.
    assert any(0 < n < 30 for n in ticks), ticks
