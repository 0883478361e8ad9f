"""Small networks of "hosts" on this machine: network namespaces joined by veth
pairs, each host with its own ``/dev/shm`` (a tmpfs in a private mount namespace)
and runtime directory.

Each link is a /30 of 10.231.0.0/16 (two hosts) or 10.232.0.0/16 (a network),
assigned only inside the namespaces; nothing is configured in the machine's own
network namespace. Used by ``bench/_relay.py``, ``tests/test_relay_netns.py`` and
the Zenoh bridge's tests and benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def why_no_netns() -> str | None:
    """None when network namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command"
    probe = f"shmprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Host:
    """One host: a ``bench._netns_host`` agent running in its namespaces."""

    def __init__(self, name: str, netns: str, addr: str, rundir: Path) -> None:
        self.name = name
        self.netns = netns
        self.addr = addr
        #: This host's address on the link to each neighbour (``network()``).
        self.addrs: dict[str, str] = {}
        self.rundir = rundir
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        script = 'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$0" -m bench._netns_host'
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(rundir)
        env.pop("SHMCAST_NAMESPACE", None)
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "unshare",
                "--mount",
                "sh",
                "-c",
                script,
                sys.executable,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        try:
            self.wait_line("@host ready", 20)
        except BaseException:
            self.close()
            raise

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._q.put(line)

    def _cmd(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def start(
        self, tag: str, argv: Sequence[str], env: dict[str, str] | None = None, ready: str = ""
    ) -> dict[str, Any]:
        """Start ``python <argv>`` on this host; with ``ready``, wait for that line's JSON."""
        self._cmd(op="start", tag=tag, argv=[sys.executable, *argv], env=env or {})
        if not ready:
            return {}
        line = self.wait_line(f"{tag}| {ready}", 30)
        return dict(json.loads(line.split(ready, 1)[1]))

    def shmcast(
        self, tag: str, args: Sequence[str], ns: str, ready: str, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return self.start(
            tag, ["-m", "shmcast.cli", *args], {"SHMCAST_NAMESPACE": ns, **(env or {})}, ready
        )

    def stop(self, tag: str) -> None:
        self._cmd(op="stop", tag=tag)
        self.wait_line(f"@stopped {tag}", 30)

    def wait_line(self, prefix: str, timeout: float) -> str:
        for line in self.lines:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                tail = "\n".join(self.lines[-40:])
                raise TimeoutError(f"{self.name}: no line {prefix!r} in {timeout}s:\n{tail}")
            try:
                line = self._q.get(timeout=min(left, 0.1))
            except queue.Empty:
                if self.proc.poll() is not None and self._q.empty():
                    tail = "\n".join(self.lines[-40:])
                    raise RuntimeError(f"{self.name} agent exited:\n{tail}") from None
                continue
            if line.startswith(prefix):
                return line

    def last(self, prefix: str) -> dict[str, Any] | None:
        """The JSON of the last line starting with ``prefix`` (``tag| text``)."""
        for line in reversed(self.lines):
            if line.startswith(prefix):
                return dict(json.loads(line[len(prefix) :]))
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._cmd(op="quit")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                # The agent and its children are all ours; its process group is not
                # separate, so signal the agent, then kill it.
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        self._thread.join(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@dataclass
class Link:
    """The veth pair between the two hosts."""

    a_netns: str
    b_netns: str
    a_dev: str
    b_dev: str

    def set(self, up: bool) -> None:
        state = "up" if up else "down"
        _ip("-n", self.a_netns, "link", "set", self.a_dev, state)
        _ip("-n", self.b_netns, "link", "set", self.b_dev, state)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host, Link]]:
    """Host A (10.231.X.1) and host B (10.231.X.2), torn down in ``finally``."""
    tag = secrets.token_hex(3)
    na, nb = f"shmA{tag}", f"shmB{tag}"
    da, db = f"vshA{tag}", f"vshB{tag}"
    x = secrets.randbelow(250) + 1
    a_ip, b_ip = f"10.231.{x}.1", f"10.231.{x}.2"
    tmp = Path(tempfile.mkdtemp(prefix="shmr"))
    hosts: list[Host] = []
    made: list[str] = []
    try:
        for ns in (na, nb):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", da, "type", "veth", "peer", "name", db)
        _ip("link", "set", da, "netns", na)
        _ip("link", "set", db, "netns", nb)
        for ns, dev, ip in ((na, da, a_ip), (nb, db, b_ip)):
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        for name, ns, ip in (("A", na, a_ip), ("B", nb, b_ip)):
            rd = tmp / name
            rd.mkdir(mode=0o700)
            hosts.append(Host(name, ns, ip, rd))
        yield hosts[0], hosts[1], Link(na, nb, da, db)
    finally:
        for h in hosts:
            h.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        # A veth pair left in the root namespace (failure before the move) goes too.
        subprocess.run(["ip", "link", "del", da], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def network(
    names: Sequence[str], links: Sequence[tuple[str, str]]
) -> Iterator[tuple[dict[str, Host], dict[tuple[str, str], Link]]]:
    """Hosts ``names`` joined by ``links`` (pairs of names), torn down in ``finally``.

    ``host.addrs[peer]`` is the host's address on its link to ``peer``; each link
    is a /30 of its own, so hosts reach only their direct neighbours.
    """
    tag = secrets.token_hex(3)
    base = secrets.randbelow(200) + 1
    netns = {n: f"shm{n}{tag}"[:15] for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="shmn"))
    hosts: dict[str, Host] = {}
    made: list[str] = []
    devs: list[str] = []
    out: dict[tuple[str, str], Link] = {}
    addrs: dict[str, dict[str, str]] = {n: {} for n in names}
    try:
        for n in names:
            _ip("netns", "add", netns[n])
            made.append(netns[n])
            _ip("-n", netns[n], "link", "set", "lo", "up")
        for k, (a, b) in enumerate(links):
            da, db = f"v{k}a{tag}", f"v{k}b{tag}"
            _ip("link", "add", da, "type", "veth", "peer", "name", db)
            devs.append(da)
            _ip("link", "set", da, "netns", netns[a])
            _ip("link", "set", db, "netns", netns[b])
            a_ip, b_ip = f"10.232.{base + k}.1", f"10.232.{base + k}.2"
            for name, dev, ip in ((a, da, a_ip), (b, db, b_ip)):
                _ip("-n", netns[name], "addr", "add", f"{ip}/30", "dev", dev)
                _ip("-n", netns[name], "link", "set", dev, "up")
            addrs[a][b], addrs[b][a] = a_ip, b_ip
            out[(a, b)] = Link(netns[a], netns[b], da, db)
        for n in names:
            rd = tmp / n
            rd.mkdir(mode=0o700)
            first = next(iter(addrs[n].values()), "127.0.0.1")
            host = Host(n, netns[n], first, rd)
            host.addrs = addrs[n]
            hosts[n] = host
        yield hosts, out
    finally:
        for h in hosts.values():
            h.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for dev in devs:  # a pair left in the root namespace (failure before the move)
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
