"""Broker configuration: frozen dataclasses, resolved once at start.

Precedence: CLI flag, then ``SHMCAST_*`` environment, then the TOML file, then
the default. Nothing here runs at import.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np

from ._auth import curve_public, is_z85_key
from ._layout import MAX_SLOTS, dtype_str, mode_problem, normalize_layout, parse_dtype
from ._names import (
    NAMESPACE_ENV,
    validate_metrics_host,
    validate_namespace,
    validate_segment_name,
)
from ._protocol import MAX_REQUEST
from .errors import ConfigError, ShmcastError

__all__ = ["BrokerConfig", "SegmentSpec", "load_toml", "resolve_config", "resolve_layers"]

T = TypeVar("T")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class SegmentSpec:
    """A segment declared up front in the broker's configuration."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    slots: int = 2

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape) * np.dtype(_dtype_from(self.dtype)).itemsize)


def _dtype_from(value: Any) -> Any:
    """A dtype from TOML: a numpy name, or a list of [name, type(, shape)] fields."""
    if isinstance(value, str):
        return parse_dtype(value)
    if isinstance(value, list):
        return np.dtype([tuple(tuple(x) if isinstance(x, list) else x for x in f) for f in value])
    raise TypeError(f"expected a string or a list of fields, got {type(value).__name__}")


@dataclass(frozen=True)
class BrokerConfig:
    """Everything a broker needs, validated.

    ``namespace`` of ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``, read
    when the broker is made. ``control``/``control_ro``/``events`` of ``None``
    mean ipc endpoints in the namespace's runtime directory; an ipc path given
    elsewhere is bound only where nothing is or over a socket file nobody
    listens on (anything else there is refused). TCP endpoints should
    name an address; ``tcp://*`` binds every interface and is only used when
    written explicitly. ``advertise_events`` is the events endpoint told to
    clients (``hello``) when the bound one is not reachable as written, e.g.
    ``tcp://0.0.0.0:5556`` in a container. ``curve_secret_key`` never shows in
    a repr.

    Roles: ``control`` serves every request to writers, ``control_ro`` only
    those of readers (hello, list, describe, stats, report, subscribers, topics).
    With CURVE, a key in ``curve_readers`` is a reader on either endpoint and a
    key in ``curve_clients`` a writer (with both lists empty, any key is a writer).
    Without CURVE a TCP peer cannot be told apart from another, and loopback is
    reachable by every local user (of any uid), so a plain TCP ``control``
    endpoint, on 127.0.0.1 too, needs ``tcp_open = true``, written out (every
    local user is then a writer), and so does any other plain TCP endpoint
    (``control_ro``, ``events``, ``data``: the last hands every segment's bytes
    to whoever connects) beyond loopback. On loopback those three are allowed:
    every local user can then read through them (``exposure_warning``).

    A clean stop leaves the segments whose writer still runs for the next broker
    and unlinks the others; ``unlink_on_exit`` unlinks them all (stop the
    publishers first: one still running would write where no reader looks).

    Limits on what the broker takes in: ``max_segment_bytes`` per segment (a
    positive count of bytes; ``None``, no limit), ``max_message_bytes`` per control
    (and data-stream) message (a relay's hello may take ``HELLO_ALLOWANCE``, 70 KiB,
    more), ``max_subscriptions`` distinct topics served on the events endpoint,
    ``max_relays`` connected relays, ``max_relay_patterns`` patterns per relay.
    """

    namespace: str | None = None
    control: str | None = None
    control_ro: str | None = None
    events: str | None = None
    advertise_events: str | None = None
    data: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    mode: int = 0o600
    group: str | None = None
    heartbeat_interval: float = 0.5
    max_segment_bytes: int | None = None
    curve_secret_key: str | None = field(default=None, repr=False)
    curve_public_key: str | None = None
    curve_clients: tuple[str, ...] = ()
    curve_readers: tuple[str, ...] = ()
    tcp_open: bool = False
    max_message_bytes: int = MAX_REQUEST
    max_subscriptions: int = 4096
    max_relays: int = 64
    max_relay_patterns: int = 64
    unlink_on_exit: bool = False
    segments: tuple[SegmentSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.namespace is not None:
            validate_namespace(self.namespace)
        for name in ("control", "control_ro", "events", "advertise_events", "data"):
            ep = getattr(self, name)
            if ep is not None and not (
                isinstance(ep, str) and ep.startswith(("ipc://", "tcp://", "inproc://"))
            ):
                raise ConfigError(name, f"{ep!r} is not an ipc://, tcp:// or inproc:// endpoint")
        if self.metrics_port is not None and not (
            _is_int(self.metrics_port) and 0 <= self.metrics_port <= 65535
        ):
            raise ConfigError("metrics_port", f"{self.metrics_port!r} is not a port (0-65535)")
        validate_metrics_host(self.metrics_host)
        problem = mode_problem(self.mode)  # Segment.create applies the same rule
        if problem is not None:
            raise ConfigError("mode", problem)
        for name, low, high in (
            ("max_message_bytes", 1024, 2**30),
            ("max_subscriptions", 16, 2**24),
            ("max_relays", 1, 65536),
            ("max_relay_patterns", 1, 65536),
        ):
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                raise ConfigError(name, f"{value!r}: use an integer from {low} to {high}")
        if self.max_segment_bytes is not None and not (
            _is_int(self.max_segment_bytes) and self.max_segment_bytes > 0
        ):
            raise ConfigError(
                "max_segment_bytes",
                f"{self.max_segment_bytes!r}: use a positive number of bytes, "
                f"e.g. 67108864 for 64 MiB, or leave it out for no limit",
            )
        for name in ("tcp_open", "unlink_on_exit"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"{getattr(self, name)!r}: use true or false")
        for name, endpoint in self._plain_tcp().items():
            if self.tcp_open:
                break
            if name == "control":
                raise ConfigError(
                    name,
                    f"{endpoint} is plain TCP without CURVE: a TCP peer cannot be told from "
                    f"another, so every local user (any process on this host, of any user; "
                    f"beyond loopback, anyone who reaches it) {_EXPOSED[name]}: use an "
                    f"ipc:// endpoint (the default, owner only), set curve_secret_key (and "
                    f"curve_clients / curve_readers), or set tcp_open = true (--tcp-open) "
                    f"if every local user may then write",
                )
            if not is_loopback(endpoint):
                raise ConfigError(
                    name,
                    f"{endpoint} binds beyond loopback without CURVE, so anyone who reaches "
                    f"it {_EXPOSED[name]}: set curve_secret_key (and curve_clients / "
                    f"curve_readers), bind 127.0.0.1 (every local user can still reach it), "
                    f"or set tcp_open = true (--tcp-open) on a network you trust",
                )
        if self.group is not None:
            try:
                grp.getgrnam(self.group)
            except KeyError:
                raise ConfigError("group", f"no group named {self.group!r}") from None
        if not (
            isinstance(self.heartbeat_interval, (int, float))
            and not isinstance(self.heartbeat_interval, bool)
            and 0.01 <= self.heartbeat_interval <= 60
        ):
            raise ConfigError("heartbeat_interval", "use seconds between 0.01 and 60")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ConfigError("segments", "a segment name is declared twice")
        self._check_curve()

    def _check_curve(self) -> None:
        """The CURVE keys, before any socket sees them: ZeroMQ refused a bad server key
        with a traceback, and a client key that is no key, or a public key that is
        not the secret key's, only made clients time out, with nothing to say why."""
        make = 'make key pairs with `python -c "from shmcast.broker import curve_keypair; ' \
            'print(curve_keypair())"`'  # fmt: skip
        for name in ("curve_secret_key", "curve_public_key"):
            key = getattr(self, name)
            if key is not None and not is_z85_key(key):
                raise ConfigError(name, f"expected a 40-character z85 CURVE key; {make}")
        for name in ("curve_clients", "curve_readers"):
            keys = getattr(self, name)
            if not isinstance(keys, (tuple, list)):
                raise ConfigError(name, "expected a list of z85 public keys")
            for i, key in enumerate(keys):
                if not is_z85_key(key):
                    # Not shown: a mangled secret key would end up in a log.
                    raise ConfigError(
                        name, f"entry {i} is not a 40-character z85 CURVE public key; {make}"
                    )
        if self.curve_secret_key is None:
            for name in ("curve_public_key", "curve_clients", "curve_readers"):
                if getattr(self, name):
                    raise ConfigError(
                        name,
                        "set without curve_secret_key, so CURVE is off and no key is "
                        "checked: set curve_secret_key too, or leave this out",
                    )
        elif self.curve_public_key is not None:
            public = curve_public(self.curve_secret_key)
            if public is not None and public != self.curve_public_key:
                # Clients given this public key would only ever time out.
                raise ConfigError(
                    "curve_public_key",
                    f"not the public key of curve_secret_key (that is {public}); or leave "
                    f"it out: it is derived from the secret key",
                )

    def _plain_tcp(self) -> dict[str, str]:
        """The TCP endpoints bound without CURVE, by field: every local user reaches them."""
        if self.curve_secret_key:
            return {}
        return {
            name: endpoint
            for name in _EXPOSED
            if isinstance(endpoint := getattr(self, name), str) and endpoint.startswith("tcp://")
        }

    def exposure_warning(self) -> str | None:
        """One line saying who can use the plain TCP endpoints, for the log at start.

        Returns:
            ``None`` when no endpoint is plain TCP (ipc, inproc, or CURVE).
        """
        plain = self._plain_tcp()
        if not plain:
            return None
        each = "; ".join(
            f"{name} {ep}: whoever connects {_EXPOSED[name]}" for name, ep in plain.items()
        )
        return (
            f"plain TCP without CURVE is open to every local user (any uid; beyond "
            f"loopback, anyone who reaches the address): {each}. Use ipc:// endpoints "
            f"(owner only) or CURVE to keep them to this user"
        )


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` to Python, not to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


#: What whoever reaches each TCP endpoint could do. Without CURVE a TCP peer cannot
#: be told from another, and loopback is every local user's: a plain TCP control
#: endpoint (any address) and any other one beyond loopback need tcp_open written out.
_EXPOSED = {
    "control": "could create, delete and commit",
    "control_ro": "could list and describe every segment",
    "events": "could follow every segment's versions",
    "data": "could read every segment",
}


def is_loopback(endpoint: str) -> bool:
    """Whether a ``tcp://HOST:PORT`` endpoint binds a loopback address only."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "lo", "::1"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _segment_spec(raw: Any, index: int, source: str | None) -> SegmentSpec:
    where = f"segments[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "expected a table with name, dtype, shape, slots", source)
    unknown = set(raw) - {"name", "dtype", "shape", "slots"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key", source)
    try:
        name = validate_segment_name(raw.get("name"))
    except ShmcastError as exc:
        raise ConfigError(f"{where}.name", str(exc), source) from None
    shape = raw.get("shape")
    if isinstance(shape, int):
        shape = [shape]
    if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
        raise ConfigError(f"{where}.shape", f"expected a list of integers, got {shape!r}", source)
    slots = raw.get("slots", 2)
    if not isinstance(slots, int) or not 2 <= slots <= MAX_SLOTS:
        raise ConfigError(f"{where}.slots", f"expected 2..{MAX_SLOTS}, got {slots!r}", source)
    try:
        dt, shp = normalize_layout(_dtype_from(raw.get("dtype")), tuple(shape))
    except (ShmcastError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.dtype", str(exc), source) from None
    return SegmentSpec(name=name, dtype=dtype_str(dt), shape=shp, slots=slots)


_ENV = {
    "namespace": NAMESPACE_ENV,
    "control": "SHMCAST_CONTROL",
    "control_ro": "SHMCAST_CONTROL_RO",
    "events": "SHMCAST_EVENTS",
    "advertise_events": "SHMCAST_ADVERTISE_EVENTS",
    "data": "SHMCAST_DATA",
    "metrics_port": "SHMCAST_METRICS_PORT",
    "metrics_host": "SHMCAST_METRICS_HOST",
}


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
            return data
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"not valid TOML: {exc}", path) from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8: before, a traceback
        raise ConfigError(
            "--config", f"not valid TOML: not UTF-8 text (byte {exc.start})", path
        ) from None
    except OSError as exc:  # a directory, no permission: before, a traceback
        raise ConfigError(
            "--config", f"cannot read {path}: {exc.strerror}; give a TOML file"
        ) from None


def _coerce(name: str, value: Any, source: str | None) -> Any:
    if name in (
        "metrics_port",
        "max_segment_bytes",
        "max_message_bytes",
        "max_subscriptions",
        "max_relays",
        "max_relay_patterns",
    ) and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not an integer", source) from None
    if name == "mode" and isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not an octal mode like '0600'", source) from None
    if (
        name == "heartbeat_interval"
        and isinstance(value, (int, str))
        and not isinstance(value, bool)  # `true` is no number of seconds (was 1.0)
    ):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not a number", source) from None
    if name in ("curve_clients", "curve_readers"):
        if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
            raise ConfigError(name, "expected a list of z85 public keys", source)
        return tuple(value)
    return value


def resolve_config(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> BrokerConfig:
    """Build the broker's config: flags, then environment, then file, then defaults.

    Raises:
        ConfigError: naming the field (and the file) that is wrong.
    """

    def segments(data: Mapping[str, Any]) -> dict[str, Any]:
        raw_segments = data.get("segments", [])
        if not isinstance(raw_segments, list):
            raise ConfigError("segments", "expected [[segments]] tables", config_file)
        specs = tuple(_segment_spec(raw, i, config_file) for i, raw in enumerate(raw_segments))
        return {"segments": specs}

    return resolve_layers(
        BrokerConfig,
        flags,
        env_names=_ENV,
        config_file=config_file,
        environ=environ,
        coerce=_coerce,
        tables=segments,
    )


def resolve_layers(
    cls: Callable[..., T],
    flags: Mapping[str, Any] | None = None,
    *,
    env_names: Mapping[str, str],
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    coerce: Callable[[str, Any, str | None], Any] = lambda name, value, source: value,
    tables: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """A frozen config dataclass from its layers: flag, then environment, then file.

    The one layering of every service's configuration (broker, relay, bridge).

    Args:
        cls: the config dataclass; its fields are the known keys.
        flags: command-line values (``None`` means not given).
        env_names: field -> ``SHMCAST_*`` variable.
        config_file: a TOML file, or None.
        environ: the environment (``os.environ`` when None).
        coerce: turns a raw value (text from the environment or file) into the field's type.
        tables: builds the fields that come from TOML tables (``[[segments]]``).

    Raises:
        ConfigError: naming the field (and the file) that is wrong.
    """
    data: dict[str, Any] = load_toml(config_file) if config_file else {}
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    table_values = tables(data) if tables is not None else {}
    check_file_types(cls, data, known - set(table_values), config_file, coerce)
    values = layer_values(
        known - set(table_values),
        flags,
        env_names,
        environ,
        data,
        config_file,
        coerce=coerce,
        extra_keys=set(table_values),
    )
    values.update(table_values)
    config = build_config(cls, values, config_file)
    check_file_values(cls, values, data, known - set(table_values), config_file, coerce)
    return config


#: What a file's value must be for a field of each type, and how to say it. (TOML
#: has no null: a field's None is its default, never written.)
_KINDS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    str: ("a string", lambda v: isinstance(v, str)),
    int: ("an integer", _is_int),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    tuple[str, ...]: (
        "a list of strings",
        lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
    ),
}


def _kind(hint: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """The kind of a field's type hint (``X | None`` as ``X``); None: not checked here."""
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return _KINDS.get(hint)


def check_file_types(
    cls: Callable[..., Any],
    data: Mapping[str, Any],
    names: set[str],
    config_file: str | None,
    coerce: Callable[[str, Any, str | None], Any],
) -> None:
    """Each of ``names`` the file sets has its field's type, once coerced as the file's
    value would be, whether or not a flag or the environment overrides it: the file
    is wrong either way, and is used as it is the day the flag is left out.

    Raises:
        ConfigError: naming the field, the file and the type expected.
    """
    hints = typing.get_type_hints(cls)
    for name in sorted(names & data.keys()):
        kind = _kind(hints.get(name))
        if kind is not None and not kind[1](coerce(name, data[name], config_file)):
            raise ConfigError(name, f"{data[name]!r}: expected {kind[0]}", config_file)


def check_file_values(
    cls: Callable[..., Any],
    values: Mapping[str, Any],
    data: Mapping[str, Any],
    names: set[str],
    config_file: str | None,
    coerce: Callable[[str, Any, str | None], Any],
) -> None:
    """Each of ``names`` the file sets that a flag or the environment overrides is
    checked as it would be used the day the override is left out: the config of
    ``values`` with the file's value in its place. (Well-typed is not valid: before,
    ``namespace = "a.b"`` in a file under ``-n ok`` went unnoticed.)

    Raises:
        ConfigError: naming the field, the file and the fix.
    """
    for name in sorted(names & data.keys()):
        value = coerce(name, data[name], config_file)
        if name in values and values[name] == value:
            continue  # the value in use: checked with the config
        try:
            build_config(cls, {**values, name: value}, config_file)
        except ConfigError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise ConfigError(
                exc.field,
                f"{reason} (a flag or the environment overrides it now; correct the file, "
                f"or remove the key)",
                config_file,
            ) from None


def layer_values(
    names: set[str],
    flags: Mapping[str, Any] | None,
    env_names: Mapping[str, str],
    environ: Mapping[str, str] | None,
    data: Mapping[str, Any],
    config_file: str | None,
    *,
    coerce: Callable[[str, Any, str | None], Any] = lambda name, value, source: value,
    extra_keys: set[str] | None = None,
) -> dict[str, Any]:
    """Each of ``names`` from the first layer that has it: flag, environment, file.

    Raises:
        ConfigError: a key of the file that is not one of the known fields.
    """
    flags = flags or {}
    env = os.environ if environ is None else environ
    for key in data:
        if key not in names and key not in (extra_keys or set()):
            raise ConfigError(key, "unknown key", config_file)
    values: dict[str, Any] = {}
    for name in names:
        if flags.get(name) is not None:
            values[name] = coerce(name, flags[name], None)
        elif name in env_names and env.get(env_names[name]):
            values[name] = coerce(name, env[env_names[name]], f"${env_names[name]}")
        elif name in data:
            values[name] = coerce(name, data[name], config_file)
    return values


def build_config(cls: Callable[..., T], values: dict[str, Any], config_file: str | None) -> T:
    """``cls(**values)``, with every failure a ConfigError naming the field and the file."""
    try:
        return cls(**values)
    except ConfigError as exc:
        if exc.source is None and config_file:
            raise ConfigError(exc.field, str(exc).split(": ", 1)[-1], config_file) from None
        raise
    except ShmcastError as exc:
        raise ConfigError("namespace", str(exc), config_file) from None
    except TypeError as exc:
        raise ConfigError("config", str(exc), config_file) from None
