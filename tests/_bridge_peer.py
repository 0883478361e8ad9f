"""Processes for the Zenoh bridge tests: ``python -m tests._bridge_peer ROLE ...``.

- ``router LISTEN [TLS_DIR]``: a Zenoh router (mutual TLS with TLS_DIR's ca.pem,
  router.pem, router.key).
- ``publish NAME RATE``: publish 1 MiB uint32 frames filled with their version
  number, until SIGTERM.
- ``check NAME``: read every update of NAME (exact version), check each frame is
  whole and holds its version, versions only go forward; a ``STAT {json}`` line
  every 0.2 s, until SIGTERM.

Each prints ``READY {json}`` once it serves. The namespace is ``SHMCAST_NAMESPACE``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

SHAPE = (512, 512)  # uint32: 1 MiB


def _say(tag: str, body: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(body)}", flush=True)


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def router(listen: str, tls_dir: str = "") -> None:
    import zenoh

    stop = _stop_event()
    conf: dict[str, Any] = {
        "mode": "router",
        "listen": {"endpoints": [listen]},
        "scouting": {"multicast": {"enabled": False}, "gossip": {"enabled": False}},
        "transport": {"shared_memory": {"enabled": False}},
    }
    if tls_dir:
        conf["transport"]["link"] = {
            "tls": {
                "root_ca_certificate": f"{tls_dir}/ca.pem",
                "listen_certificate": f"{tls_dir}/router.pem",
                "listen_private_key": f"{tls_dir}/router.key",
                "enable_mtls": True,
            }
        }
    session = zenoh.open(zenoh.Config.from_json5(json.dumps(conf)))
    try:
        _say("READY", {"zid": str(session.zid()), "listen": listen})
        stop.wait()
    finally:
        session.close()


def publish(name: str, rate: str) -> None:
    from shmcast.publisher import Publisher

    stop = _stop_event()
    period = 1.0 / float(rate)
    with Publisher(name, dtype=np.uint32, shape=SHAPE) as pub:
        _say("READY", {"segment": name, "version": pub.version})
        next_t = time.monotonic()
        while not stop.is_set():
            with pub.loan() as arr:
                arr.fill(pub.version + 1)
            next_t += period
            stop.wait(max(0.0, next_t - time.monotonic()))
        _say("DONE", {"last": pub.version})


def check(name: str) -> None:
    from shmcast.subscriber import Subscriber

    stop = _stop_event()
    state = {"delivered": 0, "bad": 0, "gone": 0, "first": 0, "last": 0, "backwards": 0}
    with Subscriber([name], wait="futex", timeout=60) as sub:
        state["start"] = sub.stats[name].last_version
        _say("READY", {"segment": name, "start": state["start"]})
        next_stat = time.monotonic()
        while not stop.is_set():
            for update in sub.updates(timeout=0.1):
                _check_one(sub, name, update.version, state)
                if time.monotonic() >= next_stat:  # steady traffic never idles the loop
                    next_stat = time.monotonic() + 0.2
                    _say("STAT", {**state, "missed": sub.stats[name].missed})
                if stop.is_set():
                    break
            if time.monotonic() >= next_stat:
                next_stat = time.monotonic() + 0.2
                _say("STAT", {**state, "missed": sub.stats[name].missed})
        _say("STAT", {**state, "missed": sub.stats[name].missed})


def _check_one(sub: Any, name: str, version: int, state: dict[str, int]) -> None:
    from shmcast.broker import ShmcastError

    try:
        with sub.segment(name).read(version) as snap:
            whole = bool((snap.array == version).all())
    except ShmcastError:  # lapped or torn: never delivered, counted
        state["gone"] += 1
        return
    if not whole:
        state["bad"] += 1
    if version <= state["last"]:
        state["backwards"] += 1
    state["first"] = state["first"] or version
    state["last"] = version
    state["delivered"] += 1


ROLES = {"router": router, "publish": publish, "check": check}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
