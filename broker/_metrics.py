"""Prometheus metrics: the broker's collector, and the one HTTP server every service uses.

Counters stay plain integers on the hot path; the metric families are built
only when Prometheus scrapes (a custom collector over a ``stats()`` snapshot).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from ._names import validate_metrics_host
from ._segment import SegmentInfo
from .errors import EndpointError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._datastream import DataStreamStats

__all__ = ["BrokerCollector", "BrokerStats", "MetricsServer", "start_metrics_server"]


@dataclass(frozen=True)
class BrokerStats:
    """A snapshot of the broker's counters (turned into metrics at scrape time)."""

    namespace: str
    epoch: int
    seq: int
    segments: tuple[SegmentInfo, ...]
    published: dict[str, int]
    sources: dict[str, str]
    requests: int
    errors: dict[str, int]
    clients: int
    shm_used: int
    shm_free: int
    shm_total: int
    started: float
    subscriptions: int = 0


class BrokerCollector(Collector):
    """Exports ``shmcast_broker_*`` and per-segment metrics of one broker.

    Args:
        stats: returns the broker's counters (called at each scrape).
        data_stats: returns the data stream's counters, or None when it is off.
    """

    def __init__(
        self,
        stats: Callable[[], BrokerStats],
        data_stats: Callable[[], DataStreamStats | None],
    ) -> None:
        self._stats = stats
        self._data_stats = data_stats

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
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
            (GaugeMetricFamily, "shmcast_broker_subscriptions",
             "Distinct topics subscribed on the events endpoint", st.subscriptions),
            (CounterMetricFamily, "shmcast_broker_requests", "Control requests received",
             st.requests),
        ):  # fmt: skip
            fam = family(name, help_text, labels=["namespace"])
            fam.add_metric([ns], value)
            yield fam
        errors = CounterMetricFamily(
            "shmcast_broker_errors",
            "Requests answered with an error, refused objects and endpoint resets, by kind",
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
        now = time.monotonic_ns()
        created_now = time.time_ns()
        for info in st.segments:
            labels = [ns, info.name]
            published.add_metric(labels, st.published.get(info.name, 0))
            version.add_metric(labels, info.version)
            seconds = info.age_s(now)  # monotonic: a clock step neither fires nor hides it
            if seconds is None:  # nothing published yet: the age of the segment itself
                seconds = max(0.0, (created_now - info.created_ns) / 1e9)
            age.add_metric(labels, seconds)
            size.add_metric(labels, info.size)
            writer.add_metric(labels, 1.0 if info.writer_alive else 0.0)
        yield published
        yield version
        yield from _data_stream(self._data_stats(), ns)
        yield age
        yield size
        yield writer


def _data_stream(data: DataStreamStats | None, ns: str) -> Iterator[Metric]:
    """The relay data stream's counters (when the broker offers one)."""
    if data is None:
        return
    peers = GaugeMetricFamily(
        "shmcast_data_relays", "Relays connected to the data stream", labels=["namespace"]
    )
    peers.add_metric([ns], data.peers)
    yield peers
    up = GaugeMetricFamily(
        "shmcast_data_stream_up",
        "1 while the data stream serves (0: restarting after a failure)",
        labels=["namespace"],
    )
    up.add_metric([ns], 1.0 if data.up else 0.0)
    yield up
    missing = GaugeMetricFamily(
        "shmcast_data_stream_missing_segments",
        "Segments the data stream cannot open (retried; e.g. out of file descriptors)",
        labels=["namespace"],
    )
    missing.add_metric([ns], len(data.missing))
    yield missing
    for name, value, help_text in (
        ("shmcast_data_stream_restarts", data.restarts, "Restarts of the data stream"),
        (
            "shmcast_data_stream_failures",
            data.failures,
            "Failures of the data stream (its thread, or opening a segment)",
        ),
        ("shmcast_data_refused_relays", data.refused, "Relays refused (max_relays)"),
        (
            "shmcast_data_bad_messages",
            data.bad_messages,
            "Messages from relays refused: malformed, or over a limit",
        ),
        ("shmcast_data_sent_versions", data.sent, "Versions sent to relays"),
        ("shmcast_data_sent_bytes", data.sent_bytes, "Payload bytes sent to relays"),
        ("shmcast_data_torn_sends", data.torn, "Zero-copy sends overwritten in flight (voided)"),
        ("shmcast_data_copied_sends", data.copied, "Versions sent from a checked private copy"),
        (
            "shmcast_data_dropped",
            data.dropped,
            "Versions not sent to a relay: its connection's queue was full",
        ),
    ):
        fam = CounterMetricFamily(name, help_text, labels=["namespace"])
        fam.add_metric([ns], value)
        yield fam


#: Connections a metrics endpoint holds at once. Its port is every local user's
#: (loopback TCP): without a bound, idle connections each held a thread and a
#: descriptor of the service for ever, until it ran out of descriptors (a subscriber
#: then failed to attach its next segment).
MAX_CONNECTIONS = 16
#: Seconds a connection may stay silent before it is closed (a scrape takes ms).
IDLE_TIMEOUT = 10.0
#: Seconds a new connection waits for the one it evicts to be let go (microseconds).
EVICT_WAIT = 0.5


class _Server(ThreadingMixIn, WSGIServer):
    """At most :data:`MAX_CONNECTIONS` connections, each with its thread. When all are
    held, a new one takes the place of the one that has waited longest for its
    request (closed): a scrape sends its request at once, so connections left idle
    (any local user's) can never keep Prometheus out, however many they are. Only
    when every one is in the middle of a request is a new connection refused."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the listen backlog: a burst of connections waits, not drops

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._held = threading.Condition()
        self._live = 0  # connections with a thread (each holds a descriptor)
        #: Connections that have not sent their request yet, oldest first.
        self._waiting: dict[Any, None] = {}
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._held:
            if self._live >= MAX_CONNECTIONS and self._waiting:
                victim = next(iter(self._waiting))
                del self._waiting[victim]
                with contextlib.suppress(OSError):
                    victim.shutdown(socket.SHUT_RDWR)  # its read ends: its thread exits
                self._held.wait_for(lambda: self._live < MAX_CONNECTIONS, EVICT_WAIT)
            if self._live >= MAX_CONNECTIONS:
                admitted = False  # every connection is being answered
            else:
                admitted = True
                self._live += 1
                self._waiting[request] = None
        if not admitted:
            self.shutdown_request(request)  # closed, never served
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._let_go(request)  # no thread took it (cannot start one)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # closes it
        finally:
            self._let_go(request)

    def _let_go(self, request: Any) -> None:
        with self._held:
            self._waiting.pop(request, None)
            self._live -= 1
            self._held.notify_all()

    def request_read(self, request: Any) -> bool:
        """The request of ``request`` has been read: it is answered, never evicted.
        False when it was evicted meanwhile (its socket is shut: nothing to send)."""
        with self._held:
            if request not in self._waiting:
                return False
            del self._waiting[request]
            return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went silent (IDLE_TIMEOUT) or away: nothing to print
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT  # read from the class when each connection is set up
    server: _Server

    def parse_request(self) -> bool:
        return super().parse_request() and self.server.request_read(self.request)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer:
    """A ``/metrics`` endpoint served from a daemon thread; :meth:`close` stops it.

    Make one with :func:`start_metrics_server`.
    """

    def __init__(self, server: WSGIServer, host: str) -> None:
        self._server = server
        self.host = host
        self.port: int = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/metrics"
        self._closed = False
        self._thread = threading.Thread(
            target=server.serve_forever, name="shmcast-metrics", daemon=True
        )
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop serving and free the port. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}{' closed' if self._closed else ''}>"


def start_metrics_server(
    registry: CollectorRegistry, port: int = 0, *, host: str = "127.0.0.1"
) -> MetricsServer:
    """Serve ``registry`` over HTTP at ``http://host:port/metrics`` from a thread.

    The same on every prometheus-client release we support (``start_http_server``
    returns nothing before 0.20).

    Args:
        registry: what to serve (each service has its own, never the global one).
        port: TCP port; 0 picks a free one (see ``MetricsServer.port``).
        host: address to bind; loopback unless told otherwise (``0.0.0.0`` or ``::``
            for every interface; an empty one is refused, not taken for those).

    Raises:
        ConfigError: ``host`` is no non-empty string.
        EndpointError: the address cannot be bound (in use, no permission, bad host).
    """
    host = validate_metrics_host(host)
    server_class = _Server6 if ":" in host else _Server
    try:
        server = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        fix = None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            # Not the port: the host is no address of this machine.
            fix = "give an address of this host as --metrics-host (127.0.0.1 by default)"
        raise EndpointError("metrics", f"{host}:{port}", exc.strerror or str(exc), fix=fix) from exc
    return MetricsServer(server, host)
