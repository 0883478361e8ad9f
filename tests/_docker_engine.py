"""A private Docker engine for the deployment test (`make test-docker`).

Debian's ``docker.io`` (dockerd 20.10) started so that it touches nothing outside
one directory, the *root* (``$SHMCAST_DOCKER_ROOT``, default
``/var/tmp/shmcast-test-docker``)::

    root/data         --data-root: images, layers, containers (kept: the cache)
    root/exec         --exec-root: runtime state, containerd's socket
    root/docker.sock  -H unix://...           root/dockerd.pid   --pidfile
    root/daemon.json  --config-file, so /etc/docker/daemon.json is not read; it
                      moves the daemon's key from /etc/docker into the root
    root/logs/        dockerd.log and the logs of builds and bootstraps

No bridge (``--bridge=none``), no iptables or ip6tables rules, no IP forwarding,
no userland proxy: containers get the host network or none. Containers live
under a cgroup parent named after the root, so that processes of a crashed run
are found by their cgroup, never by a program name. Another engine on the
machine, and its containers, are never looked at.

:meth:`Engine.stop` removes the containers, stops the daemon, ends whatever of
this root is left, unmounts, and returns what it could not put back: a process,
a mount, a cgroup, a new bridge, a changed iptables rule set or forwarding switch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ROOT_ENV = "SHMCAST_DOCKER_ROOT"
DEFAULT_ROOT = Path("/var/tmp/shmcast-test-docker")
DOCKERD = "/usr/sbin/dockerd"
#: The Debian client: it matches the daemon, and builds with BuildKit without buildx.
DOCKER = "/usr/bin/docker"
COMPOSE_V1 = "/usr/bin/docker-compose"
#: Programs of an engine; one of them is ours when its command line names our root.
ENGINE_PROGRAMS = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc")
#: Directories dockerd 20.10 creates outside its roots whatever it is told.
OUTSIDE_DIRS = (Path("/run/docker/plugins"), Path("/run/docker"))

Log = Callable[[str], None]


class EngineError(Exception):
    """The engine could not be installed, started or used."""


def root_from_env(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(ROOT_ENV) or DEFAULT_ROOT).absolute()


def cgroup_parent(root: Path) -> str:
    """The cgroup parent of the containers of the engine at ``root``, e.g.
    ``var-tmp-shmcast-test-docker``: unique per root, one path component."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", str(root).strip("/"))


# ---------------------------------------------------------------------- packages


def apt_install(packages: Sequence[str], log: Log, logfile: Path) -> None:
    """``apt-get install`` the Debian packages, refreshing the lists once if needed.

    The packages' maintainer scripts must not start the system's dockerd (it would
    create docker0 and iptables rules): a ``policy-rc.d`` that forbids it is put in
    place for the install when the machine has none.
    """
    if not packages:
        return
    log(f"apt-get install {' '.join(packages)}")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\n# shmcast make test-docker: start no service\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        with logfile.open("a") as out:

            def apt(*args: str, timeout: float = 600) -> int:
                done = subprocess.run(args, stdout=out, stderr=out, env=env, timeout=timeout)
                return done.returncode

            ok = apt(*install)
            if ok != 0:  # stale or missing package lists (a fresh machine): refresh, retry
                apt("apt-get", "update", "-q", timeout=300)
                ok = apt(*install)
    finally:
        if made_policy:
            policy.unlink()
    if ok != 0:
        raise EngineError(f"apt-get install {' '.join(packages)} failed: {_tail(logfile)}")


# ---------------------------------------------------------------------- host state


def _lines(cmd: Sequence[str]) -> list[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return [f"<{cmd[0]}: {exc}>"]
    return sorted(
        line for line in (out.stdout + out.stderr).splitlines() if not line.startswith("# Warning")
    )


def host_state() -> dict[str, list[str]]:
    """What a Docker engine could change in the host's network, read without
    changing anything: bridges, the iptables rule sets, nftables tables, forwarding.

    (Legacy iptables tables are read only when the kernel already has them: asking
    ``iptables-legacy`` for a table creates it.)
    """
    state = {"bridges": _lines(["ip", "-o", "link", "show", "type", "bridge"])}
    state["bridges"] = [line.split(":")[1].strip() for line in state["bridges"] if ":" in line]
    for family, tool in (("ip", "iptables"), ("ip6", "ip6tables")):
        for table in ("filter", "nat", "mangle", "raw"):
            state[f"{tool} -t {table}"] = _lines([tool, "-w", "5", "-t", table, "-S"])
        names = Path(f"/proc/net/{family}_tables_names")
        if names.exists():
            for table in sorted(names.read_text().split()):
                state[f"{tool}-legacy -t {table}"] = _lines(
                    [f"{tool}-legacy", "-w", "5", "-t", table, "-S"]
                )
    state["nft tables"] = _lines(["nft", "list", "tables"])
    for name in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        path = Path("/proc/sys/net") / name
        state[name] = [path.read_text().strip()] if path.exists() else []
    return state


def state_changes(before: Mapping[str, list[str]], after: Mapping[str, list[str]]) -> list[str]:
    """What differs between two :func:`host_state` snapshots, one line a difference."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, []), after.get(key, [])
        if old != new:
            added = sorted(set(new) - set(old))
            removed = sorted(set(old) - set(new))
            changes.append(f"{key}: added {added}, removed {removed}")
    return changes


# ---------------------------------------------------------------------- the engine


class Engine:
    """The private dockerd of one root. ``start()``, then ``docker(...)``, then ``stop()``."""

    def __init__(self, root: Path, log: Log) -> None:
        self.root = root
        self.log = log
        self.data = root / "data"
        self.exec_root = root / "exec"
        self.sock = root / "docker.sock"
        self.pidfile = root / "dockerd.pid"
        self.logs = root / "logs"
        self.cgroup_parent = cgroup_parent(root)
        self.storage_driver = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._before: dict[str, list[str]] = {}
        self._outside_before: set[Path] = set()
        self._cgroups_before: set[Path] = set()

    @property
    def env(self) -> dict[str, str]:
        """The environment of every client of this engine (docker, compose)."""
        return {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_CONFIG": str(self.root / "client"),  # not ~/.docker
            "DOCKER_BUILDKIT": "1",
        }

    # -- start

    def start(self, timeout: float = 90.0) -> None:
        """Start the daemon (overlay2, else vfs) and wait until it answers.

        Raises:
            EngineError: another run holds this root, or no storage driver works.
        """
        for d in (self.root, self.logs, self.root / "client"):
            d.mkdir(parents=True, exist_ok=True)
        lock = (self.root / "lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EngineError(f"another make test-docker is using {self.root}") from None
        self._lock = lock  # from here on, everything of this root is ours to stop
        stale = self._engine_pids()  # a run that was killed may have left its daemon
        if stale:
            self.log(f"stopping what a killed run left: processes {stale}")
        leftovers = self._cleanup()
        if leftovers:
            raise EngineError(f"cannot clean up after an earlier run: {leftovers}")
        self._before = host_state()
        self._outside_before = {d for d in OUTSIDE_DIRS if d.exists()}
        self._cgroups_before = set(self._cgroup_dirs())
        # The daemon's identity key goes to the root, not to /etc/docker/key.json.
        config = {"deprecated-key-path": str(self.root / "key.json")}
        (self.root / "daemon.json").write_text(json.dumps(config))
        chosen = self.root / "storage-driver"  # the driver the data root was made with
        drivers = [chosen.read_text().strip()] if chosen.exists() else ["overlay2", "vfs"]
        errors = []
        for driver in drivers:
            try:
                self._start_daemon(driver, timeout)
            except EngineError as exc:
                errors.append(f"{driver}: {exc}")
                self._stop_daemon()
                continue
            self.storage_driver = driver
            chosen.write_text(driver)
            # Containers of a run that was killed: the daemon restarts those with a
            # restart policy, on the ports of that run. Every container here is ours.
            stale = self.docker("ps", "-aq").stdout.split()
            if stale:
                self.log(f"removing {len(stale)} container(s) of an earlier run")
                self.docker("rm", "-f", *stale, timeout=120)
            return
        raise EngineError("dockerd did not start: " + "; ".join(errors))

    def _start_daemon(self, driver: str, timeout: float) -> None:
        self.sock.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        args = [
            DOCKERD,
            *("--config-file", str(self.root / "daemon.json")),
            *("-H", f"unix://{self.sock}"),
            *("--data-root", str(self.data)),
            *("--exec-root", str(self.exec_root)),
            *("--pidfile", str(self.pidfile)),
            *("--storage-driver", driver),
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            f"--cgroup-parent=/{self.cgroup_parent}",
            "--log-level=warn",
        ]
        with (self.logs / "dockerd.log").open("ab") as out:
            # A session of its own: a Ctrl-C meant for the test does not reach it.
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EngineError(f"exited with {self._proc.returncode}: {self._log_tail()}")
            try:  # a busy daemon (restoring containers, a loaded machine) answers late
                answers = self.docker("version", check=False, timeout=10).returncode == 0
            except EngineError:
                answers = False
            if answers:
                actual = self.docker("info", "--format", "{{.Driver}}").stdout.strip()
                if actual != driver:
                    raise EngineError(f"asked for {driver}, runs {actual}")
                self.log(f"dockerd {self._proc.pid} answers on {self.sock} ({driver})")
                return
            time.sleep(0.2)
        raise EngineError(f"no answer in {timeout}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return _tail(self.logs / "dockerd.log")

    # -- use

    def docker(
        self, *args: str, timeout: float = 120.0, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this engine; with ``check``, raise with its stderr."""
        return run([DOCKER, *args], env=self.env, timeout=timeout, check=check, input=input)

    def inspect(self, *names: str) -> list[dict[str, Any]]:
        out = json.loads(self.docker("inspect", *names).stdout)
        assert isinstance(out, list)
        return out

    # -- stop

    def stop(self) -> list[str]:
        """Remove the containers, stop the daemon, and say what is left behind.

        Returns:
            One line per thing that is not as it was before :meth:`start`; empty
            when the machine is back as it was (the data root, the cache, stays).
        """
        if self._lock is None:  # never started, or another run holds the root
            return []
        problems = []
        try:  # the fast way; a daemon that hangs is stopped below all the same
            answers = self.sock.exists() and not self.docker("version", check=False).returncode
            ids = self.docker("ps", "-aq", check=False).stdout.split() if answers else []
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
        except EngineError as exc:
            self.log(f"could not remove the containers through the daemon: {exc}")
        self._stop_daemon()
        problems += self._cleanup()
        for d in OUTSIDE_DIRS:  # deepest first; only those this run created, if empty
            if d.exists() and d not in self._outside_before:
                with contextlib.suppress(OSError):
                    d.rmdir()
        if self._before:
            problems += state_changes(self._before, host_state())
        self._lock.close()
        self._lock = None
        return problems

    def _stop_daemon(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def _cleanup(self) -> list[str]:
        """End every process and mount of this root and drop its cgroups; say what stayed."""
        left = []
        for pids, what in (
            (self._engine_pids, "engine processes"),
            (self._cgroup_pids, "container processes"),
        ):
            if not _end_all(pids):
                left.append(f"{what} left: {pids()}")
        for d in sorted(self._cgroup_dirs(), key=lambda p: len(p.parts), reverse=True):
            if d not in self._cgroups_before:
                with contextlib.suppress(OSError):
                    d.rmdir()
        for mount in sorted(self._mounts(), reverse=True):
            if subprocess.run(["umount", mount], capture_output=True, timeout=30).returncode:
                subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        if self._mounts():
            left.append(f"mounts left: {self._mounts()}")
        stray = [d for d in self._cgroup_dirs() if d not in self._cgroups_before]
        if stray:
            left.append(f"cgroups left: {[str(d) for d in stray]}")
        return left

    def _engine_pids(self) -> list[int]:
        """dockerd, containerd and the shims whose command line names this root."""
        mark = f"{self.root}/".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                comm = (proc / "comm").read_text().strip()
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if comm in ENGINE_PROGRAMS and mark in cmdline:
                pids.append(int(proc.name))
        return sorted(pids)

    def _cgroup_dirs(self) -> list[Path]:
        base = Path("/sys/fs/cgroup")
        tops = [base / self.cgroup_parent, *base.glob(f"*/{self.cgroup_parent}")]
        return [d for top in tops if top.is_dir() for d in [top, *top.rglob("*")] if d.is_dir()]

    def _cgroup_pids(self) -> list[int]:
        pids: set[int] = set()
        for d in self._cgroup_dirs():
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(pids)

    def _mounts(self) -> list[str]:
        mark = f"{self.root}/"
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        return [p for p in points if p.startswith(mark)]  # the data root's own bind mount too


# ---------------------------------------------------------------------- helpers


def run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    check: bool = True,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; with ``check``, raise with its output if it fails."""
    try:
        out = subprocess.run(
            list(cmd),
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"{' '.join(cmd)}: no result in {timeout}s") from exc
    if check and out.returncode != 0:
        output = out.stdout[-2000:] + out.stderr[-3000:]
        raise EngineError(f"{' '.join(cmd)} exited with {out.returncode}:\n{output}")
    return out


def _end_all(pids: Callable[[], list[int]]) -> bool:
    """SIGTERM, then SIGKILL, the processes ``pids()`` lists; True once none is left.
    (A container's PID 1 ignores SIGTERM from the host: the SIGKILL is needed.)"""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = pids()
        if not found:
            return True
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        _poll(lambda: not pids(), 10)
    return not pids()


def _poll(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"
