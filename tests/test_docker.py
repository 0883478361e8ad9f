"""docker/: the files say what a deployment needs, and the containers' commands work.

These checks need no container engine (``make test``): the Dockerfile, the
compose file with its variables at their defaults, the test's compose override
and the Kubernetes manifest are parsed and checked for what matters, the
manifest is validated against Kubernetes' schemas offline, and the containers'
exact command lines run as local processes (on fresh ports and a fresh
namespace: everything is on loopback already). ``make test-docker``
(tests/test_docker_engine.py) runs the same files on a real engine.
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

from ._compose import docker_bytes, interpolate, network_offenders
from ._obs_util import ROOT, free_port, sample_sum, scrape

yaml = pytest.importorskip("yaml")

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
OVERRIDE = ROOT / "tests" / "compose.test.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
KUBERNETES = DOCKER / "kubernetes.yaml"
UID = 10001


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker/compose.yaml as Compose reads it, its variables from ``env`` or defaults."""
    data = interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})
    assert isinstance(data, dict)
    return data


def _services(env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return dict(_compose(env)["services"])


def _is_shmcast(svc: dict[str, Any]) -> bool:
    return bool(svc.get("image") == "shmcast:latest")


def _runs_shmcast(svc: dict[str, Any]) -> bool:
    """A shmcast service that runs a shmcast command (not the shm service's sleep)."""
    return _is_shmcast(svc) and not svc.get("entrypoint")


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            if word.upper() == "FROM":
                stages.append([])
            stages[-1].append((word.upper(), rest.strip()))
    return stages


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


def _broker_config_path() -> Path:
    broker = _services()["broker"]
    cmd = [str(a) for a in broker["command"]]
    container_path = cmd[cmd.index("--config") + 1]
    mounted = _volume_map(broker).get(container_path)
    assert mounted is not None, f"{container_path} is not mounted into the broker"
    return mounted


def _broker_config(environ: dict[str, str] | None = None) -> Any:
    return resolve_config({}, config_file=str(_broker_config_path()), environ=environ or {})


def _port_variables() -> dict[str, int]:
    """The compose file's port variables and their defaults."""
    found = re.findall(r"\$\{(SHMCAST_\w+_PORT):-(\d+)\}", COMPOSE.read_text())
    return {name: int(default) for name, default in found}


# ---------------------------------------------------------------------- the image


def test_dockerfile_builds_in_a_stage_and_runs_non_root_with_a_real_healthcheck() -> None:
    build, final = _stages()
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert final[0] == ("FROM", "python:3.11-slim")
    # The compiler is the build stage's: the final stage installs nothing with apt.
    build_text = " ".join(a for _, a in build)
    assert "gcc" in build_text
    assert "pip wheel" in build_text
    for word, args in final:
        assert "apt-get" not in args
        assert "gcc" not in args
        if word == "COPY" and args.startswith("--from"):
            assert args == "--from=build /opt/shmcast /opt/shmcast", args
    users = [a for w, a in final if w == "USER"]
    assert users == ["shmcast"], "the image must run as its own user, not root"
    assert f"--uid {UID}" in " ".join(a for w, a in final if w == "RUN")
    entry = [_exec_form(a) for w, a in final if w == "ENTRYPOINT"]
    assert entry == [["shmcast"]]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^shmcast = "shmcast\.cli:main"$', pyproject, re.M)
    parser = build_parser()
    # The default command and the health check are valid shmcast command lines.
    cmd = next(_exec_form(a) for w, a in final if w == "CMD")
    assert parser.parse_args(cmd).command == "broker"
    health = next(a for w, a in final if w == "HEALTHCHECK")
    check = _exec_form(health.split("CMD", 1)[1])
    assert check[0] == "shmcast"
    assert parser.parse_args(check[1:]).command == "health"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if pat == "*" or path == pat or path.startswith(pat + "/"):
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    # "*" and plain paths; the "**/..." patterns only drop caches inside what is kept.
    patterns = [p for p in (ln.strip() for ln in lines) if p and p[0] != "#" and "**" not in p]
    for pat in patterns:
        if pat.startswith("!"):
            assert (ROOT / pat[1:].rstrip("/")).exists(), pat
    copied = set()
    for stage in _stages():
        for word, args in stage:
            if word != "COPY" or args.startswith("--from"):
                continue
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert not _ignored(src, patterns), f"COPY {src}: .dockerignore leaves it out"
                copied.add(src)
    # What the build backend reads, and every package directory, reaches the build.
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).exists():
            assert name in copied, f"{name} is not copied into the build stage"
    text = (ROOT / "pyproject.toml").read_text()
    packages = set(re.findall(r'^"shmcast\.\w+" = "(\w+)"$', text, re.M))
    assert packages
    assert packages <= copied, f"package directories not copied: {packages - copied}"


# ---------------------------------------------------------------------- compose


def test_compose_file_suits_compose_v1_and_v2() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    assert "name" not in raw, "Compose v1 rejects a top-level name: (use -p)"
    assert "version" not in raw, "Compose v2 warns that version: is obsolete"
    assert set(raw) <= {"services", "volumes", "x-shmcast", "x-client"}


def test_compose_builds_the_image_and_mounts_existing_files() -> None:
    services = _services()
    assert {"shm", "broker", "ticks", "frames", "strategy", "recorder", "prometheus"} <= set(
        services
    )
    parser = build_parser()
    for name, svc in services.items():
        if _is_shmcast(svc):
            build = svc["build"]
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
            assert build.get("network") == "host", "builds need no bridge either"
        if _runs_shmcast(svc):
            parser.parse_args([str(a) for a in svc["command"]])  # exits on a bad command line
        for container_path, host in _volume_map(svc).items():
            assert host.is_file(), f"{name} mounts {host} at {container_path}: no such file"


def test_every_service_is_on_the_host_network_and_loopback() -> None:
    config = _compose()
    assert network_offenders(config) == []
    for name, svc in config["services"].items():
        assert "ports" not in svc, f"{name}: the host network publishes nothing"
        text = " ".join(str(v) for v in [svc.get("command"), svc.get("environment")])
        for endpoint in re.findall(r"tcp://([^:/\s]+)", text):
            assert endpoint == "127.0.0.1", f"{name} uses {endpoint}"
        assert "0.0.0.0" not in text, name
    listen = [a for a in config["services"]["prometheus"]["command"] if "listen-address" in a]
    assert listen == ["--web.listen-address=127.0.0.1:9090"]


def test_every_service_that_maps_segments_shares_the_shm_services_ipc() -> None:
    services = _services()
    shm = services["shm"]
    assert shm["ipc"] == "shareable"
    assert shm["network_mode"] == "none"
    assert shm["entrypoint"] == ["sleep", "infinity"]  # it outlives a broker restart
    assert shm["init"] is True  # so that `sleep` gets the stop signal
    others = [n for n, s in services.items() if _runs_shmcast(s)]
    assert "broker" in others
    assert len(others) >= 5
    for name in others:
        svc = services[name]
        assert svc.get("ipc") == "service:shm", f"{name} does not join the shm service's IPC"
        assert "shm_size" not in svc, f"{name}: shm_size is the shm service's (it owns /dev/shm)"
        assert svc["network_mode"] == "host", name
    assert "shm" in services["broker"]["depends_on"]
    for name in others:
        if name != "broker":
            assert services[name]["depends_on"]["broker"]["condition"] == "service_healthy"


def test_shm_size_holds_the_configured_segments() -> None:
    config = _broker_config()
    shm = docker_bytes(_services()["shm"]["shm_size"])
    needed = sum(segment_size(s.nbytes, s.slots) for s in config.segments)
    assert {s.name for s in config.segments} >= {"ticks", "frames"}
    assert needed <= shm, f"shm_size {shm} < {needed} bytes of declared segments"
    assert config.max_segment_bytes is not None
    assert needed + config.max_segment_bytes <= shm, "no room for one more segment"
    assert shm > 64 * 2**20, "Docker's default /dev/shm is 64 MB: say what is needed"


def test_broker_config_binds_loopback_and_compose_ports_agree() -> None:
    config = _broker_config()
    assert config.control == "tcp://127.0.0.1:5555"
    assert config.events == "tcp://127.0.0.1:5556"
    assert config.advertise_events is None  # the bound endpoint is the one to connect to
    assert config.metrics_host == "127.0.0.1"
    # compose's variables default to the same ports, and the image's health check too.
    env = _services()["broker"]["environment"]
    in_compose = _broker_config({k: str(v) for k, v in env.items()})
    assert (in_compose.control, in_compose.events) == (config.control, config.events)
    assert in_compose.metrics_port == config.metrics_port
    final = _stages()[-1]
    image_env = " ".join(a for w, a in final if w == "ENV")
    assert f"SHMCAST_BROKER={config.control}" in image_env


def test_prometheus_scrapes_the_compose_services() -> None:
    services = _services()
    prom = services["prometheus"]
    mounts = _volume_map(prom)
    cfg_path = mounts["/etc/prometheus/prometheus.yml"]
    assert cfg_path == ROOT / "configs" / "prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == ROOT / "configs" / "alerts.yml"
    config = yaml.safe_load(cfg_path.read_text())
    ports: dict[str, int] = {"broker": int(_broker_config().metrics_port or 0)}
    for name, svc in services.items():
        cmd = [str(a) for a in svc.get("command", [])]
        if _runs_shmcast(svc) and "--metrics-port" in cmd:
            ports[name] = int(cmd[cmd.index("--metrics-port") + 1])
            assert "--metrics-host" not in cmd, f"{name}: the default, 127.0.0.1, is the one"
    assert len(set(ports.values())) == len(ports), f"two services, one host port: {ports}"
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {f"127.0.0.1:{port}" for port in ports.values()}


def test_every_host_port_is_a_variable_with_one_default() -> None:
    variables = _port_variables()
    assert set(variables) == {
        "SHMCAST_CONTROL_PORT",
        "SHMCAST_EVENTS_PORT",
        "SHMCAST_BROKER_METRICS_PORT",
        "SHMCAST_STRATEGY_METRICS_PORT",
        "SHMCAST_RECORDER_METRICS_PORT",
        "SHMCAST_PROMETHEUS_PORT",
    }
    text = COMPOSE.read_text()
    for name, default in variables.items():
        assert set(re.findall(rf"\$\{{{name}:-(\d+)\}}", text)) == {str(default)}, name
        assert f"{name} ({default})" in text, f"the header of compose.yaml does not name {name}"
    # With other ports, nothing keeps a default one.
    fresh = {name: str(40000 + i) for i, name in enumerate(variables)}
    moved = yaml.safe_dump(_compose(fresh))
    for default in variables.values():
        assert not re.search(rf"\b{default}\b", moved), f"port {default} stays fixed"


def test_the_test_override_changes_health_checks_and_prometheus_only() -> None:
    override = yaml.safe_load(OVERRIDE.read_text())
    services = _services()
    assert set(override) <= {"services", "x-fast-health"}
    for name, svc in override["services"].items():
        assert name in services, f"the override adds a service: {name}"
        allowed = {"healthcheck"} | ({"image", "volumes"} if name == "prometheus" else set())
        assert set(svc) <= allowed, f"{name}: the override changes {set(svc) - allowed}"
        assert "test" not in svc["healthcheck"], f"{name}: the check itself stays the image's"
    assert set(override["services"]) == set(services), "every service checks fast"
    prom = interpolate(override["services"]["prometheus"], {
        "SHMCAST_TEST_PROMETHEUS_IMAGE": "img", "SHMCAST_TEST_PROMETHEUS_CONFIG": "/cfg"
    })  # fmt: skip
    targets = [v.split(":")[1] for v in prom["volumes"]]
    assert targets == ["/etc/prometheus/prometheus.yml"]


# ---------------------------------------------------------------------- Kubernetes


def _k8s() -> dict[str, Any]:
    data = yaml.safe_load(KUBERNETES.read_text())
    assert isinstance(data, dict)
    return data


def _pod() -> dict[str, Any]:
    return dict(_k8s()["spec"]["template"]["spec"])


def _containers() -> list[dict[str, Any]]:
    pod = _pod()
    return [*pod.get("initContainers", []), *pod["containers"]]


def _k8s_bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert m, f"not a quantity this test reads: {quantity}"
    return int(m.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[m.group(2)]


@pytest.mark.parametrize("version", ["1.29", "latest"])
def test_kubernetes_manifest_is_valid(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    target = kv.latest_version() if version == "latest" else version
    kv.validate(_k8s(), target, strict=True)  # raises ValidationError with the path


def test_kubernetes_validation_catches_a_bad_manifest() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    bad = _k8s()
    bad["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = ["256Mi"]
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.29", strict=True)
    bad = _k8s()
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.29", strict=True)


def test_kubernetes_pod_shares_dev_shm_between_same_uid_containers() -> None:
    pod = _pod()
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm_volumes = set()
    for c in _containers():
        assert c["image"] == "shmcast:latest", c["name"]
        assert c.get("securityContext", {}).get("runAsUser", UID) == UID, c["name"]
        mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1, f"{c['name']} does not mount /dev/shm"
        shm_volumes.add(mounts[0]["name"])
    assert len(shm_volumes) == 1, f"containers mount different volumes on /dev/shm: {shm_volumes}"
    volume = volumes[shm_volumes.pop()]
    assert volume["emptyDir"]["medium"] == "Memory"
    size = _k8s_bytes(volume["emptyDir"]["sizeLimit"])
    config = resolve_config({}, config_file=str(DOCKER / "broker.toml"), environ={})
    needed = sum(segment_size(s.nbytes, s.slots) for s in config.segments)
    assert config.max_segment_bytes is not None
    assert needed + config.max_segment_bytes <= size, f"sizeLimit {size} < {needed} + one more"


#: The address a pod gets, standing in for the downward API's ``status.podIP``.
POD_IP = "10.244.0.7"


def _k8s_env(c: dict[str, Any]) -> dict[str, str]:
    """A container's variables, ``status.podIP`` read as :data:`POD_IP`."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", e
            env[e["name"]] = POD_IP
    return env


def _k8s_args(c: dict[str, Any]) -> list[str]:
    """A container's args with ``$(VAR)`` expanded from its variables, as the kubelet does."""
    env = _k8s_env(c)
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]


def test_kubernetes_metrics_are_served_where_prometheus_scrapes_the_pod() -> None:
    # The annotations and the ports named metrics-* send Prometheus to the pod's
    # address. A server on the pod's loopback refuses it (before: broker.toml's
    # 127.0.0.1, and the subscriber's default).
    parser = build_parser()
    served = set()
    for c in _containers():
        args = parser.parse_args(_k8s_args(c))
        if args.command == "broker":
            config = resolve_config(
                {}, config_file=str(DOCKER / "broker.toml"), environ=_k8s_env(c)
            )
            assert config.metrics_port is not None
            assert config.metrics_host == POD_IP, f"{c['name']}: metrics on {config.metrics_host}"
            served.add(config.metrics_port)
        elif getattr(args, "metrics_port", None) is not None:
            assert args.metrics_host == POD_IP, f"{c['name']}: metrics on {args.metrics_host}"
            served.add(args.metrics_port)
    annotations = _k8s()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) in served
    named = {p["containerPort"] for c in _containers() for p in c.get("ports", [])}
    assert served == named


def test_kubernetes_pod_runs_broker_first_with_health_probes_and_metrics() -> None:
    pod = _pod()
    parser = build_parser()
    broker = [c for c in pod.get("initContainers", []) if c["args"][0] == "broker"]
    assert len(broker) == 1, "the broker is the pod's sidecar (an init container)"
    assert broker[0]["restartPolicy"] == "Always"
    assert broker[0]["startupProbe"]["exec"]["command"] == ["shmcast", "health"]
    # The broker creates the segments: the emptyDir's pages count against its memory.
    size = _k8s_bytes(pod["volumes"][0]["emptyDir"]["sizeLimit"])
    assert _k8s_bytes(broker[0]["resources"]["limits"]["memory"]) > size
    roles = set()
    for c in _containers():
        args = parser.parse_args(c["args"])
        roles.add(args.command)
        probe = c["readinessProbe"]["exec"]["command"]
        assert probe[0] == "shmcast"
        assert parser.parse_args(probe[1:]).command == "health"
        assert _k8s_env(c).get("SHMCAST_NAMESPACE") == "demo", c["name"]
        assert "--broker" not in c["args"], "the image's SHMCAST_BROKER is the pod's loopback"
    assert roles == {"broker", "publish", "subscribe"}
    config = resolve_config({}, config_file=str(DOCKER / "broker.toml"), environ={})
    annotations = _k8s()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    ports = {p["containerPort"] for c in _containers() for p in c.get("ports", [])}
    assert config.metrics_port in ports
    for c in _containers():
        if "--metrics-port" in c["args"]:
            assert int(c["args"][c["args"].index("--metrics-port") + 1]) in ports


# ---------------------------------------------------------------------- the commands


def _env(svc: dict[str, Any], namespace: str) -> dict[str, str]:
    env = {k: str(v) for k, v in svc.get("environment", {}).items()}
    env["SHMCAST_NAMESPACE"] = namespace
    return env


def test_the_containers_command_lines_run_and_data_flows(namespace: str, tmp_path: Path) -> None:
    # The compose file with fresh ports: the same command lines, the same broker.toml.
    ports = {name: str(free_port()) for name in _port_variables()}
    services = _services({"SHMCAST_NAMESPACE": namespace, **ports})
    broker_svc = services["broker"]
    paths = {c: str(h) for c, h in _volume_map(broker_svc).items()}
    control = f"tcp://127.0.0.1:{ports['SHMCAST_CONTROL_PORT']}"
    health_cmd = next(
        _exec_form(a.split("CMD", 1)[1]) for w, a in _stages()[-1] if w == "HEALTHCHECK"
    )

    def cmdline(svc: dict[str, Any]) -> list[str]:
        return [paths.get(str(a), str(a)) for a in svc["command"]]

    procs: list[ShmcastProcess] = []
    try:
        broker = start(cmdline(broker_svc), ready=BROKER_READY, env=_env(broker_svc, namespace))
        procs.append(broker)
        assert broker.ready["namespace"] == namespace
        assert broker.ready["control"] == control
        assert sorted(broker.ready["segments"]) == ["frames", "ticks"]
        with ControlClient(control, timeout=5) as client:
            hello = client.request("hello")
        assert hello["events"] == f"tcp://127.0.0.1:{ports['SHMCAST_EVENTS_PORT']}"

        # The image's HEALTHCHECK, as the broker container runs it.
        ok = subprocess.run(
            [sys.executable, "-m", "shmcast.cli", *health_cmd[1:]],
            env={**os.environ, **_env(broker_svc, namespace)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr

        clients = [n for n, s in services.items() if _runs_shmcast(s) and n != "broker"]
        feeds = [n for n in clients if services[n]["command"][0] == "publish"]
        subs = [n for n in clients if services[n]["command"][0] == "subscribe"]
        assert feeds
        assert subs
        for name in feeds:
            svc = services[name]
            procs.append(start(cmdline(svc), ready=PUBLISH_READY, env=_env(svc, namespace)))
        sub_procs = {}
        for name in subs:
            svc = services[name]
            sp = start(cmdline(svc), ready=SUBSCRIBE_READY, env=_env(svc, namespace))
            procs.append(sp)
            sub_procs[name] = sp

        # Data flows: every subscriber receives versions of every segment it names.
        for name, sp in sub_procs.items():
            segs = sp.ready["segments"]
            assert sp.ready["metrics"].startswith("http://127.0.0.1:"), sp.ready

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
        with ControlClient(control, timeout=5) as client:
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
        env={**os.environ, **_env(broker_svc, namespace)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1
    assert "unhealthy" in bad.stderr
