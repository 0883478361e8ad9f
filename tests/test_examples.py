"""Every runnable example in the README runs, with a deadline and a namespace of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, namespace: str) -> None:
    code = BLOCKS[index].replace('namespace="lab"', f'namespace="{namespace}"')
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "every example prints what it read"


def _sample_names(collector: object) -> set[str]:
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for family in collector.collect():  # type: ignore[attr-defined]
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_every_metric_the_readme_names_is_exported(namespace: str, tmp_path: Path) -> None:
    import numpy as np

    from shmcast.bridge import BridgeCollector, BridgeStats
    from shmcast.broker import Broker, BrokerConfig
    from shmcast.broker._metrics import BrokerCollector
    from shmcast.publisher import Publisher, Relay, RelayCollector, resolve_relay_config
    from shmcast.subscriber import Recorder, RecorderCollector, Subscriber, SubscriberCollector

    broker = Broker(BrokerConfig(namespace=namespace, data="tcp://127.0.0.1:0")).start()
    try:
        with (
            Publisher("m", dtype="f8", shape=1, namespace=namespace) as pub,
            Subscriber("m", namespace=namespace) as sub,
            Subscriber("m", namespace=namespace, wait="events") as events,
            Recorder("m", tmp_path / "m.h5", namespace=namespace) as rec,
        ):
            pub.publish(np.zeros(1))
            for _ in sub.updates(timeout=2):
                break
            relay = Relay(resolve_relay_config({"upstream": "tcp://127.0.0.1:1"}, environ={}))
            counts = {"sent": 1, "skipped": 0, "torn": 0, "received": 1, "stale": 0}
            counts |= {"upstream_up": True}
            bridge = BridgeStats(namespace, exported={"m": counts}, imported={"n": counts})
            exported = (
                _sample_names(BrokerCollector(broker.stats, broker.data_stats))
                | _sample_names(SubscriberCollector(sub))
                | _sample_names(SubscriberCollector(events))
                | _sample_names(RecorderCollector(rec))
                | _sample_names(RelayCollector(relay))
                | _sample_names(BridgeCollector(lambda: bridge))
            )
    finally:
        broker.close()
    documented = set(re.findall(r"\bshmcast_[a-z0-9_]+\b", (ROOT / "README.md").read_text()))
    documented = {n for n in documented if not n.endswith("_")}
    assert len(documented) > 20
    assert documented <= exported, sorted(documented - exported)


def test_the_readme_names_the_labels_of_the_subscriber_metrics(namespace: str) -> None:
    """Before, the README said every subscriber metric was labelled by `segment`;
    three are not (and every one is by `namespace`)."""
    import numpy as np

    from shmcast.broker import Broker, BrokerConfig
    from shmcast.publisher import Publisher
    from shmcast.subscriber import Subscriber, SubscriberCollector

    broker = Broker(BrokerConfig(namespace=namespace)).start()
    try:
        with (
            Publisher("m", dtype="f8", shape=1, namespace=namespace) as pub,
            Subscriber("m", namespace=namespace, wait="events") as sub,
        ):
            pub.publish(np.zeros(1))
            labels = {
                sample.name: set(sample.labels) - {"le"}
                for family in SubscriberCollector(sub).collect()
                for sample in family.samples
            }
    finally:
        broker.close()
    text = " ".join((ROOT / "README.md").read_text().split())
    said = re.search(r"by `segment` \(never by version\) except [^:]*: (.*?)\.", text)
    assert said, "the README does not say which subscriber metrics have no segment label"
    unsegmented = {n for n, keys in labels.items() if "segment" not in keys}
    assert unsegmented == set(re.findall(r"`(shmcast_\w+)`", said.group(1)))
    assert all(keys >= {"namespace", "subscriber"} for keys in labels.values())
