"""What the tests run as another user (see ``tests/_other_user.py``).

Run as ``python -I -B _as_other.py COMMAND ARGS...`` from the world-readable copy
that ``_other_user.prepare`` makes: it imports shmcast, numpy, pyzmq and msgpack
from the ``site`` directory beside it and nothing from the checkout. Every
import happens before any work, so a helper that cannot import fails loudly
(no ``RESULT`` line) instead of looking refused. One-shot commands print
``RESULT {json}``; long-running ones print ``READY {json}`` and run until killed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "site"))

import json
import random
import time
from typing import Any

import zmq

from shmcast.broker import Broker, BrokerConfig, Segment
from shmcast.broker.client import ControlClient, pack, reader_endpoint, unpack
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber


def _outcome(fn: Any) -> Any:
    """What ``fn()`` returned, or the name of the error it raised."""
    try:
        return fn()
    except Exception as exc:
        return type(exc).__name__


def probe(ns: str, control: str) -> dict[str, Any]:
    """Read and write segment ``p`` of ``ns``; say hello at ``control``."""

    def read() -> float:
        with Segment.attach("p", namespace=ns) as seg:
            return float(seg.latest().array.sum())

    def write() -> str:
        Segment.attach("p", namespace=ns, writable=True).close()
        return "ok"

    def hello(endpoint: str) -> str:
        with ControlClient(endpoint, timeout=1.0) as c:
            return str(c.request("hello")["namespace"])

    return {
        "read": _outcome(read),
        "write": _outcome(write),
        "hello": _outcome(lambda: hello(control)),
        "hello_as_reader": _outcome(lambda: hello(reader_endpoint(control))),
    }


def unanswered(endpoint: str, timeout: str) -> dict[str, Any]:
    """A ``hello`` at ``endpoint`` that gets no reply: the error's type and message."""
    try:
        with ControlClient(endpoint, timeout=float(timeout)) as c:
            c.request("hello")
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "message": ""}


def _curve(keys: str) -> tuple[bytes, bytes, bytes] | None:
    """``server_public,client_public,client_secret`` (z85), or ``-`` for none."""
    if keys == "-":
        return None
    server, public, secret = keys.split(",")
    return server.encode(), public.encode(), secret.encode()


def control(endpoint: str, ops: str, keys: str = "-") -> dict[str, Any]:
    """Each ``[op, fields]`` of the JSON list ``ops`` as a request: the reply's keys, or
    the error's class name. ``[op, fields, "send"]`` sends one-way. ``keys``: CURVE."""
    out = []
    with ControlClient(endpoint, timeout=2.0, curve=_curve(keys)) as c:
        for item in json.loads(ops):
            op, fields, oneway = item[0], item[1], len(item) > 2

            def call(op: str = op, fields: dict[str, Any] = fields, oneway: bool = oneway) -> Any:
                return c.send(op, **fields) if oneway else sorted(c.request(op, **fields))

            out.append(_outcome(call))
    return {"results": out}


def subscribe(ns: str, broker: str, name: str, count: str) -> dict[str, Any]:
    """A Subscriber of ``name`` (its broker found from ``broker``): versions it read."""
    got = []
    with Subscriber(name, namespace=ns, broker=broker, timeout=5) as sub:
        deadline = time.monotonic() + 20
        while len(got) < int(count) and time.monotonic() < deadline:
            for up in sub.updates(timeout=0.5):
                with sub.read(up.segment) as snap:
                    got.append([up.version, float(snap.array.sum())])
                break
    return {"got": got}


def publisher(ns: str, broker: str, name: str) -> dict[str, Any]:
    """Try to create-and-publish ``name`` through ``broker``."""

    def publish() -> int:
        import numpy as np

        with Publisher(name, dtype="f8", shape=(4,), namespace=ns, broker=broker, timeout=2) as p:
            return p.publish(np.ones(4))

    return {"publish": _outcome(publish)}


def copy_file(src: str, dst: str, mode: str) -> dict[str, Any]:
    """Make ``dst`` (ours, ``mode``) with the bytes of ``src``: a squatted object."""
    with open(src, "rb") as f:
        data = f.read()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, int(mode, 8))
    try:
        os.fchmod(fd, int(mode, 8))
        os.write(fd, data)
    finally:
        os.close(fd)
    return {"made": dst}


def symlink(target: str, link: str) -> dict[str, Any]:
    os.symlink(target, link)
    return {"made": link}


def can_write(path: str) -> dict[str, Any]:
    """Whether we may open ``path`` for writing (and so truncate or forge it)."""
    try:
        os.close(os.open(path, os.O_RDWR))
    except PermissionError:
        return {"can_write": False}
    return {"can_write": True}


def mkdir(path: str, mode: str) -> dict[str, Any]:
    os.mkdir(path)
    os.chmod(path, int(mode, 8))
    return {"made": path}


def fake_broker(directory: str) -> None:
    """A broker impostor: answers every request at ``directory/control.sock`` with
    ``ok`` and prints ``GOT <op>`` for each."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "control.sock")
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(f"ipc://{path}")
    os.chmod(path, 0o777)
    print("READY " + json.dumps({"control": f"ipc://{path}"}), flush=True)
    while True:
        frames = sock.recv_multipart()
        req = unpack(frames[-1])
        print(f"GOT {req.get('op')}", flush=True)
        reply = {"ok": True, "id": req.get("id"), "namespace": "fake", "epoch": 1, "events": ""}
        sock.send_multipart([*frames[:-1], pack(reply)])


def serve(ns: str, broker: str) -> None:
    """Segments of ``ns`` of this user: ``live``, whose writer holds its lease, and
    ``idle``, written once and let go; with ``broker`` "1" a broker of ``ns`` (in a
    thread, heartbeat 0.1 s) serves them, with "0" they are made with the engine
    API. Holds them until killed."""
    import numpy as np

    if broker == "1":
        Broker(BrokerConfig(namespace=ns, heartbeat_interval=0.1)).start()
        with Publisher("idle", dtype="f8", shape=(4,), namespace=ns) as p:
            p.publish(np.ones(4))
        live: Publisher | Segment = Publisher("live", dtype="f8", shape=(4,), namespace=ns)
    else:
        with Segment.create("idle", "f8", (4,), namespace=ns) as seg:
            seg.write(np.ones(4))
        live = Segment.create("live", "f8", (4,), namespace=ns)
    print("READY " + json.dumps({"pid": os.getpid(), "live": repr(live)}), flush=True)
    while True:
        time.sleep(1)


def relay_hellos(endpoint: str, connections: str, patterns: str) -> dict[str, Any]:
    """Open ``connections`` relay connections to a data stream, each asking for
    ``patterns`` patterns: which of them were welcomed."""
    socks = []
    for i in range(int(connections)):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        hello = {"patterns": [f"p{i}-{j}*" for j in range(int(patterns))], "window": 4}
        sock.send_multipart([b"hello", pack(hello)])
        socks.append(sock)
    welcomed = []
    for sock in socks:
        got = False
        deadline = time.monotonic() + 2.0
        while not got and time.monotonic() < deadline:
            if sock.poll(100):
                got = sock.recv_multipart()[0] == b"welcome"
        welcomed.append(got)
    for sock in socks:
        sock.close(0)
    return {"welcomed": welcomed}


def cli(*argv: str) -> dict[str, Any]:
    """``shmcast ARGV`` in this process: its exit code and what it printed on stderr."""
    import contextlib
    import io

    from shmcast.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return {"rc": rc, "stderr": err.getvalue()}


def flood(events: str, count: str, length: str, big: str) -> None:
    """Subscribe ``count`` distinct topics of ``length`` bytes (after one of ``big``
    bytes) at the broker's events endpoint, then hold the connection."""
    sock = zmq.Context.instance().socket(zmq.XSUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(events)
    sent = 0
    if int(big):
        sock.send(b"\x01" + b"x" * int(big))
        sent += 1
    rnd = random.Random(7)
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789_-."
    for _ in range(int(count)):
        sock.send(b"\x01" + bytes(rnd.choice(alphabet) for _ in range(int(length))))
        sent += 1
    print("READY " + json.dumps({"sent": sent}), flush=True)
    while True:
        time.sleep(1)


COMMANDS = {
    "probe": probe,
    "control": control,
    "subscribe": subscribe,
    "publisher": publisher,
    "copy-file": copy_file,
    "symlink": symlink,
    "can-write": can_write,
    "mkdir": mkdir,
    "fake-broker": fake_broker,
    "flood": flood,
    "relay-hellos": relay_hellos,
    "serve": serve,
    "cli": cli,
    "unanswered": unanswered,
}


if __name__ == "__main__":
    result = COMMANDS[sys.argv[1]](*sys.argv[2:])
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)
