"""Relays on one host: explicit versions in the engine, and a relay over loopback TCP.

Two namespaces stand for two hosts (the network-namespace tests in
``test_relay_netns.py`` do it for real); everything here runs without root.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmcast.broker import Broker, BrokerConfig, Segment
from shmcast.broker.client import ControlClient, resolve_endpoint
from shmcast.broker.errors import SegmentError, SegmentNotFoundError
from shmcast.cli._cmd_relay import READY as RELAY_READY
from shmcast.cli.testing import BROKER_READY, running, unique_namespace, wait_for
from shmcast.publisher import Created, LocalBroker, MirrorSpec, Publisher
from tests._curve import curve_broker, curve_file


def test_write_and_loan_take_an_explicit_version_only_forward(namespace: str) -> None:
    with Segment.create("v", np.int64, (4,), namespace=namespace) as seg:
        try:
            assert seg.write(np.full(4, 1, np.int64)) == 1
            assert seg.write(np.full(4, 7, np.int64), version=7) == 7
            with seg.loan(version=9) as arr:
                arr[:] = 9
            with Segment.attach("v", namespace=namespace) as reader:
                snap = reader.latest()
                assert snap.version == 9
                assert (snap.array == 9).all()
            for bad in (9, 3, 0):
                with pytest.raises(SegmentError, match="versions only go forward"):
                    seg.write(np.zeros(4, np.int64), version=bad)
                with (
                    pytest.raises(SegmentError, match="versions only go forward"),
                    seg.loan(version=bad),
                ):
                    pass  # pragma: no cover
            assert seg.version == 9
            assert seg.write(np.full(4, 10, np.int64)) == 10  # numbering goes on from there
        finally:
            seg.unlink()


def _catalog(endpoint: str, name: str) -> dict[str, object] | None:
    with ControlClient(endpoint, timeout=2.0) as client:
        for entry in client.request("list")["segments"]:
            if entry["name"] == name:
                return dict(entry)
    return None


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            total += float(m.group(2))
    return total


def test_relay_over_loopback_mirrors_versions_intact() -> None:
    up_ns, down_ns = unique_namespace(), unique_namespace()
    up_env = {"SHMCAST_NAMESPACE": up_ns}
    down_env = {"SHMCAST_NAMESPACE": down_ns}
    with (
        running(
            ["broker", "--data", "tcp://127.0.0.1:0", "--heartbeat", "0.1", "--metrics-port", "0"],
            ready=BROKER_READY,
            env=up_env,
        ) as upstream,
        running(["broker"], ready=BROKER_READY, env=down_env) as local,
    ):
        data_ep = upstream.ready["data"]
        assert data_ep.startswith("tcp://127.0.0.1:")
        ticks = Publisher("ticks", dtype=np.int64, shape=(128,), namespace=up_ns)
        other = Publisher("other", dtype=np.float32, shape=(8,), namespace=up_ns)
        try:
            for _ in range(5):  # before the relay starts: it must join at version 5
                ticks.publish(np.full(128, ticks.version + 1, np.int64))
            other.publish(np.ones(8, np.float32))
            with running(
                ["relay", "--upstream", data_ep, "--segments", "tick*", "--metrics-port", "0"],
                ready=RELAY_READY,
                env=down_env,
            ) as relay:
                assert relay.ready["upstream"] == data_ep
                control = local.ready["control"]
                wait_for(
                    lambda: (_catalog(control, "ticks") or {}).get("version") == 5,
                    10,
                    what="the late-joining relay to mirror version 5",
                )
                entry = _catalog(control, "ticks")
                assert entry is not None
                assert entry["source"] == f"relay:{data_ep}"
                assert entry["upstream_up"] is True
                assert _catalog(control, "other") is None  # not matched by tick*
                with Segment.attach("ticks", namespace=down_ns) as mirror:
                    assert mirror.dtype == np.int64
                    assert mirror.shape == (128,)
                    assert mirror.slots == 2
                    snap = mirror.latest()
                    assert snap.version == 5
                    assert (snap.array == 5).all()
                    for _ in range(200):
                        ticks.publish(np.full(128, ticks.version + 1, np.int64))
                        snap = mirror.latest()
                        assert (snap.array == snap.version).all()
                    wait_for(lambda: mirror.version == 205, 10, what="catching up to 205")
                    assert (mirror.latest().array == 205).all()
                    # The upstream's commit time comes along with its version number.
                    with Segment.attach("ticks", namespace=up_ns) as up:
                        assert mirror.latest().timestamp_ns == up.latest().timestamp_ns
                url = relay.ready["metrics"]
                assert _metric(url, "shmcast_relay_upstream_up") == 1.0
                received = _metric(url, "shmcast_relay_versions_received_total")
                skipped = _metric(url, "shmcast_relay_versions_skipped_total")
                assert received >= 1
                assert received + skipped == 201  # 5..205: each one committed or counted
                # The upstream broker's side of the same traffic, in its metrics.
                up_url = upstream.ready["metrics"]
                assert _metric(up_url, "shmcast_data_relays") == 1.0
                sent = _metric(up_url, "shmcast_data_sent_versions_total")
                torn = _metric(up_url, "shmcast_data_torn_sends_total")
                assert sent >= received
                assert sent - torn <= 201
        finally:
            ticks.close()
            other.close()


def test_relay_never_commits_a_torn_send() -> None:
    """A writer lapping a 2-slot ring of 1 MiB frames tears zero-copy sends; the relay
    must drop those, and every version a local reader sees must be whole."""
    up_ns, down_ns = unique_namespace(), unique_namespace()
    with (
        running(
            ["broker", "--data", "tcp://127.0.0.1:0"],
            ready=BROKER_READY,
            env={"SHMCAST_NAMESPACE": up_ns},
        ) as upstream,
        running(["broker"], ready=BROKER_READY, env={"SHMCAST_NAMESPACE": down_ns}) as local,
        running(
            ["relay", "--upstream", upstream.ready["data"], "--metrics-port", "0"],
            ready=RELAY_READY,
            env={"SHMCAST_NAMESPACE": down_ns},
        ) as relay,
    ):
        n = 2**17  # 1 MiB of float64
        pub = Publisher("frames", dtype=np.float64, shape=(n,), namespace=up_ns)
        stop = threading.Event()

        def write() -> None:
            while not stop.is_set():
                with pub.loan() as arr:
                    arr.fill(pub.version + 1)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            control = local.ready["control"]
            wait_for(lambda: _catalog(control, "frames"), 10, what="the mirror")
            with Segment.attach("frames", namespace=down_ns) as mirror:
                seen = set()
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline or len(seen) < 3:
                    if mirror.version:
                        snap = mirror.latest()
                        assert snap.array[0] == snap.version
                        assert (snap.array == snap.version).all()
                        seen.add(snap.version)
                    if time.monotonic() > deadline + 10:
                        break
                assert len(seen) >= 3
        finally:
            stop.set()
            writer.join()
            pub.close()
        torn = _metric(relay.ready["metrics"], "shmcast_relay_torn_sends_total")
        received = _metric(relay.ready["metrics"], "shmcast_relay_versions_received_total")
        assert received >= 3
        # Torn sends happen (and are discarded) when the writer laps libzmq; the
        # fallback to validated copies keeps versions flowing either way.
        assert torn >= 0


def test_relay_re_registers_its_mirrors_with_a_restarted_local_broker() -> None:
    import signal

    from shmcast.cli.testing import start

    up_ns, down_ns = unique_namespace(), unique_namespace()
    up_env = {"SHMCAST_NAMESPACE": up_ns}
    down_env = {"SHMCAST_NAMESPACE": down_ns}
    local_args = ["broker", "--heartbeat", "0.1"]
    with running(
        ["broker", "--data", "tcp://127.0.0.1:0", "--heartbeat", "0.1"],
        ready=BROKER_READY,
        env=up_env,
    ) as upstream:
        local = start(local_args, ready=BROKER_READY, env=down_env)
        again = None
        pub = Publisher("feed", dtype=np.int32, shape=(4,), namespace=up_ns)
        try:
            pub.publish(np.full(4, 1, np.int32))
            with running(
                ["relay", "--upstream", upstream.ready["data"]], ready=RELAY_READY, env=down_env
            ):
                source = f"relay:{upstream.ready['data']}"

                def entry(control: str) -> dict[str, object]:
                    return _catalog(control, "feed") or {}

                wait_for(lambda: entry(local.ready["control"]).get("version") == 1, 10)
                assert entry(local.ready["control"])["source"] == source
                local.send_signal(signal.SIGKILL)
                local.wait(10)
                again = start(local_args, ready=BROKER_READY, env=down_env)
                assert again.ready["segments"] == ["feed"]  # adopted ...
                # ... and the relay tells the new broker again that it is relayed.
                wait_for(
                    lambda: entry(again.ready["control"]).get("source") == source,
                    10,
                    what="the relay to re-register its mirror",
                )
                pub.publish(np.full(4, 2, np.int32))
                with Segment.attach("feed", namespace=down_ns) as mirror:
                    wait_for(lambda: mirror.version == 2, 10, what="version 2 relayed")
                    assert (mirror.latest().array == 2).all()
        finally:
            pub.close()
            if again is not None:
                again.stop()
            local.stop()


def test_a_segment_deleted_upstream_is_deleted_on_the_relay_side() -> None:
    up_ns, down_ns = unique_namespace(), unique_namespace()
    with (
        running(
            ["broker", "--data", "tcp://127.0.0.1:0", "--heartbeat", "0.1"],
            ready=BROKER_READY,
            env={"SHMCAST_NAMESPACE": up_ns},
        ) as upstream,
        running(["broker"], ready=BROKER_READY, env={"SHMCAST_NAMESPACE": down_ns}) as local,
    ):
        with (
            Publisher("stays", dtype=np.int8, shape=(4,), namespace=up_ns) as stays,
            Publisher("goes", dtype=np.int8, shape=(4,), namespace=up_ns) as goes,
        ):
            stays.publish(np.ones(4, np.int8))
            goes.publish(np.ones(4, np.int8))
        with running(
            ["relay", "--upstream", upstream.ready["data"]],
            ready=RELAY_READY,
            env={"SHMCAST_NAMESPACE": down_ns},
        ):
            control = local.ready["control"]
            wait_for(
                lambda: Segment.list(down_ns) == ["goes", "stays"],
                10,
                what="both segments mirrored",
            )
            with ControlClient(upstream.ready["control"]) as up:
                up.request("delete", name="goes")
            wait_for(lambda: Segment.list(down_ns) == ["stays"], 10, what="the mirror deleted")
            assert _catalog(control, "goes") is None
            assert (_catalog(control, "stays") or {}).get("version") == 1


def test_a_mirror_never_takes_over_a_segment_fed_by_another(thread_broker: object) -> None:
    """A relay's or bridge's create (with a ``source``) of a name a local publisher
    feeds, or another upstream's mirror holds, is refused before anything changes:
    it used to relabel the segment, and the mirror's writer then overwrote it."""
    from shmcast.broker.errors import LayoutConflictError

    ns = thread_broker.namespace  # type: ignore[attr-defined]
    with Publisher("data", dtype="u8", shape=(4,), namespace=ns) as pub:
        pub.publish(np.arange(4, dtype=np.uint64))
    with ControlClient(f"ipc://{_runtime(ns)}/control.sock") as c:
        layout = {"dtype": "<u8", "shape": [4], "slots": 2}
        for name, source in (("data", "zenoh:shmcast/x/data"), ("data", "relay:tcp://h:1")):
            with pytest.raises(LayoutConflictError, match="exists as a local segment"):
                c.request("create", name=name, source=source, **layout)
        assert c.request("describe", name="data")["source"] == "local"
        c.request("create", name="m", source="relay:tcp://h:1", **layout)
        c.request("create", name="m", source="relay:tcp://h:1", upstream_up=False, **layout)
        with pytest.raises(LayoutConflictError, match="mirror of relay:tcp://h:1"):
            c.request("create", name="m", source="zenoh:shmcast/x/m", **layout)
        assert c.request("describe", name="m")["source"] == "relay:tcp://h:1"
    with Segment.attach("data", namespace=ns) as seg:
        assert seg.version == 1
        assert list(seg.latest().array) == [0, 1, 2, 3]


def _runtime(namespace: str) -> str:
    from shmcast.broker.client import runtime_dir

    return str(runtime_dir(namespace))


def _mirror_made(namespace: str, spec: MirrorSpec) -> Publisher:
    """The publisher a relay's :class:`LocalBroker` makes for ``spec`` (a run of it)."""
    client = ControlClient(resolve_endpoint(None, namespace), timeout=2.0)
    local = LocalBroker(
        client,
        epoch=client.request("hello")["epoch"],
        namespace=namespace,
        broker=None,
        source="relay:tcp://127.0.0.1:1",
        timeout=2.0,
    )
    try:
        local.create(spec)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            done = local.results()
            if done:
                assert isinstance(done[0], Created), done
                return done[0].pub
            time.sleep(0.01)
        raise AssertionError("no mirror made within 5 s")
    finally:
        local.close()


class _GatedClient:
    """A control client whose requests wait for ``gate`` (the local thread busy: what
    is asked meanwhile queues), and that notes each one."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client
        self.gate = threading.Event()
        self.done = threading.Event()
        self.asked: list[tuple[str, str, object]] = []

    def request(self, kind: str, **kw: Any) -> Any:
        self.gate.wait(10)
        if kw.get("name") == "last":
            self.done.set()
        reply = self.client.request(kind, **kw)
        self.asked.append((kind, kw.get("name", ""), kw.get("upstream_up")))  # answered
        return reply

    def close(self) -> None:
        self.client.close()


def test_catalog_marks_are_told_in_the_order_they_were_asked(namespace: str) -> None:
    """``LocalBroker.annotate`` keeps the latest mark of each name queued for one
    job: a later mark joined the job queued before a restart check or a delete
    asked after it, and went ahead of them. A mirror's upstream, marked down,
    then up, around a check of a restarted local broker (its marks: down) ended
    down in the catalog; a mark asked after a delete was told before it. A mark
    joins only the job queued last (one job for the marks of a flapping token
    still, whatever number of changes)."""
    src = "relay:tcp://127.0.0.1:1"
    layout = ("<u8", (4,), 2)
    with Broker(BrokerConfig(namespace=namespace)).start():
        client = ControlClient(resolve_endpoint(None, namespace), timeout=2.0)
        for name in ("m", "n"):
            client.request("create", name=name, source=src, dtype="<u8", shape=[4], slots=2)
        gated = _GatedClient(client)
        # Another epoch: the check takes the local broker for restarted.
        local = LocalBroker(
            gated,  # type: ignore[arg-type]
            epoch=object(),
            namespace=namespace,
            broker=None,
            source=src,
            timeout=2.0,
        )
        try:
            local.annotate([("m", layout)], False)
            local.check_marks([("m", layout, src, False)])
            local.annotate([("m", layout)], True)
            local.annotate([("n", layout)], False)
            local.delete("n")
            local.annotate([("n", layout)], True)
            local.delete("last")
            gated.gate.set()
            assert gated.done.wait(10)
            with ControlClient(resolve_endpoint(None, namespace)) as c:
                assert c.request("describe", name="m")["upstream_up"] is True
            told = [(k, n, up) for k, n, up in gated.asked if n == "n" and k != "describe"]
            # The mark asked after the delete is of a mirror deleted: not told.
            assert told == [("create", "n", False), ("delete", "n", None)]
        finally:
            local.close()
            with ControlClient(resolve_endpoint(None, namespace)) as c:
                c.request("delete", name="m")


class _DeletingClient:
    """A control client that deletes ``name`` (``shmcast rm --force``) as soon as the
    first request naming it is answered, and sets ``done`` at a request naming
    ``"done"``."""

    def __init__(self, client: ControlClient, name: str) -> None:
        self.client = client
        self.name = name
        self.done = threading.Event()
        self.deleted = False

    def request(self, kind: str, **kw: Any) -> Any:
        if kw.get("name") == "done":
            self.done.set()
        reply = self.client.request(kind, **kw)
        if kw.get("name") == self.name and not self.deleted:
            self.deleted = True
            self.client.request("delete", name=self.name, force=True)
        return reply

    def close(self) -> None:
        self.client.close()


def test_a_mirror_deleted_while_its_mark_is_told_stays_deleted(namespace: str) -> None:
    """A mirror deleted here (``shmcast rm --force``) just as its relay or bridge
    told the catalog of it (its upstream up or down; made) stays deleted. The mark
    was a ``describe``, then a ``create``: a deletion between the two was not seen,
    and the create made the mirror again, empty and written by nobody, until the
    upstream's next version (a bridge test caught it on a loaded host). The broker
    now checks in the create itself (``existing``)."""
    src = "relay:tcp://127.0.0.1:1"
    with Broker(BrokerConfig(namespace=namespace)).start():
        client = ControlClient(resolve_endpoint(None, namespace), timeout=2.0)
        client.request("create", name="m", source=src, dtype="<u8", shape=[4], slots=2)
        deleting = _DeletingClient(client, "m")
        local = LocalBroker(
            deleting,  # type: ignore[arg-type]
            epoch=client.request("hello")["epoch"],
            namespace=namespace,
            broker=None,
            source=src,
            timeout=2.0,
        )
        try:
            local.annotate([("m", ("<u8", (4,), 2))], False)
            local.delete("done")  # after the mark, in the same thread
            assert deleting.done.wait(10)
            assert deleting.deleted
            assert "m" not in Segment.list(namespace)
            with (
                ControlClient(resolve_endpoint(None, namespace)) as c,
                pytest.raises(SegmentNotFoundError),
            ):
                c.request("describe", name="m")
        finally:
            local.close()


def test_a_restarted_relay_writes_on_into_its_mirror_of_the_same_upstream_incarnation(
    thread_broker: object, namespace: str
) -> None:
    """The mirror an earlier (killed) run left, of the upstream incarnation the new run
    receives, is written on: local readers see the same incarnation go on (made
    afresh, they counted the versions they had from it as missed again). One of
    another upstream incarnation is made afresh, as before."""
    dt = np.dtype("u4")
    layout = ("<u4", (4,), 2)

    def spec(incarnation: int, first: int) -> MirrorSpec:
        return MirrorSpec("fr", dt, (4,), 2, layout, 0, incarnation, first=first)

    pub = _mirror_made(namespace, spec(77, 1))
    local_incarnation = pub.segment.incarnation
    for v in range(1, 6):
        pub.publish_bytes(np.full(4, v, dt).tobytes(), version=v, timestamp_ns=v)
    pub.close()  # the run's end: no live writer (as a killed one's)

    pub = _mirror_made(namespace, spec(77, 9))  # the same upstream incarnation, at 9
    try:
        assert pub.segment.incarnation == local_incarnation
        assert pub.version == 5
        pub.publish_bytes(np.full(4, 9, dt).tobytes(), version=9, timestamp_ns=9)
    finally:
        pub.close()

    pub = _mirror_made(namespace, spec(78, 3))  # upstream made again meanwhile
    try:
        assert pub.segment.incarnation != local_incarnation
        assert pub.version == 0
    finally:
        pub.close()


def test_relay_takes_the_local_curve_brokers_keys_and_says_curve_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shmcast relay`` could give no CURVE keys to its LOCAL broker (one with
    curve_secret_key), though the refused handshake's error named ``--curve-keys``:
    an unrecognized argument (exit 2). Now it takes them (its mirrors' publishers
    too), and without them the error still says CURVE."""
    from shmcast.broker import Broker, BrokerConfig, curve_keypair
    from shmcast.cli._main import main
    from shmcast.publisher import _relay

    up_ns, down_ns = unique_namespace(), unique_namespace()
    server_pub, server_sec = curve_keypair()
    client_pub, client_sec = curve_keypair()
    keys = curve_file(tmp_path / "keys.toml", server_pub, client_pub, client_sec)
    curve = (server_pub, client_pub, client_sec)
    upstream = Broker(BrokerConfig(namespace=up_ns, data="tcp://127.0.0.1:0")).start()
    local = curve_broker(down_ns, server_sec, client_pub)
    ticks = None
    try:
        assert upstream.endpoints is not None
        assert local.endpoints is not None
        control = local.endpoints.control
        ticks = Publisher("ticks", dtype=np.int64, shape=(4,), namespace=up_ns)
        ticks.publish(np.full(4, 1, np.int64))
        with ControlClient(upstream.endpoints.control, timeout=2.0) as client:
            data_ep = client.request("hello")["data"]
        argv = ["relay", "-n", down_ns, "--broker", control, "--upstream", data_ep]
        with running([*argv, "--curve-keys", str(keys)], ready=RELAY_READY) as relay:
            assert relay.ready["broker"] == control

            def mirrored() -> bool:
                with ControlClient(control, timeout=2.0, curve=curve) as client:
                    names = {e["name"] for e in client.request("list")["segments"]}
                return "ticks" in names

            wait_for(mirrored, 10, what="the relay to mirror ticks into the CURVE broker")
        monkeypatch.setattr(_relay, "LOCAL_TIMEOUT", 0.5)  # the refusal, sooner
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "CURVE" in err, err
        assert "--curve-keys" in err, err
    finally:
        if ticks is not None:
            ticks.close()
        local.close()
        upstream.close()
        for ns in (up_ns, down_ns):
            Segment.remove("ticks", namespace=ns)
