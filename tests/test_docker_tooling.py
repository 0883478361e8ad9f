"""The helpers of ``make test-docker``, without an engine: the private engine's
bookkeeping, the stand-in images' host settings, and reading compose files."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from ._compose import docker_bytes, interpolate, network_offenders, service_view
from ._docker_engine import Engine, EngineError, cgroup_parent, root_from_env, state_changes
from ._docker_standin import (
    STANDINS,
    apt_settings,
    certificates,
    missing_certificates,
    mmdebstrap_command,
    pip_conf,
)

HOST_PIP = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/somewhere/else.pem'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple https://mirror.example/simple'
global.find-links='/opt/wheels'
global.timeout='60'
"""


def _cert(body: str) -> str:
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


def test_pip_conf_keeps_what_works_in_a_container() -> None:
    conf = pip_conf(HOST_PIP)
    assert conf.splitlines()[1] == "[global]"
    lines = set(conf.splitlines()[2:])
    assert lines == {
        "cert = /etc/ssl/certs/ca-certificates.crt",  # the image's bundle, holding the host's CAs
        "timeout = 180",  # the environment's value wins, as in pip
        "disable-pip-version-check = 1",
        "extra-index-url = https://mirror.example/simple",  # file:// and /opt paths dropped
    }
    assert "constraint" not in conf


def test_pip_conf_of_a_host_without_settings_names_only_the_bundle() -> None:
    assert pip_conf("").splitlines()[2:] == ["cert = /etc/ssl/certs/ca-certificates.crt"]


def test_missing_certificates_are_the_hosts_the_image_lacks() -> None:
    a, b, c = _cert("AAAA"), _cert("BBBB"), _cert("CCCC")
    host = f"# comment\n{a}{b}\n{c}"
    image = f"{b}"
    assert certificates(host) == [a, b, c]
    assert missing_certificates(host, image) == [a, c]
    assert missing_certificates(image, host) == []


def test_apt_settings_are_acquire_and_docker_files(tmp_path: Path) -> None:
    (tmp_path / "99snapshot").write_text('Acquire::Check-Valid-Until "false";\n')
    (tmp_path / "90proxy").write_text('Acquire::http::Proxy "http://proxy:3128";\n')
    (tmp_path / "docker-clean").write_text("DPkg::Post-Invoke { };\n")
    (tmp_path / "20packagekit").write_text('APT::Update::Post-Invoke-Success { "x"; };\n')
    assert [p.name for p in apt_settings(tmp_path)] == ["90proxy", "99snapshot", "docker-clean"]


def test_mmdebstrap_runs_this_modules_hook_for_the_kind(tmp_path: Path) -> None:
    if not Path("/etc/os-release").read_text().count("VERSION_CODENAME="):
        pytest.skip("not a Debian host")
    cmd = mmdebstrap_command(STANDINS["prometheus"], tmp_path / "x.tar")
    hook = next(a for a in cmd if a.startswith("--customize-hook="))
    assert "-m tests._docker_standin customize prometheus" in hook
    assert "--include=prometheus,wget,ca-certificates" in cmd
    assert any("moment-timezone" in a for a in cmd)
    assert cmd[-2] == str(tmp_path / "x.tar")


def test_host_state_changes_name_what_changed() -> None:
    before = {"bridges": [], "iptables -t nat": ["-P PREROUTING ACCEPT"]}
    after = {"bridges": ["docker0"], "iptables -t nat": ["-P PREROUTING ACCEPT", "-N DOCKER"]}
    assert state_changes(before, before) == []
    assert state_changes(before, after) == [
        "bridges: added ['docker0'], removed []",
        "iptables -t nat: added ['-N DOCKER'], removed []",
    ]


def test_engine_root_and_its_cgroup_parent() -> None:
    assert root_from_env({}) == Path("/var/tmp/shmcast-test-docker")
    assert root_from_env({"SHMCAST_DOCKER_ROOT": "/x/y"}) == Path("/x/y")
    assert cgroup_parent(Path("/var/tmp/shmcast-test-docker")) == "var-tmp-shmcast-test-docker"


def test_stopping_an_engine_that_never_started_touches_nothing(tmp_path: Path) -> None:
    said: list[str] = []
    engine = Engine(tmp_path / "root", said.append)
    assert engine.stop() == []
    assert said == []
    assert not (tmp_path / "root").exists()


def test_an_engine_whose_root_another_run_holds_neither_starts_nor_stops(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with (root / "lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        engine = Engine(root, print)
        with pytest.raises(EngineError, match="another make test-docker is using"):
            engine.start()
        assert engine.stop() == []  # nothing of the other run's is touched
    assert sorted(p.name for p in root.iterdir()) == ["client", "lock", "logs"]


def test_network_offenders_are_what_makes_compose_create_a_bridge() -> None:
    fine = {
        "services": {
            "a": {"network_mode": "host"},
            "b": {"network_mode": "none"},
            "c": {"network_mode": "service:a"},
        }
    }
    assert network_offenders(fine) == []
    bad = {
        "services": {"a": {}, "b": {"network_mode": "host", "networks": ["x"]}},
        "networks": {"x": {}},
    }
    assert network_offenders(bad) == [
        "service a: network_mode (unset)",
        "service b: networks ['x']",
        "network x defined",
    ]


def test_service_view_reads_compose_v1_and_v2_alike() -> None:
    v1 = {
        "image": "i",
        "command": ["subscribe", "ticks", "--metrics-port", "9101"],
        "shm_size": "256m",
        "volumes": ["/a/b.toml:/etc/b.toml:ro"],
        "depends_on": {"broker": {"condition": "service_healthy"}},
        "environment": {"PORT": 9100},
    }
    v2 = {
        "image": "i",
        "command": ["subscribe", "ticks", "--metrics-port", 9101],
        "shm_size": "268435456",
        "volumes": [
            {"type": "bind", "source": "/a/b.toml", "target": "/etc/b.toml", "read_only": True}
        ],
        "depends_on": {"broker": {"condition": "service_healthy", "required": True}},
        "environment": {"PORT": "9100"},
    }
    assert service_view(v1) == service_view(v2)


def test_interpolate_as_compose_does() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}", env) == "x/d/d"
    assert interpolate("${EMPTY-d}/${UNSET-d}/$${SET}", env) == "/d/${SET}"
    assert interpolate({"a": ["${SET}", 5]}, env) == {"a": ["x", 5]}
    with pytest.raises(KeyError, match="UNSET"):
        interpolate("${UNSET}", env)


def test_docker_bytes() -> None:
    assert docker_bytes("256m") == 256 * 2**20
    assert docker_bytes("64M") == 64 * 2**20
    assert docker_bytes(1024) == 1024
    assert docker_bytes("1g") == 2**30
    with pytest.raises(ValueError, match="not a Docker size"):
        docker_bytes("lots")
