"""Every handle has the same discipline, and errors say what happened.

Broker and Relay: ``closed``, context manager, idempotent ``close()``, a
``ResourceWarning`` when dropped while serving. A second broker of a namespace
is refused at once. Ports in use, secret keys, the namespace's environment
default, and a Subscriber closed from another thread.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shmcast.broker import (
    Broker,
    BrokerConfig,
    BrokerRunningError,
    ClosedError,
    EndpointError,
    Segment,
    start_metrics_server,
)
from shmcast.broker.client import ControlClient, runtime_dir
from shmcast.cli._main import main
from shmcast.cli.testing import unique_namespace, wait_for
from shmcast.publisher import Publisher, Relay, RelayConfig
from shmcast.subscriber import Subscriber


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback TCP port that something else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_broker_is_a_handle_like_a_segment(namespace: str) -> None:
    broker = Broker(BrokerConfig(namespace=namespace))
    assert not broker.closed
    with broker.start() as b:
        assert b is broker
        assert not broker.closed
    assert broker.closed
    broker.close()  # idempotent
    assert broker.closed
    assert not runtime_dir(namespace).exists()
    with pytest.raises(ClosedError):
        broker.run()


def test_a_broker_that_never_ran_closes_quietly(namespace: str) -> None:
    broker = Broker(BrokerConfig(namespace=namespace))
    broker.close()
    assert broker.closed
    with pytest.raises(ClosedError):
        broker.start()


def test_dropping_a_serving_broker_warns(namespace: str) -> None:
    broker = Broker(BrokerConfig(namespace=namespace)).start()
    thread = broker._thread
    assert thread is not None
    with pytest.warns(ResourceWarning, match="not closed"):
        broker.__del__()
    thread.join(10)  # __del__ asked it to stop: it shuts down cleanly
    assert not thread.is_alive()
    assert broker.closed


def test_a_handle_dropped_open_warns_naming_it_and_lets_go(
    namespace: str, thread_broker: Broker
) -> None:
    """Segment, Publisher and Subscriber: collected while open, each warns
    (ResourceWarning, naming what it was) and closes, so its lease goes free."""
    seg = Segment.create("seg", np.uint8, (4,), namespace=namespace)
    with pytest.warns(ResourceWarning, match="segment 'seg' was not closed"):
        seg.__del__()
    assert seg.closed
    pub = Publisher("pub", dtype="u1", shape=4, namespace=namespace)
    with pytest.warns(ResourceWarning, match="publisher of 'pub' was not closed"):
        pub.__del__()
    sub = Subscriber("pub", namespace=namespace)
    with pytest.warns(ResourceWarning, match="subscriber was not closed"):
        sub.__del__()
    with Segment.attach("seg", namespace=namespace, writable=True) as again:
        again.write(np.ones(4, np.uint8))  # the dropped writer's lease went free
        again.unlink()
    with Publisher("pub", dtype="u1", shape=4, namespace=namespace) as pub2:
        assert pub2.publish(np.zeros(4, np.uint8)) == 1


def test_second_broker_of_a_namespace_is_refused_at_once(namespace: str) -> None:
    with Broker(BrokerConfig(namespace=namespace)).start():
        fds = _open_fds()
        second = Broker(BrokerConfig(namespace=namespace))
        t0 = time.monotonic()
        with pytest.raises(BrokerRunningError, match=str(os.getpid())):
            second.start(timeout=10)
        assert time.monotonic() - t0 < 2, "refused only after the start timeout"
        assert second.closed
        gc.collect()
        assert _open_fds() <= fds, "the refused broker leaked a file descriptor"
        # The running broker still serves, its runtime dir untouched.
        with Publisher("x", dtype="u1", shape=4, namespace=namespace) as pub:
            pub.publish(np.zeros(4, np.uint8))


def test_broker_honours_the_namespace_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from shmcast.cli.testing import unique_namespace

    ns = unique_namespace()
    monkeypatch.setenv("SHMCAST_NAMESPACE", ns)
    with Broker(BrokerConfig()).start() as broker:
        assert broker.namespace == ns
        assert runtime_dir(ns).is_dir()
        with Publisher("e", dtype="u1", shape=1) as pub:  # also from the environment
            assert pub.namespace == ns


@pytest.mark.parametrize("role", ["control", "control_ro", "events"])
def test_bind_errors_name_the_endpoint(namespace: str, busy_port: int, role: str) -> None:
    """Nothing is left in the runtime dir: before, a broker whose events bind
    failed left the control sockets it had bound there (and so the directory)."""
    endpoint = f"tcp://127.0.0.1:{busy_port}"
    cfg = BrokerConfig(namespace=namespace, tcp_open=True, **{role: endpoint})
    with pytest.raises(EndpointError, match=f"{role} endpoint {endpoint}"):
        Broker(cfg).start()
    assert not runtime_dir(namespace).exists()


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A directory of the test's own for ipc paths (short: a socket path has 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="shmcast-ipc-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_an_ipc_path_outside_the_runtime_dir_is_taken_only_from_a_dead_socket(
    namespace: str, ipc_dir: Path
) -> None:
    """Binding unlinked whatever sat at an explicit ipc path: a user's file, a
    directory (a traceback), another namespace's live broker socket (that broker
    kept running, unreachable). Only a socket file nobody listens on goes now."""
    notes = ipc_dir / "notes.txt"
    notes.write_text("important\n")
    (ipc_dir / "adir").mkdir()
    for path, what in ((notes, "a regular file"), (ipc_dir / "adir", "a directory")):
        with pytest.raises(EndpointError, match=f"{path} exists and is {what}"):
            Broker(BrokerConfig(namespace=namespace, control=f"ipc://{path}")).start()
    assert notes.read_text() == "important\n"
    assert (ipc_dir / "adir").is_dir()

    stale = ipc_dir / "control.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # closed unlistened: the file of a process gone
    shared = f"ipc://{stale}"
    other = unique_namespace("t")
    with Broker(BrokerConfig(namespace=namespace, control=shared)).start():
        with pytest.raises(EndpointError, match=f"a running process listens on {stale}"):
            Broker(BrokerConfig(namespace=other, control=shared)).start()
        with ControlClient(shared, timeout=5) as client:
            assert client.request("hello")["namespace"] == namespace


def test_a_broker_of_another_namespace_is_refused_before_any_request(
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """$SHMCAST_BROKER (every compose container sets it) naming namespace A's broker
    and -n B: `rm` deleted A's segment (exit 0), `ls`/`top` showed A's catalog as
    B's, a Publisher of B created its segment in A, and a Replayer compared the
    recorded layouts with A's segments. Each now asks `hello` first."""
    from shmcast.broker import NamespaceMismatchError
    from shmcast.broker.recording import SegmentLayout, open_writer
    from shmcast.publisher import Replayer

    other = unique_namespace("t")
    recording = tmp_path / "r.h5"
    with open_writer(str(recording), [SegmentLayout("rec", np.dtype("<f8"), (2,))]) as w:
        w.append("rec", [np.ones(2)], [1], [10])
    with Broker(BrokerConfig(namespace=namespace)).start() as b:
        assert b.endpoints is not None
        control = b.endpoints.control
        Publisher("frames", dtype="u1", shape=4, namespace=namespace).close()
        Publisher("rec", dtype="u1", shape=4, namespace=namespace).close()  # not as recorded
        monkeypatch.setenv("SHMCAST_BROKER", control)
        wrong = f"the broker at {control} serves namespace {namespace!r}, not {other!r}"
        for argv in (["rm", "frames"], ["ls", "--interval", "0"], ["top", "--once"]):
            assert main([*argv, "-n", other]) == 1, argv
            assert wrong in capsys.readouterr().err, argv
        with pytest.raises(NamespaceMismatchError, match=wrong):
            Publisher("newseg", dtype="u1", shape=4, namespace=other, broker=control)
        with pytest.raises(NamespaceMismatchError, match=wrong):
            Replayer(recording, namespace=other, broker=control)
        with pytest.raises(NamespaceMismatchError, match=f"{namespace!r}, not {other!r}"):
            Subscriber("frames", namespace=other, broker=control)  # via its read-only twin
        assert b.catalog.names() == ["frames", "rec"]
        # No namespace asked for: the default, which is not the broker's either.
        monkeypatch.delenv("SHMCAST_NAMESPACE")
        assert main(["rm", "frames"]) == 1
        assert "not 'default'" in capsys.readouterr().err
        assert main(["rm", "frames", "rec", "-n", namespace]) == 0
        assert b.catalog.names() == []


def test_metrics_port_in_use_is_one_clear_error(
    namespace: str, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from prometheus_client import CollectorRegistry

    with pytest.raises(EndpointError, match=f"127.0.0.1:{busy_port}.*--metrics-port"):
        start_metrics_server(CollectorRegistry(), busy_port)
    rc = main(["broker", "-n", namespace, "--metrics-port", str(busy_port)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1, err  # one line, no traceback
    assert f"127.0.0.1:{busy_port}" in err
    assert "Traceback" not in err


def test_metrics_server_serves_and_closes() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("probe_things", "things", registry=registry).inc(3)
    server = start_metrics_server(registry, 0)
    import urllib.request

    page = urllib.request.urlopen(server.url, timeout=5).read().decode()
    assert "probe_things_total 3.0" in page
    server.close()
    server.close()
    with socket.socket() as s:  # the port is free again (nobody listens)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))


def test_secret_keys_never_show_in_a_repr() -> None:
    from shmcast.broker import CurveKeys, curve_keypair

    public, secret = curve_keypair()
    texts = [
        repr(BrokerConfig(curve_secret_key=secret, curve_public_key=public)),
        repr(
            RelayConfig(
                upstream="tcp://127.0.0.1:1",
                curve_secret_key=secret,
                curve_public_key=public,
                curve_server_key=public,
            )
        ),
        repr(CurveKeys(secret, public)),
    ]
    for text in texts:
        assert secret not in text
        assert public in text  # the repr still says which keys


def test_relay_is_a_handle_like_a_segment(namespace: str) -> None:
    relay = Relay(RelayConfig(upstream="tcp://127.0.0.1:1", namespace=namespace))
    assert not relay.closed
    with relay:
        pass  # never served: closing is enough
    assert relay.closed
    relay.close()
    with pytest.raises(ClosedError):
        relay.run()


def test_relay_without_a_local_broker_fails_to_start(namespace: str) -> None:
    from shmcast.broker import BrokerUnavailableError

    relay = Relay(RelayConfig(upstream="tcp://127.0.0.1:1", namespace=namespace))
    with pytest.raises(BrokerUnavailableError):
        relay.start(timeout=30)
    assert relay.closed


@pytest.mark.parametrize("wait", ["shm", "events", "futex", "spin"])
def test_closing_a_subscriber_from_another_thread_ends_the_reader(
    namespace: str, wait: str
) -> None:
    with (
        Broker(BrokerConfig(namespace=namespace)).start(),
        Publisher("c", dtype="u1", shape=8, namespace=namespace) as pub,
    ):
        pub.publish(np.zeros(8, np.uint8))
        sub = Subscriber(["c"], namespace=namespace, wait=wait)  # type: ignore[arg-type]
        outcome: list[BaseException | str] = []

        def reader() -> None:
            try:
                for _ in sub.updates():
                    pass
                outcome.append("returned")
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        time.sleep(0.3)  # let it settle into its wait (no condition to poll for)
        sub.close()
        t.join(5)
        assert not t.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], ClosedError), outcome[0]
        with pytest.raises(ClosedError):
            next(iter(sub.updates()))


def test_a_reader_closed_while_publishing_goes_on_sees_closed(namespace: str) -> None:
    """The close lands while updates keep arriving (events mode), not only while idle."""
    with (
        Broker(BrokerConfig(namespace=namespace)).start(),
        Publisher("busy", dtype="u1", shape=8, namespace=namespace) as pub,
    ):
        sub = Subscriber(["busy"], namespace=namespace)
        errors: list[BaseException] = []
        got = threading.Event()

        def reader() -> None:
            try:
                for _ in sub.updates():
                    got.set()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                pub.publish(np.zeros(8, np.uint8))
                time.sleep(0.001)

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        try:
            wait_for(got.is_set, timeout=10, what="first update")
            sub.close()
            t.join(5)
        finally:
            stop.set()
            w.join(5)
        assert not t.is_alive()
        assert len(errors) == 1, errors
        assert isinstance(errors[0], ClosedError), errors
