"""The relay: mirror an upstream broker's segments into this host's broker.

A client of two brokers: the relay connects a DEALER to an upstream broker's
data stream (the messages, and why they are sound, are described with the
data stream in ``shmcast.broker``), and for each
segment matching its patterns it acts as the local segment's publisher: it
creates-or-gets the segment in the local broker (same name, dtype, shape and
slots; catalog ``source`` = ``"relay:<upstream>"``), takes the writer lease, and
commits every version it receives under the upstream's version number and
commit time (``Publisher.publish_bytes(..., version=v, timestamp_ns=ts)``), then
announces it like any publisher. Local subscribers read it zero-copy and cannot
tell it from a local segment except by ``source`` (and ``upstream_up``) in the
catalog.

- A received version is committed only after the upstream's ``ok`` verdict, so a
  send torn by the upstream writer never reaches a local reader.
- Latest value: versions the relay never commits (skipped upstream because the
  relay or the link was slower, or torn) are counted per segment
  (``shmcast_relay_versions_skipped_total``), from version 1 for a segment made
  (or made again) upstream while the relay runs; nothing queues without bound (the
  upstream keeps at most ``window`` messages in flight, and the relay holds no
  more than that). What is counted of each incarnation runs from that first
  version (else from the first one received) to the last one received. In no
  counter: a segment's versions before the first one received when the upstream
  served it already as the relay joined (a late joiner starts from the latest);
  those an incarnation committed after the last one received, before it was
  deleted or made again (the stream sends only latest versions, and a
  heartbeat's latest carries no incarnation to say whose it is); and an
  incarnation that came and went upstream with none of its versions sent. A
  segment deleted upstream (missing from a heartbeat) loses its mirror, not its
  counters: a name that comes back counts on from them (its new incarnation from
  version 1), as for a new incarnation. Those of the ``MAX_DELETED`` (1024) names
  last deleted are kept; an older deletion's, and those of a name that counted
  no version, are forgotten (names come and go upstream without bound): each
  name forgotten past that cap is counted (``shmcast_relay_forgotten_names_total``).
- Bounds: a data header is checked (version, commit time, the payload's size
  against its layout) before a mirror is made or dropped for it, and at most
  ``max_mirrors`` mirrors of at most ``max_mirror_bytes`` each are held, none that
  would leave less than ``SHM_RESERVE`` (10%) of /dev/shm free; versions beyond
  are refused and counted (``shmcast_relay_refused_versions_total``).
- Silence: with no message for ``heartbeat_timeout`` (default 3 upstream
  heartbeats + 0.2 s) the upstream is reported down (metric
  ``shmcast_relay_upstream_up``, catalog ``upstream_up: false``); the local
  segments keep their last data. ZeroMQ reconnects by itself; the relay says
  ``hello`` again (with the versions it has) and catches up to the latest.
- An upstream segment that was recreated (a new incarnation id in the data
  header, or a new layout) is recreated locally: local readers then see a new
  incarnation too and follow it, whatever the new version numbers.
- Requests to the local broker (creating a mirror, the catalog's
  ``upstream_up``, deletions, the restart check) run in a thread of their own
  (``_relay_local``): a stalled local broker never stalls the data loop. A
  mirror the local broker refused (or did not answer for) is tried again,
  after 1 s, then twice as long each time up to 30 s. A mirror whose local
  header went corrupt (a ``latest`` beyond any real version) is recreated too.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from shmcast.broker import (
    MetricsServer,
    Service,
    dtype_str,
    is_z85_key,
    normalize_layout,
    parse_dtype,
    resolve_layers,
    segment_size,
    start_metrics_server,
)
from shmcast.broker.client import (
    HELLO_ALLOWANCE,
    MAX_REQUEST,
    MAX_VERSION,
    NAMESPACE_ENV,
    ControlClient,
    CurveKeyTriple,
    client_curve,
    pack,
    resolve_endpoint,
    resolve_namespace,
    unpack,
    validate_metrics_host,
    validate_namespace,
    validate_segment_name,
)
from shmcast.broker.errors import ConfigError, EndpointError, ShmcastError

from ._publisher import Publisher
from ._relay_local import Created, LocalBroker, MirrorSpec, shm_shortfall, turn_incarnation

__all__ = ["Relay", "RelayCollector", "RelayConfig", "RelayStats", "resolve_relay_config"]

log = logging.getLogger(__name__)

MAX_HEADER = 64 * 1024
Layout = tuple[str, tuple[int, ...], int]


#: Seconds between checks that the local broker is the one the mirrors were
#: registered with.
LOCAL_CHECK = 1.0
#: Seconds between two log lines of one refusal by the upstream.
REFUSAL_LOG = 30.0
#: Seconds each request to the local broker waits for its reply.
LOCAL_TIMEOUT = 5.0
#: Seconds before a refused mirror is tried again: the first wait, and the longest.
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
#: Names refused for the limits that are warned about (any number may come).
MAX_WARNED = 1024
#: Names deleted upstream whose counters are kept, to go on if they come back.
MAX_DELETED = 1024


@dataclass(frozen=True)
class RelayConfig:
    """What a relay needs, validated.

    Args:
        upstream: the upstream broker's data endpoint, ``tcp://HOST:PORT``.
        segments: fnmatch patterns of the segments to mirror (a tuple or a list; a
            string is one pattern).
        namespace: the local namespace the mirrors live in (``None``:
            ``$SHMCAST_NAMESPACE`` or ``"default"``, read when the relay is made).
        broker: the local broker's control endpoint (default: the namespace's ipc one).
        window: data messages the upstream may have in flight to us.
        heartbeat_timeout: seconds of silence before the upstream is called down
            (``None``: 3 upstream heartbeat intervals + 0.2 s).
        curve_server_key: the upstream's CURVE public key (z85); enables CURVE.
        curve_public_key, curve_secret_key: this relay's key pair (generated per
            run when unset, which only works with an upstream allowing any key).
        max_mirrors: most segments mirrored (made, being made, or refused by the
            local broker and tried again) at once; versions of further segments
            are refused (counted, logged).
        max_mirror_bytes: largest mirror (all its slots, as many as upstream);
            versions of a larger one are refused (counted, logged). The upstream
            names each segment's layout and slots: without these bounds it could
            fill this host's /dev/shm, with a 64-slot mirror per version's bytes.
            And no mirror is made that would leave less than
            :data:`SHM_RESERVE` (10%) of /dev/shm free (the limits alone allow
            256 GiB).
    """

    upstream: str = ""
    segments: tuple[str, ...] = ("*",)
    namespace: str | None = None
    broker: str | None = None
    window: int = 8
    heartbeat_timeout: float | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    curve_server_key: str | None = None
    curve_public_key: str | None = None
    curve_secret_key: str | None = field(default=None, repr=False)
    max_mirrors: int = 256
    max_mirror_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if not isinstance(self.upstream, str) or not self.upstream.startswith(
            ("tcp://", "ipc://", "inproc://")
        ):
            raise ConfigError(
                "upstream", f"{self.upstream!r}: give the data endpoint, tcp://HOST:PORT"
            )
        if self.upstream.startswith("tcp://"):
            # ZeroMQ connects to tcp://host:99999 (or with no port: EINVAL later) and
            # the relay then only hears silence.
            host, _, port = self.upstream[6:].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(
                    "upstream",
                    f"{self.upstream!r}: give the data endpoint, tcp://HOST:PORT "
                    f"(a port from 1 to 65535)",
                )
        if self.namespace is not None:
            validate_namespace(self.namespace)
        # A list is as good as a tuple, and a string is one pattern (as in the file and
        # the environment): iterated, it was a pattern per character.
        if isinstance(self.segments, (str, list)):
            patterns = (self.segments,) if isinstance(self.segments, str) else self.segments
            object.__setattr__(self, "segments", tuple(patterns))
        if (
            not isinstance(self.segments, tuple)
            or not self.segments
            or not all(isinstance(p, str) and p for p in self.segments)
        ):
            raise ConfigError(
                "segments", f"{self.segments!r}: give one or more fnmatch patterns, e.g. 'frames*'"
            )
        # bool is an int to Python: `window = true` in a file is a mistake, not 1.
        if not _is_int(self.window) or not 1 <= self.window <= 64:
            raise ConfigError("window", f"{self.window!r}: use 1..64")
        hb = self.heartbeat_timeout
        if hb is not None and not (
            isinstance(hb, (int, float)) and not isinstance(hb, bool) and 0 < hb < math.inf
        ):
            raise ConfigError("heartbeat_timeout", f"{hb!r}: use a finite number of seconds > 0")
        if self.metrics_port is not None and not (
            _is_int(self.metrics_port) and 0 <= self.metrics_port <= 65535
        ):
            raise ConfigError("metrics_port", f"{self.metrics_port!r} is not a port (0-65535)")
        validate_metrics_host(self.metrics_host)
        for name in ("curve_server_key", "curve_public_key", "curve_secret_key"):
            key = getattr(self, name)
            if key is not None and not is_z85_key(key):
                # ZeroMQ refuses anything else when the socket is made: a traceback.
                raise ConfigError(name, "expected a 40-character z85 CURVE key")
        for name in ("max_mirrors", "max_mirror_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(name, f"{value!r}: use a positive integer")
        if (self.curve_public_key is None) != (self.curve_secret_key is None):
            raise ConfigError("curve_secret_key", "give both curve_public_key and curve_secret_key")
        if self.curve_secret_key is not None and self.curve_public_key is not None:
            try:
                public = zmq.curve_public(self.curve_secret_key.encode()).decode()
            except zmq.ZMQError:  # a libzmq without CURVE: the connection says so
                public = self.curve_public_key
            if public != self.curve_public_key:
                # The upstream would only ever be silent (its handshake fails).
                raise ConfigError(
                    "curve_public_key",
                    f"not the public key of curve_secret_key (that is {public})",
                )

    @property
    def source(self) -> str:
        return f"relay:{self.upstream}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ENV = {
    "namespace": NAMESPACE_ENV,
    "upstream": "SHMCAST_RELAY_UPSTREAM",
    "broker": "SHMCAST_BROKER",
}


def resolve_relay_config(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> RelayConfig:
    """Flags, then ``SHMCAST_*`` environment, then the TOML file, then defaults.

    Raises:
        ConfigError: naming the field (and the file) that is wrong.
    """

    def coerce(name: str, value: Any, source: str | None) -> Any:
        if name == "segments" and isinstance(value, (list, str)):
            return (value,) if isinstance(value, str) else tuple(value)
        return value

    return resolve_layers(
        RelayConfig,
        flags,
        env_names=_ENV,
        config_file=config_file,
        environ=environ,
        coerce=coerce,
    )


class _OverLimits(Exception):
    """A mirror that ``max_mirrors`` or ``max_mirror_bytes`` does not allow."""


@dataclass
class _Mirror:
    name: str
    layout: Layout
    created: int
    pub: Publisher
    incarnation: int = 0
    #: The layout as data headers carry it (dtype text, shape list, slots): a header
    #: that repeats it needs no parsing.
    wire: tuple[str, list[int], int] = field(init=False)

    def __post_init__(self) -> None:
        self.wire = (self.layout[0], list(self.layout[1]), self.layout[2])


@dataclass
class _Counts:
    received: int = 0
    skipped: int = 0
    torn: int = 0
    stale: int = 0
    refused: int = 0
    bytes: int = 0
    last_version: int = 0
    upstream_latest: int = 0
    #: The upstream incarnation before the mirror's, and the last version received
    #: of it (:func:`turn_incarnation`).
    previous: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class RelayStats:
    """A snapshot of a relay's counters (metrics are built from it at scrape time)."""

    upstream: str
    namespace: str
    upstream_up: bool
    reconnects: int
    silence_s: float
    segments: dict[str, _Counts] = field(default_factory=dict)
    bad_messages: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    #: Names deleted upstream whose counters were forgotten: over the ``MAX_DELETED``
    #: kept (their series left the metrics).
    forgotten: int = 0


class Relay(Service):
    """The relay service: :meth:`run` serves until :meth:`stop` (or :meth:`start` in a
    thread, :meth:`close` to end it), as every shmcast service.

    Args:
        config: a :class:`RelayConfig`.
        broker_curve: the LOCAL broker's CURVE keys, ``(server_public,
            client_public, client_secret)`` as :class:`ControlClient` takes them, for
            a local broker with ``curve_secret_key`` (the upstream's keys are the
            config's ``curve_*``).

    Raises:
        ConfigError: ``broker_curve`` is not three CURVE keys.
    """

    def __init__(self, config: RelayConfig, *, broker_curve: CurveKeyTriple | None = None) -> None:
        self.config = config
        # The LOCAL broker's keys (config.curve_* are the upstream's): ConfigError here.
        self._broker_curve = client_curve(broker_curve)
        self.namespace = resolve_namespace(config.namespace)
        super().__init__(f"relay of {config.upstream} into namespace {self.namespace!r}")
        self._lock = threading.Lock()
        self._mirrors: dict[str, _Mirror] = {}
        self._counts: dict[str, _Counts] = {}
        self._pending: dict[str, tuple[dict[str, Any], zmq.Frame]] = {}
        self._acks: list[int] = []
        self._refused: dict[str, str] = {}
        self._retry: dict[str, tuple[float, float]] = {}  # name -> (when, next wait)
        #: Mirrors being made, and their bytes (not in /dev/shm yet).
        self._creating: dict[str, int] = {}
        self._waiting: dict[str, tuple[dict[str, Any], zmq.Frame]] = {}
        #: Mirrors recreated for a new upstream incarnation whose first version is
        #: not committed yet: the versions before it are counted as skipped.
        self._renewed: set[str] = set()
        #: Names refused for max_mirrors or max_mirror_bytes (warned once each).
        self._over: set[str] = set()
        #: The upstream's names when the relay joined (in its first heartbeat, or
        #: sent before it): their versions before the first one here are not ours
        #: to count. A name the upstream makes later counts from its version 1.
        self._joined: set[str] = set()
        self._heard_names = False
        #: Names deleted upstream whose counters are kept, oldest deletion first.
        self._deleted: dict[str, None] = {}
        #: Names whose counters were forgotten past the MAX_DELETED kept (their series
        #: went from the metrics): counted, so that the cap is seen when it is hit.
        self._forgotten = 0
        self._localbroker: LocalBroker | None = None
        self.upstream_up = False
        self.reconnects = 0
        self.bad_messages = 0
        self.interval = 0.5
        self._welcomed = False
        self._last_heard = 0.0
        #: When the first hello still unanswered went out (0: answered), and the
        #: value of it last told in the log.
        self._unanswered_since = 0.0
        self._told = 0.0
        self._refusal = ""
        self._refusal_logged = 0.0
        self._told_hello_size = False
        self._hello_size = 0
        self._sock: zmq.Socket[Any] | None = None
        self.metrics_url: str | None = None

    # ------------------------------------------------------------------ public

    @property
    def heartbeat_timeout(self) -> float:
        t = self.config.heartbeat_timeout
        return t if t is not None else 3 * self.interval + 0.2

    def stats(self) -> RelayStats:
        with self._lock:
            counts = {n: _Counts(**vars(c)) for n, c in self._counts.items()}
            refused = dict(self._refused)
            forgotten = self._forgotten
        silence = time.monotonic() - self._last_heard if self._last_heard else -1.0
        return RelayStats(
            upstream=self.config.upstream,
            namespace=self.namespace,
            upstream_up=self.upstream_up,
            reconnects=self.reconnects,
            silence_s=silence,
            segments=counts,
            bad_messages=self.bad_messages,
            refused=refused,
            forgotten=forgotten,
        )

    def run(self, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Serve until :meth:`stop`; ``on_ready`` gets the ready information.

        Raises:
            BrokerUnavailableError: the local broker does not answer.
            EndpointError: the upstream endpoint is not a valid address.
            ClosedError: the relay was closed, or has served already.
        """
        super().run(on_ready)

    def _serve_all(self, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
        cfg = self.config
        local_ep = resolve_endpoint(cfg.broker, self.namespace)
        ctx: zmq.Context[Any] = zmq.Context()
        metrics_server: MetricsServer | None = None
        client: ControlClient | None = None
        try:
            client = ControlClient(
                local_ep, timeout=LOCAL_TIMEOUT, context=ctx, curve=self._broker_curve
            )
            epoch = client.request("hello")["epoch"]
            self._localbroker = LocalBroker(
                client,
                epoch=epoch,
                namespace=self.namespace,
                broker=cfg.broker,
                source=cfg.source,
                timeout=LOCAL_TIMEOUT,
                curve=self._broker_curve,
            )
            client = None  # the local thread owns it now
            self._sock = self._connect(ctx)
            if cfg.metrics_port is not None:
                metrics_server = self._start_metrics(cfg.metrics_port, cfg.metrics_host)
            self._send_hello()
            self._set_ready(
                on_ready,
                {
                    "namespace": self.namespace,
                    "pid": os.getpid(),
                    "upstream": cfg.upstream,
                    "segments": list(cfg.segments),
                    "broker": local_ep,
                    "metrics": self.metrics_url,
                    "curve": cfg.curve_server_key is not None,
                },
            )
            self._serve()
        finally:
            layouts = self._layouts()
            for m in self._mirrors.values():
                with contextlib.suppress(Exception):
                    m.pub.close()
            self._mirrors.clear()
            self._pending.clear()
            self._waiting.clear()
            if self._localbroker is not None:
                # The mirrors keep their last data, and no longer follow the upstream.
                last = [(name, layout, cfg.source, False) for name, layout in layouts]
                self._localbroker.close(last)
            if client is not None:
                client.close()
            if metrics_server is not None:
                metrics_server.close()
            ctx.destroy(0)

    # ------------------------------------------------------------------ set-up

    def _connect(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        cfg = self.config
        sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 64)
        sock.setsockopt(zmq.RCVHWM, 4 * 64 + 64)
        # No queueing towards a connection that is not up: hellos are re-sent anyway.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # ZMTP heartbeats: a cut link kills the connection, so ZeroMQ rebuilds it on repair.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 500)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1500)
        if cfg.curve_server_key:
            if cfg.curve_public_key and cfg.curve_secret_key:
                public, secret = cfg.curve_public_key.encode(), cfg.curve_secret_key.encode()
            else:
                public, secret = zmq.curve_keypair()
            sock.curve_serverkey = cfg.curve_server_key.encode()
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        try:
            sock.connect(cfg.upstream)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise EndpointError("upstream", cfg.upstream, exc.strerror, connect=True) from exc
        return sock

    def _start_metrics(self, port: int, host: str) -> MetricsServer:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(RelayCollector(self))
        server = start_metrics_server(registry, port, host=host)
        self.metrics_url = server.url
        return server

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        next_ping = time.monotonic() + self.interval
        next_local = time.monotonic() + LOCAL_CHECK
        while not self._stop.is_set():
            if sock.poll(100, zmq.POLLIN):
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._heard()
                    self._guarded(self._on_message, frames)
                    if self._acks and len(self._acks) >= 16:
                        self._flush_acks()
            self._flush_acks()
            self._collect()
            self._retry_due()
            now = time.monotonic()
            if self.upstream_up and now - self._last_heard > self.heartbeat_timeout:
                log.warning("upstream %s silent for %.1fs: down", self.config.upstream,
                            now - self._last_heard)  # fmt: skip
                self.upstream_up = False
                self._pending.clear()  # their verdicts may never come
                self._annotate()
                next_ping = now
            since = self._unanswered_since
            if since and now - since > 2 * self.heartbeat_timeout and since != self._told:
                # A CURVE handshake that fails (keys not allowed, or wrong) and an
                # address where no data stream listens look the same: silence.
                self._told = since
                big = ""
                if self._hello_size > MAX_REQUEST:
                    big = (f"; or does it take this relay's hello of {self._hello_size} "
                           f"bytes (a broker takes max_message_bytes + {HELLO_ALLOWANCE} "
                           f"for a hello; one older than this relay only "
                           f"max_message_bytes)")  # fmt: skip
                log.error("no answer from upstream %s for %.1f s: is a broker's data "
                          "endpoint there, and does it let this relay in (with CURVE: "
                          "curve_server_key must be its public key, and this relay's "
                          "public key in its curve_clients)%s?", self.config.upstream,
                          now - since, big)  # fmt: skip
            if now >= next_local:
                next_local = now + LOCAL_CHECK
                self._check_local()
            if now >= next_ping:
                next_ping = now + self.interval
                if self.upstream_up and self._welcomed:
                    self._send(b"ping", {})
                else:
                    self._send_hello()

    def _guarded(self, handle: Callable[..., None], *message: Any) -> None:
        """Handle one message from upstream: whatever it raises makes it one bad
        message (counted, logged), never the relay's end."""
        try:
            handle(*message)
        except (ValueError, TypeError, KeyError, ShmcastError) as exc:
            self.bad_messages += 1
            log.warning("bad message from upstream: %s", exc)
        except Exception:  # a kind no check foresaw
            self.bad_messages += 1
            log.exception("bad message from upstream")

    def _check_local(self) -> None:
        """Has the local broker restarted? (asked by the local thread, never waited for)
        Was a mirror deleted here (``shmcast rm --force``, a reclaim)? Then it is made
        again: the upstream sends its latest version to a hello without it."""
        gone = [m for m in self._mirrors.values() if not m.pub.segment.linked()]
        for m in gone:
            log.warning("mirror %s was deleted here, not upstream: making it again", m.name)
            with self._lock:
                del self._mirrors[m.name]
            m.pub.close()
        if gone:
            self._send_hello()
        if self._localbroker is not None:
            self._localbroker.check(self._layouts(), self.upstream_up)

    def _layouts(self, mirrors: list[_Mirror] | None = None) -> list[tuple[str, Layout]]:
        ms = list(self._mirrors.values()) if mirrors is None else mirrors
        return [(m.name, m.layout) for m in ms]

    def _retry_due(self) -> None:
        """Try again the mirrors refused a while ago, with the last version received
        (an idle upstream segment sends nothing new to retry on)."""
        now = time.monotonic()
        for name, (when, _) in list(self._retry.items()):
            if now >= when and name in self._waiting and name not in self._creating:
                with contextlib.suppress(ValueError, TypeError, KeyError, ShmcastError):
                    self._commit(name, *self._waiting.pop(name))

    def _collect(self) -> None:
        """Take in the mirrors the local thread made, or could not make (retried later)."""
        if self._localbroker is None:
            return
        for done in self._localbroker.results():
            spec = done.spec
            self._creating.pop(spec.name, None)
            if isinstance(done, Created):
                m = _Mirror(
                    name=spec.name,
                    layout=spec.layout,
                    created=spec.created,
                    pub=done.pub,
                    incarnation=spec.incarnation,
                )
                with self._lock:
                    self._mirrors[spec.name] = m
                    self._refused.pop(spec.name, None)
                self._retry.pop(spec.name, None)
                self._annotate([m])
                waiting = self._waiting.pop(spec.name, None)
                if waiting is not None:
                    self._guarded(self._commit, spec.name, *waiting)
                continue
            wait = self._retry.get(spec.name, (0.0, RETRY_FIRST))[1]
            self._retry[spec.name] = (time.monotonic() + wait, min(2 * wait, RETRY_MAX))
            log.error("cannot mirror %s (trying again in %.0f s): %s", spec.name, wait, done.reason)
            with self._lock:
                self._refused[spec.name] = done.reason

    def _heard(self) -> None:
        self._last_heard = time.monotonic()
        self._unanswered_since = 0.0
        if not self.upstream_up:
            self.upstream_up = True
            if self._welcomed:
                self.reconnects += 1
            log.info("upstream %s is up", self.config.upstream)
            self._annotate()

    def _send(self, kind: bytes, body: dict[str, Any]) -> None:
        assert self._sock is not None
        with contextlib.suppress(zmq.Again):
            self._sock.send_multipart([kind, pack(body)], zmq.NOBLOCK)

    def _send_hello(self) -> None:
        if not self._unanswered_since:
            self._unanswered_since = time.monotonic()
        have = {}
        incarnations = {}
        for name, m in self._mirrors.items():
            with contextlib.suppress(ShmcastError, ValueError):
                have[name] = int(m.pub.version)
                incarnations[name] = m.incarnation
        body = {
            "patterns": list(self.config.segments),
            "window": self.config.window,
            "have": have,
            "incarnations": incarnations,
        }
        size = len(pack(body))
        self._hello_size = size
        limit = MAX_REQUEST + HELLO_ALLOWANCE  # what a broker with its defaults takes
        if size > limit and not self._told_hello_size:
            # An upstream with the default max_message_bytes drops it, and the
            # connection, without a word: the relay would only ever hear silence.
            self._told_hello_size = True
            log.error("this relay's hello to %s is %d bytes (its segment patterns and "
                      "the versions of its %d mirrors), over the %d a broker with the "
                      "default max_message_bytes (%d) takes for a hello: the upstream "
                      "drops it and never answers unless its max_message_bytes is raised "
                      "by the difference; or mirror fewer segments (--segments, "
                      "--max-mirrors)", self.config.upstream, size, len(have), limit,
                      MAX_REQUEST)  # fmt: skip
        self._send(b"hello", body)

    def _flush_acks(self) -> None:
        if self._acks:
            self._send(b"ack", {"mids": self._acks})
            self._acks = []

    def _wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.config.segments)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        body = unpack(frames[1].bytes, MAX_HEADER) if len(frames) > 1 else {}
        if kind == b"data":
            if len(frames) != 3:
                raise ValueError("data message without payload")
            self._on_data(body, frames[2])
        elif kind == b"verdict":
            self._on_verdict(body)
        elif kind == b"hb":
            latest = body.get("latest", {})
            if isinstance(latest, dict):
                with self._lock:
                    for name, v in latest.items():
                        if isinstance(name, str) and isinstance(v, int) and self._wants(name):
                            self._counts.setdefault(name, _Counts()).upstream_latest = v
                if not self._heard_names:
                    self._heard_names = True
                    self._joined |= {n for n in latest if isinstance(n, str) and self._wants(n)}
                self._forget_deleted(set(latest))
        elif kind == b"welcome":
            interval = body.get("heartbeat_interval")
            if interval is not None:
                # A broker's own bounds: an interval of 1e300 (or inf) would end the
                # relay's pings and hellos, and never call the upstream down.
                if not (
                    isinstance(interval, (int, float))
                    and not isinstance(interval, bool)
                    and 0.01 <= interval <= 60
                ):
                    raise ValueError(f"welcome with a heartbeat_interval of {interval!r} s")
                self.interval = float(interval)
            self._welcomed = True
        elif kind == b"who":
            self._send_hello()
        elif kind == b"refused":  # our hello, over one of the upstream's limits
            reason = str(body.get("reason", "no reason given"))[:300]
            now = time.monotonic()
            if reason != self._refusal or now >= self._refusal_logged + REFUSAL_LOG:
                self._refusal, self._refusal_logged = reason, now
                log.error("upstream %s refuses this relay: %s (mirror fewer segment "
                          "patterns, or raise the limit in its configuration)",
                          self.config.upstream, reason)  # fmt: skip

    def _forget_deleted(self, upstream: set[str]) -> None:
        """A heartbeat lists every segment upstream serves us: a mirror missing from
        it was deleted there, so it is deleted here too, and whatever the relay
        kept of a name missing from it is forgotten (names come and go upstream
        without bound), but for the counters of the ``MAX_DELETED`` names last
        deleted that counted a version. A cut link sends no heartbeat: then the
        mirrors keep serving the last data."""
        with self._lock:
            gone = [m for name, m in self._mirrors.items() if name not in upstream]
            for m in gone:
                del self._mirrors[m.name]
            # The counters of a name that counted a version go on if it comes back
            # (Prometheus counters never go back, and the totals add up across its
            # incarnations); its next incarnation counts from version 1 (it was made
            # again while the relay ran). Those of the most recently deleted names
            # only are kept: names come and go upstream without bound.
            self._deleted = {n: None for n in self._deleted if n not in upstream}
            for name in [n for n in self._counts if n not in upstream]:
                c = self._counts[name]
                if c.received or c.skipped or c.torn or c.stale or c.refused:
                    c.last_version = c.upstream_latest = 0  # no version of it here now
                    self._deleted[name] = None
                else:
                    del self._counts[name]
            while len(self._deleted) > MAX_DELETED:
                oldest = next(iter(self._deleted))
                del self._deleted[oldest]
                del self._counts[oldest]
                self._forgotten += 1
            for name in [n for n in self._refused if n not in upstream]:
                del self._refused[name]
        for held in (self._retry, self._waiting):
            for name in [n for n in held if n not in upstream]:
                del held[name]
        self._renewed &= upstream
        self._over &= upstream
        self._joined &= upstream
        for m in gone:
            log.info("upstream deleted segment %s: deleting the mirror", m.name)
            m.pub.close()
            if self._localbroker is not None:
                self._localbroker.delete(m.name)

    def _on_data(self, hdr: dict[str, Any], payload: zmq.Frame) -> None:
        name = validate_segment_name(hdr.get("segment"))
        mid = hdr.get("mid")
        if not isinstance(mid, int):
            raise ValueError("data without an integer mid")
        if not self._wants(name):
            self._acks.append(mid)
            return
        if not self._heard_names:
            self._joined.add(name)
        prev = self._pending.pop(name, None)
        if prev is not None:  # its verdict was lost (dropped at a high-water mark)
            self._acks.append(int(prev[0]["mid"]))
        self._pending[name] = (hdr, payload)
        if len(self._pending) > self.config.window:
            # More than the upstream may have in flight: the oldest one's verdict was
            # lost (its credit expired upstream), or the peer keeps no window and
            # would make us hold its payloads without bound. Never committed: a gap,
            # counted skipped at the name's next commit.
            oldest = next(iter(self._pending))
            self._acks.append(int(self._pending.pop(oldest)[0]["mid"]))

    def _on_verdict(self, body: dict[str, Any]) -> None:
        name = validate_segment_name(body.get("segment"))
        mid = body.get("mid")
        if isinstance(mid, int):
            self._acks.append(mid)
        pending = self._pending.get(name)
        if pending is None or pending[0].get("mid") != mid:
            return
        del self._pending[name]
        hdr, payload = pending
        if not body.get("ok"):
            with self._lock:
                self._counts.setdefault(name, _Counts()).torn += 1
            return
        self._commit(name, hdr, payload)

    def _commit(self, name: str, hdr: dict[str, Any], payload: zmq.Frame) -> None:
        version = hdr.get("version")
        ts = hdr.get("ts")
        # Checked before a mirror is made or dropped for it: a bad message changes nothing.
        if type(version) is not int or not 0 < version <= MAX_VERSION:
            raise ValueError(f"data header needs a version from 1 to 2**63-1, got {version!r}")
        if type(ts) is not int or not 0 <= ts < 1 << 64:
            raise ValueError(f"data header needs a ts from 0 to 2**64-1 (ns), got {ts!r}")
        try:
            m = self._mirror(name, hdr, payload.buffer.nbytes)
        except _OverLimits:
            with self._lock:
                self._counts.setdefault(name, _Counts()).refused += 1
            return  # nothing kept: any number of names may come
        with self._lock:
            c = self._counts.setdefault(name, _Counts())
        if not c.last_version and self._heard_names and name not in self._joined:
            # Made upstream while the relay ran: its versions before the first one
            # here were committed while we mirrored the name, and never came.
            self._renewed.add(name)
        if m is None:
            # Being made, or refused and tried again later: the latest version waits
            # and is committed once the mirror exists.
            self._wait(name, c, hdr, payload)
            return
        seg = m.pub.segment
        buf = payload.buffer
        if buf.nbytes != seg.nbytes:
            raise ValueError(f"segment {name!r}: {buf.nbytes} bytes for a {seg.nbytes}-byte layout")
        if version <= seg.version:
            c.stale += 1
            return
        # The one copy on this host: from ZeroMQ's receive buffer into the slot, as
        # raw bytes, under the upstream's version number and commit time.
        m.pub.publish_bytes(buf, version=version, timestamp_ns=ts)
        if name in self._renewed:
            # A new incarnation starts at version 1: those before this one were
            # committed upstream while we mirrored the name, and never came here.
            self._renewed.discard(name)
            c.skipped += version - 1
        elif version == c.last_version:
            # Sent again for a mirror made again (deleted here): counted already.
            return
        elif c.last_version and version > c.last_version + 1:
            c.skipped += version - c.last_version - 1
        c.last_version = version
        c.received += 1
        c.bytes += seg.nbytes
        c.upstream_latest = max(c.upstream_latest, version)

    def _wait(self, name: str, c: _Counts, hdr: dict[str, Any], payload: zmq.Frame) -> None:
        """Keep the latest version of a mirror not made yet. One it replaces is never
        committed: counted skipped here when no version of the stream was committed
        yet (else the gap counts it at the next commit), with those between the two."""
        version: int = hdr["version"]
        c.upstream_latest = max(c.upstream_latest, version)
        prev = self._waiting.get(name)
        if prev is not None and prev[0].get("incarnation") == hdr.get("incarnation"):
            before: int = prev[0]["version"]
            if version <= before:
                c.stale += 1
                return
            if not c.last_version and name not in self._renewed:
                c.skipped += version - before
        self._waiting[name] = (hdr, payload)

    def _mirror(self, name: str, hdr: dict[str, Any], size: int) -> _Mirror | None:
        """The mirror of ``name``, or None while the local thread makes it (that
        version is then not committed here; the next one is).

        Raises:
            ValueError: the header's layout is not one, or not the ``size`` bytes
                of the payload that came with it (nothing is made or dropped).
        """
        shape = hdr.get("shape")
        slots = hdr.get("slots")
        created = hdr.get("created", 0)
        incarnation = hdr.get("incarnation", 0)
        if not isinstance(incarnation, int):
            raise ValueError("data header incarnation must be an integer")
        if not isinstance(shape, list) or not isinstance(slots, int):
            raise ValueError("data header needs shape and slots")
        m = self._mirrors.get(name)
        if (
            m is not None
            and incarnation
            and incarnation == m.incarnation
            and (hdr.get("dtype"), shape, slots) == m.wire
            and m.pub.version <= MAX_VERSION
        ):
            return m  # the stream goes on: nothing to parse (the usual case, per version)
        dt, shp = normalize_layout(parse_dtype(str(hdr.get("dtype"))), tuple(shape))
        nbytes = math.prod(shp) * dt.itemsize
        if size != nbytes:
            # A few bytes announcing a large layout would make (or, as a new
            # incarnation, drop) a mirror for a version that never fits it.
            raise ValueError(f"segment {name!r}: {size} bytes for a {nbytes}-byte layout")
        layout = (dtype_str(dt), shp, slots)
        recreated = False
        if m is not None:
            local = m.pub.version
            if incarnation and m.incarnation:
                # Each creation upstream has its own id: a new one is a new mirror, so
                # local readers see a new incarnation too, whatever its version numbers.
                recreated = incarnation != m.incarnation
            else:  # an upstream older than incarnation ids
                recreated = int(hdr["version"]) <= local and created != m.created
            if m.layout == layout and not recreated and local <= MAX_VERSION:
                return m
        mirror_bytes = segment_size(nbytes, slots) if slots > 0 else 0
        if name not in self._creating:
            self._check_limits(name, mirror_bytes, m)
        if m is not None:
            # The upstream segment was recreated, or ours went corrupt: so is the mirror
            # recreated (versions only go forward).
            why = "its local header is corrupt" if local > MAX_VERSION else "it was recreated"
            log.warning("mirror %s: %s upstream or here; recreating it", name, why)
            if recreated:
                c = self._counts.get(name)
                last = None
                if c is not None:
                    # The old incarnation's latest is no version of this one (whose
                    # numbers may be lower): the lag is measured from this version on.
                    c.upstream_latest = 0
                    if incarnation and m.incarnation:
                        # None of the mirror's incarnation counted yet: its last is 0.
                        mine = 0 if name in self._renewed else c.last_version
                        c.previous, last = turn_incarnation(
                            c.previous, (m.incarnation, mine), incarnation
                        )
                if last is None:
                    self._renewed.add(name)
                else:  # back on the incarnation before: its versions count on from last
                    assert c is not None
                    self._renewed.discard(name)
                    c.last_version = last
            with self._lock:
                del self._mirrors[name]
            m.pub.close()
            if self._localbroker is not None:
                self._localbroker.delete(name)
        if name in self._creating or self._localbroker is None:
            return None
        retry = self._retry.get(name)
        if retry is not None and time.monotonic() < retry[0]:
            return None
        self._creating[name] = mirror_bytes
        self._localbroker.create(
            MirrorSpec(
                name,
                dt,
                shp,
                slots,
                layout,
                int(created) if isinstance(created, int) else 0,
                incarnation,
                first=int(hdr["version"]),
            )
        )
        return None

    def _check_limits(self, name: str, size: int, old: _Mirror | None) -> None:
        """Raise :class:`_OverLimits` if a mirror of ``size`` bytes for ``name``
        (made, or made again in place of ``old``) would break ``max_mirror_bytes``
        or ``max_mirrors``, or leave less than ``SHM_RESERVE`` of /dev/shm free
        (:func:`shm_shortfall`: the limits alone let an upstream fill it; ``old``
        is deleted first, its bytes freed): checked before an old mirror goes, so
        a refused version changes nothing."""
        cfg = self.config
        held = self._mirrors.keys() | self._creating.keys() | self._retry.keys()
        others = len(held) - (name in held)
        why: str | None
        if size > cfg.max_mirror_bytes or others >= cfg.max_mirrors:
            why = (
                f"a {size}-byte segment, with {others} mirrors held; the limits are "
                f"max_mirror_bytes {cfg.max_mirror_bytes} and max_mirrors {cfg.max_mirrors}"
            )
        else:
            freed = 0 if old is None else segment_size(old.pub.segment.nbytes, old.layout[2])
            why = shm_shortfall(size, making=sum(self._creating.values()), freed=freed)
            if why is None:
                return
        if name not in self._over and len(self._over) < MAX_WARNED:
            self._over.add(name)
            log.warning("not mirroring %s: %s", name, why)
        raise _OverLimits(name)

    def _annotate(self, mirrors: list[_Mirror] | None = None) -> None:
        """Tell the local catalog whether the upstream is up (``upstream_up`` field)."""
        if self._localbroker is not None:
            self._localbroker.annotate(self._layouts(mirrors), self.upstream_up)


class RelayCollector(Collector):
    """Exports ``shmcast_relay_*`` metrics of one relay."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def collect(self) -> Iterator[Metric]:
        st = self._relay.stats()
        base = ["namespace", "upstream"]
        lbl = [st.namespace, st.upstream]
        up = GaugeMetricFamily(
            "shmcast_relay_upstream_up", "1 while the upstream is heard", labels=base
        )
        up.add_metric(lbl, 1.0 if st.upstream_up else 0.0)
        yield up
        silence = GaugeMetricFamily(
            "shmcast_relay_upstream_silence_seconds",
            "Seconds since the upstream was last heard (-1: never)",
            labels=base,
        )
        silence.add_metric(lbl, st.silence_s)
        yield silence
        refused = GaugeMetricFamily(
            "shmcast_relay_refused_mirrors",
            "Segments the local broker refused (or did not answer) to mirror; retried",
            labels=base,
        )
        refused.add_metric(lbl, len(st.refused))
        yield refused
        rec = CounterMetricFamily(
            "shmcast_relay_reconnects", "Times the upstream came back after silence", labels=base
        )
        rec.add_metric(lbl, st.reconnects)
        yield rec
        bad = CounterMetricFamily(
            "shmcast_relay_bad_messages", "Malformed messages from the upstream", labels=base
        )
        bad.add_metric(lbl, st.bad_messages)
        yield bad
        forgotten = CounterMetricFamily(
            "shmcast_relay_forgotten_names",
            f"Names deleted upstream whose counters were forgotten (over the {MAX_DELETED} "
            "last deleted, which are kept)",
            labels=base,
        )
        forgotten.add_metric(lbl, st.forgotten)
        yield forgotten
        seg_labels = [*base, "segment"]
        families = {
            "received": CounterMetricFamily(
                "shmcast_relay_versions_received", "Versions committed locally", labels=seg_labels
            ),
            "skipped": CounterMetricFamily(
                "shmcast_relay_versions_skipped",
                "Upstream versions never committed here (latest-value skips and torn sends)",
                labels=seg_labels,
            ),
            "torn": CounterMetricFamily(
                "shmcast_relay_torn_sends",
                "Versions discarded because the upstream writer overwrote them in flight",
                labels=seg_labels,
            ),
            "stale": CounterMetricFamily(
                "shmcast_relay_stale_versions",
                "Versions not newer than the mirror's (re-sent, or going backwards upstream)",
                labels=seg_labels,
            ),
            "refused": CounterMetricFamily(
                "shmcast_relay_refused_versions",
                "Versions not mirrored: over max_mirrors or max_mirror_bytes, or too little "
                "of /dev/shm left free",
                labels=seg_labels,
            ),
            "bytes": CounterMetricFamily(
                "shmcast_relay_received_bytes", "Bytes committed locally", labels=seg_labels
            ),
        }
        lag = GaugeMetricFamily(
            "shmcast_relay_lag_versions",
            "Upstream's latest version minus the local one",
            labels=seg_labels,
        )
        for name, c in sorted(st.segments.items()):
            labels = [*lbl, name]
            for key, fam in families.items():
                fam.add_metric(labels, getattr(c, key))
            lag.add_metric(labels, max(0, c.upstream_latest - c.last_version))
        yield from families.values()
        yield lag
