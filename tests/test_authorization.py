"""Trust (issue 11, class 5): the broker does not trust its clients.

- A commit is checked against the segment's own header.
- The control plane authorizes by role: a reader (the configured group, through
  the read-only socket; a CURVE key in ``curve_readers``) may hello, list,
  describe, stats, report and subscribe, nothing that changes state.
- What a client can make the broker hold is bounded: subscriptions on the
  events endpoint, message size and relays on every socket.

Every attack runs as another user (``nobody``, see ``tests/_other_user.py``).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from shmcast.broker import Broker, BrokerConfig, ConfigError, curve_keypair
from shmcast.broker.client import ControlClient, topic, unpack
from shmcast.cli.testing import BROKER_READY, running, wait_for
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber
from tests._other_user import OtherUser

pytestmark = pytest.mark.root


@pytest.fixture
def broker(namespace: str, request: pytest.FixtureRequest) -> Iterator[Broker]:
    kwargs = getattr(request, "param", {})
    with Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.05, **kwargs)).start() as b:
        yield b


def _ops(*items: Any) -> str:
    return json.dumps(list(items))


@pytest.mark.parametrize(
    "broker", [{"control": "tcp://127.0.0.1:0", "tcp_open": True}], indirect=True
)
def test_a_commit_beyond_the_header_is_refused(broker: Broker, other_user: OtherUser) -> None:
    """A plain loopback TCP control endpoint gives any local user the writer role
    (so it needs tcp_open); even so, a commit the header does not show is not announced."""
    assert broker.endpoints is not None
    control = broker.endpoints.control
    spy: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
    spy.setsockopt(zmq.LINGER, 0)
    spy.setsockopt(zmq.SUBSCRIBE, topic("p"))
    spy.connect(broker.endpoints.events)
    try:
        with Publisher("p", dtype="f8", shape=(4,), broker=control) as pub:
            for _ in range(3):
                pub.publish(np.ones(4))
            wait_for(lambda: broker.catalog.entry("p").announced == 3, 5, what="v3 announced")
            forged = 2**63 - 1
            out = other_user.run(
                "control",
                control,
                _ops(
                    ["commit", {"name": "p", "version": forged, "ts": 1}, "send"],
                    ["commit", {"name": "p", "version": forged, "ts": 1, "ack": True}],
                    ["commit", {"name": "p", "version": 4, "ts": 1, "ack": True}],
                ),
            )
            assert out["results"] == [True, "RemoteError", "RemoteError"]
            entry = broker.catalog.entry("p")
            assert entry.announced == 3
            assert broker.stats().published["p"] == 3  # not 2**63
            # The real versions after it are announced, with the header's commit time.
            pub.publish(np.ones(4))
            seen: list[int] = []
            deadline = time.monotonic() + 5
            while 4 not in seen:
                assert time.monotonic() < deadline, f"version 4 never announced: {seen}"
                if spy.poll(100):
                    seen.append(int(unpack(spy.recv_multipart()[1])["version"]))
            assert max(seen) == 4
            assert broker.stats().published["p"] == 4
    finally:
        spy.close(0)


@pytest.mark.parametrize("broker", [{"group": "nogroup", "mode": 0o640}], indirect=True)
def test_readers_may_look_but_not_change(broker: Broker, other_user: OtherUser) -> None:
    assert broker.endpoints is not None
    assert broker.endpoints.control_ro is not None
    with Publisher("p", dtype="f8", shape=(4,)) as pub:
        pub.publish(np.full(4, 2.0))
        before = broker.stats().errors.get("ForbiddenError", 0)
        out = other_user.run(
            "control",
            broker.endpoints.control_ro,
            _ops(
                ["hello", {}],
                ["list", {}],
                ["describe", {"name": "p"}],
                ["stats", {}],
                ["subscribers", {}],
                ["report", {"name": "r", "pid": 1, "segments": {}}, "send"],
                ["create", {"name": "q", "dtype": "f8", "shape": [4]}],
                ["delete", {"name": "p"}],
                ["lease", {"name": "p", "pid": 1}],
                ["commit", {"name": "p", "version": 1, "ts": 1, "ack": True}],
                ["commit", {"name": "p", "version": 1, "ts": 1}, "send"],
                ["hello", {}],
            ),
        )
        results = out["results"]
        assert all(isinstance(r, list) for r in results[:5]), results
        assert "control_ro" in results[0]
        assert results[5] is True
        assert results[6:10] == ["ForbiddenError"] * 4
        assert results[10] is True
        assert isinstance(results[11], list)
        assert broker.catalog.names() == ["p"]
        assert broker.catalog.entry("p").seg.version == 1
        wait_for(
            lambda: broker.stats().errors.get("ForbiddenError", 0) >= before + 5,
            5,
            what="the one-way commit counted as forbidden",
        )
        # The group's subscriber, given the owner's socket (which it cannot open), finds
        # the read-only one beside it and receives the versions.
        stop = threading.Event()

        def publish() -> None:
            while not stop.wait(0.05):
                pub.publish(np.full(4, 5.0))

        feeder = threading.Thread(target=publish)
        feeder.start()
        try:
            got = other_user.run("subscribe", broker.namespace, broker.endpoints.control, "p", "3")
        finally:
            stop.set()
            feeder.join(10)
        assert len(got["got"]) == 3, got
        assert all(total == 20.0 for _, total in got["got"][1:])


CURVE_OPS = _ops(["hello", {}], ["create", {"name": "c", "dtype": "f8", "shape": [2]}])


def test_curve_keys_carry_roles(namespace: str, other_user: OtherUser) -> None:
    server_pub, server_sec = curve_keypair()
    writer_pub, writer_sec = curve_keypair()
    reader_pub, reader_sec = curve_keypair()
    stranger_pub, stranger_sec = curve_keypair()
    cfg = BrokerConfig(
        namespace=namespace,
        control="tcp://127.0.0.1:0",
        events="tcp://127.0.0.1:0",
        curve_secret_key=server_sec,
        curve_clients=(writer_pub,),
        curve_readers=(reader_pub,),
    )
    with Broker(cfg).start() as b:
        assert b.endpoints is not None
        control = b.endpoints.control

        def run(public: str, secret: str) -> list[Any]:
            keys = f"{server_pub},{public},{secret}"
            return list(other_user.run("control", control, CURVE_OPS, keys)["results"])

        reader = run(reader_pub, reader_sec)
        assert isinstance(reader[0], list)
        assert reader[1] == "ForbiddenError"
        # Refused in the handshake: a BrokerUnavailableError that says so.
        assert run(stranger_pub, stranger_sec) == ["BrokerHandshakeError"] * 2
        writer = run(writer_pub, writer_sec)
        assert all(isinstance(r, list) for r in writer), writer
        assert b.catalog.names() == ["c"]


def test_plain_tcp_control_beyond_loopback_must_be_written_out(
    namespace: str, other_user: OtherUser
) -> None:
    out = other_user.run("cli", "broker", "--namespace", namespace, "--control", "tcp://0.0.0.0:0")
    assert out["rc"] == 2
    assert "tcp_open" in out["stderr"]
    assert "curve_secret_key" in out["stderr"]


@pytest.mark.parametrize("where", ["tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://10.0.0.1:5557"])
@pytest.mark.parametrize(
    ("endpoint", "what"),
    [("data", "could read every segment"), ("events", "could follow every segment's versions"),
     ("control_ro", "could list and describe")],
)  # fmt: skip
def test_a_plain_tcp_endpoint_beyond_loopback_must_be_written_out(
    where: str, endpoint: str, what: str
) -> None:
    """The data stream hands every segment's bytes to whoever connects, the events
    and read-only control endpoints their names and versions: beyond loopback
    without CURVE they were served to anyone, with nothing written out (only the
    control endpoint asked for tcp_open)."""
    with pytest.raises(ConfigError, match=what):
        BrokerConfig(**{endpoint: where})
    assert getattr(BrokerConfig(**{endpoint: where}, tcp_open=True), endpoint) == where
    assert getattr(BrokerConfig(**{endpoint: where}, curve_secret_key="x" * 40), endpoint) == where
    assert getattr(BrokerConfig(**{endpoint: "tcp://127.0.0.1:5557"}), endpoint)


def _rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _settled_hwm(pid: int, timeout: float = 30.0) -> float:
    """The peak RSS of ``pid`` once it stopped growing (four equal readings 0.25 s apart)."""
    last, same = -1.0, 0
    deadline = time.monotonic() + timeout
    while same < 4 and time.monotonic() < deadline:
        hwm = _rss_mib(pid)[1]
        same = same + 1 if hwm == last else 0
        last = hwm
        time.sleep(0.25)  # sampling interval of a measurement, not a synchronisation
    return last


def test_subscription_flood_keeps_the_broker_bounded(namespace: str, other_user: OtherUser) -> None:
    """One 2 MB subscription and 20 000 distinct 100-byte ones: before, the broker
    (a PUB socket) kept them all, about 10 KB each; now its peak RSS stays within
    a few MB, and a subscriber is served afterwards."""
    args = ["broker", "--events", "tcp://127.0.0.1:0", "--heartbeat", "0.1"]
    with running(args, ready=BROKER_READY) as broker:
        pid, events = broker.pid, broker.ready["events"]
        with Subscriber("warm", timeout=5) as warm:  # the broker's own buffers, warmed
            list(warm.updates(timeout=0.2))
        base = _settled_hwm(pid)
        with other_user.running("flood", events, "20000", "100", str(2 * 2**20)) as flood:
            assert flood.ready["sent"] == 20001
            peak = _settled_hwm(pid)
        growth = peak - base
        print(f"FIGURES flood: peak RSS {base:.1f} -> {peak:.1f} MiB (+{growth:.1f})")
        with ControlClient(broker.ready["control"], timeout=5) as ctl:
            stats = ctl.request("stats")
        assert growth < 48, f"the broker grew by {growth:.1f} MiB under the flood"
        assert stats["errors"].get("events_reset", 0) >= 1
        with Publisher("after", dtype="f8", shape=(2,)) as pub, Subscriber("after") as sub:
            pub.publish(np.ones(2))
            got = [u.version for u in sub.updates(timeout=2)]
            assert got, "no update after the flood"
            assert got[-1] >= 1


@pytest.mark.parametrize(
    "broker",
    [{"data": "tcp://127.0.0.1:0", "max_relays": 2, "max_relay_patterns": 8}],
    indirect=True,
)
def test_data_stream_bounds_relays_and_patterns(broker: Broker, other_user: OtherUser) -> None:
    data = broker.data_stats()
    assert data is not None
    too_many_patterns = other_user.run("relay-hellos", data.endpoint, "1", "9")
    assert too_many_patterns == {"welcomed": [False]}
    three = other_user.run("relay-hellos", data.endpoint, "3", "8")
    assert sorted(three["welcomed"]) == [False, True, True]


@pytest.mark.parametrize(
    "broker", [{"max_subscriptions": 16, "group": "nogroup", "mode": 0o640}], indirect=True
)
def test_the_events_endpoint_resets_on_ipc_and_serves_on(
    broker: Broker, namespace: str, other_user: OtherUser
) -> None:
    """A member of the group floods the ipc events socket past its bound: the
    endpoint resets in place (same file, same mode) and subscribers are served after."""
    assert broker.endpoints is not None
    events = broker.endpoints.events
    path = events[len("ipc://") :]
    with other_user.running("flood", events, "100", "20", "0") as flood:
        assert flood.ready["sent"] == 100
        wait_for(lambda: broker.stats().errors.get("events_reset", 0) >= 1, 10, what="reset")
    assert os.path.exists(path), "the reset lost the socket file"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with Publisher("p", dtype="f8", shape=(2,)) as pub, Subscriber("p", timeout=5) as sub:
        pub.publish(np.ones(2))
        assert [u.version for u in sub.updates(timeout=2)] == [1]


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python child (its ZeroMQ context its own: a hang cannot take
    the test process's); it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc


_NO_PIPE_CHILD = """
import signal, socket, time
import zmq
from shmcast.broker.client import ControlClient
from shmcast.broker.errors import BrokerUnavailableError

signal.alarm(20)  # a send blocked for ever ends the child here: the test fails
# A peer that greets announcing CURVE, as a CURVE broker does: a client without keys
# fails the handshake for a protocol error, and libzmq ends that session for good
# (no reconnection), leaving the DEALER no pipe to queue a request on.
greeting = b"\\xff" + bytes(8) + b"\\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\\0")
greeting += b"\\x01" + bytes(31)
srv = socket.create_server(("127.0.0.1", 0))
with ControlClient(f"tcp://127.0.0.1:{srv.getsockname()[1]}", timeout=0.3) as client:
    conn, _ = srv.accept()
    conn.sendall(greeting)
    assert client._monitor is not None and client._monitor.poll(10_000)  # it failed
    for _ in range(5):  # the socket takes in its pipe's end (a few commands)
        time.sleep(0.05)
        client._sock.getsockopt(zmq.EVENTS)
    try:
        client.request("hello")
    except BrokerUnavailableError as exc:
        print(type(exc).__name__, exc)
conn.close()
srv.close()
"""


def test_a_request_after_a_refused_handshake_times_out_rather_than_blocks() -> None:
    """A request on a connection whose handshake failed for a protocol error (a CURVE
    broker, a client without keys) blocked in its send for ever: libzmq ends such a
    session without reconnecting, and the DEALER had no pipe to queue on. ``shmcast
    top`` without keys hung at a request. Now the send waits until the request's
    deadline at most."""
    proc = _run_child(_NO_PIPE_CHILD)
    assert proc.stdout.startswith("BrokerHandshakeError "), proc.stdout
    assert "gave no CURVE keys" in proc.stdout, proc.stdout


_MANY_REFUSED_CHILD = """
import os, signal, socket, threading
from shmcast.broker.client import ControlClient
from shmcast.broker.errors import BrokerUnavailableError

signal.alarm(50)
greeting = b"\\xff" + bytes(8) + b"\\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\\0")
greeting += b"\\x01" + bytes(31)
srv = socket.create_server(("127.0.0.1", 0))
accepted = []

def serve():
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        conn.sendall(greeting)
        accepted.append(conn)

threading.Thread(target=serve, daemon=True).start()
before = len(os.listdir("/proc/self/fd"))
for _ in range(150):
    with ControlClient(f"tcp://127.0.0.1:{srv.getsockname()[1]}", timeout=0.01) as client:
        try:
            client.request("hello")
        except BrokerUnavailableError:
            pass
opened = len(os.listdir("/proc/self/fd")) - before - len(accepted)
print(len(accepted), opened)
"""


def test_clients_refused_a_handshake_leave_the_processs_zeromq_working() -> None:
    """Clients that time out against a CURVE endpoint (no keys) each closed their
    handshake monitor while ZeroMQ's I/O thread could still report to it: that thread
    hung, and with it every socket of the process's context. After about 50 such
    clients no connection was made any more, and each later one left its descriptors
    open. Run in a child: a hung context would take the test process's with it."""
    proc = _run_child(_MANY_REFUSED_CHILD)
    accepted, opened = map(int, proc.stdout.split())
    assert accepted >= 150, proc.stdout  # every client connected
    assert opened < 20, proc.stdout  # what the clients left open


def _refused(client: ControlClient) -> str:
    """The message of the BrokerHandshakeError a hello gets: a request that times out
    before the handshake failed (a loaded machine) raises BrokerUnavailableError, and
    the next one (a new connection) is asked, for 10 s at most."""
    from shmcast.broker.errors import BrokerHandshakeError, BrokerUnavailableError

    deadline = time.monotonic() + 10
    while True:
        try:
            client.request("hello", timeout=0.3)
        except BrokerHandshakeError as exc:
            return str(exc)
        except BrokerUnavailableError:
            assert time.monotonic() < deadline, "no handshake refused within 10 s"
        else:
            raise AssertionError("the broker answered")


def test_a_curve_brokers_default_ipc_endpoints_say_a_handshake_was_refused(
    namespace: str,
) -> None:
    """A broker with CURVE serves its default (ipc) control endpoints with CURVE as
    well; only a TCP connection's handshakes were watched, so ``shmcast health``
    without keys said "no broker answered ... start one with `shmcast broker`" of
    the running broker. ipc connections are watched too now."""
    _, server_sec = curve_keypair()
    client_pub, _ = curve_keypair()
    cfg = BrokerConfig(
        namespace=namespace, curve_secret_key=server_sec, curve_clients=(client_pub,)
    )
    with Broker(cfg).start() as b:
        assert b.endpoints is not None
        for endpoint in (b.endpoints.control, b.endpoints.control_ro):
            assert endpoint.startswith("ipc://")
            with ControlClient(endpoint) as client:
                said = _refused(client)
            assert "without CURVE keys" in said or "gave no CURVE keys" in said, said


def test_curve_keys_as_text_as_curve_keypair_makes_them_are_taken(namespace: str) -> None:
    """The README's recipe: keys from ``curve_keypair()`` (text) passed as
    ``curve=(server_public, client_public, client_secret)``. ZeroMQ takes bytes
    only: every client failed with TypeError "unicode not allowed, use
    setsockopt_string". Text is taken now, and what is no key is a ConfigError
    naming it."""
    server_pub, server_sec = curve_keypair()
    client_pub, client_sec = curve_keypair()
    cfg = BrokerConfig(
        namespace=namespace,
        control="tcp://127.0.0.1:0",
        events="tcp://127.0.0.1:0",
        curve_secret_key=server_sec,
        curve_clients=(client_pub,),
    )
    keys = (server_pub, client_pub, client_sec)
    with Broker(cfg).start() as b:
        assert b.endpoints is not None
        with ControlClient(b.endpoints.control, timeout=5, curve=keys) as client:
            assert client.request("hello")["namespace"] == namespace
        with Subscriber("s", broker=b.endpoints.control, wait="events", curve=keys) as sub:
            assert sub.namespace == namespace
    with pytest.raises(ConfigError, match="client_secret is not a 40-character z85"):
        ControlClient("tcp://127.0.0.1:1", curve=(server_pub, client_pub, "x"))
    with pytest.raises(ConfigError, match="three z85 keys"):
        Subscriber("s", broker="tcp://127.0.0.1:1", curve=(server_pub, client_pub))  # type: ignore[arg-type]


def test_keys_for_a_broker_without_curve_name_where_they_came_from(namespace: str) -> None:
    """Keys given to a broker without CURVE (``$SHMCAST_CURVE_KEYS`` left set from
    another broker, say): the error said only "connect without CURVE keys", not
    where the keys came from nor how to leave them out."""
    server_pub, _ = curve_keypair()
    client_pub, client_sec = curve_keypair()
    with Broker(BrokerConfig(namespace=namespace)).start() as b:
        assert b.endpoints is not None
        keys = (server_pub, client_pub, client_sec)
        with ControlClient(b.endpoints.control, curve=keys) as client:
            said = _refused(client)
        assert "does not speak CURVE" in said, said
        assert "$SHMCAST_CURVE_KEYS unset" in said, said


_FLAPPING_PEER_CHILD = """
import os, signal, socket, struct, threading, time
import msgpack, zmq
from shmcast.broker.client import ControlClient

signal.alarm(60)
_connect = zmq.Socket.connect
def fast(self, addr):  # reconnect at once: many handshakes in little time
    self.setsockopt(zmq.RECONNECT_IVL, 1)
    return _connect(self, addr)
zmq.Socket.connect = fast

GREETING = b"\\xff" + bytes(8) + b"\\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\\0") + bytes(32)
prop = b"\\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER"
READY = bytes([0x04, 6 + len(prop)]) + b"\\x05READY" + prop
srv = socket.create_server(("127.0.0.1", 0))
accepted = 0

def read_exact(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b

def read_frame(c):
    flags = read_exact(c, 1)[0]
    size = struct.unpack(">Q", read_exact(c, 8))[0] if flags & 2 else read_exact(c, 1)[0]
    return flags, read_exact(c, size)

def serve():
    global accepted
    first = True
    while True:
        try:
            c, _ = srv.accept()
        except OSError:
            return
        accepted += 1
        try:
            c.sendall(GREETING + READY)
            read_exact(c, 64)
            read_frame(c)  # its READY
            if first:
                _, body = read_frame(c)
                rid = msgpack.unpackb(body)["id"]
                reply = msgpack.packb({"ok": True, "id": rid, "namespace": "x"})
                c.sendall(bytes([0, len(reply)]) + reply)
                first = False
                time.sleep(0.05)
        except (EOFError, OSError):
            pass
        c.close()

threading.Thread(target=serve, daemon=True).start()
client = ControlClient(f"tcp://127.0.0.1:{srv.getsockname()[1]}", timeout=5)
client.request("hello")
last, stalled = 0, time.monotonic()
while accepted < 2500 and time.monotonic() - stalled < 3:
    time.sleep(0.05)
    if accepted != last:
        last, stalled = accepted, time.monotonic()
print(accepted)
os._exit(0)
"""


_DROPPING_CHILD = """
import os, signal, socket, threading, time
import zmq
from shmcast.broker.client import ControlClient

signal.alarm(50)
ctx = zmq.Context()
ctx.setsockopt(zmq.RECONNECT_IVL, 1)  # a reconnect each millisecond, not each 100
ctx.setsockopt(zmq.RCVHWM, 1)  # the monitor's pipe then held 1001 events, not 2000
srv = socket.create_server(("127.0.0.1", 0))
accepted = [0]

def serve():
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        accepted[0] += 1
        conn.close()  # before the greeting: a failed handshake

threading.Thread(target=serve, daemon=True).start()
client = ControlClient(f"tcp://127.0.0.1:{srv.getsockname()[1]}", timeout=1, context=ctx)
seen, since = 0, time.monotonic()
while accepted[0] < 1200 and time.monotonic() - since < 3.0:  # or no more come
    if accepted[0] != seen:
        seen, since = accepted[0], time.monotonic()
    time.sleep(0.01)
pull = ctx.socket(zmq.PULL)
port = pull.bind_to_random_port("tcp://127.0.0.1")
push = ctx.socket(zmq.PUSH)
push.connect(f"tcp://127.0.0.1:{port}")
push.send(b"x")
print(accepted[0] >= 1200, bool(pull.poll(2000)), flush=True)
os._exit(0)
"""


def test_a_client_reconnecting_thousands_of_times_leaves_the_processs_zeromq_working() -> None:
    """A client that had its reply kept its handshake monitor, which queued one event
    per reconnection, unread; ZeroMQ's I/O thread sends them with a blocking send and
    hung once the queue was full, after 2001 reconnections (a broker restarting over
    and over, a flapping link), and with it every socket of the process. A peer that
    answers one hello, then takes each connection's handshake and closes it, with
    reconnections 1 ms apart: 2500 connections are made now. In a child: a hung
    context would take the test process's with it."""
    proc = _run_child(_FLAPPING_PEER_CHILD)
    assert int(proc.stdout) >= 2500, proc.stdout


def test_a_client_left_open_at_an_endpoint_dropping_connections_leaves_zeromq_working() -> None:
    """A client left open (no request) at a tcp endpoint that accepts and drops each
    connection (a port forwarder whose broker is down) gets a failed handshake event
    at each reconnect, which its monitor's pipe held until a request read them. Once
    that pipe was full ZeroMQ's I/O thread blocked sending the next one, and every
    socket of the process's context with it, for ever (2000 reconnects: about five
    minutes at the default interval). Run in a child: a hung context would take the test
    process's with it."""
    proc = _run_child(_DROPPING_CHILD)
    # Reconnects went on, and another socket of the context was served.
    assert proc.stdout.split() == ["True", "True"], proc.stdout


_COLLECTED_CHILD = """
import os, signal, socket, threading, time
import zmq
from shmcast.broker.client import ControlClient

signal.alarm(50)
ctx = zmq.Context()
ctx.setsockopt(zmq.RECONNECT_IVL, 1)  # a handshake each millisecond: the race, often
srv = socket.create_server(("127.0.0.1", 0))

def serve():
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        conn.close()  # a failed handshake, then a reconnect

threading.Thread(target=serve, daemon=True).start()
endpoint = f"tcp://127.0.0.1:{srv.getsockname()[1]}"
for _ in range(60):
    client = ControlClient(endpoint, timeout=1, context=ctx)
    time.sleep(0.005)
    del client  # collected (its last reference) without close()
pull = ctx.socket(zmq.PULL)
port = pull.bind_to_random_port("tcp://127.0.0.1")
push = ctx.socket(zmq.PUSH)
push.connect(f"tcp://127.0.0.1:{port}")
push.send(b"x")
print(bool(pull.poll(2000)), flush=True)
os._exit(0)
"""


def test_a_client_collected_unclosed_leaves_the_processs_zeromq_working() -> None:
    """A ``ControlClient`` collected without ``close()`` while its handshake monitor
    was live (no reply yet: a broker down, a key refused) closed the monitor's end
    before its socket; a handshake reported in between hung ZeroMQ's I/O thread,
    and every socket of the process with it. Now it closes as ``close()`` does (and
    warns). In a child: a hung context would take the test process's with it."""
    proc = _run_child(_COLLECTED_CHILD)
    assert proc.stdout.split() == ["True"], proc.stdout


def test_an_endpoint_dropping_connections_is_not_called_a_curve_broker() -> None:
    """A TCP endpoint that closes each connection during the handshake (a port
    forwarder whose broker is down, another service): a client without keys was told
    only "it is likely a broker with curve_secret_key" and to give CURVE keys. The
    other cause, and its fix, are named too now."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with ControlClient(f"tcp://127.0.0.1:{srv.getsockname()[1]}") as client:
            said = _refused(client)
    finally:
        stop.set()
        srv.close()
        thread.join(5)
    assert "no broker's control endpoint" in said, said
    assert "port forwarder" in said, said


def test_a_brokers_events_socket_given_as_its_control_endpoint_is_named(namespace: str) -> None:
    """``ipc://.../events.sock`` given where the control endpoint goes: ZeroMQ reports
    no handshake there, and the error said the live broker holding the lock beside it
    was "busy or hung" and to kill it. It names the control endpoint now."""
    from shmcast.broker.errors import BrokerHandshakeError

    with Broker(BrokerConfig(namespace=namespace)).start() as b:
        assert b.endpoints is not None
        with (
            ControlClient(b.endpoints.events, timeout=0.3) as client,
            pytest.raises(BrokerHandshakeError) as err,
        ):
            client.request("hello")
        said = str(err.value)
        assert "kill" not in said, said
        assert "events endpoint" in said, said
        assert b.endpoints.control in said, said


def test_client_keys_of_two_pairs_are_refused_before_connecting() -> None:
    """``curve=`` whose ``client_public`` is not ``client_secret``'s (two pairs' keys,
    or the pair swapped): every handshake failed, the broker closing each connection,
    and the timeout asked whether the *server* key was the broker's. Refused at once
    now, as a ``--curve-keys`` file's mismatched pair is."""
    server_pub, _ = curve_keypair()
    client_pub, client_sec = curve_keypair()
    other_pub, other_sec = curve_keypair()
    match = "client_public is not the public key of client_secret"
    for keys in ((server_pub, client_pub, other_sec), (server_pub, client_sec, client_pub)):
        with pytest.raises(ConfigError, match=match):
            ControlClient("tcp://127.0.0.1:1", curve=keys)
        with pytest.raises(ConfigError, match=match):
            Subscriber("s", broker="tcp://127.0.0.1:1", curve=keys)
        with pytest.raises(ConfigError, match=match):
            Publisher("p", broker="tcp://127.0.0.1:1", curve=keys)
    ControlClient("tcp://127.0.0.1:1", curve=(server_pub, other_pub, other_sec)).close()


def test_a_refused_request_names_the_endpoint_it_was_refused_at(thread_broker: Broker) -> None:
    """A ``ForbiddenError`` rebuilt from the broker's reply had ``endpoint == ""`` and
    a message naming no endpoint, though the client knows where it asked."""
    from shmcast.broker import ForbiddenError

    assert thread_broker.endpoints is not None
    endpoint = thread_broker.endpoints.control_ro
    assert endpoint
    with ControlClient(endpoint, timeout=5) as ctl, pytest.raises(ForbiddenError) as exc:
        ctl.request("delete", name="s")
    assert (exc.value.op, exc.value.role, exc.value.endpoint) == ("delete", "reader", endpoint)
    assert f"refused 'delete' to this connection at {endpoint}: " in str(exc.value)


def test_a_refused_reader_is_told_every_operation_readers_may_do() -> None:
    """A reader refused an operation was told "readers may only hello, list, describe,
    stats, report and subscribe": ``subscribers`` (``shmcast top``'s) and ``topics``
    (an ``events`` subscriber's) were left out, though readers may do both."""
    from shmcast.broker import ForbiddenError
    from shmcast.broker._broker import READER_OPS

    message = str(ForbiddenError("create", "reader"))
    allowed = message.split("may only ", 1)[1].split(";", 1)[0]
    for op in READER_OPS:
        assert op in allowed.replace(",", " ").split(), (op, allowed)
