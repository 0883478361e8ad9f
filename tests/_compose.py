"""Reading compose files the way Compose does: sizes, the network rule, and a view of
a service that Compose v1 and v2 ``config`` outputs share."""

from __future__ import annotations

import re
from typing import Any

#: network_mode values that create no network: the host's, none, another container's.
NO_NETWORK = ("host", "none")
SHARED_NETWORK = ("service:", "container:")


def docker_bytes(text: str | int) -> int:
    """``256m`` -> 268435456, as Docker reads ``shm_size``."""
    m = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(text).strip().lower())
    if not m:
        raise ValueError(f"not a Docker size: {text!r}")
    return int(m.group(1)) * int(1024 ** "bkmg".index(m.group(2) or "b"))


def network_offenders(config: dict[str, Any]) -> list[str]:
    """Why Compose would create a network (a bridge) for this config; empty if it would not.

    Compose creates ``<project>_default``, a bridge, for any service that does not
    use the host's network, no network, or another container's; and for every
    network the file defines.
    """
    out = []
    for name, svc in (config.get("services") or {}).items():
        mode = str(svc.get("network_mode", ""))
        if mode not in NO_NETWORK and not mode.startswith(SHARED_NETWORK):
            out.append(f"service {name}: network_mode {mode or '(unset)'}")
        if svc.get("networks"):
            out.append(f"service {name}: networks {svc['networks']}")
    out += [f"network {n} defined" for n in config.get("networks") or {}]
    return out


def service_view(svc: dict[str, Any]) -> dict[str, Any]:
    """What a service runs, in a form both Compose v1's and v2's ``config`` give alike.

    (v2 writes volumes in the long syntax, sizes in bytes, and adds the implicit
    dependency of ``ipc: service:X``; v1 keeps the short forms.)
    """
    volumes = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            volumes.append((vol["source"], vol["target"], bool(vol.get("read_only"))))
        else:
            source, target, *mode = str(vol).split(":")
            volumes.append((source, target, mode == ["ro"]))
    depends = svc.get("depends_on") or {}
    if isinstance(depends, list):
        depends = {name: {"condition": "service_started"} for name in depends}
    return {
        "image": svc.get("image"),
        "command": [str(a) for a in svc.get("command") or []],
        "entrypoint": [str(a) for a in svc.get("entrypoint") or []],
        "environment": {k: str(v) for k, v in (svc.get("environment") or {}).items()},
        "network_mode": svc.get("network_mode"),
        "ipc": svc.get("ipc"),
        "shm_size": docker_bytes(svc["shm_size"]) if "shm_size" in svc else None,
        "init": bool(svc.get("init")),
        "restart": svc.get("restart"),
        "healthcheck": [str(a) for a in (svc.get("healthcheck") or {}).get("test") or []],
        "volumes": sorted(volumes),
        "depends_on": {k: v.get("condition") for k, v in depends.items()},
    }


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` with Compose's variables replaced as Compose does:
    ``${VAR:-default}`` (default when unset or empty), ``${VAR-default}`` (when
    unset), ``${VAR}``, and ``$$`` for a ``$``.

    Raises:
        KeyError: a ``${VAR}`` without a default is not set.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, form, default = m.group(1), m.group(2), m.group(3)
        got = env.get(name)
        if got is not None and (got or form != ":-"):
            return got
        if default is not None:
            return default
        raise KeyError(f"${{{name}}} is not set and has no default")

    return _VARIABLE.sub(one, value)
