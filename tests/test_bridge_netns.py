"""The Zenoh bridge across hosts: an exporter host, a router, two importer hosts.

Four network namespaces joined by veth links through the router's, each host
with its own /dev/shm and broker. 1 MiB frames at 100 Hz, each filled with its
version number. Checks: every version the importers' local readers deliver is
whole and in order, and the rest are counted; a cut link, once repaired,
resumes without restarting anything; a plain Zenoh client with no shmcast
decodes the frames from the documented format.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from collections.abc import Iterator

import pytest

from bench._netns import Host, Link, network, why_no_netns
from shmcast.cli.testing import BROKER_READY, unique_namespace, wait_for

_why = why_no_netns()
try:
    import zenoh  # noqa: F401
except ImportError:
    _why = _why or "eclipse-zenoh is not installed (the zenoh extra)"
pytestmark = [pytest.mark.root, pytest.mark.skipif(_why is not None, reason=_why or "")]

PORT = 7447
SITE = sysconfig.get_paths()["purelib"]  # zenoh, msgpack, numpy; not the .pth files
PEER = ["-m", "tests._bridge_peer"]
BRIDGE_READY = "shmcast bridge ready: "


def _stat(host: Host, tag: str) -> dict[str, int]:
    got = host.last(f"{tag}| STAT ")
    return got or {}


@pytest.fixture
def hosts() -> Iterator[tuple[dict[str, Host], dict[tuple[str, str], Link]]]:
    with network(["R", "E", "I1", "I2"], [("E", "R"), ("I1", "R"), ("I2", "R")]) as net:
        yield net


@pytest.fixture
def report(
    request: pytest.FixtureRequest, hosts: tuple[dict[str, Host], dict[tuple[str, str], Link]]
) -> Iterator[None]:
    """On failure, what each host's processes said last."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for host in hosts[0].values():
            lines = [ln for ln in host.lines if "| STAT " not in ln][-25:]
            print(f"--- host {host.name}", *lines, sep="\n", file=sys.stderr)


def test_frames_cross_a_router_to_two_hosts_and_survive_a_cut_link(
    hosts: tuple[dict[str, Host], dict[tuple[str, str], Link]], report: None
) -> None:
    h, links = hosts
    ns = unique_namespace("zb")
    env = {"SHMCAST_NAMESPACE": ns}
    h["R"].start("router", [*PEER, "router", f"tcp/0.0.0.0:{PORT}"], ready="READY ")
    for name in ("E", "I1", "I2"):
        h[name].shmcast("broker", ["broker"], ns, BROKER_READY)
    router_for = {name: f"tcp/{h['R'].addrs[name]}:{PORT}" for name in ("E", "I1", "I2")}
    for name in ("I1", "I2"):
        h[name].shmcast(
            "bridge",
            ["bridge", "zenoh", "--connect", router_for[name], "--import", f"shmcast/{ns}/*"],
            ns,
            BRIDGE_READY,
        )
    h["I2"].start(
        "plain",
        ["-S", "tests/_plain_zenoh.py", SITE, router_for["I2"], f"shmcast/{ns}/frames", "20"],
        ready="READY ",
    )
    h["E"].start("pub", [*PEER, "publish", "frames", "100"], env, ready="READY ")
    h["E"].shmcast(
        "bridge",
        ["bridge", "zenoh", "--connect", router_for["E"], "--export", "frames*"],
        ns,
        BRIDGE_READY,
    )
    for name in ("I1", "I2"):
        h[name].start("check", [*PEER, "check", "frames"], env, ready="READY ")
    for name in ("I1", "I2"):
        wait_for(
            lambda n=name: _stat(h[n], "check").get("delivered", 0) >= 100,
            timeout=60,
            what=f"100 frames delivered on {name}",
        )

    # The plain Zenoh client decoded whole frames without shmcast.
    line = h["I2"].wait_line("plain| RESULT ", 30)
    frames = json.loads(line.split("RESULT ", 1)[1])
    assert len(frames) == 20
    assert all(f["whole"] and f["dtype"] == "<u4" and f["shape"] == [512, 512] for f in frames)
    assert [f["version"] for f in frames] == sorted({f["version"] for f in frames})

    # Cut I1's link to the router for 3 s, repair it: I1 resumes by itself.
    link = links[("I1", "R")]
    link.set(False)
    # The outage lasts 3 s (time is the scenario here, not a wait for something).
    # What was already in I1's buffers drains in the first half; then nothing comes.
    time.sleep(1.5)
    drained = _stat(h["I1"], "check")["delivered"]
    i2_before = _stat(h["I2"], "check")["delivered"]
    time.sleep(1.5)
    during = _stat(h["I1"], "check")["delivered"]
    assert during - drained <= 2, "frames kept arriving over a cut link"
    assert _stat(h["I2"], "check")["delivered"] > i2_before, "I2 stalled with I1's link"
    link.set(True)
    repaired_at = time.monotonic()
    wait_for(
        lambda: _stat(h["I1"], "check")["delivered"] >= during + 100,
        timeout=60,
        what="I1 receiving again after the repair",
    )
    resumed_s = time.monotonic() - repaired_at

    h["E"].stop("pub")
    last = json.loads(h["E"].wait_line("pub| DONE ", 10).split("DONE ", 1)[1])["last"]
    for name in ("I1", "I2"):
        wait_for(
            lambda n=name: _stat(h[n], "check").get("last") == last,
            timeout=30,
            what=f"{name} reaching the last version {last}",
        )
        h[name].stop("check")
        st = _stat(h[name], "check")
        assert st["bad"] == 0, st  # every delivered frame whole, with its own version
        assert st["backwards"] == 0, st  # and in order
        # Everything else is counted: delivered + missed + lost reads = the span seen.
        assert st["delivered"] + st["missed"] + st["gone"] == last - st["start"], st
    print(
        f"\nFIGURES bridge: last version {last}; I1 delivered "
        f"{_stat(h['I1'], 'check')['delivered']} (missed {_stat(h['I1'], 'check')['missed']}), "
        f"I2 delivered {_stat(h['I2'], 'check')['delivered']}; I1 resumed "
        f"{resumed_s:.1f} s after the repair",
        file=sys.stderr,
    )
