"""A subscriber's and a recorder's Prometheus metrics, built from their counters at
scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from shmcast.broker import MetricsServer, start_metrics_server

from ._stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._recorder import Recorder
    from ._subscriber import Subscriber

__all__ = ["RecorderCollector", "SubscriberCollector", "serve_metrics", "serve_recorder_metrics"]

#: The causes of a recorder's missed versions (``RecorderStats`` fields), its
#: ``shmcast_recorder_versions_missed_total`` label ``cause``.
MISSED_CAUSES = ("lapped", "torn", "dropped", "unwritten")


class SubscriberCollector(Collector):
    """Exports one subscriber's ``shmcast_*`` metrics, labelled by namespace and
    subscriber, and all but ``shmcast_broker_up``, ``shmcast_events_missed_total`` and
    ``shmcast_bad_messages_total`` by segment too."""

    def __init__(self, subscriber: Subscriber, *, name: str | None = None) -> None:
        self._sub = subscriber
        #: The ``subscriber`` label: the subscriber's own name (what ``shmcast top``
        #: shows of its reports) unless told otherwise.
        self._name = subscriber.name if name is None else name

    def collect(self) -> Iterator[Metric]:
        sub = self._sub
        ns = sub.namespace
        labels = ["namespace", "subscriber", "segment"]
        # The four version counters: per segment they add up to the versions published.
        updates = CounterMetricFamily(
            "shmcast_updates_received",
            "Versions delivered (updates handed out; a read one only if its read completed)",
            labels=labels,
        )
        missed = CounterMetricFamily(
            "shmcast_versions_missed",
            "Versions never learnt of (gaps in the announcements or the headers), or never "
            "handed out (counted at close)",
            labels=labels,
        )
        overrun = CounterMetricFamily(
            "shmcast_versions_overrun",
            "Versions learnt of but lapped by the writer before their read could start",
            labels=labels,
        )
        torn = CounterMetricFamily(
            "shmcast_torn_reads",
            "Versions whose read started but failed validation (overwritten meanwhile), "
            "or whose copy raised before it was done",
            labels=labels,
        )
        stale = GaugeMetricFamily(
            "shmcast_staleness_seconds", "Age of the latest version seen", labels=labels
        )
        version = GaugeMetricFamily(
            "shmcast_subscriber_version", "Latest version this subscriber saw", labels=labels
        )
        latency = HistogramMetricFamily(
            "shmcast_publish_to_read_latency_seconds",
            "From the commit to the subscriber having the version",
            labels=labels,
        )
        now = time.monotonic_ns()
        for seg, st in list(sub.stats.items()):
            lv = [ns, self._name, seg]
            updates.add_metric(lv, st.updates)
            missed.add_metric(lv, st.missed)
            overrun.add_metric(lv, st.overrun)
            torn.add_metric(lv, st.torn)
            version.add_metric(lv, st.last_version)
            # Staleness on the monotonic clock: a clock step neither fires nor hides it.
            age = sub.staleness(seg, now)
            if age is not None:
                stale.add_metric(lv, age)
            cum = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), st.buckets, strict=False):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
            latency.add_metric(lv, buckets, st.latency_sum)
        yield updates
        yield missed
        yield overrun
        yield torn
        yield stale
        yield version
        yield latency
        broker_up = sub.broker_up
        if broker_up is not None:
            up = GaugeMetricFamily(
                "shmcast_broker_up",
                "1 while the broker's heartbeats arrive (as this subscriber sees it)",
                labels=["namespace", "subscriber"],
            )
            up.add_metric([ns, self._name], 1.0 if broker_up else 0.0)
            yield up
        if sub.mode == "events":
            gaps = CounterMetricFamily(
                "shmcast_events_missed",
                "Announcements lost (gaps in the per-topic sequence numbers)",
                labels=["namespace", "subscriber"],
            )
            gaps.add_metric([ns, self._name], sub.events_missed)
            yield gaps
            bad = CounterMetricFamily(
                "shmcast_bad_messages",
                "Malformed announcements dropped",
                labels=["namespace", "subscriber"],
            )
            bad.add_metric([ns, self._name], sub.bad_messages)
            yield bad


def serve_metrics(
    subscriber: Subscriber,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    name: str | None = None,
    registry: CollectorRegistry | None = None,
) -> MetricsServer:
    """Serve a subscriber's metrics over HTTP (``.url``; ``.close()`` stops it).

    Args:
        subscriber: whose counters to export.
        port: 0 picks a free port.
        host: address to bind (loopback by default).
        name: the ``subscriber`` label (default: ``subscriber.name``, the name its
            reports to the broker give).
        registry: where to register the collector (a new registry by default).

    Raises:
        EndpointError: the port cannot be bound.
    """
    registry = registry or CollectorRegistry(auto_describe=True)
    registry.register(SubscriberCollector(subscriber, name=name))
    return start_metrics_server(registry, port, host=host)


class RecorderCollector(Collector):
    """Exports one recorder's ``shmcast_recorder_*`` metrics, labelled by namespace
    and recorder, and all but the file's by segment too: per segment, the versions
    since the recording started are ``recorded``, ``missed`` (by ``cause``) or
    queued; every ``*_total`` only goes up."""

    def __init__(self, recorder: Recorder, *, name: str | None = None) -> None:
        self._rec = recorder
        #: The ``recorder`` label: the recorder's own name unless told otherwise.
        self._name = recorder.name if name is None else name

    def collect(self) -> Iterator[Metric]:
        rec = self._rec
        base = ["namespace", "recorder"]
        labels = [*base, "segment"]
        recorded = CounterMetricFamily(
            "shmcast_recorder_versions_recorded",
            "Versions written to the recording file (counted once written: never taken back)",
            labels=labels,
        )
        missed = CounterMetricFamily(
            "shmcast_recorder_versions_missed",
            "Versions of the recorded span not in the file, by cause: lapped (left the "
            "ring before their copy), torn, dropped (no free buffer: the disk was slower "
            "than the stream), unwritten (writing failed)",
            labels=[*labels, "cause"],
        )
        nbytes = CounterMetricFamily(
            "shmcast_recorder_recorded_bytes",
            "Bytes of the versions written (their arrays, before compression)",
            labels=labels,
        )
        deleted = CounterMetricFamily(
            "shmcast_recorder_deleted",
            "Times the segment was deleted while recorded",
            labels=labels,
        )
        version = GaugeMetricFamily(
            "shmcast_recorder_version", "Latest version copied out for the file", labels=labels
        )
        queued = GaugeMetricFamily(
            "shmcast_recorder_queued_versions",
            "Versions copied out and not written yet (the disk's backlog, with those a "
            "Parquet writer buffers for its next row group)",
            labels=labels,
        )
        queued_now = rec.queued()
        for seg, st in rec.stats().items():
            lv = [rec.namespace, self._name, seg]
            recorded.add_metric(lv, st.recorded)
            for cause in MISSED_CAUSES:
                missed.add_metric([*lv, cause], getattr(st, cause))
            nbytes.add_metric(lv, st.recorded_bytes)
            deleted.add_metric(lv, st.deleted)
            version.add_metric(lv, st.last_version)
            queued.add_metric(lv, queued_now.get(seg, 0))
        yield recorded
        yield missed
        yield nbytes
        yield deleted
        yield version
        yield queued
        lv = [rec.namespace, self._name]
        age = GaugeMetricFamily(
            "shmcast_recorder_flush_age_seconds",
            "Seconds since the file was last flushed (what a reader of the growing file "
            "lacks, what a crash would lose); grows for ever once writing stopped",
            labels=base,
        )
        age.add_metric(lv, rec.flush_age())
        yield age
        size = GaugeMetricFamily(
            "shmcast_recorder_file_size_bytes",
            "Bytes of the recording's files on disk",
            labels=base,
        )
        size.add_metric(lv, rec.size())
        yield size


def serve_recorder_metrics(
    recorder: Recorder,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    name: str | None = None,
    registry: CollectorRegistry | None = None,
) -> MetricsServer:
    """Serve a recorder's metrics over HTTP (``.url``; ``.close()`` stops it), as
    :func:`serve_metrics` does a subscriber's.

    Args:
        recorder: whose counters to export.
        port: 0 picks a free port.
        host: address to bind (loopback by default).
        name: the ``recorder`` label (default: ``recorder.name``).
        registry: where to register the collector (a new registry by default).

    Raises:
        EndpointError: the port cannot be bound.
    """
    registry = registry or CollectorRegistry(auto_describe=True)
    registry.register(RecorderCollector(recorder, name=name))
    return start_metrics_server(registry, port, host=host)
