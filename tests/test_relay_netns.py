"""Relays across two hosts on this machine: network namespaces joined by a veth pair,
each with its own /dev/shm and runtime directory (see ``bench/_netns.py``).

Host A: upstream broker (data stream on 10.231.X.1) and a publisher writing arrays
whose every element equals the version. Host B: a broker, a relay and a checker
that reads the mirrored segment locally.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from bench._netns import Host, Link, two_hosts, why_no_netns
from shmcast.broker.client import ControlClient
from shmcast.cli._cmd_relay import READY as RELAY_READY
from shmcast.cli.testing import BROKER_READY, unique_namespace, wait_for

pytestmark = pytest.mark.root

_why = why_no_netns()
if _why is not None:
    pytest.skip(f"cannot make network namespaces: {_why}", allow_module_level=True)

PORT = 5557
PUB_READY = "peer publish ready: "
CHECK = "peer check: "


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host, Link]]:
    with two_hosts() as h:
        yield h


def _entry(control: str, name: str, curve: tuple[bytes, bytes, bytes] | None = None) -> Any:
    # ipc sockets are files: the test reaches both hosts' brokers from here.
    with ControlClient(control, timeout=2.0, curve=curve) as client:
        for entry in client.request("list")["segments"]:
            if entry["name"] == name:
                return entry
    return None


def _version(control: str, name: str, curve: tuple[bytes, bytes, bytes] | None = None) -> int:
    entry = _entry(control, name, curve)
    return int(entry["version"]) if entry else 0


def test_relay_across_hosts_survives_a_cut_link(hosts: tuple[Host, Host, Link]) -> None:
    a, b, link = hosts
    ns_a, ns_b = unique_namespace("ra"), unique_namespace("rb")
    data = f"tcp://{a.addr}:{PORT}"
    # Plain TCP beyond loopback, on the test's own link (the CURVE test below has keys).
    up = a.shmcast("broker", ["broker", "--data", data, "--tcp-open", "--heartbeat", "0.2"],
                   ns_a, BROKER_READY)  # fmt: skip
    assert up["data"] == data
    a.start("pub", ["-m", "tests._relay_peer", "publish", "frames", "4096", "50"],
            {"SHMCAST_NAMESPACE": ns_a}, PUB_READY)  # fmt: skip
    local = b.shmcast("broker", ["broker"], ns_b, BROKER_READY)
    b.shmcast("relay", ["relay", "--upstream", data, "--segments", "fr*"], ns_b, RELAY_READY)
    b.start("check", ["-m", "tests._relay_peer", "check", "frames"], {"SHMCAST_NAMESPACE": ns_b})
    ctl_a, ctl_b = up["control"], local["control"]

    # Data arrives intact, with the upstream's version numbers.
    wait_for(lambda: _version(ctl_b, "frames") >= 20, 20, what="relayed versions on B")
    entry = _entry(ctl_b, "frames")
    assert entry["source"] == f"relay:{data}"
    assert entry["upstream_up"] is True
    assert entry["dtype"] == _entry(ctl_a, "frames")["dtype"]
    assert entry["shape"] == [4096]
    wait_for(lambda: (b.last(f"check| {CHECK}") or {}).get("checked", 0) >= 10, 10,
             what="the checker on B")  # fmt: skip
    v_b = _version(ctl_b, "frames")
    assert 0 < v_b <= _version(ctl_a, "frames")

    # Cut the link: the relay reports the upstream down and keeps serving the last data.
    link.set(up=False)
    wait_for(lambda: _entry(ctl_b, "frames").get("upstream_up") is False, 10,
             what="upstream_up false on B")  # fmt: skip
    frozen = _version(ctl_b, "frames")
    wait_for(lambda: _version(ctl_a, "frames") > frozen + 25, 10, what="A publishing on")
    assert _version(ctl_b, "frames") == frozen
    status = b.last(f"check| {CHECK}")
    assert status is not None
    assert status["version"] == frozen

    # Repair: it resumes and catches up to the latest.
    link.set(up=True)
    target = _version(ctl_a, "frames")
    wait_for(lambda: _entry(ctl_b, "frames").get("upstream_up") is True, 20,
             what="upstream_up true again")  # fmt: skip
    wait_for(lambda: _version(ctl_b, "frames") >= target, 20, what="catching up")
    wait_for(lambda: (b.last(f"check| {CHECK}") or {}).get("version", 0) >= target, 10,
             what="the checker reading the caught-up version")  # fmt: skip
    final = b.last(f"check| {CHECK}")
    assert final is not None
    assert final["bad"] == 0
    assert final["checked"] >= 20


def _toml(path: Path, **values: Any) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            items = ", ".join(f'"{v}"' for v in value)
            lines.append(f"{key} = [{items}]")
        else:
            lines.append(f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_unauthenticated_relay_gets_nothing_with_curve(
    hosts: tuple[Host, Host, Link], tmp_path: Path
) -> None:
    a, b, _ = hosts
    server_pub, server_sec = (k.decode() for k in zmq.curve_keypair())
    good_pub, good_sec = (k.decode() for k in zmq.curve_keypair())
    rogue_pub, rogue_sec = (k.decode() for k in zmq.curve_keypair())
    pub_pub, pub_sec = (k.decode() for k in zmq.curve_keypair())  # A's local publisher
    ns_a = unique_namespace("ca")
    ns_good, ns_plain, ns_rogue = (unique_namespace(p) for p in ("cg", "cp", "cr"))
    data = f"tcp://{a.addr}:{PORT}"
    broker_cfg = _toml(
        tmp_path / "broker.toml",
        curve_secret_key=server_sec,
        curve_public_key=server_pub,
        curve_clients=[good_pub, pub_pub],
    )
    up = a.shmcast("broker", ["broker", "--config", broker_cfg, "--data", data], ns_a,
                   BROKER_READY)  # fmt: skip
    a.start(
        "pub",
        ["-m", "tests._relay_peer", "publish", "frames", "1024", "50"],
        {"SHMCAST_NAMESPACE": ns_a, "SHMCAST_TEST_CURVE": f"{server_pub},{pub_pub},{pub_sec}"},
        PUB_READY,
    )
    controls = {}
    for ns in (ns_good, ns_plain, ns_rogue):
        controls[ns] = b.shmcast(f"broker-{ns}", ["broker"], ns, BROKER_READY)["control"]
    good_cfg = _toml(
        tmp_path / "good.toml",
        upstream=data,
        curve_server_key=server_pub,
        curve_public_key=good_pub,
        curve_secret_key=good_sec,
    )
    rogue_cfg = _toml(
        tmp_path / "rogue.toml",
        upstream=data,
        curve_server_key=server_pub,
        curve_public_key=rogue_pub,
        curve_secret_key=rogue_sec,
    )
    b.shmcast("relay-good", ["relay", "--config", good_cfg], ns_good, RELAY_READY)
    b.shmcast("relay-plain", ["relay", "--upstream", data], ns_plain, RELAY_READY)
    b.shmcast("relay-rogue", ["relay", "--config", rogue_cfg], ns_rogue, RELAY_READY)

    curve_a = (server_pub.encode(), pub_pub.encode(), pub_sec.encode())
    wait_for(lambda: _version(controls[ns_good], "frames") >= 10, 20, what="the keyed relay")
    assert _version(controls[ns_good], "frames") <= _version(up["control"], "frames", curve_a)
    # The others had as long, and more: nothing reached them, not even a catalog entry.
    wait_for(lambda: _version(controls[ns_good], "frames") >= 40, 20, what="more versions")
    assert _entry(controls[ns_plain], "frames") is None
    assert _entry(controls[ns_rogue], "frames") is None
