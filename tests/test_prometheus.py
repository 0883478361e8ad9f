"""A real Prometheus server scrapes a broker, two subscribers and a recorder (issue 6).

Prometheus (Debian's ``prometheus`` package; ``make system-deps`` installs it)
runs on loopback with the project's own ``configs/prometheus.yml``, its targets
rewritten to this test's processes, its job names and alert rules kept, and a
0.5 s scrape interval. The test asks Prometheus's HTTP API for the series and
checks their values against what happened: 200 versions published.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    RECORD_READY,
    SUBSCRIBE_READY,
    ShmcastProcess,
    start,
    wait_for,
)
from shmcast.subscriber import LATENCY_BUCKETS

from ._obs_util import ROOT, free_port

yaml = pytest.importorskip("yaml")

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
COUNT = 200

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).is_file(),
    reason="prometheus is not installed (Debian package 'prometheus'; `make system-deps`)",
)


def _hostport(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _prom_config(broker: str, subscribers: list[str], recorders: list[str]) -> dict[str, Any]:
    """configs/prometheus.yml with this test's targets and a fast scrape interval.

    Three jobs: the recorders' was added with the recorder's metrics (``shmcast record
    --metrics-port``) and its alerts; the file ships it with no target (the compose
    deployment runs no recorder), so the test gives it one."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    config["global"].update(
        scrape_interval="500ms", scrape_timeout="400ms", evaluation_interval="500ms"
    )
    config["rule_files"] = [str(ROOT / "configs" / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"shmcast-broker", "shmcast-subscribers", "shmcast-recorders"}
    jobs["shmcast-broker"]["static_configs"][0]["targets"] = [broker]
    jobs["shmcast-subscribers"]["static_configs"][0]["targets"] = subscribers
    jobs["shmcast-recorders"]["static_configs"][0]["targets"] = recorders
    return config


class PromAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector"
        return list(data["result"])

    def values(self, expr: str, by: str) -> dict[str, float]:
        """``{label value: sample value}`` of an instant vector."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_prometheus_scrapes_broker_and_subscribers(namespace: str) -> None:
    procs: list[ShmcastProcess] = []
    prom: subprocess.Popen[bytes] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="shmcast-prom-"))
    try:
        broker = start(
            ["broker", "-n", namespace, "--metrics-port", "0", "--heartbeat", "0.2"],
            ready=BROKER_READY,
        )
        procs.append(broker)
        # The segment first (16 slots: a reader descheduled for a few publish intervals
        # still finds the versions in the ring), so that the subscribers are there
        # from its first version and account for every one.
        from shmcast.publisher import Publisher, make_feed

        feed = make_feed("ticks")
        Publisher(
            "ticks",
            dtype=feed.dtype,
            shape=feed.shape,
            slots=16,
            namespace=namespace,
            broker=broker.ready["control"],
        ).close()
        subs = {}
        for name in ("strategy", "recorder"):
            sp = start(
                [
                    *("subscribe", "ticks", "-n", namespace, "--quiet", "--stats"),
                    *("--metrics-port", "0", "--name", name),
                ],
                ready=SUBSCRIBE_READY,
            )
            procs.append(sp)
            subs[name] = sp
        archive = start(
            [
                *("record", "ticks", "-n", namespace, "-o", str(workdir / "ticks.h5")),
                *("--metrics-port", "0", "--name", "archive"),
            ],
            ready=RECORD_READY,
        )
        procs.append(archive)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        config = _prom_config(
            _hostport(broker.ready["metrics"]),
            [_hostport(sp.ready["metrics"]) for sp in subs.values()],
            [_hostport(archive.ready["metrics"])],
        )
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run(
            [
                str(Path(PROMETHEUS).with_name("promtool")),
                *("check", "config", str(workdir / "prometheus.yml")),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in finally)
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def alive_and_ready() -> bool:
            assert prom is not None
            if prom.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited {prom.returncode}: "
                    + (workdir / "prometheus.log").read_text()[-2000:]
                )
            return _ready(base)

        wait_for(alive_and_ready, 30, 0.1, "prometheus ready")
        api = PromAPI(base)

        # Publish a known number of versions, then let Prometheus catch up.
        pub = start(
            [
                *("publish", "ticks", "-n", namespace, "--source", "ticks"),
                *("--rate", "400", "--count", str(COUNT), "--slots", "16"),
            ],
            ready=PUBLISH_READY,
        )
        procs.append(pub)
        assert pub.wait(30) == 0
        sel = f'namespace="{namespace}"'

        def settled() -> bool:
            published = api.values(f"shmcast_versions_published_total{{{sel}}}", "segment")
            seen = api.values(f"shmcast_subscriber_version{{{sel}}}", "subscriber")
            recorded = api.values(f"shmcast_recorder_version{{{sel}}}", "recorder")
            return (
                published == {"ticks": COUNT}
                and seen == {"strategy": COUNT, "recorder": COUNT}
                and recorded == {"archive": COUNT}
            )

        wait_for(settled, 30, 0.25, "Prometheus to hold the final counts")

        up = api.values('up{job=~"shmcast-.*"}', "job")
        assert up == {"shmcast-broker": 1.0, "shmcast-subscribers": 1.0, "shmcast-recorders": 1.0}
        assert len(api.query('up{job="shmcast-subscribers"} == 1')) == 2
        assert api.values(f"shmcast_segment_version{{{sel}}}", "segment") == {"ticks": COUNT}
        broker_up = api.query(f"shmcast_broker_up{{{sel}}}")
        assert {r["metric"]["job"] for r in broker_up} == {"shmcast-broker", "shmcast-subscribers"}
        assert all(float(r["value"][1]) == 1.0 for r in broker_up)

        # Every version reached each subscriber: delivered, or counted missed, overrun
        # or torn (they read each version exactly, in place).
        updates = api.values(f"shmcast_updates_received_total{{{sel}}}", "subscriber")
        lost = {
            metric: api.values(f"{metric}{{{sel}}}", "subscriber")
            for metric in (
                "shmcast_versions_missed_total",
                "shmcast_versions_overrun_total",
                "shmcast_torn_reads_total",
            )
        }
        for name in subs:
            total = updates[name] + sum(v[name] for v in lost.values())
            assert total == COUNT, (name, updates, lost)
            # How many were delivered depends on the host: a reader descheduled on a busy
            # one for longer than the ring holds loses versions (counted above).
            assert updates[name] > 0, (name, updates, lost)

        # The recorder: every version written to its file or counted missed (by cause).
        def archived() -> bool:
            written = api.values(f"shmcast_recorder_versions_recorded_total{{{sel}}}", "recorder")
            missed = api.query(f"sum(shmcast_recorder_versions_missed_total{{{sel}}})")
            return written.get("archive", 0) + float(missed[0]["value"][1]) == COUNT

        wait_for(archived, 30, 0.25, "Prometheus to hold the recorder's final counts")
        flush_age = api.values(f"shmcast_recorder_flush_age_seconds{{{sel}}}", "recorder")
        assert 0 <= flush_age["archive"] < 10

        # The latency histogram: buckets from 1 us to 100 ms and +Inf, cumulative,
        # +Inf equal to the versions learnt (delivered, overrun or torn: all but missed).
        for name in subs:
            learnt = COUNT - lost["shmcast_versions_missed_total"][name]
            rows = api.query(
                f'shmcast_publish_to_read_latency_seconds_bucket{{{sel},subscriber="{name}"}}'
            )
            buckets = {float(r["metric"]["le"]): float(r["value"][1]) for r in rows}
            assert set(buckets) == {*LATENCY_BUCKETS, math.inf}
            assert min(buckets) == 1e-6
            assert max(b for b in buckets if b != math.inf) == 0.1
            ordered = [buckets[b] for b in sorted(buckets)]
            assert ordered == sorted(ordered)
            assert buckets[math.inf] == learnt
            count = api.values(
                f'shmcast_publish_to_read_latency_seconds_count{{{sel},subscriber="{name}"}}',
                "subscriber",
            )
            assert count == {name: learnt}
        p99 = api.query(
            "histogram_quantile(0.99, sum by (le, subscriber) "
            f"(shmcast_publish_to_read_latency_seconds_bucket{{{sel}}}))"
        )
        assert len(p99) == 2
        assert all(float(r["value"][1]) > 0 for r in p99)

        # Staleness: the feed stopped, so the latest version is old, and ageing.
        stale = api.values(f"shmcast_staleness_seconds{{{sel}}}", "subscriber")
        assert set(stale) == set(subs)
        assert all(v >= 0 for v in stale.values())
        age = api.values(f"shmcast_segment_age_seconds{{{sel}}}", "segment")
        assert set(age) == {"ticks"}
        assert api.values(f"shmcast_shm_size_bytes{{{sel}}}", "namespace")[namespace] > 0

        print(  # shown with -s: what Prometheus holds
            f"published={COUNT} updates={updates} lost={lost} staleness={stale} "
            f"p99={[(r['metric']['subscriber'], r['value'][1]) for r in p99]}"
        )

        # The project's alert rules are loaded, and none fires on this healthy run.
        groups = api.get("/api/v1/rules")["groups"]
        names = {r["name"] for g in groups for r in g["rules"]}
        assert {"ShmcastSegmentStale", "ShmcastBrokerDown", "ShmcastTornReadsRising"} <= names
        assert {"ShmcastRecorderFlushStalled", "ShmcastRecorderDown"} <= names
        firing = [a for a in api.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
        assert firing == []
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(10)
        for sp in reversed(procs):
            sp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_subscriber_label_is_the_subscribers_own_name(namespace: str) -> None:
    """``Subscriber(..., name="risk")`` reports to ``shmcast top`` as ``risk``; before,
    ``serve_metrics(sub, port)`` labelled its metrics ``subscriber="subscriber"``
    all the same (every subscriber of a process alike)."""
    import numpy as np

    from shmcast.broker import Segment
    from shmcast.subscriber import Subscriber, SubscriberCollector

    seg = Segment.create("lbl", "f8", (1,), namespace=namespace)
    try:
        with Subscriber("lbl", namespace=namespace, wait="futex", name="risk") as sub:
            seg.write(np.zeros(1))

            def labels(collector: SubscriberCollector) -> set[str]:
                return {s.labels["subscriber"] for f in collector.collect() for s in f.samples}

            assert labels(SubscriberCollector(sub)) == {"risk"}
            assert labels(SubscriberCollector(sub, name="probe")) == {"probe"}
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])
def test_a_metrics_host_that_is_no_address_here_is_named_as_the_fix(host: str) -> None:
    """A host that does not resolve, or is no address of this machine: before, the
    error's fix was "pick another --metrics-port", which cannot help."""
    from prometheus_client import CollectorRegistry

    from shmcast.broker import EndpointError, start_metrics_server

    with pytest.raises(EndpointError, match="--metrics-host") as info:
        start_metrics_server(CollectorRegistry(), 0, host=host)
    assert "--metrics-port" not in str(info.value)


@pytest.mark.parametrize("host", ["", " ", 5, None])
def test_a_metrics_host_that_is_empty_is_refused_not_every_interface(host: object) -> None:
    """An empty host (``--metrics-host "$HOST"`` with the variable unset, or
    ``metrics_host = ""`` in a file) was taken by the socket layer for every
    interface: the metrics were served beyond the host, at ``http://:PORT/metrics``.
    A number in a file was a TypeError traceback at start."""
    from prometheus_client import CollectorRegistry

    from shmcast.bridge import BridgeConfig
    from shmcast.broker import BrokerConfig, ConfigError, start_metrics_server
    from shmcast.publisher import RelayConfig

    server = None
    try:
        with pytest.raises(ConfigError, match=r"metrics_host.*every interface"):
            server = start_metrics_server(CollectorRegistry(), 0, host=host)  # type: ignore[arg-type]
    finally:
        if server is not None:
            server.close()
    for make in (
        lambda: BrokerConfig(metrics_port=0, metrics_host=host),  # type: ignore[arg-type]
        lambda: RelayConfig(upstream="tcp://127.0.0.1:9", metrics_host=host),  # type: ignore[arg-type]
        lambda: BridgeConfig(
            listen=("tcp/127.0.0.1:0",),
            exports=("*",),
            metrics_host=host,  # type: ignore[arg-type]
        ),
    ):
        with pytest.raises(ConfigError, match="metrics_host"):
            make()


def test_a_metrics_endpoint_holds_a_bounded_number_of_connections() -> None:
    """The metrics port is every local user's (loopback TCP). Before, each idle
    connection held a thread and a descriptor for ever: a reviewer's 121 of them
    took a subscriber (open-files limit 128) to ``EMFILE``, and its next segment
    could not be attached. Beyond the bound, connections are closed at once."""
    import socket
    import threading

    from prometheus_client import CollectorRegistry

    from shmcast.broker import start_metrics_server

    bound = 16  # broker._metrics.MAX_CONNECTIONS

    def handlers() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    def at_eof(client: socket.socket) -> bool:
        client.setblocking(False)
        try:
            return client.recv(1) == b""
        except BlockingIOError:
            return False

    server = start_metrics_server(CollectorRegistry(), 0)
    clients: list[socket.socket] = []
    try:
        for _ in range(2 * bound):
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        wait_for(
            lambda: handlers() + sum(map(at_eof, clients)) >= len(clients),
            10,
            0.05,
            "every connection held by a thread or closed",
        )
        assert handlers() <= bound
    finally:
        for client in clients:
            client.close()
        server.close()


def test_idle_connections_never_keep_a_scrape_out() -> None:
    """With the bound, any local user's idle connections (as many as the bound)
    closed every scrape at once, for as long as they were held (re-opened each
    10 s): Prometheus never got a sample. A new connection now takes the place of
    the one that has waited longest for its request."""
    import socket
    import threading

    from prometheus_client import CollectorRegistry, Counter

    from shmcast.broker import start_metrics_server

    bound = 16  # broker._metrics.MAX_CONNECTIONS

    def handlers() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    registry = CollectorRegistry()
    Counter("scraped_thing", "a sample to find", registry=registry).inc()
    server = start_metrics_server(registry, 0)
    idle: list[socket.socket] = []
    try:
        for _ in range(bound):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        wait_for(lambda: handlers() >= bound, 10, 0.02, "every idle connection held")
        for _ in range(3):
            with urllib.request.urlopen(server.url, timeout=10) as resp:
                assert b"scraped_thing_total 1.0" in resp.read()
        assert handlers() <= bound
    finally:
        for client in idle:
            client.close()
        server.close()
