"""The broker's Prometheus metrics: a custom collector over :meth:`Broker.stats`.

Counters stay plain integers on the hot path; the metric families are built
only when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._broker import Broker


class BrokerCollector(Collector):
    """Exports ``shmcast_broker_*`` and per-segment metrics of one broker."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        st = self._broker.stats()
        ns = st.namespace
        for family, name, help_text, value in (
            (GaugeMetricFamily, "shmcast_broker_up", "1 while the broker serves", 1.0),
            (GaugeMetricFamily, "shmcast_broker_segments", "Segments the broker owns",
             len(st.segments)),
            (GaugeMetricFamily, "shmcast_shm_used_bytes",
             "Shared memory taken by the broker's segments", st.shm_used),
            (GaugeMetricFamily, "shmcast_shm_free_bytes", "Free bytes in /dev/shm", st.shm_free),
            (GaugeMetricFamily, "shmcast_shm_size_bytes", "Size of /dev/shm", st.shm_total),
            (GaugeMetricFamily, "shmcast_broker_clients",
             "Control clients heard from in the last 30 s", st.clients),
            (CounterMetricFamily, "shmcast_broker_requests", "Control requests received",
             st.requests),
        ):  # fmt: skip
            fam = family(name, help_text, labels=["namespace"])
            fam.add_metric([ns], value)
            yield fam
        errors = CounterMetricFamily(
            "shmcast_broker_errors",
            "Requests answered with an error, and dropped messages, by kind",
            labels=["namespace", "kind"],
        )
        for kind, n in sorted(st.errors.items()):
            errors.add_metric([ns, kind], n)
        yield errors
        published = CounterMetricFamily(
            "shmcast_versions_published",
            "Versions committed to a segment (announced by the broker)",
            labels=["namespace", "segment"],
        )
        version = GaugeMetricFamily(
            "shmcast_segment_version", "Latest committed version", labels=["namespace", "segment"]
        )
        age = GaugeMetricFamily(
            "shmcast_segment_age_seconds",
            "Age of the latest version (staleness at the source)",
            labels=["namespace", "segment"],
        )
        size = GaugeMetricFamily(
            "shmcast_segment_size_bytes",
            "Shared memory of one segment (all slots and header)",
            labels=["namespace", "segment"],
        )
        writer = GaugeMetricFamily(
            "shmcast_segment_writer_up",
            "1 while a process holds the segment's writer lease",
            labels=["namespace", "segment"],
        )
        now = time.time_ns()
        for info in st.segments:
            labels = [ns, info.name]
            published.add_metric(labels, st.published.get(info.name, 0))
            version.add_metric(labels, info.version)
            ref = info.timestamp_ns or info.created_ns
            age.add_metric(labels, max(0.0, (now - ref) / 1e9))
            size.add_metric(labels, info.size)
            writer.add_metric(labels, 1.0 if info.writer_alive else 0.0)
        yield published
        yield version
        yield from _data_stream(self._broker, ns)
        yield age
        yield size
        yield writer


def _data_stream(broker: Broker, ns: str) -> Iterator[Metric]:
    """The relay data stream's counters (when the broker offers one)."""
    data = broker.data_stats()
    if data is None:
        return
    peers = GaugeMetricFamily(
        "shmcast_data_relays", "Relays connected to the data stream", labels=["namespace"]
    )
    peers.add_metric([ns], data.peers)
    yield peers
    for name, value, help_text in (
        ("shmcast_data_sent_versions", data.sent, "Versions sent to relays"),
        ("shmcast_data_sent_bytes", data.sent_bytes, "Payload bytes sent to relays"),
        ("shmcast_data_torn_sends", data.torn, "Zero-copy sends overwritten in flight (voided)"),
        ("shmcast_data_copied_sends", data.copied, "Versions sent from a checked private copy"),
        ("shmcast_data_dropped", data.dropped, "Versions not sent: a relay's window was full"),
    ):
        fam = CounterMetricFamily(name, help_text, labels=["namespace"])
        fam.add_metric([ns], value)
        yield fam
