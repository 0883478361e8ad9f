"""configs/: scrape config and alert rules pass promtool, alerts fire in promtool's
unit tests, and the dashboard and rules use only metric names the code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shmcast.broker import Broker, BrokerConfig
from shmcast.broker._metrics import BrokerCollector
from shmcast.cli.testing import unique_namespace
from shmcast.subscriber._metrics import SubscriberCollector
from shmcast.subscriber._subscriber import SegmentStats

from ._obs_util import ROOT

yaml = pytest.importorskip("yaml")

CONFIGS = ROOT / "configs"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).is_file(),
    reason="promtool is not installed (Debian package 'prometheus'; `make system-deps`)",
)

#: Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=CONFIGS
    )


@needs_promtool
def test_promtool_checks_rules_and_config() -> None:
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_alerts_fire_in_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path) -> None:
    # The unit tests have teeth: an alert that can never fire fails them.
    broken = (CONFIGS / "alerts.yml").read_text().replace("> 30", "> 1e9", 1)
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(CONFIGS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "ShmcastSegmentStale" in result.stdout + result.stderr


def _alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((CONFIGS / "alerts.yml").read_text())
    return [r for g in data["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_the_issue_asks_for_exists_and_has_a_unit_test() -> None:
    names = {r["alert"] for r in _alert_rules()}
    wanted = {
        "ShmcastSegmentStale",
        "ShmcastBrokerDown",
        "ShmcastTornReadsRising",
        "ShmcastVersionsMissedRising",
        "ShmcastShmNearlyFull",
        # A recorder losing versions (any cause), its writing stalled, its target down.
        "ShmcastRecorderVersionsMissed",
        "ShmcastRecorderFlushStalled",
        "ShmcastRecorderDown",
    }
    assert wanted <= names
    tests = yaml.safe_load((CONFIGS / "alerts_test.yml").read_text())["tests"]
    fired = {
        t["alertname"]
        for case in tests
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    silent = {
        t["alertname"]
        for case in tests
        for t in case.get("alert_rule_test", [])
        if not t.get("exp_alerts")
    }
    assert fired == names, "every alert fires in some unit test"
    # ... and each is shown silent on healthy series (an empty exp_alerts, or a
    # healthy series next to the failing one that is not in exp_alerts).
    assert {"ShmcastBrokerDown", "ShmcastShmNearlyFull", "ShmcastSegmentStale"} <= silent
    assert {a for a in names if a.startswith("ShmcastRecorder")} <= silent
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def _exported_metric_names() -> set[str]:
    """The sample names the collectors export, collected by running them."""
    names: set[str] = set()
    broker = Broker(BrokerConfig(namespace=unique_namespace()))
    stats = SegmentStats(updates=1, last_version=1, last_ts=1)
    stats.observe(1e-5)
    fake_sub = SimpleNamespace(
        namespace="x",
        mode="events",
        stats={"seg": stats},
        broker_up=True,
        events_missed=0,
        bad_messages=0,
        staleness=lambda seg, now=None: 1.0,
    )
    collectors = [
        BrokerCollector(broker.stats, broker.data_stats),
        SubscriberCollector(fake_sub, name="s"),
    ]  # type: ignore[arg-type]
    for collector in collectors:
        for family in collector.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def test_collectors_export_the_names_the_docs_promise() -> None:
    names = _exported_metric_names()
    for name in (
        "shmcast_versions_published_total",
        "shmcast_updates_received_total",
        "shmcast_versions_missed_total",
        "shmcast_versions_overrun_total",
        "shmcast_torn_reads_total",
        "shmcast_staleness_seconds",
        "shmcast_publish_to_read_latency_seconds_bucket",
        "shmcast_broker_up",
        "shmcast_shm_free_bytes",
        "shmcast_shm_size_bytes",
    ):
        assert name in names


_METRIC = re.compile(r"\bshmcast_[a-z0-9_]+\b")
# identifiers that are PromQL functions, keywords or label names, not metric names
_NOT_METRICS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right|and|or|unless|bool|offset)\b"
)


def _expressions_of_dashboard() -> list[str]:
    dash = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            # label_values(metric, label): the metric is the expression
            exprs.append(re.sub(r"label_values\((.+),\s*\w+\)", r"\1", var["definition"]))
    return exprs


def _bare_metric_names(expr: str) -> set[str]:
    """Every name in a PromQL expression used as a metric (not a label, function)."""
    text = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    text = re.sub(  # label lists: by (...), on (...), group_right (...)
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )
    text = _NOT_METRICS.sub(" ", text)
    names = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text):
        word = m.group(1)
        if not re.fullmatch(r"\d.*|e\d+|[0-9.]+", word):
            names.add(word)
    return names


def test_dashboard_is_grafana_json_using_only_exported_metrics() -> None:
    dash = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
    assert dash["title"]
    assert dash["uid"]
    assert dash["panels"]
    exported = _exported_metric_names()
    exprs = _expressions_of_dashboard()
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        names = set(_METRIC.findall(expr))
        assert names, f"no shmcast metric in {expr!r}"
        assert names <= exported, f"{expr!r} uses {sorted(names - exported)}"
        assert _bare_metric_names(expr) <= exported | {"le"}, expr
        used |= names
    # The dashboard shows what the issue names.
    for name in (
        "shmcast_versions_published_total",
        "shmcast_updates_received_total",
        "shmcast_publish_to_read_latency_seconds_bucket",
        "shmcast_staleness_seconds",
        "shmcast_torn_reads_total",
        "shmcast_versions_missed_total",
        "shmcast_versions_overrun_total",
        "shmcast_shm_free_bytes",
    ):
        assert name in used, name


def test_alert_rules_use_only_exported_metrics() -> None:
    exported = _every_exported_name()
    for rule in _alert_rules():
        names = set(_METRIC.findall(rule["expr"]))
        assert names <= exported, f"{rule['alert']} uses {sorted(names - exported)}"
        assert _bare_metric_names(rule["expr"]) <= exported | PROMETHEUS_SERIES, rule["expr"]


def _every_exported_family() -> dict[str, str]:
    """``{family name: type}`` of every service's collector: the broker's with a data
    stream, a subscriber's in ``events`` mode, a recorder's, a relay's and a Zenoh
    bridge's."""
    from shmcast.bridge import BridgeCollector, BridgeStats
    from shmcast.broker import BrokerStats
    from shmcast.broker._datastream import DataStreamStats
    from shmcast.publisher import RelayCollector, RelayStats
    from shmcast.subscriber import RecorderCollector, RecorderStats

    def broker_stats() -> BrokerStats:
        return BrokerStats(
            namespace="x", epoch=1, seq=0, segments=(), published={}, sources={}, requests=0,
            errors={}, clients=0, shm_used=0, shm_free=0, shm_total=0, started=0.0,
        )  # fmt: skip

    def data_stats() -> DataStreamStats:
        return DataStreamStats(
            endpoint="", peers=0, sent=0, sent_bytes=0, torn=0, copied=0, dropped=0
        )

    relay = SimpleNamespace(
        stats=lambda: RelayStats(
            upstream="tcp://127.0.0.1:9", namespace="x", upstream_up=True, reconnects=0, silence_s=0
        )
    )
    fake_sub = SimpleNamespace(
        namespace="x", mode="events", stats={}, broker_up=True, events_missed=0,
        bad_messages=0, staleness=lambda seg, now=None: None,
    )  # fmt: skip
    fake_rec = SimpleNamespace(
        namespace="x", name="r", stats=lambda: {"seg": RecorderStats()},
        queued=lambda: {"seg": 0}, flush_age=lambda: 0.0, size=lambda: 0,
    )  # fmt: skip
    collectors = [
        BrokerCollector(broker_stats, data_stats),
        SubscriberCollector(fake_sub, name="s"),  # type: ignore[arg-type]
        RecorderCollector(fake_rec),  # type: ignore[arg-type]
        RelayCollector(relay),  # type: ignore[arg-type]
        BridgeCollector(lambda: BridgeStats(namespace="x")),
    ]
    return {f.name: f.type for c in collectors for f in c.collect()}


def _every_exported_name() -> set[str]:
    """Every sample name of :func:`_every_exported_family` (``_total`` and all)."""
    families = _every_exported_family()
    return set(families) | {
        name + suffix for name, kind in families.items() for suffix in _SUFFIXES[kind]
    }


#: The docs that name metrics, in backquotes.
_METRIC_DOCS = ["README.md", "docs/ARCHITECTURE.md", "docs/RELIABILITY.md", "docker/README.md"]


def test_every_metric_the_docs_name_is_exported() -> None:
    """A name in the docs that no collector exports cannot be found in Prometheus:
    docs/RELIABILITY.md said ``shmcast_bridge_refused_total``, whose name is
    ``shmcast_bridge_refused_samples_total``."""
    exported = _every_exported_name()
    for doc in _METRIC_DOCS:
        named = set(re.findall(r"`(shmcast_[a-z0-9_]+)(?:\{[^}`]*\})?`", (ROOT / doc).read_text()))
        assert named - exported == set(), doc


def test_the_readme_names_every_metric_exported() -> None:
    """README.md's Metrics section lists what each service exports (before, it left
    out ``shmcast_segment_size_bytes``)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name, kind in sorted(_every_exported_family().items())
        if f"`{name}{_SUFFIXES[kind][0] if kind == 'counter' else ''}" not in section
    ]
    assert missing == []


def test_the_readme_names_every_kind_of_broker_error() -> None:
    """``shmcast_broker_errors_total{kind}``: each kind the broker counts is named in
    the README (before: none but ``events_reset``, ``too_many_frames`` and
    ``report_refused``, in docs/RELIABILITY.md only). The kinds are read from the
    broker's source: each ``_count_error("kind")``; the rest are the names of the
    error classes a request was answered with."""
    source = (ROOT / "broker" / "_broker.py").read_text()
    kinds = set(re.findall(r'_count_error\("(\w+)"\)', source))
    assert {"BadRequest", "events_reset"} <= kinds  # the pattern still finds them
    assert "_count_error(type(exc).__name__)" in source
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    assert sorted(k for k in kinds if f"`{k}`" not in section) == []
    assert "`shmcast.broker.errors`" in section  # where the class names come from
