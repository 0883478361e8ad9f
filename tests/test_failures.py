"""Failures are not swallowed (issue 11, class 7).

- The broker's data stream survives running out of file descriptors, and any
  error in its thread: it says so (``hello``/``stats``, metrics, ``shmcast
  health``, the log) and recovers by itself.
- A relay keeps mirroring while its local broker is stalled (its requests there
  run off the data loop), and mirrors a segment refused meanwhile once the
  broker answers again.
- A header whose ``latest`` word is 2**64-1 is a corrupt segment: the broker
  reclaims it and the relay recreates its mirror; neither crashes.
- A segment unlinked behind the broker (``Segment.remove``, ``rm`` of its path)
  leaves the catalog, announced deleted; its name is free again.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from shmcast.broker import Broker, BrokerConfig, Segment, _datastream
from shmcast.broker._datastream import DataStream, DataStreamStats
from shmcast.broker._layout import W_LATEST
from shmcast.broker.client import ControlClient, pack, shm_path, unpack
from shmcast.cli._main import main
from shmcast.cli.testing import BROKER_READY, running, unique_namespace, wait_for
from shmcast.publisher import Publisher, Relay, RelayConfig


class _FakeRelay:
    """A relay's DEALER on a data stream: says hello, collects the data messages."""

    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.versions: dict[str, int] = {}
        self.latest: dict[str, int | None] | None = None  # of the last heartbeat
        self.welcomed = False
        self.hello()

    def hello(self) -> None:
        self.sock.send_multipart([b"hello", pack({"patterns": ["*"], "window": 8})])

    def poll(self) -> dict[str, int]:
        # As a relay does: pings, so that a stream that lost us asks for a hello.
        self.sock.send_multipart([b"ping", pack({})], zmq.NOBLOCK)
        while self.sock.poll(10):
            frames = self.sock.recv_multipart()
            if frames[0] == b"data":
                hdr = unpack(frames[1])
                self.versions[hdr["segment"]] = hdr["version"]
                self.sock.send_multipart([b"ack", pack({"mids": [hdr["mid"]]})])
            elif frames[0] == b"welcome":
                self.welcomed = True
            elif frames[0] == b"hb":
                self.latest = unpack(frames[1])["latest"]
            elif frames[0] == b"who":
                self.hello()
        return self.versions

    def close(self) -> None:
        self.sock.close(0)


def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    n = 0
    while n in used:
        n += 1
    return n


def test_data_stream_out_of_descriptors_is_visible_and_recovers(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A long heartbeat: the stream opens the segment when its first version is
    # announced, not at a tick, so the test knows when the descriptor is needed.
    args = ["broker", "--data", "tcp://127.0.0.1:0", "--heartbeat", "30"]
    with running(args, ready=BROKER_READY) as broker:
        pid = broker.pid
        relay = _FakeRelay(broker.ready["data"])
        try:
            with (
                ControlClient(broker.ready["control"], timeout=5) as ctl,
                Publisher("e", dtype="f8", shape=(4,)) as pub,
            ):
                assert ctl.request("hello")["data_stream"]["problem"] == ""
                wait_for(lambda: relay.poll() is not None and relay.welcomed, 10, what="welcome")
                soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(pid), hard))
                try:
                    pub.publish(np.ones(4))  # the stream must now open "e": EMFILE
                    data = wait_for(
                        lambda: (ctl.request("hello")["data_stream"] or {}).get("missing"),
                        10,
                        what="the data stream to report the segment it cannot open",
                    )
                    assert data == ["e"]
                    problem = ctl.request("hello")["data_stream"]["problem"]
                    assert "Too many open files" in problem
                    assert "e" in problem
                finally:
                    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
                # It retries by itself: the relay gets the version, health is ok again.
                wait_for(lambda: relay.poll().get("e") == 1, 10, what="the stream to recover")
                assert ctl.request("hello")["data_stream"]["problem"] == ""
                assert main(["health"]) == 0
                capsys.readouterr()
        finally:
            relay.close()
    assert any("data stream cannot open segment e" in line for line in broker.stderr)


@contextlib.contextmanager
def _relayed(namespace: str) -> Iterator[tuple[Broker, DataStreamStats, Publisher, _FakeRelay]]:
    """A broker with a data stream (heartbeats every 0.1 s), segment ``f`` at
    version 1, and a fake relay that has received it."""
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=0.1)
    with Broker(cfg).start() as b, Publisher("f", dtype="f8", shape=(2,)) as pub:
        stats = b.data_stats()
        assert stats is not None
        relay = _FakeRelay(stats.endpoint)
        try:
            pub.publish(np.ones(2))
            wait_for(lambda: relay.poll().get("f") == 1, 10, what="the first version")
            yield b, stats, pub, relay
        finally:
            relay.close()


def test_a_segment_the_data_stream_cannot_open_stays_in_its_heartbeats(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay deletes a mirror whose name a heartbeat leaves out: a segment the
    stream cannot open for now (EMFILE) is named, with no version, until it can."""
    failing = threading.Event()

    class _Segment:  # what the data stream's module sees as Segment
        @staticmethod
        def attach(name: str, **kw: Any) -> Segment:
            if failing.is_set() and name == "e":
                raise OSError(24, "Too many open files")
            return Segment.attach(name, **kw)

    monkeypatch.setattr(_datastream, "Segment", _Segment)
    with _relayed(namespace) as (b, stats, _, relay):
        failing.set()
        with Publisher("e", dtype="f8", shape=(2,)) as e:
            e.publish(np.ones(2))
            wait_for(lambda: (b.data_stats() or stats).missing == ("e",), 10, what="EMFILE")
            # (A heartbeat sent before the stream failed may still be on its way.)
            wait_for(
                lambda: relay.poll() is not None and "e" in (relay.latest or {}),
                10,
                what="a heartbeat naming the segment the stream cannot open",
            )
            assert relay.latest == {"f": 1, "e": None}
            failing.clear()
            wait_for(lambda: relay.poll().get("e") == 1, 10, what="the stream to recover")
            wait_for(
                lambda: relay.poll() is not None and (relay.latest or {}).get("e") == 1,
                10,
                what="a heartbeat with its version",
            )
            assert relay.latest == {"f": 1, "e": 1}


def test_a_hello_again_opens_no_new_window(namespace: str) -> None:
    """Each hello made the relay a fresh peer: empty window, message ids from 1
    again. A relay that never acks got one more message in flight per hello
    (each of up to a whole segment, copied when sends were torn)."""
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=1.0)
    with Broker(cfg).start() as b, Publisher("f", dtype="u1", shape=(64,)) as pub:
        stats = b.data_stats()
        assert stats is not None
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(stats.endpoint)
        mids: list[int] = []

        def drain(seconds: float) -> None:
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                if sock.poll(int(left * 1000) + 1):
                    frames = sock.recv_multipart()
                    if frames[0] == b"data":
                        mids.append(unpack(frames[1])["mid"])

        try:
            hello = [b"hello", pack({"patterns": ["*"], "window": 1})]
            sock.send_multipart(hello)
            pub.publish(np.zeros(64, np.uint8))
            wait_for(lambda: drain(0.05) or mids, 10, what="the first version")
            for v in range(2, 6):  # never an ack; a hello again before each version
                sock.send_multipart(hello)
                pub.publish(np.full(64, v, np.uint8))
                drain(0.25)
        finally:
            sock.close(0)
    assert mids == [1], mids  # window 1, never acked: one in flight, whatever the hellos


def test_a_failing_data_stream_thread_restarts_and_health_says_so(
    namespace: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = threading.Event()
    schedule = DataStream._schedule

    def faulty(self: DataStream, router: zmq.Socket[Any]) -> None:
        if failing.is_set():
            raise RuntimeError("injected fault")
        schedule(self, router)

    monkeypatch.setattr(DataStream, "_schedule", faulty)
    with _relayed(namespace) as (b, stats, pub, relay):
        failing.set()
        wait_for(lambda: not (b.data_stats() or stats).up, 10, what="the failure")
        assert main(["health"]) == 1
        err = capsys.readouterr().err
        assert "data stream" in err
        assert "injected fault" in err
        failing.clear()
        wait_for(lambda: (b.data_stats() or stats).up, 15, what="the restart")
        after = b.data_stats()
        assert after is not None
        assert after.restarts >= 1
        assert after.failures >= 1
        assert main(["health"]) == 0
        pub.publish(np.ones(2))
        wait_for(lambda: relay.poll().get("f") == 2, 10, what="data after the restart")


@pytest.fixture
def upstream() -> Iterator[Broker]:
    cfg = BrokerConfig(
        namespace=unique_namespace(), data="tcp://127.0.0.1:0", heartbeat_interval=0.1
    )
    with Broker(cfg).start() as b:
        yield b


def _data(b: Broker) -> str:
    stats = b.data_stats()
    assert stats is not None
    return stats.endpoint


def test_relay_keeps_mirroring_while_its_local_broker_stalls(upstream: Broker) -> None:
    down = unique_namespace()
    with running(["broker"], ready=BROKER_READY, env={"SHMCAST_NAMESPACE": down}) as local:
        a = Publisher("a", dtype="f8", shape=(4,), namespace=upstream.namespace)
        b_pub: Publisher | None = None
        relay = Relay(RelayConfig(upstream=_data(upstream), namespace=down)).start()
        try:
            a.publish(np.ones(4))
            wait_for(lambda: "a" in Segment.list(down), 10, what="the mirror of a")
            with Segment.attach("a", namespace=down) as mirror:
                # Mirrored, not merely created: until its first commit the relay may
                # still be waiting for the broker's lease reply, which the stall eats.
                wait_for(lambda: mirror.version >= 1, 10, what="the first version of a's mirror")
                local.send_signal(signal.SIGSTOP)
                try:
                    # A new segment upstream: its mirror needs the stalled local broker.
                    b_pub = Publisher("b", dtype="f4", shape=(2,), namespace=upstream.namespace)
                    b_pub.publish(np.ones(2, np.float32))
                    # Longer than a request's timeout (5 s): the mirror of b is refused.
                    gaps, last_v, last_t = [], mirror.version, time.monotonic()
                    deadline = last_t + 6.5
                    while time.monotonic() < deadline or "b" not in relay.stats().refused:
                        assert time.monotonic() < deadline + 5, "b was never refused"
                        a.publish(np.ones(4))
                        if mirror.wait(last_v, timeout=0.05) > last_v:
                            now = time.monotonic()
                            gaps.append(now - last_t)
                            last_v, last_t = mirror.version, now
                    gaps.append(time.monotonic() - last_t)
                finally:
                    local.send_signal(signal.SIGCONT)
                worst = max(gaps)
                print(f"FIGURES relay_local_stall: worst gap {worst:.2f} s, {len(gaps)} mirrored")
                assert worst < 1.5, f"the mirror of a stood still {worst:.1f} s"
            # The mirror of b, refused (no answer) while stalled, is made once it answers.
            wait_for(lambda: "b" in Segment.list(down), 30, what="the mirror of b after retry")
            with Segment.attach("b", namespace=down) as mb:
                wait_for(lambda: mb.version == 1, 10, what="version 1 of b")
            assert relay.stats().refused == {}
        finally:
            relay.close()
            a.close()
            if b_pub is not None:
                b_pub.close()
    for name in ("a", "b"):
        Segment.remove(name, namespace=upstream.namespace)


def _corrupt_latest(namespace: str, name: str) -> None:
    fd = os.open(shm_path(namespace, name), os.O_RDWR)
    try:
        os.pwrite(fd, (2**64 - 1).to_bytes(8, "little"), 8 * W_LATEST)
    finally:
        os.close(fd)


def test_a_reclaimed_segment_is_unlinked_before_it_leaves_the_catalog(upstream: Broker) -> None:
    """Whoever sees a reclaimed segment gone from the catalog finds its name free
    too. Before, the broker dropped the entry first and unlinked after: a reader of
    the catalog in between (test_a_corrupt_latest_word_is_reclaimed_not_fatal, once
    in CI) still found the object."""
    catalog = upstream.catalog
    pop = catalog.pop
    object_at_pop: list[bool] = []

    def watched_pop(name: str) -> object:
        object_at_pop.append(os.path.exists(shm_path(upstream.namespace, name)))
        return pop(name)

    with Publisher("r", dtype="f8", shape=(4,), namespace=upstream.namespace) as pub:
        pub.publish(np.ones(4))
        wait_for(lambda: "r" in catalog, 10, what="the segment in the catalog")
        catalog.pop = watched_pop  # type: ignore[method-assign]
        try:
            _corrupt_latest(upstream.namespace, "r")
            wait_for(lambda: "r" not in catalog, 10, what="the reclaim")
        finally:
            del catalog.pop  # the class's method again
    assert object_at_pop == [False]


def test_a_corrupt_latest_word_is_reclaimed_not_fatal(upstream: Broker) -> None:
    down = unique_namespace()
    with Broker(BrokerConfig(namespace=down, heartbeat_interval=0.05)).start() as local:
        relay = Relay(RelayConfig(upstream=_data(upstream), namespace=down)).start()
        pub = Publisher("c", dtype="f8", shape=(4,), namespace=upstream.namespace)
        try:
            for _ in range(3):
                pub.publish(np.ones(4))
            wait_for(lambda: "c" in local.catalog, 10, what="the mirror")
            wait_for(lambda: local.catalog.entry("c").seg.version == 3, 10, what="v3 mirrored")
            # The mirror's header goes bad: the local broker reclaims it, the relay
            # makes it again and goes on mirroring.
            _corrupt_latest(down, "c")
            pub.publish(np.full(4, 4.0))
            wait_for(
                lambda: "c" in local.catalog and local.catalog.entry("c").seg.version == 4,
                10,
                what="the mirror recreated at version 4",
            )
            with Segment.attach("c", namespace=down) as again:
                assert again.latest().array.tolist() == [4.0] * 4
            assert local.stats().published.get("c", 0) < 2**63
            # The upstream segment's header goes bad: reclaimed there, deleted here.
            pub.close()
            _corrupt_latest(upstream.namespace, "c")
            wait_for(lambda: "c" not in upstream.catalog, 10, what="the upstream reclaim")
            assert not os.path.exists(shm_path(upstream.namespace, "c"))
            wait_for(lambda: "c" not in local.catalog, 10, what="the mirror deleted")
            with ControlClient(upstream.endpoints.control if upstream.endpoints else "") as c:
                assert c.request("hello")["namespace"] == upstream.namespace
            assert upstream.stats().errors.get("NotASegmentError", 0) >= 1
        finally:
            relay.close()
            pub.close()


def test_a_segment_unlinked_behind_the_broker_leaves_the_catalog(
    namespace: str, thread_broker: Broker
) -> None:
    """Before, the catalog kept it for ever: ``list`` showed it, every Publisher of
    the name failed (SegmentNotFoundError), another layout got LayoutConflictError."""
    assert thread_broker.endpoints is not None
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(thread_broker.endpoints.events)
    sub.subscribe(b"g\0")
    try:
        with Publisher("g", dtype="f8", shape=(2,), namespace=namespace) as pub:
            pub.publish(np.ones(2))
        Segment.remove("g", namespace=namespace)
        wait_for(lambda: "g" not in thread_broker.catalog, 5, what="the entry dropped")
        kinds = []
        while "deleted" not in kinds and sub.poll(2000):
            kinds.append(unpack(sub.recv_multipart()[-1], 4096)["kind"])
        assert "deleted" in kinds
        with ControlClient(thread_broker.endpoints.control, timeout=5) as ctl:
            assert ctl.request("list")["segments"] == []
        with Publisher("g", dtype="f8", shape=(3,), namespace=namespace) as again:
            assert again.publish(np.zeros(3)) == 1
    finally:
        sub.close(0)


def test_the_brokers_log_escapes_names_from_dev_shm_and_relays(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's log (its terminal's stderr) wrote two names anyone may choose as
    they were: an object in sticky ``/dev/shm`` under the namespace's prefix whose
    name is no segment name ("ignoring ..." at start), and the segment patterns of
    a relay's hello (any client of the data stream): an escape sequence in either
    retitled or cleared the terminal, a newline forged a log line."""
    evil = "x\x1b]0;pwned\x07\x1b[2J\nFAKE"
    path = shm_path(namespace, evil)
    with open(path, "wb"):
        pass
    caplog.set_level("INFO")
    cfg = BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0", heartbeat_interval=0.1)
    try:
        with Broker(cfg).start() as b:
            stats = b.data_stats()
            assert stats is not None
            sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(stats.endpoint)
            try:
                sock.send_multipart([b"hello", pack({"patterns": [evil], "window": 8})])
                assert sock.poll(5000)  # welcomed: the hello was taken (and logged)
            finally:
                sock.close(0)
    finally:
        os.unlink(path)
        with contextlib.suppress(FileNotFoundError):  # kept beside the object left
            os.unlink(shm_path(namespace, "@catalog"))
    text = caplog.text
    assert "ignoring" in text
    assert "joined for" in text
    assert "\x1b" not in text
    assert "\nFAKE" not in text


def test_a_stopped_broker_is_named_so_not_missing(namespace: str) -> None:
    """A broker SIGSTOPped (Ctrl-Z, a debugger) holds its namespace but answers
    nothing: a client's timeout names its pid and `kill -CONT`, read from the
    kernel's lock table. Before, "no broker answered ...; start one with `shmcast
    broker`": the wrong fix (another broker is refused while it holds the lock).
    Once it is gone (SIGKILL), the message is the usual one."""
    from shmcast.broker.errors import BrokerUnavailableError

    with running(["broker", "-n", namespace], ready=BROKER_READY) as sp:
        endpoint = sp.ready["control"]
        sp.send_signal(signal.SIGSTOP)
        try:
            with (
                ControlClient(endpoint, timeout=0.2) as client,
                pytest.raises(BrokerUnavailableError) as err,
            ):
                client.request("hello")
        finally:
            sp.send_signal(signal.SIGCONT)
        assert (err.value.pid, err.value.stopped) == (sp.pid, True)
        assert f"(pid {sp.pid}) did not answer within 0.2s: it is stopped" in str(err.value)
        assert f"`kill -CONT {sp.pid}`" in str(err.value)
        sp.send_signal(signal.SIGKILL)
        sp.wait(10)
        with (
            ControlClient(endpoint, timeout=0.2) as client,
            pytest.raises(BrokerUnavailableError, match=r"^no broker answered at ") as err,
        ):
            client.request("hello")
        assert err.value.pid is None
    from shmcast.broker import diagnose

    diagnose(namespace=namespace, fix=True)  # what the killed broker left, as doctor does


def test_a_control_clients_timeout_that_is_no_wait_is_refused(thread_broker: Broker) -> None:
    """``ControlClient(timeout=nan)`` raised "cannot convert float NaN to integer" at
    its first request, and a timeout <= 0 (or a request's) said that the live broker
    "did not answer within -1s: it is busy or hung" and to kill it. Refused now,
    naming the timeout, as a ``Publisher``'s or ``Subscriber``'s is."""
    assert thread_broker.endpoints is not None
    endpoint = thread_broker.endpoints.control
    for bad in (float("nan"), -1.0, 0.0, "5"):
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            ControlClient(endpoint, timeout=bad)  # type: ignore[arg-type]
    with ControlClient(endpoint, timeout=5) as client:
        for bad in (float("nan"), -1.0):
            with pytest.raises(ValueError, match="timeout must be a finite number of seconds"):
                client.request("hello", timeout=bad)
        assert client.request("hello", timeout=5)["ok"]


def test_a_control_client_closed_by_a_signal_handler_under_a_request_says_closed() -> None:
    """``close()`` from a signal handler (a Ctrl-C or SIGTERM handler that closes
    what is open) interrupting a request's wait for a reply: the request went on
    with the closed socket and ZeroMQ's "Socket operation on non-socket" came out
    (and a wait that ended then made a new socket, with its handshake monitor, that
    the closed client never closed). It raises ClosedError now."""
    import socket

    from shmcast.broker.errors import ClosedError

    srv = socket.create_server(("127.0.0.1", 0))  # a peer that never answers
    client = ControlClient(f"tcp://127.0.0.1:{srv.getsockname()[1]}", timeout=5)
    before = signal.signal(signal.SIGALRM, lambda *_: client.close())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(ClosedError, match=r"control connection to tcp://127\.0\.0\.1"):
            client.request("hello")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        client.close()
        srv.close()


def test_a_control_clients_close_with_a_bad_linger_leaves_it_open_to_close_again() -> None:
    """``close(linger=nan)`` (or ``inf``, ``1e300``) raised from converting it after
    the client was marked closed: its socket and handshake monitor stayed open for
    good, and a second ``close()`` did nothing. A bad linger is refused before
    anything changes now, and a huge one is capped."""
    client = ControlClient("tcp://127.0.0.1:1", timeout=1)
    sock = client._sock
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="linger must be a finite number of seconds"):
            client.close(linger=bad)
        assert not client.closed
        assert not sock.closed
    client.close(linger=1e300)
    assert client.closed
    assert sock.closed


def test_a_forked_childs_copy_of_a_control_client_leaves_the_parents_sockets_alone() -> None:
    """A child forked while a ``ControlClient``'s handshake monitor is live (no reply
    yet) that closes its inherited copy, or collects it at its exit: pyzmq's close
    leaves the parent's sockets alone in a child, but stopping the monitor called
    ``zmq_socket_monitor`` on the parent's socket, taking libzmq's locks as the fork
    found them (the monitor's, which the parent's I/O thread holds while it reports
    a handshake: a fork then would leave the child waiting for ever). The child's
    close touches no socket now; the parent's client is left as it was."""
    client = ControlClient("tcp://127.0.0.1:1", timeout=0.2)
    try:
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no exceptions out of here
            code = 1
            try:

                def touched(*_: object) -> None:
                    raise AssertionError("libzmq called on the parent's socket")

                zmq.Socket.disable_monitor = touched  # type: ignore[method-assign]
                client.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not client.closed
    finally:
        client.close()
    assert client.closed


def test_a_tcp_peer_that_takes_the_connection_and_never_answers_is_not_called_missing() -> None:
    """A TCP broker SIGSTOPped (or hung) still has its connections taken, by the
    kernel; the client said "no broker answered ...; start one with `shmcast
    broker`", as for an address nobody listens on, and another broker there would be
    refused. A listening socket that never accepts stands for it here. An address
    nobody listens on keeps the usual message."""
    import socket

    from shmcast.broker.errors import BrokerUnavailableError

    srv = socket.create_server(("127.0.0.1", 0))  # takes connections, says nothing
    try:
        with (
            ControlClient(f"tcp://127.0.0.1:{srv.getsockname()[1]}", timeout=0.5) as client,
            pytest.raises(BrokerUnavailableError) as err,
        ):
            client.request("hello")
        said = str(err.value)
        assert said.startswith("a peer at tcp://127.0.0.1:"), said
        assert "took the connection but did not answer within 0.5s" in said, said
        assert "stopped (SIGSTOP" in said, said
        assert "start one" not in said, said
        assert err.value.reached == "connected"
    finally:
        port = srv.getsockname()[1]
        srv.close()
    with (
        ControlClient(f"tcp://127.0.0.1:{port}", timeout=0.3) as client,
        pytest.raises(BrokerUnavailableError, match=r"^no broker answered at tcp://"),
    ):
        client.request("hello")


def test_a_publisher_whose_segment_is_deleted_under_it_says_so_once(
    namespace: str,
    thread_broker: Broker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A library Publisher whose segment is unlinked under it (``shmcast rm
    --force``, a broker stopped with --unlink-on-exit) logs a warning once, at the
    first publish past the look interval, and ``segment_deleted`` says so. Before,
    only ``shmcast publish`` said so (with a look of its own): a library user
    published on into the unlinked object, versions no reader finds, in silence."""
    from shmcast.publisher import _publisher

    monkeypatch.setattr(_publisher, "LINKED_EVERY", 0.0, raising=False)
    caplog.set_level("WARNING", logger=_publisher.__name__)
    with (
        Publisher("g", dtype="u1", shape=(4,), namespace=namespace) as pub,
        Publisher("h", dtype="u1", shape=(4,), namespace=namespace) as kept,
        Publisher("m", dtype="u1", shape=(4,), namespace=namespace, source="relay:x") as mirror,
    ):
        pub.publish(np.ones(4, np.uint8))
        assert caplog.records == []
        Segment.remove("g", namespace=namespace)
        Segment.remove("m", namespace=namespace)
        for _ in range(3):
            pub.publish(np.ones(4, np.uint8))
            kept.publish(np.ones(4, np.uint8))
            mirror.publish(np.ones(4, np.uint8))  # its relay says so, and makes it again
        with pub.loan() as out:
            out[:] = 2
        pub.publish_bytes(bytes(4))
        said = [r.getMessage() for r in caplog.records if r.name == _publisher.__name__]
        assert len(said) == 1, said
        assert pub.segment_deleted
        assert not kept.segment_deleted
        assert mirror.segment_deleted
    assert f"segment 'g' of namespace {namespace!r} was deleted under this publisher" in said[0]
    assert "stop it and start it again" in said[0]


def test_a_publisher_that_slows_down_after_a_burst_still_looks_within_16_publishes(
    namespace: str, thread_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publish path reads the clock every few versions, the step doubling while
    no look is due: after a burst the step had grown to 1024 versions, so a
    publisher that then slowed down (1 Hz) looked up to 1024 publishes after the
    look was due, 17 minutes, its segment deleted meanwhile and nothing said. A
    look now comes at most 16 publishes late."""
    from shmcast.publisher import _publisher

    monkeypatch.setattr(_publisher, "LINKED_EVERY", 3600.0)  # no look due in the burst
    with Publisher("b", dtype="u1", shape=(8,), namespace=namespace) as pub:
        a = np.zeros(8, np.uint8)
        for _ in range(4096):  # as far as the step grows
            pub.publish(a)
        Segment.remove("b", namespace=namespace)
        pub._next_look_ns = 0  # the look is due now, as after a second of 1 Hz
        for _ in range(16):
            pub.publish(a)
        assert pub._deleted  # found by a publish (not by segment_deleted's own look)


def test_an_idle_control_clients_handshake_events_do_not_pile_up(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``ControlClient`` that neither requests nor sends, at an endpoint that
    accepts and drops every connection (a port forwarder whose broker is down, a
    broker restarting over and over): each reconnection queued three handshake
    events on its monitor, which only a request or a send read: about 680 bytes a
    reconnection, for as long as the client lived (13 MiB over 20000). The process's
    reader of idle clients' events reads them now. Reconnections every 1 ms here,
    that reader's rounds every 0.05 s."""
    import socket

    import shmcast.broker.client as client_mod

    monkeypatch.setattr(client_mod, "DRAIN_EVERY", 0.05)
    made = client_mod.open_socket

    def fast(ctx: zmq.Context[Any], kind: int, what: str) -> zmq.Socket[Any]:
        sock = made(ctx, kind, what)
        if kind == zmq.DEALER:
            sock.setsockopt(zmq.RECONNECT_IVL, 1)
        return sock

    monkeypatch.setattr(client_mod, "open_socket", fast)
    path = str(tmp_path / "drops.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    srv.settimeout(0.05)
    accepted = 0
    stop = threading.Event()

    def drop_each() -> None:
        nonlocal accepted
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            accepted += 1
            conn.close()

    thread = threading.Thread(target=drop_each, daemon=True)
    thread.start()
    client = ControlClient(f"ipc://{path}", timeout=1)
    try:
        wait_for(lambda: accepted >= 300, 20, what="300 reconnections")
        stop.set()
        thread.join(5)
        srv.close()
        os.unlink(path)  # no more connections: no more events
        # Read for it (its thread asked nothing): the connection's state is known.
        wait_for(lambda: client._link is None and client._handshake is not None, 10)
        mon = client._monitor
        assert mon is not None
        with client._mon_lock:
            unread = 0
            while mon.poll(0, zmq.POLLIN):
                mon.recv_multipart()
                unread += 1
        assert unread < accepted, (unread, accepted)
    finally:
        stop.set()
        client.close()
        srv.close()


def test_a_child_forked_while_shmcasts_locks_are_held_makes_its_own_clients(
    tmp_path: Any,
) -> None:
    """A fork while another thread holds the lock of the process's reader of idle
    clients' events (its round, every second) or of shmcast's ZeroMQ context (the
    first socket being made): the child's first ``ControlClient`` waited for that
    lock for ever. The child gets new locks at the fork. Held here by the test's
    thread at the fork; the child is killed if it does not finish in 10 s."""
    import shmcast.broker._context as context_mod
    import shmcast.broker.client as client_mod

    endpoint = f"ipc://{tmp_path}/nobody.sock"
    for lock in (client_mod._idle_monitors._lock, context_mod._lock):
        with lock:
            pid = os.fork()
            if pid == 0:  # the child: no pytest, no exceptions out of here
                code = 1
                try:
                    ControlClient(endpoint, timeout=0.1).close()
                    code = 0
                finally:
                    os._exit(code)
        assert _exit_code_within(pid, 10) == 0


def _exit_code_within(pid: int, timeout: float) -> int | None:
    """The exit code of child ``pid`` once it ended, or None: killed after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_a_publisher_whose_segment_is_made_anew_by_another_is_told_to_close(
    namespace: str,
    thread_broker: Broker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Publisher whose segment is deleted and made anew by another Publisher (a
    new incarnation): its warning tells it to close, not to start again, which
    the new writer's lease refuses (``WriterBusyError``); the new one says nothing."""
    from shmcast.broker.errors import WriterBusyError
    from shmcast.publisher import _publisher

    monkeypatch.setattr(_publisher, "LINKED_EVERY", 0.0, raising=False)
    caplog.set_level("WARNING", logger=_publisher.__name__)
    assert thread_broker.endpoints is not None
    with Publisher("g", dtype="u1", shape=(4,), namespace=namespace) as old:
        with ControlClient(thread_broker.endpoints.control, timeout=5) as client:
            client.request("delete", name="g", force=True)  # shmcast rm --force
        with Publisher("g", dtype="u1", shape=(4,), namespace=namespace) as new:
            old.publish(np.ones(4, np.uint8))
            new.publish(np.ones(4, np.uint8))
            with pytest.raises(WriterBusyError):
                Publisher("g", dtype="u1", shape=(4,), namespace=namespace)
            assert not new.segment_deleted
    said = [r.getMessage() for r in caplog.records if r.name == _publisher.__name__]
    assert len(said) == 1, said
    assert "was deleted under this publisher and made anew" in said[0]
    assert "close it" in said[0]
    assert "start it again" not in said[0]
