"""docker/: the files say what a deployment needs, and the containers' commands work.

No Docker engine runs on the development machines, so the compose file and the
Dockerfile are parsed and checked for what matters, and the containers' exact
command lines run as local processes (TCP on 127.0.0.1 in place of the service
names, fresh ports, a fresh namespace).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shmcast.broker import resolve_config, segment_size
from shmcast.broker.client import ControlClient
from shmcast.cli._main import build_parser
from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    SUBSCRIBE_READY,
    ShmcastProcess,
    start,
    wait_for,
)

from ._obs_util import ROOT, free_port, sample_sum, scrape

yaml = pytest.importorskip("yaml")

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    return dict(_compose()["services"])


def _is_shmcast(svc: dict[str, Any]) -> bool:
    build = svc.get("build") or {}
    return isinstance(build, dict) and build.get("dockerfile") == "docker/Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is YAML too
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


def _volume_map(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> the repository file a service mounts there."""
    out = {}
    for vol in svc.get("volumes", []):
        host, container, *_ = str(vol).split(":")
        out[container] = (DOCKER / host).resolve()
    return out


def _docker_bytes(text: str | int) -> int:
    m = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(text).strip().lower())
    assert m, f"not a Docker size: {text!r}"
    return int(m.group(1)) * int(1024 ** "bkmg".index(m.group(2) or "b"))


def _broker_config_path() -> Path:
    broker = _services()["broker"]
    cmd = [str(a) for a in broker["command"]]
    container_path = cmd[cmd.index("--config") + 1]
    mounted = _volume_map(broker).get(container_path)
    assert mounted is not None, f"{container_path} is not mounted into the broker"
    return mounted


# ---------------------------------------------------------------------- the files


def test_dockerfile_is_small_non_root_with_entrypoint_and_real_healthcheck() -> None:
    ins = _instructions()
    words = [w for w, _ in ins]
    assert ins[0] == ("FROM", "python:3.11-slim")
    assert words.count("FROM") == 1
    user = [a for w, a in ins if w == "USER"]
    assert user, "no USER: the image would run as root"
    assert user[-1] not in ("root", "0"), "the image must not run as root"
    entry = [_exec_form(a) for w, a in ins if w == "ENTRYPOINT"]
    assert entry == [["shmcast"]]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^shmcast = "shmcast\.cli:main"$', pyproject, re.M)
    parser = build_parser()
    # The default command and the health check are valid shmcast command lines.
    cmd = next(_exec_form(a) for w, a in ins if w == "CMD")
    assert parser.parse_args(cmd).command == "broker"
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    check = _exec_form(health.split("CMD", 1)[1])
    assert check[0] == "shmcast"
    assert parser.parse_args(check[1:]).command == "health"


def test_dockerfile_copies_only_what_exists() -> None:
    for word, args in _instructions():
        if word != "COPY":
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            if not src.startswith("--"):
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignore = DOCKER / "Dockerfile.dockerignore"
    for line in ignore.read_text().splitlines():
        if line.startswith("!"):
            assert (ROOT / line[1:].rstrip("/")).exists(), line


def test_compose_builds_the_image_and_mounts_existing_files() -> None:
    services = _services()
    assert {"broker", "ticks", "frames", "strategy", "recorder", "prometheus"} <= set(services)
    parser = build_parser()
    for name, svc in services.items():
        if _is_shmcast(svc):
            build = svc["build"]
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT
            assert (context / build["dockerfile"]).is_file()
            parser.parse_args([str(a) for a in svc["command"]])  # exits on a bad command line
        for container_path, host in _volume_map(svc).items():
            assert host.is_file(), f"{name} mounts {host} at {container_path}: no such file"


def test_every_service_that_maps_segments_shares_the_brokers_ipc() -> None:
    services = _services()
    assert services["broker"]["ipc"] == "shareable"
    clients = [n for n, s in services.items() if _is_shmcast(s) and n != "broker"]
    assert len(clients) >= 4
    for name in clients:
        svc = services[name]
        assert svc.get("ipc") == "service:broker", f"{name} does not join the broker's IPC"
        assert "broker" in svc.get("depends_on", {}), name
        assert "shm_size" not in svc, f"{name}: shm_size is the broker's (it owns /dev/shm)"
        # ipc:// does not cross containers: every client names the broker over TCP.
        cmd = [str(a) for a in svc["command"]]
        assert cmd[cmd.index("--broker") + 1].startswith("tcp://broker:"), name


def test_brokers_shm_size_holds_the_configured_segments() -> None:
    config = resolve_config({}, config_file=str(_broker_config_path()), environ={})
    shm = _docker_bytes(_services()["broker"]["shm_size"])
    needed = sum(segment_size(s.nbytes, s.slots) for s in config.segments)
    assert {s.name for s in config.segments} >= {"ticks", "frames"}
    assert needed <= shm, f"shm_size {shm} < {needed} bytes of declared segments"
    assert config.max_segment_bytes is not None
    assert needed + config.max_segment_bytes <= shm, "no room for one more segment"
    assert shm > 64 * 2**20, "Docker's default /dev/shm is 64 MB: say what is needed"


def test_broker_config_in_a_container_binds_tcp_and_advertises_a_reachable_endpoint() -> None:
    config = resolve_config({}, config_file=str(_broker_config_path()), environ={})
    assert config.control == "tcp://0.0.0.0:5555"
    assert config.events == "tcp://0.0.0.0:5556"
    assert config.advertise_events == "tcp://broker:5556"
    assert config.metrics_host == "0.0.0.0"


def test_prometheus_service_scrapes_the_compose_services() -> None:
    services = _services()
    prom = services["prometheus"]
    mounts = _volume_map(prom)
    cfg_path = mounts["/etc/prometheus/prometheus.yml"]
    assert cfg_path == ROOT / "configs" / "prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == ROOT / "configs" / "alerts.yml"
    config = yaml.safe_load(cfg_path.read_text())
    broker_cfg = resolve_config({}, config_file=str(_broker_config_path()), environ={})
    ports: dict[str, int] = {"broker": int(broker_cfg.metrics_port or 0)}
    for name, svc in services.items():
        cmd = [str(a) for a in svc.get("command", [])]
        if _is_shmcast(svc) and "--metrics-port" in cmd:
            ports[name] = int(cmd[cmd.index("--metrics-port") + 1])
            assert cmd[cmd.index("--metrics-host") + 1] == "0.0.0.0", name
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {f"{host}:{port}" for host, port in ports.items()}


# ---------------------------------------------------------------------- the commands


def _localize(cmd: list[str], ports: dict[int, int], paths: dict[str, str]) -> list[str]:
    """A container's command line for this machine: TCP on 127.0.0.1, fresh ports."""
    out = []
    for i, arg in enumerate(cmd):
        prev = cmd[i - 1] if i else ""
        if prev == "--metrics-port":
            arg = "0"
        elif prev == "--metrics-host":
            arg = "127.0.0.1"
        elif arg in paths:
            arg = paths[arg]
        else:
            arg = re.sub(
                r"tcp://(?:broker|0\.0\.0\.0|127\.0\.0\.1):(\d+)",
                lambda m: f"tcp://127.0.0.1:{ports[int(m.group(1))]}",
                arg,
            )
        out.append(arg)
    return out


def _env(svc: dict[str, Any], namespace: str, ports: dict[int, int]) -> dict[str, str]:
    env = {k: _localize([str(v)], ports, {})[0] for k, v in svc.get("environment", {}).items()}
    env["SHMCAST_NAMESPACE"] = namespace
    return env


def test_the_containers_command_lines_run_and_data_flows(namespace: str, tmp_path: Path) -> None:
    services = _services()
    broker_svc = services["broker"]
    ports = {5555: free_port(), 5556: free_port()}
    # The broker's config with the same substitutions as the command lines.
    text = _broker_config_path().read_text()
    text = re.sub(
        r"tcp://(?:broker|0\.0\.0\.0):(\d+)",
        lambda m: f"tcp://127.0.0.1:{ports[int(m.group(1))]}",
        text,
    )
    text = re.sub(r"(?m)^metrics_port = \d+", "metrics_port = 0", text)
    text = re.sub(r'(?m)^metrics_host = "0\.0\.0\.0"', 'metrics_host = "127.0.0.1"', text)
    local_toml = tmp_path / "broker.toml"
    local_toml.write_text(text)
    local = resolve_config({}, config_file=str(local_toml), environ={})
    for value in (local.control, local.events, local.advertise_events, local.metrics_host):
        assert value is not None
        assert "127.0.0.1" in value, value
    paths = {c: str(local_toml) for c in _volume_map(broker_svc)}
    health_cmd = next(
        _exec_form(a.split("CMD", 1)[1]) for w, a in _instructions() if w == "HEALTHCHECK"
    )
    procs: list[ShmcastProcess] = []
    try:
        broker = start(
            _localize([str(a) for a in broker_svc["command"]], ports, paths),
            ready=BROKER_READY,
            env=_env(broker_svc, namespace, ports),
        )
        procs.append(broker)
        assert broker.ready["namespace"] == namespace
        assert sorted(broker.ready["segments"]) == ["frames", "ticks"]
        with ControlClient(f"tcp://127.0.0.1:{ports[5555]}", timeout=5) as client:
            hello = client.request("hello")
        assert hello["events"] == f"tcp://127.0.0.1:{ports[5556]}"  # advertised, connectable

        # The image's HEALTHCHECK, as the broker container runs it.
        health_env = {**_env(broker_svc, namespace, ports)}
        ok = subprocess.run(
            [sys.executable, "-m", "shmcast.cli", *health_cmd[1:]],
            env={**_base_env(), **health_env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr

        clients = [n for n, s in services.items() if _is_shmcast(s) and n != "broker"]
        feeds = [n for n in clients if services[n]["command"][0] == "publish"]
        subs = [n for n in clients if services[n]["command"][0] == "subscribe"]
        assert feeds
        assert subs
        for name in feeds:
            svc = services[name]
            procs.append(
                start(
                    _localize([str(a) for a in svc["command"]], ports, paths),
                    ready=PUBLISH_READY,
                    env=_env(svc, namespace, ports),
                )
            )
        sub_procs = {}
        for name in subs:
            svc = services[name]
            sp = start(
                _localize([str(a) for a in svc["command"]], ports, paths),
                ready=SUBSCRIBE_READY,
                env=_env(svc, namespace, ports),
            )
            procs.append(sp)
            sub_procs[name] = sp

        # Data flows: every subscriber receives versions of every segment it names.
        for name, sp in sub_procs.items():
            segs = sp.ready["segments"]

            def flowing(sp: ShmcastProcess = sp, segs: list[str] = segs) -> bool:
                samples = scrape(sp.ready["metrics"])
                got = {
                    dict(labels)["segment"]
                    for (n, labels), v in samples.items()
                    if n == "shmcast_updates_received_total" and v > 0
                }
                # Torn reads are detected and discarded, never data. The subscribers read
                # every version exactly, and one that falls behind reads versions whose
                # slot is the writer's next: a few percent on a loaded test machine is
                # fine, a steady large share is not.
                torn = sample_sum(samples, "shmcast_torn_reads_total")
                updates = sample_sum(samples, "shmcast_updates_received_total")
                return got >= set(segs) and torn <= 0.05 * updates

            wait_for(flowing, 20, 0.1, f"{name} receiving {segs}")
        with ControlClient(f"tcp://127.0.0.1:{ports[5555]}", timeout=5) as client:
            reported = wait_for(
                lambda: (
                    {s["name"] for s in client.request("subscribers")["subscribers"]} >= set(subs)
                ),
                10,
                0.1,
                "subscribers reporting to the broker",
            )
            assert reported
    finally:
        for sp in reversed(procs):
            sp.stop()
    for sp in procs:
        assert sp.proc.returncode == 0, (sp.args, sp.stderr[-10:])
    # Broker gone: the health check says so.
    bad = subprocess.run(
        [sys.executable, "-m", "shmcast.cli", "health", "--timeout", "0.5"],
        env={**_base_env(), **_env(broker_svc, namespace, ports)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1
    assert "unhealthy" in bad.stderr


def _base_env() -> dict[str, str]:
    return dict(os.environ)
