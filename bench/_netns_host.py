"""A "host" for the network-namespace tests: run inside one netns + mount namespace.

Started as ``ip netns exec NS unshare --mount sh -c 'mount -t tmpfs ... /dev/shm &&
exec python -m bench._netns_host'``, so every process it starts shares that host's
own ``/dev/shm``. Commands on stdin, one JSON object a line:

    {"op": "start", "tag": "broker", "argv": [...], "env": {...}}
    {"op": "stop", "tag": "broker"}          SIGTERM -> wait -> SIGKILL
    {"op": "quit"}                           stop everything (also on EOF or SIGTERM)

Every output line of a child is echoed as ``<tag>| <line>``; ``@exit <tag> <rc>``
when a child ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import IO

_lock = threading.Lock()
_children: dict[str, subprocess.Popen[str]] = {}


def _say(line: str) -> None:
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _pump(tag: str, stream: IO[str]) -> None:
    for line in stream:
        _say(f"{tag}| {line.rstrip()}")


def _watch(tag: str, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    _pump(tag, proc.stdout)
    _say(f"@exit {tag} {proc.wait()}")


def _stop(tag: str) -> None:
    proc = _children.pop(tag, None)
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _stop_all() -> None:
    for tag in reversed(list(_children)):
        _stop(tag)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: (_stop_all(), os._exit(0)))
    _say("@host ready")
    for raw in sys.stdin:
        cmd = json.loads(raw)
        op = cmd.get("op")
        if op == "start":
            env = dict(os.environ)
            env.update(cmd.get("env", {}))
            env["PYTHONUNBUFFERED"] = "1"
            proc = subprocess.Popen(
                cmd["argv"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            _children[cmd["tag"]] = proc
            threading.Thread(target=_watch, args=(cmd["tag"], proc), daemon=True).start()
        elif op == "stop":
            _stop(cmd["tag"])
            _say(f"@stopped {cmd['tag']}")
        elif op == "quit":
            break
    _stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
