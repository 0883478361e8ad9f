"""Permissions and exposure: owner-only objects, another user shut out unless a group
is configured, read-only subscribers, loopback TCP, CURVE authentication."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from shmcast.broker import Broker, BrokerConfig, ConfigError, curve_keypair
from shmcast.broker._protocol import ipc_path
from shmcast.broker.client import ControlClient, runtime_dir
from shmcast.broker.errors import BrokerUnavailableError
from shmcast.cli.testing import BROKER_READY, start
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber
from tests._other_user import OtherUser

ROOT = Path(__file__).resolve().parent.parent


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _serve(cfg: BrokerConfig) -> tuple[Broker, threading.Thread]:
    b = Broker(cfg)
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    assert b.wait_ready(10)
    return b, t


@pytest.fixture
def served(namespace: str, request: pytest.FixtureRequest) -> Iterator[Broker]:
    kwargs = getattr(request, "param", {})
    b, t = _serve(BrokerConfig(namespace=namespace, **kwargs))
    try:
        yield b
    finally:
        b.stop()
        t.join(30)


def test_owner_only_by_default(served: Broker, namespace: str) -> None:
    assert served.endpoints is not None
    with Publisher("p", dtype="f8", shape=(8,)) as pub:
        assert _mode(pub.segment.path) == 0o600
    for ep in (served.endpoints.control, served.endpoints.control_ro, served.endpoints.events):
        path = ipc_path(ep)
        assert path is not None
        assert _mode(path) == 0o600
    assert _mode(runtime_dir(namespace)) == 0o700
    assert _mode(runtime_dir(namespace).parent) & 0o066 == 0  # nobody else lists or writes


@pytest.mark.root
def test_other_user_is_shut_out(served: Broker, namespace: str, other_user: OtherUser) -> None:
    assert served.endpoints is not None
    with Publisher("p", dtype="f8", shape=(8,)) as pub:
        pub.publish(np.ones(8))
        out = other_user.run("probe", namespace, served.endpoints.control)
    assert out == {
        "read": "PermissionError",
        "write": "PermissionError",
        "hello": "BrokerUnavailableError",
        "hello_as_reader": "BrokerUnavailableError",
    }


@pytest.mark.root
@pytest.mark.parametrize("served", [{"group": "nogroup", "mode": 0o640}], indirect=True)
def test_configured_group_can_read_not_write(
    served: Broker, namespace: str, other_user: OtherUser
) -> None:
    assert served.endpoints is not None
    with Publisher("p", dtype="f8", shape=(8,)) as pub:
        pub.publish(np.ones(8))
        assert _mode(pub.segment.path) == 0o640
        out = other_user.run("probe", namespace, served.endpoints.control)
    # The owner's control socket stays owner-only; the group gets the read-only one.
    assert out == {
        "read": 8.0,
        "write": "PermissionError",
        "hello": "BrokerUnavailableError",
        "hello_as_reader": namespace,
    }
    assert _mode(runtime_dir(namespace)) == 0o750


@pytest.mark.root
def test_a_helper_that_cannot_start_fails_the_test(other_user: OtherUser) -> None:
    """Issue 16: a child that dies on an import is never taken for a refusal."""
    broken = Path(tempfile.mkdtemp(prefix="shmcast-broken-"))
    try:
        os.chmod(broken, 0o755)
        shutil.copy2(other_user.top / "_as_other.py", broken / "_as_other.py")  # no site/
        user = dataclasses.replace(other_user, top=broken)
        with pytest.raises(pytest.fail.Exception, match="ModuleNotFoundError"):
            user.run("probe", "x", "ipc:///nonexistent")
    finally:
        shutil.rmtree(broken)


@pytest.mark.root
def test_another_users_stopped_broker_is_named_as_theirs(
    namespace: str, other_user: OtherUser
) -> None:
    """A stopped broker (SIGSTOP) of root's, asked by a user of its group: the
    timeout says whose it is and that resuming it takes that user or root. Before,
    it said "resume it: `kill -CONT N`", which that user cannot do. Its owner
    still gets the plain advice."""
    import signal

    from shmcast.cli.testing import running

    with running(["broker", "-n", namespace, "--group", "nogroup"], ready=BROKER_READY) as sp:
        control = sp.ready["control"]
        ro = f"ipc://{os.path.join(os.path.dirname(control[len('ipc://') :]), 'control-ro.sock')}"
        sp.send_signal(signal.SIGSTOP)
        try:
            theirs = other_user.run("unanswered", ro, "0.3")
            with (
                ControlClient(control, timeout=0.2) as client,
                pytest.raises(BrokerUnavailableError) as mine,
            ):
                client.request("hello")
        finally:
            sp.send_signal(signal.SIGCONT)
    assert theirs["error"] == "BrokerUnavailableError", theirs
    said = theirs["message"]
    assert f"(pid {sp.pid}) did not answer within 0.3s: it is stopped" in said
    assert "it runs as user 'root' (uid 0), not as you" in said
    assert f"takes that user or root (`kill -CONT {sp.pid}` as that user, or `sudo" in said
    assert "resume it:" not in said
    assert f"resume it: `kill -CONT {sp.pid}`" in str(mine.value)
    assert "not as you" not in str(mine.value)
    assert mine.value.uid == 0


def test_subscribers_cannot_write(served: Broker) -> None:
    with Publisher("p", dtype="f8", shape=(8,)) as pub, Subscriber("p") as sub:
        pub.publish(np.arange(8.0))
        with sub.read("p") as snap:
            with pytest.raises(ValueError, match="read-only"):
                snap.array[0] = 42.0
            with pytest.raises(ValueError, match="WRITEABLE"):
                snap.array.flags.writeable = True
        assert (sub.latest("p").array == np.arange(8.0)).all()
        seg = sub.segment("p")
        assert not seg.writable


def test_tcp_binds_loopback_when_asked(namespace: str) -> None:
    """No TCP unless configured; the documented TCP endpoints are loopback."""
    cfg = BrokerConfig(namespace=namespace)
    assert cfg.control is None
    assert cfg.events is None
    assert cfg.metrics_host == "127.0.0.1"
    b, t = _serve(
        BrokerConfig(
            namespace=namespace,
            control="tcp://127.0.0.1:0",
            events="tcp://127.0.0.1:0",
            tcp_open=True,  # a plain TCP control endpoint, loopback too, is written out
        )
    )
    try:
        assert b.endpoints is not None
        assert b.endpoints.control.startswith("tcp://127.0.0.1:")
        assert b.endpoints.events.startswith("tcp://127.0.0.1:")
    finally:
        b.stop()
        t.join(30)
    text = (ROOT / "configs" / "broker.toml").read_text()
    for line in text.splitlines():
        key = line.lstrip("# ").split("=")[0].strip()
        if key in ("control", "events") and "tcp://" in line:
            assert "127.0.0.1" in line, line


@pytest.mark.parametrize(
    "where", ["tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555"]
)
def test_a_plain_tcp_control_endpoint_on_loopback_needs_tcp_open(where: str) -> None:
    """Loopback is every local user's: user nobody deleted the owner's segment and
    created its own through tcp://127.0.0.1 (the documented choice, and
    docker/broker.toml's). A plain TCP control endpoint is now refused at any
    address unless tcp_open is written out; the error names the ways out."""
    with pytest.raises(ConfigError, match="control") as exc:
        BrokerConfig(control=where)
    for needle in ("every local user", "ipc://", "curve_secret_key", "tcp_open = true"):
        assert needle in str(exc.value), needle
    assert BrokerConfig(control=where, tcp_open=True).control == where
    assert BrokerConfig(control=where, curve_secret_key="x" * 40).control == where
    assert BrokerConfig(control="ipc:///run/x/control.sock").exposure_warning() is None


def test_loopback_read_only_endpoints_are_served_with_one_warning_line(namespace: str) -> None:
    """events, control_ro and data on 127.0.0.1 stay allowed (every local user can
    read through them), and the broker says so in one warning line at start."""
    args = ["broker", "-n", namespace, "--heartbeat", "5"]
    for name in ("events", "control-ro", "data"):
        args += [f"--{name}", "tcp://127.0.0.1:0"]
    broker = start(args, ready=BROKER_READY)
    try:
        assert broker.ready["events"].startswith("tcp://127.0.0.1:")
    finally:
        assert broker.stop() == 0
    warned = [line for line in broker.stderr if "every local user" in line]
    assert len(warned) == 1, broker.stderr
    assert "WARNING" in warned[0]
    for name in ("events", "control_ro", "data"):
        assert f"{name} tcp://127.0.0.1:0" in warned[0]


def test_a_library_broker_warns_of_loopback_readers_too(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only ``shmcast broker``: a ``Broker`` started from Python says it as well."""
    with Broker(BrokerConfig(namespace=namespace, events="tcp://127.0.0.1:0")).start():
        pass
    warned = [r for r in caplog.records if "every local user" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].levelname == "WARNING"


def test_an_ipc_data_endpoint_is_owner_only_and_removed_at_close(
    namespace: str, tmp_path: Path
) -> None:
    """The data stream's ipc socket file got the umask's mode (0775 under umask 002:
    the group, whoever reached the directory, read every segment through it) and
    stayed behind when the broker stopped. Now 0600, like control.sock, and removed."""
    path = tmp_path / "data.sock"
    old = os.umask(0o002)
    try:
        with Broker(BrokerConfig(namespace=namespace, data=f"ipc://{path}")).start():
            mode = stat.S_IMODE(os.stat(path).st_mode)
    finally:
        os.umask(old)
    assert mode == 0o600, oct(mode)
    assert not path.exists()


def test_refused_curve_clients_are_counted_and_logged_sparingly(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused CURVE handshake wrote a warning line: anyone who reaches the
    data endpoint (on a LAN) wrote 800 lines a second into the broker's log by
    connecting with a key it does not know. Now: counted, one line per 10 s."""
    import logging

    from shmcast.cli.testing import wait_for

    server_pub, server_sec = curve_keypair()
    client_pub, _ = curve_keypair()
    stranger_pub, stranger_sec = curve_keypair()
    cfg = BrokerConfig(
        namespace=namespace,
        data="tcp://127.0.0.1:0",
        curve_secret_key=server_sec,
        curve_clients=(client_pub,),
    )
    socks: list[zmq.Socket[Any]] = []
    with Broker(cfg).start() as b, caplog.at_level(logging.WARNING, "shmcast.broker"):
        data = b.data_stats()
        assert data is not None
        assert b._data is not None
        allow = b._data._auth.credentials_providers["*"]
        try:
            for _ in range(20):  # a connection each: libzmq does not retry a refused one
                sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.curve_serverkey = server_pub.encode()
                sock.curve_publickey = stranger_pub.encode()
                sock.curve_secretkey = stranger_sec.encode()
                sock.connect(data.endpoint)
                socks.append(sock)
            wait_for(lambda: allow.denied >= 20, 10, what="20 refusals")
        finally:
            for sock in socks:
                sock.close(0)
    lines = [r for r in caplog.records if "refused a CURVE client" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def test_curve_refuses_unknown_clients(namespace: str) -> None:
    server_pub, server_sec = curve_keypair()
    client_pub, client_sec = curve_keypair()
    stranger_pub, stranger_sec = curve_keypair()
    b, t = _serve(
        BrokerConfig(
            namespace=namespace,
            control="tcp://127.0.0.1:0",
            events="tcp://127.0.0.1:0",
            curve_secret_key=server_sec,
            curve_clients=(client_pub,),
            heartbeat_interval=0.05,
        )
    )
    keys = (server_pub.encode(), client_pub.encode(), client_sec.encode())
    stranger = (server_pub.encode(), stranger_pub.encode(), stranger_sec.encode())
    try:
        assert b.endpoints is not None
        control, events = b.endpoints.control, b.endpoints.events
        for curve in (None, stranger):
            with (
                ControlClient(control, timeout=0.5, curve=curve) as c,
                pytest.raises(BrokerUnavailableError),
            ):
                c.request("hello")
        # A SUB without keys (or with unknown ones) receives nothing, heartbeats included.
        spies = []
        for curve in (None, stranger):
            spy: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
            spy.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                spy.curve_serverkey, spy.curve_publickey, spy.curve_secretkey = curve
            spy.setsockopt(zmq.SUBSCRIBE, b"")
            spy.connect(events)
            spies.append(spy)
        try:
            pub = Publisher("c", dtype="i8", shape=(2,), broker=control, curve=keys)
            sub = Subscriber("c", broker=control, curve=keys, timeout=5, wait="events")
            with pub, sub:
                deadline = time.monotonic() + 5
                got: list[int] = []
                while not got:
                    assert time.monotonic() < deadline, "the authenticated subscriber got nothing"
                    pub.publish(np.array([1, 2]))
                    got = [u.version for u in sub.updates(timeout=0.1)]
                assert sub._sub is not None
            for spy in spies:
                assert not spy.poll(300), "an unauthenticated SUB received events"
        finally:
            for spy in spies:
                spy.close(0)
    finally:
        b.stop()
        t.join(30)


def test_a_broker_restarted_without_the_group_takes_its_access_away(namespace: str) -> None:
    """Before, the segments and the namespace word a restarted broker adopted kept
    the earlier broker's group and mode (0640): the group read every later version,
    although the runtime directory went back to 0700."""
    import grp

    from shmcast.broker.client import shm_path

    if os.geteuid() != 0:
        pytest.skip("needs root to give the objects to group nogroup")
    nogroup = grp.getgrnam("nogroup").gr_gid
    word = shm_path(namespace, "@catalog")
    b, t = _serve(BrokerConfig(namespace=namespace, group="nogroup", mode=0o640))
    live = Publisher("secret", dtype="f8", shape=(4,), namespace=namespace)
    try:
        live.publish(np.ones(4))
        assert (_mode(live.segment.path), os.stat(live.segment.path).st_gid) == (0o640, nogroup)
        b.stop()
        t.join(30)  # the live writer's segment and the word stay for the next broker
        b, t = _serve(BrokerConfig(namespace=namespace))
        for path, mode in ((live.segment.path, 0o600), (word, 0o600 & 0o644)):
            st = os.stat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, os.getegid()), path
        assert _mode(runtime_dir(namespace)) == 0o700
    finally:
        live.close()
        b.stop()
        t.join(30)
