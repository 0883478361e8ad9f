"""The Zenoh bridge: a namespace's segments onto Eclipse Zenoh, and Zenoh's back into it.

**Export.** Every segment of the local namespace whose name matches an
``--export`` pattern is read as it is published (a futex wait on its header, as
any local reader) and its latest version is ``put`` on ``shmcast/<ns>/<segment>``
in the format of :mod:`._wire`, with a liveliness token and a queryable for late
joiners. A bridge that falls behind skips to the latest version and counts what
it skipped; nothing queues without bound. A segment recreated locally (a new
incarnation) is exported afresh.

**Import.** Every key matching an ``--import`` key expression is mirrored into
the local segment of the same name: created with the announced dtype and shape
through the local broker, written under the upstream's version numbers and
commit times, so local readers read it zero-copy and cannot tell it from a local
segment except by the catalog's ``source`` (``zenoh:<key>``) and
``upstream_up``. Gaps in the versions are counted; a new incarnation upstream
recreates the mirror (versions start over; at most once a second, and not while
the mirror's exporter is live: see ``ZenohBridge._hold``). A late joiner asks
the queryable for the latest version as soon as the exporter's token appears.
At most ``max_mirrors`` mirrors are held: a new name past it takes the place of
the mirror whose exporter has been gone longest (its token gone, nothing received
since), deleted here as the exporter deleted it; with none gone, it is refused.

A bridge never imports what it exports itself, nor exports what it imported.
Zenoh's own shared-memory transport is always turned off, ``--config`` file or
not: shmcast already is the shared-memory path on each host, and Zenoh's default
(on) leaves ``<n>.zenoh`` objects in /dev/shm when the bridge exits.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from shmcast.broker import (
    MetricsServer,
    Segment,
    Service,
    dtype_str,
    resolve_layers,
    segment_size,
    start_metrics_server,
    wait_any,
)
from shmcast.broker.client import (
    MAX_VERSION,
    NAMESPACE_ENV,
    ControlClient,
    CurveKeyTriple,
    client_curve,
    resolve_endpoint,
    resolve_namespace,
    validate_metrics_host,
    validate_namespace,
)
from shmcast.broker.errors import (
    ConfigError,
    EndpointError,
    MissingExtraError,
    ShmcastError,
    TornReadError,
)
from shmcast.publisher import (
    LocalBroker,
    Mark,
    MirrorSpec,
    Publisher,
    Refused,
    shm_shortfall,
    turn_incarnation,
)

from ._wire import (
    KEY_ROOT,
    AttachmentTemplate,
    Frame,
    decode_attachment,
    key_of,
    parse_key,
)

__all__ = [
    "BridgeCollector",
    "BridgeConfig",
    "BridgeStats",
    "ZenohBridge",
    "resolve_bridge_config",
]

log = logging.getLogger(__name__)

MODES = ("client", "peer", "router")
#: Where a mirror says its data comes from (catalog ``source``).
SOURCE_PREFIX = "zenoh:"
#: Seconds before a name the local broker refused a mirror is tried again.
RETRY_SECONDS = 5.0
#: Names remembered for a warning given once, or a retry: at most this many.
MAX_WARNED = 1024
#: Seconds between two new incarnations of one name mirrored: one sooner after the
#: last is held (the latest of the name) until then.
RENEW_SECONDS = 1.0
#: Names whose mirror went (evicted, refused when made again, or deleted here) whose
#: counters are kept, to go on if they come back.
MAX_EVICTED = 1024
#: Longest wait, in seconds, before a segment refused for export is tried again: the
#: waits double from one look at the catalog up to this.
EXPORT_RETRY_SECONDS = 10.0


def _load_zenoh() -> Any:
    try:
        import zenoh
    except ImportError as exc:
        raise MissingExtraError("zenoh", "zenoh", "shmcast bridge zenoh") from exc
    return zenoh


@dataclass(frozen=True)
class BridgeConfig:
    """What a Zenoh bridge needs, validated.

    Args:
        connect: Zenoh endpoints to connect to (``tcp/10.0.0.1:7447``, ``tls/...``).
        listen: Zenoh endpoints to listen on (makes the bridge a peer unless ``mode``).
        exports: fnmatch patterns of local segment names to export.
        imports: Zenoh key expressions under ``shmcast/`` to import
            (``shmcast/lab/*``, ``shmcast/*/frames``).
        namespace: the local namespace (``None``: ``$SHMCAST_NAMESPACE`` or ``"default"``).
        broker: the local broker's control endpoint (default: the namespace's ipc one).
        zenoh_config: a Zenoh JSON5 configuration file (TLS, access control, ...);
            the endpoints above are added to it.
        mode: the Zenoh session mode; default ``client`` with only ``connect``,
            ``peer`` with ``listen``.
        slots: slots of the segments created for imports.
        max_mirrors: most segments made for imports at once. Any peer of the Zenoh
            network may put on a key that an import expression matches, and each
            new key makes a local segment. A new key past it evicts the mirror
            whose exporter has been gone longest (its liveliness token gone, no
            sample since; counted, logged), never a live one; with none gone, its
            samples are refused (counted, logged).
        max_mirror_bytes: largest segment made for an import (all its slots); a
            sample announcing a larger layout is refused (counted, logged), and so
            is one whose mirror would leave less than
            ``shmcast.publisher.SHM_RESERVE`` (10%) of /dev/shm free.
        catalog_interval: seconds between looks at the local catalog (new,
            deleted or recreated segments to export), from 0.01 to 60.
        connect_timeout: seconds (> 0) to reach a ``connect`` endpoint at start (an
            unreachable or refusing router is an error then; once connected, a
            lost link is retried for ever).
        congestion: what exports do when a link is congested: ``drop`` (default:
            that link misses versions, counted by its importers, and nobody else
            slows down) or ``block`` (every importer waits for the slowest; for a
            single lossless consumer).
    """

    connect: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()
    exports: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    namespace: str | None = None
    broker: str | None = None
    zenoh_config: str | None = None
    mode: str | None = None
    slots: int = 4
    max_mirrors: int = 256
    max_mirror_bytes: int = 1 << 30
    catalog_interval: float = 0.5
    connect_timeout: float = 10.0
    congestion: str = "drop"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.namespace is not None:
            validate_namespace(self.namespace)
        if not self.connect and not self.listen and self.zenoh_config is None:
            raise ConfigError("connect", "give --connect or --listen endpoints (or --config)")
        if not self.exports and not self.imports:
            raise ConfigError("export", "give --export patterns, --import key expressions, or both")
        for expr in self.imports:
            if not isinstance(expr, str) or not expr.startswith(f"{KEY_ROOT}/"):
                raise ConfigError("import", f"{expr!r}: import key expressions under {KEY_ROOT}/")
        _check_key_expressions(self.imports)
        if self.congestion not in ("drop", "block"):
            raise ConfigError("congestion", f"{self.congestion!r}: use drop or block")
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError("mode", f"{self.mode!r}: use one of {', '.join(MODES)}")
        if not isinstance(self.slots, int) or not 2 <= self.slots <= 64:
            raise ConfigError("slots", f"{self.slots!r}: use 2..64")
        for name in ("max_mirrors", "max_mirror_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"{value!r}: use a positive integer")
        # 0 (or less) looked at the catalog without a pause (4090 list requests a
        # second), NaN or infinity never again after the first look.
        if not _seconds_within(self.catalog_interval, 0.01, 60.0):
            raise ConfigError(
                "catalog_interval", f"{self.catalog_interval!r}: use seconds from 0.01 to 60"
            )
        if not (_seconds_within(self.connect_timeout, 0.0, 1e6) and self.connect_timeout > 0):
            raise ConfigError(
                "connect_timeout",
                f"{self.connect_timeout!r}: use a finite number of seconds > 0, at most 1e6",
            )
        if self.metrics_port is not None and not (
            isinstance(self.metrics_port, int) and 0 <= self.metrics_port <= 65535
        ):
            raise ConfigError("metrics_port", f"{self.metrics_port!r} is not a port (0-65535)")
        validate_metrics_host(self.metrics_host)
        if self.zenoh_config is not None and not os.path.isfile(self.zenoh_config):
            raise ConfigError("config", f"no such Zenoh configuration file: {self.zenoh_config}")

    @property
    def session_mode(self) -> str:
        return self.mode or ("peer" if self.listen else "client")


def _seconds_within(value: object, low: float, high: float) -> bool:
    """Whether ``value`` is a number of seconds (not a bool) from ``low`` to ``high``
    (NaN is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _check_key_expressions(imports: tuple[str, ...]) -> None:
    """Zenoh's syntax, and no two that overlap: a key both match would be delivered
    to two subscribers, and each of its samples applied twice. (Checked by Zenoh's
    own parser where the extra is installed; without it, running names the extra.)"""
    try:
        import zenoh
    except ImportError:
        return
    exprs = []
    for text in imports:
        try:
            exprs.append(zenoh.KeyExpr(text))
        except zenoh.ZError as exc:
            raise ConfigError("import", f"{text!r} is not a Zenoh key expression: {exc}") from exc
    for i, a in enumerate(exprs):
        for b in exprs[i + 1 :]:
            if a.intersects(b):
                raise ConfigError(
                    "import",
                    f"{a} and {b} overlap: give one expression that covers both "
                    "(a key both match would have each sample applied twice)",
                )


_ENV = {"namespace": NAMESPACE_ENV, "broker": "SHMCAST_BROKER"}


def resolve_bridge_config(
    flags: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None
) -> BridgeConfig:
    """Flags, then ``SHMCAST_*`` environment, then defaults.

    Raises:
        ConfigError: naming the field that is wrong.
    """

    def coerce(name: str, value: Any, source: str | None) -> Any:
        if name in ("connect", "listen", "exports", "imports") and isinstance(value, list):
            return tuple(value)
        return value

    return resolve_layers(BridgeConfig, flags, env_names=_ENV, environ=environ, coerce=coerce)


@dataclass
class _Export:
    name: str
    key: str
    seg: Segment
    incarnation: int
    pub: Any
    token: Any
    queryable: Any
    #: The export loop's copy of the version it puts, reused: ``put`` copies it into
    #: Zenoh. A new ``bytes`` per version cost a 1 MiB allocation that glibc trims
    #: and faults in again each time (800 us a frame instead of 50).
    staging: bytearray
    encode: Callable[[int, int], bytes]
    last: int = 0
    sent: int = 0
    skipped: int = 0
    torn: int = 0
    bytes: int = 0


@dataclass
class _ExportRefusal:
    """Why a local segment could not be exported, and when it is tried again."""

    kind: type[BaseException]
    why: str
    #: The catalog's incarnation of the segment refused: another one is tried at once.
    incarnation: int | None
    #: Looks at the catalog from this refusal to the next try (doubling per refusal).
    wait: int = 1
    #: Looks left to pass over before that try.
    skip: int = 0


@dataclass
class _Mirror:
    name: str
    key: str
    incarnation: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    pub: Publisher
    #: What a shmcast exporter's attachments for this layout and incarnation look
    #: like: a sample that matches it is written without decoding its attachment.
    template: AttachmentTemplate
    #: Counts of the local name: they go on across mirrors (incarnations) of it.
    counts: _Counts


@dataclass
class _Counts:
    """An imported name's counters, kept across its mirrors (each new incarnation
    upstream, each mirror made again): Prometheus counters never go back."""

    key: str
    incarnation: int = 0  # the upstream incarnation the versions below are of
    last: int = 0  # the latest version written of that incarnation (0: none yet)
    received: int = 0
    skipped: int = 0
    stale: int = 0
    bytes: int = 0
    upstream_up: bool = True
    #: The next mirror follows a new incarnation upstream: versions before its
    #: first one were committed there and never came here.
    renewed: bool = False
    #: When a mirror last went for a new incarnation (``time.monotonic()``): the
    #: next one waits until :data:`RENEW_SECONDS` later.
    renewed_at: float = float("-inf")
    #: The key's liveliness token went away since the mirror went for this
    #: incarnation: its exporter stopped, or made a new one (or lost its link:
    #: versions of it received after the token came back say so).
    token_lost: bool = False
    #: ``received`` when the token came back.
    token_back: int = 0
    #: The incarnation before ``incarnation``, and its last version written.
    previous: tuple[int, int] = (0, 0)
    #: When the key's liveliness token went away (``time.monotonic()``; None while
    #: it is up, or never seen), and ``received + stale`` then: a mirror whose
    #: token is gone with no sample since may be evicted (see ``ZenohBridge._evict``).
    #: Both start again at a look at the mirrors that finds a sample came since.
    gone_at: float | None = None
    gone_seen: int = 0


@dataclass
class _Pending:
    """The latest sample of a key whose mirror the local thread is making (or held
    back, see :class:`_Held`)."""

    key: str
    frame: Frame
    payload: bytes
    #: The samples of its incarnation it stands for (it and those it replaced):
    #: refused with it if it is never mirrored.
    samples: int = 1
    #: The earliest version of its incarnation it stands for (0: not known). A
    #: name's first mirror counts from there: the versions it replaced came, and
    #: are a gap counted skipped.
    first: int = 0


@dataclass
class _Held:
    """The latest sample of a new incarnation held back (see ``ZenohBridge._hold``)."""

    sample: _Pending
    at: float  #: when the first sample held for the name came (``time.monotonic()``)
    received: int  #: the name's versions received then (do they go on?)


@dataclass(frozen=True)
class BridgeStats:
    """A snapshot of a bridge's counters (metrics are built from it at scrape time)."""

    namespace: str
    exported: dict[str, dict[str, int]] = field(default_factory=dict)
    imported: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_samples: int = 0
    conflicts: int = 0
    refused: int = 0
    #: Local segments to export that could not be attached, or declared on Zenoh
    #: (tried again after 1, 2, 4, ... looks at the catalog, at most every
    #: ``EXPORT_RETRY_SECONDS``), and why.
    refused_exports: dict[str, str] = field(default_factory=dict)
    #: Mirrors deleted to make room for a new name (their exporter gone longest).
    evicted: int = 0
    #: Names whose counters were forgotten: over the ``MAX_EVICTED`` kept (evicted,
    #: refused by the local broker when made again, or deleted here).
    forgotten: int = 0


class ZenohBridge(Service):
    """The bridge service: :meth:`run` serves until :meth:`stop` (or :meth:`start`
    in a thread and :meth:`close`), as every shmcast service.

    Args:
        config: a :class:`BridgeConfig`.
        broker_curve: the local broker's CURVE keys, ``(server_public,
            client_public, client_secret)`` as :class:`ControlClient` takes them, for
            a local broker with ``curve_secret_key``.

    Raises:
        ConfigError: ``broker_curve`` is not three CURVE keys.
    """

    def __init__(self, config: BridgeConfig, *, broker_curve: CurveKeyTriple | None = None) -> None:
        self.config = config
        self._broker_curve = client_curve(broker_curve)  # ConfigError here
        self.namespace = resolve_namespace(config.namespace)
        super().__init__(f"zenoh bridge of namespace {self.namespace!r}")
        self._lock = threading.Lock()
        self._exports: dict[str, _Export] = {}
        #: Segments to export that could not be attached or declared: the kind of
        #: error (told once in the log per name and kind), its message, and when to
        #: try again.
        self._export_refused: dict[str, _ExportRefusal] = {}
        self._mirrors: dict[str, _Mirror] = {}
        #: The same mirrors by their Zenoh key: the hot path's one lookup.
        self._by_key: dict[str, _Mirror] = {}
        self._counts: dict[str, _Counts] = {}
        #: Names whose mirror the local thread is making, with the latest sample.
        self._pending: dict[str, _Pending] = {}
        #: Names refused by the local broker, and when to try again.
        self._retry_at: dict[str, float] = {}
        #: Names refused for the limits (warned once each).
        self._over: set[str] = set()
        #: Names a new incarnation of was held back (warned once each; apart: a
        #: name held once had its later refusals logged nowhere).
        self._held_warned: set[str] = set()
        #: Keys whose latest version is being asked for (one get at a time each).
        self._asking: set[str] = set()
        #: The latest sample of a new incarnation of a mirrored name, held back
        #: (at most max_mirrors): see _hold.
        self._held: dict[str, _Held] = {}
        #: Names whose mirror was evicted and whose counters are kept (to go on if
        #: they come back), oldest eviction first; at most MAX_EVICTED.
        self._evicted: dict[str, None] = {}
        #: Imported keys whose liveliness token is up, oldest first, each with its
        #: name (at most MAX_WARNED: any peer may declare tokens; a new one takes the
        #: place of the oldest whose key is not mirrored, see _token_up).
        self._tokens: dict[str, str] = {}
        self._put_kind: Any = None
        self._import_lock = threading.Lock()
        self._local: LocalBroker | None = None
        self._session: Any = None
        self._zenoh: Any = None
        self.bad_samples = 0
        self.conflicts = 0
        self.refused = 0
        self.evicted = 0
        self.forgotten = 0
        self.metrics_url: str | None = None

    # ------------------------------------------------------------------ public

    def stats(self) -> BridgeStats:
        with self._lock:
            exported = {
                n: {
                    "sent": e.sent,
                    "skipped": e.skipped,
                    "torn": e.torn,
                    "bytes": e.bytes,
                    "version": e.last,
                }
                for n, e in self._exports.items()
            }
            refused_exports = dict(self._export_refused)
        with self._import_lock:
            imported = {
                n: {
                    "received": c.received,
                    "skipped": c.skipped,
                    "stale": c.stale,
                    "bytes": c.bytes,
                    "version": c.last,
                    "upstream_up": c.upstream_up,
                    "key": c.key,
                }
                for n, c in self._counts.items()
                if n in self._mirrors or c.received  # not a name still being made
            }
        return BridgeStats(
            namespace=self.namespace,
            exported=exported,
            imported=imported,
            bad_samples=self.bad_samples,
            conflicts=self.conflicts,
            refused=self.refused,
            refused_exports={n: r.why for n, r in refused_exports.items()},
            evicted=self.evicted,
            forgotten=self.forgotten,
        )

    def run(self, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Serve until :meth:`stop`; ``on_ready`` gets the ready information.

        Raises:
            MissingExtraError: eclipse-zenoh is not installed (``shmcast[zenoh]``).
            BrokerUnavailableError: the local broker does not answer.
            EndpointError: Zenoh could not open a session on the endpoints.
            ClosedError: the bridge was closed, or has served already.
        """
        super().run(on_ready)

    # ------------------------------------------------------------------ serving

    def _serve_all(self, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
        cfg = self.config
        zenoh = _load_zenoh()
        self._zenoh = zenoh
        self._put_kind = zenoh.SampleKind.PUT
        endpoint = resolve_endpoint(cfg.broker, self.namespace)
        client: ControlClient | None = None
        declared: list[Any] = []
        metrics: MetricsServer | None = None
        try:
            client = ControlClient(endpoint, timeout=5.0, curve=self._broker_curve)
            epoch = client.request("hello")["epoch"]
            if cfg.imports:
                # Mirrors are made, annotated and deleted by a thread of their own:
                # a stalled local broker never holds up Zenoh's callbacks.
                self._local = LocalBroker(
                    ControlClient(endpoint, timeout=5.0, curve=self._broker_curve),
                    epoch=epoch,
                    namespace=self.namespace,
                    broker=cfg.broker,
                    source=SOURCE_PREFIX,
                    timeout=5.0,
                    notify=self._collect,
                    curve=self._broker_curve,
                )
            try:
                self._session = zenoh.open(self._zenoh_config(zenoh))
            except zenoh.ZError as exc:
                where = ", ".join(cfg.connect or cfg.listen) or "the configured endpoints"
                raise EndpointError(
                    "zenoh",
                    where,
                    str(exc),
                    connect=bool(cfg.connect),
                    fix="check that the router runs there and accepts this bridge "
                    "(TLS certificates and keys go in --config)",
                ) from exc
            # Callbacks run on Zenoh's own thread (indirect=False): no hand-off to
            # a Python thread per sample, and nothing left to join at exit. They
            # are short: a copy into the slot, or a non-blocking get.
            handler = zenoh.handlers.Callback
            for expr in cfg.imports:
                declared.append(
                    self._session.declare_subscriber(expr, handler(self._on_sample, indirect=False))
                )
                declared.append(
                    self._session.liveliness().declare_subscriber(
                        expr, handler(self._on_liveliness, indirect=False), history=True
                    )
                )
            if cfg.metrics_port is not None:
                registry = CollectorRegistry(auto_describe=True)
                registry.register(BridgeCollector(self.stats))
                metrics = start_metrics_server(registry, cfg.metrics_port, host=cfg.metrics_host)
                self.metrics_url = metrics.url
            self._sync_exports(client)
            self._set_ready(
                on_ready,
                {
                    "namespace": self.namespace,
                    "pid": os.getpid(),
                    "zid": str(self._session.zid()),
                    "mode": cfg.session_mode,
                    "connect": list(cfg.connect),
                    "listen": list(cfg.listen),
                    "exports": list(cfg.exports),
                    "imports": list(cfg.imports),
                    "broker": endpoint,
                    "metrics": self.metrics_url,
                },
            )
            self._export_loop(client)
        finally:
            for entity in declared:
                with contextlib.suppress(Exception):
                    entity.undeclare()
            with self._lock:
                exports = list(self._exports.values())
                self._exports.clear()
            for e in exports:
                self._drop_export(e)
            if self._local is not None:
                # The mirrors keep their last data, and no longer follow the upstream;
                # closing also closes the mirrors it made and nobody took.
                with self._import_lock:
                    last = [(*self._mark(m)[:3], False) for m in self._mirrors.values()]
                self._local.close(last)
            with self._import_lock:
                mirrors = list(self._mirrors.values())
                self._mirrors.clear()
                self._by_key.clear()
                for m in mirrors:
                    with contextlib.suppress(Exception):
                        m.pub.close()
            if self._session is not None:
                with contextlib.suppress(Exception):
                    self._session.close()
            if client is not None:
                client.close()
            if metrics is not None:
                metrics.close()

    def _zenoh_config(self, zenoh: Any) -> Any:
        cfg = self.config
        if cfg.zenoh_config is not None:
            conf = zenoh.Config.from_file(cfg.zenoh_config)
        else:
            conf = zenoh.Config()
            # Explicit endpoints only.
            conf.insert_json5("scouting/multicast/enabled", "false")
            conf.insert_json5("scouting/gossip/enabled", "false")
        # No Zenoh shared memory, whatever a file says: shmcast is that, and Zenoh's
        # leaves objects in /dev/shm behind at exit.
        conf.insert_json5("transport/shared_memory/enabled", "false")
        conf.insert_json5("mode", json.dumps(cfg.session_mode))
        if cfg.connect:
            conf.insert_json5("connect/endpoints", json.dumps(list(cfg.connect)))
            # A router that cannot be reached (or refuses us) at start is an error;
            # a link lost later is retried quickly and for ever.
            conf.insert_json5("connect/timeout_ms", str(int(cfg.connect_timeout * 1000)))
            conf.insert_json5(
                "connect/retry",
                json.dumps(
                    {"period_init_ms": 250, "period_max_ms": 1000, "period_increase_factor": 2}
                ),
            )
        if cfg.listen:
            conf.insert_json5("listen/endpoints", json.dumps(list(cfg.listen)))
        return conf

    # ------------------------------------------------------------------ export

    def _wants_export(self, entry: Mapping[str, Any]) -> bool:
        name = str(entry.get("name", ""))
        if str(entry.get("source", "")).startswith(SOURCE_PREFIX) or name in self._mirrors:
            return False  # a mirror of our own imports (a restarted broker calls it
            # local until told again): never sent back
        return any(fnmatch.fnmatchcase(name, p) for p in self.config.exports)

    def _export_loop(self, client: ControlClient) -> None:
        interval = self.config.catalog_interval
        next_sync = time.monotonic() + interval
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_sync:
                self._sync_exports(client)
                self._check_mirrors()
                self._renew_held()
                next_sync = now + interval
            with self._lock:
                exports = list(self._exports.values())
            left = max(0.0, min(0.1, next_sync - time.monotonic()))
            if not exports:
                self._stop.wait(left)
                continue
            try:
                wait_any([e.seg for e in exports], [e.last for e in exports], left)
            except ShmcastError:  # a segment closed under us by a re-sync
                continue
            for e in exports:
                self._export_latest(e)

    def _sync_exports(self, client: ControlClient) -> None:
        """Start, stop or restart exports as the local catalog says."""
        if not self.config.exports:
            return
        try:
            entries = client.request("list", timeout=2.0)["segments"]
        except ShmcastError as exc:
            log.debug("catalog not available: %s", exc)
            return
        wanted = {str(e["name"]): e for e in entries if self._wants_export(e)}
        with self._lock:
            current = dict(self._exports)
            for name in [n for n in self._export_refused if n not in wanted]:
                del self._export_refused[name]
        for name, e in current.items():
            inc = wanted.get(name, {}).get("incarnation")
            if name not in wanted or (inc and inc != e.incarnation):
                with self._lock:
                    self._exports.pop(name, None)
                self._drop_export(e)  # its token goes: importers see the loss
        for name, entry in wanted.items():
            inc = entry.get("incarnation")
            if name not in self._exports and self._export_due(name, inc):
                self._add_export(name, inc)

    def _export_due(self, name: str, incarnation: int | None) -> bool:
        """Whether a segment to export is tried at this look at the catalog: not one
        refused whose wait is not over, unless the catalog shows it made again."""
        with self._lock:
            r = self._export_refused.get(name)
            if r is None or r.incarnation != incarnation or r.skip <= 0:
                return True
            r.skip -= 1
            return False

    def _add_export(self, name: str, incarnation: int | None) -> None:
        try:
            # No wait for a header still being written (the catalog lists segments
            # made whole: such an object was put under a listed name behind the
            # broker): the export loop waited 0.2 s at each try, no other export's
            # versions put meanwhile. Refused, it is tried at a later look.
            seg = Segment.attach(name, namespace=self.namespace, prefault=False, wait=0.0)
        except (ShmcastError, OSError) as exc:
            # This segment alone (out of descriptors is an OSError, no ShmcastError:
            # it ended the run, every export and import with it).
            self._refuse_export(name, exc, incarnation)
            return
        key = key_of(self.namespace, name)
        session = self._session
        zenoh = self._zenoh
        declared: list[Any] = []
        try:
            pub = session.declare_publisher(
                key,
                encoding=zenoh.Encoding.APPLICATION_OCTET_STREAM,
                congestion_control=(
                    zenoh.CongestionControl.BLOCK
                    if self.config.congestion == "block"
                    else zenoh.CongestionControl.DROP
                ),
            )
            declared.append(pub)
            # Bound to this export: a get's own key expression may be a wildcard
            # (shmcast/lab/*) that names no segment.
            on_query = functools.partial(self._on_query, name)
            queryable = session.declare_queryable(
                key, zenoh.handlers.Callback(on_query, indirect=False), complete=True
            )
            declared.append(queryable)
            token = session.liveliness().declare_token(key)
        except Exception as exc:
            # What was declared for it goes (a publisher was left declared), and
            # this segment alone is refused: a declaration refused by Zenoh (its
            # access control, a closing session) ended the run, every export and
            # import with it.
            for entity in reversed(declared):
                with contextlib.suppress(Exception):
                    entity.undeclare()
            seg.close()
            if not isinstance(exc, zenoh.ZError):
                raise
            self._refuse_export(name, exc, incarnation)
            return
        staging = bytearray(seg.nbytes)
        encode = AttachmentTemplate(seg.dtype, seg.shape, seg.incarnation).encode
        e = _Export(name, key, seg, seg.incarnation, pub, token, queryable, staging, encode)
        # A late start exports from the current version on; earlier ones are history.
        e.last = max(0, seg.version - 1)
        with self._lock:
            self._exports[name] = e
            self._export_refused.pop(name, None)
        log.info("exporting %s as %s", name, key)

    def _refuse_export(self, name: str, exc: Exception, incarnation: int | None) -> None:
        """``name`` cannot be exported now: listed in ``refused_exports``, logged
        once per kind of error, and tried again after one look at the catalog, then
        after twice as many looks at each refusal, at most ``EXPORT_RETRY_SECONDS``
        apart (a try attaches the segment and declares it on Zenoh: at each look,
        a refusal that stays cost both, over and over). The same segment made again
        (another ``incarnation`` in the catalog) starts the waits over."""
        cap = max(1, round(EXPORT_RETRY_SECONDS / self.config.catalog_interval))
        with self._lock:
            old = self._export_refused.get(name)
            told = old is not None and old.kind is type(exc)
            wait = 1 if old is None or old.incarnation != incarnation else min(2 * old.wait, cap)
            self._export_refused[name] = _ExportRefusal(
                type(exc), str(exc), incarnation, wait, wait - 1
            )
        if not told:
            log.warning("cannot export %s (trying again after 1, 2, 4, ... looks at the "
                        "catalog, at most %.0f s apart): %s",
                        name, EXPORT_RETRY_SECONDS, exc)  # fmt: skip

    def _drop_export(self, e: _Export) -> None:
        for entity in (e.token, e.queryable, e.pub):
            with contextlib.suppress(Exception):
                entity.undeclare()
        e.seg.close()

    def _export_latest(self, e: _Export) -> None:
        """Put the latest version (latest value: versions committed meanwhile are
        skipped and counted).

        The path from a local commit to Zenoh: one look at the header, one copy
        into the staging buffer (``Segment.read_into``: no array, no allocation)
        and the attachment. On an idle host, what runs between a wake-up and the
        ``put`` runs with cold caches, at tens of microseconds for what takes two
        when hot: a reader built of snapshot objects and numpy calls cost 30-60 us
        more per version here than this one (bench: bridge latency).
        """
        try:
            if e.seg.version <= e.last:
                return
            version, ts = e.seg.read_into(e.staging)
        except TornReadError:
            e.torn += 1
            return
        except ShmcastError:
            return
        e.pub.put(e.staging, attachment=e.encode(version, ts))
        with self._lock:
            if e.last and version > e.last + 1:
                e.skipped += version - e.last - 1
            e.last = version
            e.sent += 1
            e.bytes += len(e.staging)

    def _read_latest(self, e: _Export) -> tuple[bytearray, bytes]:
        """A private copy of the latest version (C order) and its attachment."""
        payload = bytearray(e.seg.nbytes)
        version, ts = e.seg.read_into(payload)
        # Only now, validated: the bytes are the version's.
        return payload, e.encode(version, ts)

    def _on_query(self, name: str, query: Any) -> None:
        """A late joiner asks for the latest version of export ``name`` (Zenoh's thread)."""
        with query:
            with self._lock:
                e = self._exports.get(name)
            if e is None:
                return
            try:
                # Its own copy: the export loop may be filling the staging buffer.
                payload, att = self._read_latest(e)
            except (ShmcastError, ValueError):
                return  # nothing yet, torn, or closed under us: the live stream will do
            query.reply(e.key, payload, attachment=att)

    # ------------------------------------------------------------------ import

    def _on_liveliness(self, sample: Any) -> None:
        key = str(sample.key_expr)
        alive = sample.kind == self._zenoh.SampleKind.PUT
        try:
            _, name = parse_key(key)
        except (ValueError, ShmcastError):
            return
        with self._import_lock:
            if alive:
                self._token_up(key, name)
            else:
                self._tokens.pop(key, None)
            c = self._counts.get(name)
            if c is not None and c.key == key:
                if not alive:
                    c.token_lost = True
                    if c.gone_at is None:
                        c.gone_at, c.gone_seen = time.monotonic(), c.received + c.stale
                else:
                    c.gone_at = None
                    if c.token_lost:
                        c.token_back = c.received
            if c is not None and c.key == key and c.upstream_up != alive:
                c.upstream_up = alive
                m = self._mirrors.get(name)
                if m is not None:
                    self._annotate(m)
        if alive:
            self._ask_latest(key)

    def _token_up(self, key: str, name: str) -> None:
        """Remember ``key``'s token as up. The set full, the oldest token of a key
        not mirrored goes for it: before, a peer's tokens on other keys, declared
        first, took every place, and an exporter's token found none (its mirror was
        then taken for one without a live exporter, see :meth:`_live`). Mirrored
        keys (made or being made) are at most ``max_mirrors``; an evicted name's
        kept counters keep no place (any peer may make evicted names, up to
        ``MAX_EVICTED``, and declare their tokens again). Called with the import
        lock held."""
        if key in self._tokens or len(self._tokens) < MAX_WARNED:
            self._tokens[key] = name
            return
        for old, old_name in self._tokens.items():
            c = self._counts.get(old_name)
            mirrored = old_name in self._mirrors or old_name in self._pending
            if c is None or c.key != old or not mirrored:
                del self._tokens[old]
                self._tokens[key] = name
                return

    def _ask_latest(self, key: str) -> None:
        """Ask the exporter of ``key`` for its latest version; the reply comes to
        :meth:`_on_reply` (never block in a Zenoh callback). One get per key at a
        time, and at most ``MAX_WARNED`` keys at once: a peer flapping a token
        made a get per appearance, each one the exporter's latest version sent
        again (a 1 MiB reply each)."""
        if self._stop.is_set():
            return
        with self._import_lock:
            if key in self._asking or len(self._asking) >= MAX_WARNED:
                return
            self._asking.add(key)
        done = functools.partial(self._asked, key)
        try:
            self._session.get(
                key,
                self._zenoh.handlers.Callback(self._on_reply, drop=done, indirect=False),
                timeout=5.0,
            )
        except Exception:  # closed under us: nothing asked
            done()

    def _asked(self, key: str) -> None:
        """A get of :meth:`_ask_latest` is over (answered, or timed out)."""
        with self._import_lock:
            self._asking.discard(key)

    def _on_reply(self, reply: Any) -> None:
        sample = getattr(reply, "ok", None)
        if sample is not None:
            self._apply(sample, live=False)

    def _on_sample(self, sample: Any) -> None:
        if sample.kind == self._put_kind:
            self._apply(sample, live=True)

    def _apply(self, sample: Any, *, live: bool) -> None:
        key = str(sample.key_expr)
        attachment = sample.attachment
        att = b"" if attachment is None else attachment.to_bytes()
        # The hot path: a sample of a stream already mirrored, in its exporter's own
        # encoding. The import's share of the latency is what runs here, cold (see
        # _export_latest): one lookup by key instead of parsing it, one struct unpack
        # instead of a decoding, and the payload goes in as the bytes it came as.
        m = self._by_key.get(key)
        if m is not None and (stamp := m.template.match(att)) is not None:
            payload = sample.payload.to_bytes()
            with self._import_lock:
                if self._by_key.get(key) is m:  # not recreated or closed meanwhile
                    self._commit(key, m, stamp, payload)
                    return
        if self._stop.is_set():
            return
        try:
            namespace, name = parse_key(key)
            if attachment is None:
                raise ValueError("no attachment")
            payload = sample.payload.to_bytes()
            frame = decode_attachment(att)
            # Checked before anything is made or dropped for it: a bad sample
            # changes nothing here.
            if not 0 < frame.version <= MAX_VERSION:
                raise ValueError(f"version {frame.version} is not in 1..2**63-1")
            if len(payload) != frame.nbytes:
                raise ValueError(f"{len(payload)} bytes for a {frame.nbytes}-byte layout")
        except (ValueError, ShmcastError) as exc:
            self._bad(key, exc)
            return
        if namespace == self.namespace and name in self._exports:
            return  # our own export coming back
        with self._import_lock:
            m = self._mirror(key, name, frame, payload, live=live)
            if m is not None:
                self._commit(key, m, (frame.version, frame.timestamp_ns), payload)

    def _commit(self, key: str, m: _Mirror, stamp: tuple[int, int], payload: bytes) -> None:
        """Write one upstream version into its mirror; called with the import lock held."""
        version, ts = stamp
        c = m.counts
        if version <= c.last:
            c.stale += 1
            return
        try:
            m.pub.publish_bytes(payload, version=version, timestamp_ns=ts)
        except ShmcastError as exc:  # not the layout's size; a version beyond 2**63-1
            self._bad(key, exc)
            return
        if c.renewed:
            # A new incarnation starts at version 1: those before this one were
            # committed upstream while we mirrored the name, and never came here.
            c.renewed = False
            c.skipped += version - 1
        elif c.last and version > c.last + 1:
            c.skipped += version - c.last - 1
        c.last = version
        c.received += 1
        c.bytes += len(payload)

    def _bad(self, key: str, exc: Exception) -> None:
        self.bad_samples += 1
        log.debug("bad sample on %s: %s", key, exc)

    def _mirror(
        self,
        key: str,
        name: str,
        frame: Frame,
        payload: bytes,
        *,
        live: bool,
        held: bool = False,
        samples: int = 1,
    ) -> _Mirror | None:
        """The mirror of ``key`` for ``frame``, or None while the local thread makes
        it (``payload`` is then committed once it exists) or when it cannot be made.
        ``held``: a sample :meth:`_renew_held` lets go (the mirror's incarnation is
        not to be kept). ``samples``: of ``frame``'s incarnation that it stands for
        (a held or pending sample: those it replaced too), each counted if it is
        refused. Called with the import lock held."""
        c = self._counts.get(name)
        if c is not None and c.key != key:
            if name not in self._evicted or c.key in self._tokens:
                self.conflicts += samples  # two upstreams for one local name: the first wins
                return None
            # Its mirror gone (evicted, refused, deleted here) and its key's token
            # too: the name is another key's now, its counters going on (they never
            # go back), the rest of them started over as a new name's.
            c = self._counts[name] = _Counts(
                key, received=c.received, skipped=c.skipped, stale=c.stale, bytes=c.bytes
            )
        m = self._mirrors.get(name)
        if m is not None:
            # One stream repeats one layout: decoding hands out the same dtype object.
            same = m.dtype is frame.dtype or m.dtype == frame.dtype
            if m.incarnation == frame.incarnation and same and m.shape == frame.shape:
                return m
            if not live:
                return None  # a reply from before the new incarnation: ignore it
        first = frame.version
        if (old := self._pending.get(name)) is not None:
            # Being made: the latest is committed once it is (one it replaces is a
            # gap in the versions, counted skipped then; one of another incarnation
            # is never mirrored: refused, with every sample it stood for).
            if old.frame.incarnation != frame.incarnation:
                self.refused += old.samples
            elif frame.version <= old.frame.version:
                # One no newer than the one waiting is stale: a get's reply coming
                # after a live sample of a later version replaced it, the mirror was
                # made at the older version, and the newer one was counted nowhere.
                if c is not None:
                    c.stale += samples
                return None
            else:
                samples += old.samples
                first = old.first
            self._pending[name] = _Pending(key, frame, payload, samples, first)
            return None
        if time.monotonic() < self._retry_at.get(name, 0.0):
            self.conflicts += samples
            return None
        # The limits are checked before an old mirror goes: a refused sample
        # changes nothing here. A new name past --max-mirrors takes the place of
        # mirrors whose exporters are gone (the longest gone first), if any: once
        # its mirror is made, or now if /dev/shm needs their room for it.
        size = segment_size(frame.nbytes, self.config.slots)
        why, victims = self._over_limits(size, m)
        if why is not None:
            self.refused += samples
            if name not in self._over and len(self._over) < MAX_WARNED:
                self._over.add(name)  # bounded: any peer may send any number of names
                log.warning("not mirroring %s: %s", key, why)
            return None
        self._evicted.pop(name, None)  # mirrored again: its counters are in use
        for v in victims:
            self._evict(v, key)
        if m is not None:
            assert c is not None  # a mirror's name has its counts
            now = time.monotonic()
            if now < c.renewed_at + RENEW_SECONDS or (not held and self._live(c)):
                self._hold(_Pending(key, frame, payload, samples, first), name, c, now)
                return None
            self._held.pop(name, None)
            c.renewed_at = now
            log.info("%s: new incarnation upstream; recreating the mirror", key)
            self._drop_mirror(m, delete=True)
        if c is None:
            c = self._counts[name] = _Counts(key)
        if c.incarnation != frame.incarnation:
            # A new incarnation upstream (or the first): its versions start over;
            # back on the one before (a peer's put in between), they count on.
            c.previous, last = turn_incarnation(
                c.previous, (c.incarnation, c.last), frame.incarnation
            )
            c.renewed = c.incarnation != 0 and last is None
            c.incarnation = frame.incarnation
            c.last = last or 0
            c.token_lost = False
        self._pending[name] = _Pending(key, frame, payload, samples, first)
        assert self._local is not None
        layout = (dtype_str(frame.dtype), frame.shape, self.config.slots)
        self._local.create(
            MirrorSpec(
                name,
                frame.dtype,
                frame.shape,
                self.config.slots,
                layout,
                0,
                frame.incarnation,
                source=f"{SOURCE_PREFIX}{key}",
                first=frame.version,
            )
        )
        return None

    def _over_limits(self, size: int, old: _Mirror | None) -> tuple[str | None, list[_Mirror]]:
        """Why a mirror of ``size`` bytes (in place of ``old``, if any) may not be
        made now, or None, with the mirrors to evict for it (:meth:`_evictable`):
        over ``--max-mirror-bytes``, or past ``--max-mirrors`` with no mirror of an
        exporter gone to evict, or it would leave too little of /dev/shm free
        (:func:`shm_shortfall`, counting the mirrors being made, and ``old`` or the
        mirrors evicted for it as freed: counted as taken, a mirror of more than
        45% of /dev/shm never followed a new incarnation). Any peer may put on an
        imported key. Called with the import lock held."""
        cfg = self.config
        others = len(self._mirrors) + len(self._pending) - (old is not None)
        over = others + 1 - cfg.max_mirrors
        victims = self._evictable(over) if old is None else ([] if over <= 0 else None)
        if size > cfg.max_mirror_bytes or victims is None:
            return (
                f"a {size}-byte segment, with {len(self._mirrors)} mirrors made (none of an "
                f"exporter gone, to evict); the limits are --max-mirror-bytes "
                f"{cfg.max_mirror_bytes} and --max-mirrors {cfg.max_mirrors}"
            ), []
        slots = cfg.slots
        making = sum(segment_size(p.frame.nbytes, slots) for p in self._pending.values())
        gone = [old] if old is not None else victims
        freed = sum(segment_size(o.pub.segment.nbytes, slots) for o in gone)
        why = shm_shortfall(size, making=making, freed=freed)
        if why is None and victims and shm_shortfall(size, making=making) is None:
            # Room enough beside them: they go once the new mirror is made
            # (_make_room), not before: the local broker may refuse it (a local
            # segment of that name, its limits), and one went for nothing.
            victims = []
        return why, victims

    def _evictable(self, n: int) -> list[_Mirror] | None:
        """The ``n`` mirrors whose exporters have been gone longest: their key's
        liveliness token went away (the segment deleted there, the exporter
        stopped, or its link lost: Zenoh tells them apart no more than this) and
        no sample of theirs came since, nor is one held. A mirror whose exporter
        is live, or never had a token (a plain Zenoh writer: nothing says it
        went), is never one of them. None if fewer than ``n`` are; ``[]`` for
        ``n <= 0``. Called with the import lock held."""
        if n <= 0:
            return []
        gone = [
            m
            for m in self._mirrors.values()
            if (c := m.counts).gone_at is not None
            and c.key not in self._tokens
            and c.received + c.stale == c.gone_seen
            and m.name not in self._held
        ]
        if len(gone) < n:
            return None
        gone.sort(key=lambda m: m.counts.gone_at or 0.0)
        return gone[:n]

    def _evict(self, m: _Mirror, key: str) -> None:
        """Delete the mirror ``m`` through the local broker to make room for ``key``,
        as a mirror whose upstream deleted it: its readers see the segment
        deleted. Its counters are kept for the ``MAX_EVICTED`` names last evicted
        (to go on if the name comes back); older ones are forgotten, counted.
        Called with the import lock held."""
        c = m.counts
        gone = time.monotonic() - (c.gone_at or 0.0)
        log.info(
            "evicting mirror %s (its exporter gone %.1f s, nothing received since) to make "
            "room for %s: --max-mirrors %d reached",
            m.name, gone, key, self.config.max_mirrors,
        )  # fmt: skip
        self.evicted += 1
        self._drop_mirror(m, delete=True)
        self._keep_counts(m.name)

    def _keep_counts(self, name: str) -> None:
        """Keep the counters of ``name``, whose mirror is gone (evicted, made again
        and refused by the local broker, or deleted here), to go on if it comes
        back: those of the ``MAX_EVICTED`` names last kept; older ones are
        forgotten, counted. Called with the import lock held."""
        self._evicted.pop(name, None)
        self._evicted[name] = None
        while len(self._evicted) > MAX_EVICTED:
            oldest = next(iter(self._evicted))
            del self._evicted[oldest]
            if oldest not in self._mirrors and oldest not in self._pending:
                self._counts.pop(oldest, None)
                self.forgotten += 1

    def _live(self, c: _Counts) -> bool:
        """Whether the exporter of the incarnation ``c`` counts may still be there:
        the key's liveliness token is up and has not gone away since. (An exporter
        making a new incarnation drops its token first; a peer's own token on the
        key does not hide the exporter's going: Zenoh tells of a key's last one.)
        An exporter whose link was lost and came back goes on with the same
        incarnation: its versions after the token's return make it live again.
        Called with the import lock held."""
        if c.key not in self._tokens:
            return False
        if c.token_lost and c.received > c.token_back:
            c.token_lost = False
        return not c.token_lost

    def _hold(self, pending: _Pending, name: str, c: _Counts, now: float) -> None:
        """Keep the latest sample of a new incarnation of ``name`` back:
        :meth:`_renew_held` makes it once :data:`RENEW_SECONDS` have gone by since
        the name's last new incarnation, and refuses it if the mirror's own
        incarnation stays live (:meth:`_live`) with versions received meanwhile.
        A peer alternating incarnations on a key made each sample delete the
        mirror and make another (220 a second for one name); one sample of another
        incarnation on a live exporter's key replaced its mirror for a second,
        local readers seeing the peer's data. A held sample replaced by one of
        another incarnation is never mirrored: refused, counted. (Of the same
        incarnation, its version is a gap, counted skipped once the mirror is
        made; one no newer than the held one replaces nothing, counted stale.)
        Called with the import lock held."""
        held = self._held.get(name)
        key = pending.key
        if held is None:
            if name not in self._held_warned and len(self._held_warned) < MAX_WARNED:
                self._held_warned.add(name)
                log.warning("%s: a new incarnation upstream while the mirror's is live or "
                            "less than %.0f s old: holding it back (a peer putting "
                            "incarnations of its own?)", key, RENEW_SECONDS)  # fmt: skip
            self._held[name] = _Held(pending, now, c.received)
        elif held.sample.frame.incarnation != pending.frame.incarnation:
            self.refused += held.sample.samples
            held.sample = pending
        elif pending.frame.version <= held.sample.frame.version:
            # One no newer than the one held is stale (a second writer on the key):
            # it replaced the newer one, made at the older version, the newer one
            # counted nowhere.
            c.stale += pending.samples
        else:
            pending.samples += held.sample.samples
            held.sample = pending

    def _renew_held(self) -> None:
        """Make the mirrors of the held new incarnations whose time has come, or
        refuse them (the export loop's thread, with each look at the catalog)."""
        with self._import_lock:
            if not self._held:
                return
            now = time.monotonic()
            for name, held in list(self._held.items()):
                c = self._counts.get(name)
                if c is not None and now < c.renewed_at + RENEW_SECONDS:
                    continue
                if c is not None and self._live(c):
                    if now < held.at + RENEW_SECONDS:
                        continue  # does the mirror's incarnation go on?
                    if c.received > held.received:
                        # It does, its exporter's token up: the other one is a peer's.
                        del self._held[name]
                        self.refused += held.sample.samples
                        continue
                del self._held[name]
                p = held.sample
                f = p.frame
                m = self._mirror(p.key, name, f, p.payload, live=True, held=True, samples=p.samples)
                if m is not None:
                    self._commit(p.key, m, (f.version, f.timestamp_ns), p.payload)

    def _collect(self) -> None:
        """Take in the mirrors the local thread made or could not make (its thread)."""
        assert self._local is not None
        for done in self._local.results():
            spec = done.spec
            with self._import_lock:
                pending = self._pending.pop(spec.name, None)
                if isinstance(done, Refused):
                    now = time.monotonic()
                    if len(self._retry_at) >= MAX_WARNED:  # any peer may send any names
                        self._retry_at = {n: t for n, t in self._retry_at.items() if t > now}
                    self._retry_at[spec.name] = now + RETRY_SECONDS
                    # Every sample that came while it was being made (the latest stood
                    # for them): one was counted, the others lost silently.
                    self.conflicts += 1 if pending is None else pending.samples
                    c = self._counts.get(spec.name)
                    if c is not None and not c.received:
                        del self._counts[spec.name]  # never mirrored: nothing to count
                    elif c is not None:
                        self._keep_counts(spec.name)  # bounded: any peer may send any names
                    log.error(
                        "cannot mirror %s (trying again in %.0f s): %s",
                        spec.name, RETRY_SECONDS, done.reason,
                    )  # fmt: skip
                    continue
                c = self._counts.get(spec.name)
                if self._stop.is_set() or pending is None or c is None:
                    done.pub.close()
                    continue
                key = pending.key
                self._retry_at.pop(spec.name, None)
                if not self._make_room(spec.name, key, done.pub, pending):
                    continue
                template = AttachmentTemplate(spec.dtype, spec.shape, spec.incarnation)
                m = _Mirror(
                    spec.name, key, spec.incarnation, spec.dtype, spec.shape, done.pub, template, c
                )
                self._mirrors[spec.name] = m
                self._by_key[key] = m
                self._annotate(m)  # upstream_up, in the catalog too
                f = pending.frame
                if (f.incarnation, f.dtype, f.shape) == (m.incarnation, m.dtype, m.shape):
                    if f.version == c.last:
                        # The version a mirror made again (evicted, or deleted here)
                        # had: its data again, counted once already.
                        with contextlib.suppress(ShmcastError):
                            m.pub.publish_bytes(
                                pending.payload, version=f.version, timestamp_ns=f.timestamp_ns
                            )
                        continue
                    if not c.last and not c.renewed and pending.first:
                        # The name's first versions here (nothing to count a gap
                        # from yet): those the waiting sample replaced came, and
                        # were dropped.
                        c.skipped += f.version - pending.first
                    self._commit(key, m, (f.version, f.timestamp_ns), pending.payload)
                else:  # the upstream moved on meanwhile: this sample remakes it
                    self._mirror(
                        key, spec.name, f, pending.payload, live=True, samples=pending.samples
                    )

    def _make_room(self, name: str, key: str, pub: Publisher, pending: _Pending) -> bool:
        """Evict the mirrors that the one just made takes the place of past
        ``--max-mirrors`` (those whose exporters have been gone longest now), or,
        with too few gone now (an exporter back while it was made), delete it
        again, its samples refused. Whether it stays. Called with the import lock
        held."""
        victims = self._evictable(len(self._mirrors) + 1 - self.config.max_mirrors)
        if victims is not None:
            for v in victims:
                self._evict(v, key)
            return True
        pub.close()
        assert self._local is not None
        self._local.delete(name)
        self.refused += pending.samples
        c = self._counts.get(name)
        if c is not None and not c.received:
            del self._counts[name]  # never mirrored: nothing to count
        elif c is not None:
            self._keep_counts(name)
        log.warning("not mirroring %s: --max-mirrors %d reached, and no mirror's exporter "
                    "is gone any more", key, self.config.max_mirrors)  # fmt: skip
        return False

    def _drop_mirror(self, m: _Mirror, *, delete: bool) -> None:
        """Forget ``m`` (its counts stay); called with the import lock held."""
        del self._mirrors[m.name]
        self._by_key.pop(m.key, None)
        m.pub.close()
        if delete and self._local is not None:
            self._local.delete(m.name)

    def _check_mirrors(self) -> None:
        """A mirror deleted on this host (``shmcast rm --force``, a reclaim) is made
        again from the upstream's latest version: written into the unlinked object,
        versions reached nobody, and were counted as received. A mirror whose token
        is gone but that received a sample since the last look is not evictable
        until the next look with none (its gone clock starts again): a sample put
        before the token went may arrive after it (seen in a reproducer)."""
        now = time.monotonic()
        with self._import_lock:
            for m in self._mirrors.values():
                c = m.counts
                if c.gone_at is not None and c.received + c.stale != c.gone_seen:
                    c.gone_at, c.gone_seen = now, c.received + c.stale
            gone = [m for m in self._mirrors.values() if not m.pub.segment.linked()]
            for m in gone:
                log.warning("mirror %s was deleted here, not upstream: making it again", m.name)
                self._drop_mirror(m, delete=False)
                # Bounded as an evicted name's: an upstream gone never makes it again.
                self._keep_counts(m.name)
            marks = [self._mark(m) for m in self._mirrors.values()]
        for m in gone:
            self._ask_latest(m.key)
        if marks and self._local is not None:
            # A restarted local broker adopts the mirrors as local segments: tell it
            # again what they are (else the next run takes one over, stale).
            self._local.check_marks(marks)

    def _mark(self, m: _Mirror) -> Mark:
        layout = (dtype_str(m.dtype), m.shape, self.config.slots)
        return (m.name, layout, f"{SOURCE_PREFIX}{m.key}", m.counts.upstream_up)

    def _annotate(self, m: _Mirror) -> None:
        """Tell the local catalog whether the upstream is up (``upstream_up``)."""
        if self._local is not None:
            name, layout, source, up = self._mark(m)
            self._local.annotate([(name, layout)], up, source=source)


class BridgeCollector(Collector):
    """Exports ``shmcast_bridge_*`` metrics of one bridge.

    Args:
        stats: returns the bridge's counters (called at each scrape).
    """

    def __init__(self, stats: Callable[[], BridgeStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        labels = ["namespace", "segment"]
        out = {
            "sent": CounterMetricFamily(
                "shmcast_bridge_exported_versions", "Versions put on Zenoh", labels=labels
            ),
            "out_skipped": CounterMetricFamily(
                "shmcast_bridge_export_skipped_versions",
                "Local versions never put (the bridge read the latest instead)",
                labels=labels,
            ),
            "torn": CounterMetricFamily(
                "shmcast_bridge_export_torn_reads",
                "Exports abandoned because the writer overwrote the slot during the copy",
                labels=labels,
            ),
            "received": CounterMetricFamily(
                "shmcast_bridge_imported_versions", "Versions written into mirrors", labels=labels
            ),
            "in_skipped": CounterMetricFamily(
                "shmcast_bridge_import_skipped_versions",
                "Upstream versions never written (gaps in the version numbers, and versions "
                "replaced by a later one while the mirror was made)",
                labels=labels,
            ),
            "stale": CounterMetricFamily(
                "shmcast_bridge_import_stale_versions",
                "Samples not written: a version the mirror already has or has passed",
                labels=labels,
            ),
        }
        refused_exports = GaugeMetricFamily(
            "shmcast_bridge_refused_exports",
            "Local segments to export that could not be attached or declared on Zenoh; tried again",
            labels=["namespace"],
        )
        refused_exports.add_metric([st.namespace], len(st.refused_exports))
        yield refused_exports
        up = GaugeMetricFamily(
            "shmcast_bridge_upstream_up",
            "1 while the exporter of an imported segment is alive (its liveliness token)",
            labels=labels,
        )
        ns = st.namespace
        for name, c in sorted(st.exported.items()):
            out["sent"].add_metric([ns, name], c["sent"])
            out["out_skipped"].add_metric([ns, name], c["skipped"])
            out["torn"].add_metric([ns, name], c["torn"])
        for name, c in sorted(st.imported.items()):
            out["received"].add_metric([ns, name], c["received"])
            out["in_skipped"].add_metric([ns, name], c["skipped"])
            out["stale"].add_metric([ns, name], c["stale"])
            up.add_metric([ns, name], 1.0 if c["upstream_up"] else 0.0)
        yield from out.values()
        yield up
        for name, doc, value in (
            ("bad_samples", "Samples that were not shmcast frames", st.bad_samples),
            (
                "conflicts",
                "Samples not mirrored: their local name is fed by another source, "
                "or the local broker refused the mirror",
                st.conflicts,
            ),
            (
                "refused_samples",
                "Samples not mirrored: over --max-mirrors or --max-mirror-bytes, too "
                "little of /dev/shm left free, a new incarnation replaced by another "
                "before its mirror was made, or one put while the mirror's exporter "
                "stayed live",
                st.refused,
            ),
            (
                "evicted_mirrors",
                "Mirrors deleted to make room for a new name past --max-mirrors: those "
                "whose exporter had been gone longest, nothing received since",
                st.evicted,
            ),
            (
                "forgotten_names",
                f"Names whose counters were forgotten (over the {MAX_EVICTED} last evicted, "
                "refused by the local broker when made again, or deleted here, which are kept)",
                st.forgotten,
            ),
        ):
            family = CounterMetricFamily(f"shmcast_bridge_{name}", doc, labels=["namespace"])
            family.add_metric([ns], value)
            yield family
