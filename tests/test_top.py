"""``shmcast top`` driven in a pseudo terminal against a real broker, feed and subscriber."""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import numpy as np
import pytest

from shmcast.broker import Broker, BrokerConfig, ShmcastError
from shmcast.broker.client import ControlClient
from shmcast.cli._cmd_top import Sample, render
from shmcast.cli.testing import (
    BROKER_READY,
    PUBLISH_READY,
    SUBSCRIBE_READY,
    ShmcastProcess,
    start,
    wait_for,
)
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber

SHMCAST = [sys.executable, "-m", "shmcast.cli"]

SETSID = shutil.which("setsid")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Pty:
    """``shmcast top`` on a pseudo terminal that is its controlling terminal."""

    def __init__(self, args: list[str], rows: int = 40, cols: int = 160) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        # setsid -c: a new session whose controlling terminal is the pty, so that
        # Ctrl-C typed into it becomes SIGINT as on a real terminal.
        self.proc = subprocess.Popen(
            [SETSID or "setsid", "-c", sys.executable, "-m", "shmcast.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"},
        )
        os.close(slave)
        self.raw = b""

    def read_until(self, predicate: object, timeout: float) -> str:
        """Read output until ``predicate(screen)`` holds; return the screen text."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):  # type: ignore[operator]
                return screen
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"screen never matched; last screen:\n{screen}")
            self._pump(min(left, 0.2))

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data
        return bool(data)

    def screen(self) -> str:
        """The last full frame drawn (frames start with cursor-home)."""
        text = self.raw.decode(errors="replace")
        frame = text.rsplit("\x1b[H", 1)[-1]
        return _ANSI.sub("", frame).replace("\r", "")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._pump(0.05)
        while self._pump(0):
            pass
        return self.proc.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def system(namespace: str) -> Iterator[dict[str, ShmcastProcess]]:
    procs: dict[str, ShmcastProcess] = {}
    try:
        procs["broker"] = start(
            ["broker", "-n", namespace, "--heartbeat", "0.2"], ready=BROKER_READY
        )
        procs["feed"] = start(
            ["publish", "ticks", "-n", namespace, "--source", "ticks", "--rate", "200"],
            ready=PUBLISH_READY,
        )
        procs["sub"] = start(
            ["subscribe", "ticks", "-n", namespace, "--quiet", "--name", "topwatcher"],
            ready=SUBSCRIBE_READY,
        )
        with ControlClient(procs["broker"].ready["control"], timeout=5) as client:
            wait_for(
                lambda: client.request("subscribers")["subscribers"],
                10,
                0.05,
                "the subscriber's first report",
            )
        yield procs
    finally:
        for sp in reversed(list(procs.values())):
            sp.stop()


def _has_rows(screen: str) -> bool:
    seg = re.search(r"^ticks\s+\d+\s+[\d.]+\s", screen, re.M)
    sub = re.search(r"^topwatcher\s+\d+\s+ticks\s+\d+\s+\d+\s+[1-9]\d*\s", screen, re.M)
    return bool(seg and sub and "/dev/shm:" in screen)


@pytest.mark.skipif(SETSID is None, reason="setsid (util-linux) is not installed")
@pytest.mark.parametrize(("key", "how"), [(b"q", "q"), (b"\x03", "Ctrl-C")])
def test_top_in_a_terminal_shows_segments_and_subscribers_and_quits(
    namespace: str, system: dict[str, ShmcastProcess], key: bytes, how: str
) -> None:
    term = Pty(["top", "-n", namespace, "--interval", "0.3"])
    try:
        screen = term.read_until(_has_rows, 20)
        assert f"namespace={namespace}" in screen
        assert "SEGMENT" in screen
        assert "SUBSCRIBER" in screen
        # Refreshed in place: several frames, each starting at the top left.
        term.read_until(lambda s: term.raw.count(b"\x1b[H") >= 3, 10)
        term.type(key)
        assert term.wait(10) == 0, f"exit after {how}"
        # The terminal is given back: main screen, cursor shown. The kernel may echo
        # the typed ^C after that: its line discipline sends SIGINT, lets go of the
        # terminal settings while it flushes, and echoes the key if ECHO is on by
        # then, which it is once top has restored them (seen once in a CI run).
        raw = term.raw.rstrip()
        if key == b"\x03":
            raw = raw.removesuffix(b"^C").rstrip()
        assert raw.endswith(b"\x1b[?25h\x1b[?1049l")
    finally:
        term.close()
    # The system is untouched by top coming and going.
    assert all(sp.proc.poll() is None for sp in system.values())


def test_top_once_without_a_terminal(namespace: str, system: dict[str, ShmcastProcess]) -> None:
    out = subprocess.run(
        [*SHMCAST, "top", "-n", namespace, "--once", "--interval", "0.3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    rate = re.search(r"^ticks\s+\d+\s+([\d.]+)\s", out.stdout, re.M)
    assert rate, out.stdout
    assert 50 < float(rate.group(1)) < 400  # published at 200/s
    assert re.search(r"^topwatcher\s+\d+\s+ticks\s", out.stdout, re.M), out.stdout


def test_top_without_a_broker_says_so(namespace: str) -> None:
    out = subprocess.run(
        [*SHMCAST, "top", "-n", namespace, "--once", "--interval", "0.2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "broker not answering" in out.stdout


def test_render_shows_lag_and_percentiles() -> None:
    prev = Sample(t=0.0, segments=[{"name": "a", "version": 100, "ts": 0}])
    cur = Sample(
        t=2.0,
        segments=[{"name": "a", "version": 300, "ts": time.time_ns(), "size": 8192, "slots": 2}],
        subscribers=[
            {
                "name": "w",
                "pid": 7,
                "segments": {
                    "a": {"last_version": 290, "updates": 280, "missed": 3, "overrun": 2}
                    | {"torn": 1}
                    | {"p50": 25e-6, "p99": 0.0021}
                },
            }
        ],
        stats={"shm_total": 64 * 2**20, "shm_free": 48 * 2**20, "shm_used": 8192},
    )
    lines = render("ns", "ipc://x", cur, prev)
    text = "\n".join(lines)
    assert re.search(r"^a\s+300\s+100\.0\s", text, re.M)  # 200 versions in 2 s
    row = next(ln for ln in lines if ln.startswith("w "))
    assert row.split()[:9] == ["w", "7", "a", "290", "10", "280", "3", "2", "1"]
    assert "25us" in row
    assert "2.1ms" in row
    assert "16.0 MiB of 64.0 MiB in use (25%)" in text


def test_render_shows_a_forged_report_as_dashes() -> None:
    """A report is anyone's (read-only clients too): values of the wrong kind are
    shown as '-'. Before, None or inf killed every ``shmcast top`` of the namespace
    (TypeError, OverflowError)."""
    forged: list[object] = [None, float("inf"), float("nan"), "7", [1], True]
    cur = Sample(
        t=1.0,
        segments=[{"name": "a", "version": 5}],
        subscribers=[
            {
                "name": "evil",
                "pid": 1,
                "segments": {
                    f"s{i}": dict.fromkeys(
                        ("last_version", "updates", "missed", "overrun", "torn", "p50", "p99"), v
                    )
                    for i, v in enumerate(forged)
                }
                | {"a": {"last_version": 3.0, "updates": 2}, "b": None},
            }
        ],
    )
    lines = render("ns", "ipc://x", cur, None)
    rows = [ln.split() for ln in lines if ln.startswith("evil ")]
    assert [r[2] for r in rows] == ["a", "s0", "s1", "s2", "s3", "s4", "s5"]
    assert rows[0][3:6] == ["3", "2", "2"]  # version 3, lag 2, 2 updates
    for row in rows[1:]:
        assert row[3:] == ["-"] * 8


def test_render_escapes_control_characters_of_a_report() -> None:
    """A report's subscriber and segment names are anyone's (read-only clients):
    an escape sequence in one was written to the terminal as it was (it could
    clear the screen or retitle the window of whoever ran ``shmcast top``)."""
    cur = Sample(
        t=1.0,
        segments=[{"name": "a", "version": 5}],
        subscribers=[{"name": "x\x1b[2J", "pid": 1, "segments": {"a\x1b]0;t\x07": {"updates": 1}}}],
    )
    text = "\n".join(render("ns", "ipc://x", cur, None))
    assert "\x1b" not in text
    assert "x\\x1b[2J" in text


def test_sigterm_restores_the_terminal(namespace: str, system: dict[str, ShmcastProcess]) -> None:
    if SETSID is None:
        pytest.skip("setsid (util-linux) is not installed")
    term = Pty(["top", "-n", namespace, "--interval", "0.3"])
    try:
        term.read_until(_has_rows, 20)
        term.proc.send_signal(signal.SIGTERM)
        assert term.wait(10) == 0
        assert term.raw.rstrip().endswith(b"\x1b[?25h\x1b[?1049l")
    finally:
        term.close()


def test_report_table_keeps_recent_reports_and_refuses_bad_ones(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shmcast.broker._broker as broker_module

    monkeypatch.setattr(broker_module, "REPORT_TTL", 0.5)
    brk = Broker(BrokerConfig(namespace=namespace)).start()
    try:
        assert brk.endpoints is not None
        with ControlClient(brk.endpoints.control, timeout=5) as client:
            seg = {"a": {"last_version": 3, "updates": 3, "missed": 0, "torn": 0}}
            assert client.send("report", name="w1", pid=11, segments=seg)
            assert client.send("report", name="w2", pid=12, segments=seg)
            rows = wait_for(
                lambda: (
                    len(client.request("subscribers")["subscribers"]) == 2
                    and client.request("subscribers")["subscribers"]
                ),
                5,
                0.02,
                "two reports",
            )
            assert [(r["name"], r["pid"], r["segments"]) for r in rows] == [
                ("w1", 11, seg),
                ("w2", 12, seg),
            ]
            # Values top cannot show are dropped: counts are ints from 0 to 2**63-1,
            # percentiles finite seconds or None.
            bad = [None, float("inf"), float("nan"), -1, 2**63, 1.5, True, "1"]
            forged = {
                f"s{i}": dict.fromkeys(("last_version", "updates"), v) for i, v in enumerate(bad)
            }
            forged |= {
                f"p{i}": {"p50": v, "p99": 0.5, "torn": 0}
                for i, v in enumerate([float("inf"), float("nan"), -1.0, "1", True])
            }
            assert client.send("report", name="w0", pid=10, segments=forged)
            rows = wait_for(
                lambda: [r for r in client.request("subscribers")["subscribers"] if r["pid"] == 10],
                5,
                0.02,
                "the forged report",
            )
            assert rows[0]["segments"] == {f"s{i}": {} for i in range(len(bad))} | {
                f"p{i}": {"p99": 0.5, "torn": 0} for i in range(5)
            }
            client.send("report", name="w0", pid=10, segments={"a": {"p50": None}})
            wait_for(
                lambda: any(
                    r["segments"] == {"a": {"p50": None}}
                    for r in client.request("subscribers")["subscribers"]
                ),
                5,
                0.02,
                "None kept for a percentile",
            )
            # A report that is not one: an error, counted; the broker keeps serving.
            with pytest.raises(ShmcastError, match="report needs"):
                client.request("report", name="w3", pid="x", segments=seg)
            assert client.request("stats")["errors"].get("BadRequest") == 1
            # Reports expire: a subscriber that stopped reporting leaves the table.
            wait_for(
                lambda: client.request("subscribers")["subscribers"] == [],
                5,
                0.05,
                "reports to expire",
            )
    finally:
        brk.close()


def test_a_subscriber_of_many_segments_reports_what_the_broker_keeps(
    namespace: str, thread_broker: Broker
) -> None:
    """A subscriber of 1000 segments (or of a long name) sent the counters of all of
    them, 90 KB, over the broker's largest message (64 KiB): the broker dropped each
    report with the connection, and ``shmcast top`` never showed the subscriber."""
    from shmcast.subscriber import Subscriber

    assert thread_broker.endpoints is not None
    names = [f"segment_number_{i:04}" for i in range(1000)]
    with (
        Subscriber(names, namespace=namespace, name="n" * 100_000) as sub,
        ControlClient(thread_broker.endpoints.control, timeout=5) as client,
    ):

        def shown() -> list[dict[str, object]]:
            for _ in sub.updates(timeout=0.05):
                pass
            rows: list[dict[str, object]] = client.request("subscribers")["subscribers"]
            return rows

        rows = wait_for(shown, 5, 0, "the subscriber's report")
        assert [r["name"] for r in rows] == ["n" * 64]
        segments = rows[0]["segments"]
        assert isinstance(segments, dict)
        assert sorted(segments) == names[:64]
    for bad in (5, "", None):
        with pytest.raises(ValueError, match="name must be a non-empty string"):
            Subscriber("a", namespace=namespace, name=bad)  # type: ignore[arg-type]


def test_render_gives_a_segment_made_again_no_rate() -> None:
    """A segment deleted and created again between two refreshes: before, its rate was
    the new version minus the old incarnation's, over the interval (-497.0/s)."""
    stats = {"shm_total": 1, "shm_free": 1}
    prev = Sample(t=0.0, segments=[{"name": "r", "version": 500, "incarnation": 1}], stats=stats)
    same = Sample(t=1.0, segments=[{"name": "r", "version": 600, "incarnation": 1}], stats=stats)
    again = Sample(t=1.0, segments=[{"name": "r", "version": 3, "incarnation": 2}], stats=stats)
    assert re.search(r"^r\s+600\s+100\.0\s", "\n".join(render("ns", "ep", same, prev)), re.M)
    assert re.search(r"^r\s+3\s+-\s", "\n".join(render("ns", "ep", again, prev)), re.M)


def test_a_closed_subscriber_leaves_the_table_at_once(
    namespace: str, thread_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shmcast.broker._broker as broker_module

    # Reports outlive the test: only the subscriber's goodbye can take its row away.
    monkeypatch.setattr(broker_module, "REPORT_TTL", 3600.0)
    assert thread_broker.endpoints is not None
    with (
        Publisher("ticks", dtype="f8", shape=(4,), namespace=namespace) as pub,
        ControlClient(thread_broker.endpoints.control, timeout=5) as client,
    ):
        sub = Subscriber(["ticks"], namespace=namespace, name="leaving")
        stayer = Subscriber(["ticks"], namespace=namespace, name="staying")
        try:

            def reported() -> set[str]:
                pub.publish(np.zeros(4))
                for s in (sub, stayer):  # a subscriber reports between updates
                    for _ in s.updates(timeout=0.05):
                        pass
                return {r["name"] for r in client.request("subscribers")["subscribers"]}

            wait_for(lambda: reported() == {"leaving", "staying"}, 10, 0.02, "both reports")
            sub.close()
            wait_for(
                lambda: (
                    [r["name"] for r in client.request("subscribers")["subscribers"]] == ["staying"]
                ),
                10,
                0.02,
                "the closed subscriber's row to go",
            )
        finally:
            sub.close()
            stayer.close()


def test_a_goodbye_leaves_the_row_of_a_same_named_subscriber_of_the_process(
    namespace: str, thread_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two open subscribers of one process with one name (the default
    ``subscriber``) report under one row, (name, pid): the first to close said
    goodbye, and the broker dropped the row of the one still reading, until its
    next report. The goodbye is now said by the last of them only."""
    import shmcast.broker._broker as broker_module

    monkeypatch.setattr(broker_module, "REPORT_TTL", 3600.0)
    assert thread_broker.endpoints is not None
    with (
        Publisher("ticks", dtype="f8", shape=(4,), namespace=namespace) as pub,
        ControlClient(thread_broker.endpoints.control, timeout=5) as client,
    ):
        first = Subscriber(["ticks"], namespace=namespace, name="same")
        second = Subscriber(["ticks"], namespace=namespace, name="same")
        try:
            sent: list[tuple[object, dict[str, object]]] = []
            for s in (first, second):
                assert s._client is not None
                real = s._client.send

                def spy(op: str, _real: object = real, _s: object = s, **fields: object) -> bool:
                    sent.append((_s, fields))
                    return _real(op, **fields)  # type: ignore[operator,no-any-return]

                monkeypatch.setattr(s._client, "send", spy)

            def reported() -> set[object]:
                pub.publish(np.zeros(4))
                for s in (first, second):  # a subscriber reports between updates
                    for _ in s.updates(timeout=0.05):
                        pass
                return {who for who, _ in sent}

            wait_for(lambda: reported() == {first, second}, 10, 0.02, "both reports")
            first.close()
            assert not [who for who, fields in sent if fields.get("gone")]
            assert [r["name"] for r in client.request("subscribers")["subscribers"]] == ["same"]
            second.close()
            assert [who for who, fields in sent if fields.get("gone")] == [second]
            wait_for(
                lambda: client.request("subscribers")["subscribers"] == [],
                10,
                0.02,
                "the row to go with the last of them",
            )
        finally:
            first.close()
            second.close()


_FORGER = """
import os, sys
from shmcast.broker.client import ControlClient
pid = int(sys.argv[2])
with ControlClient(sys.argv[1], timeout=5) as c:
    c.send("report", name="strategy", pid=pid, segments={}, gone=True)
    c.send("report", name="strategy", pid=pid, segments={"ticks": {"updates": 1}})
    c.send("report", name="strategy", pid=pid, segments={}, gone=True)
    # A row no process vouched for (a pid not the sender's) still goes at a goodbye.
    c.send("report", name="unvouched", pid=os.getppid(), segments={})
    c.request("hello")
    c.send("report", name="unvouched", pid=os.getppid(), segments={}, gone=True)
    c.request("hello")  # the reports went before it, on the same connection
"""


def test_another_clients_goodbye_leaves_a_subscribers_own_row(
    thread_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any client could send a goodbye (a ``report`` with ``gone``) in another
    subscriber's name and pid, and its row left ``shmcast top`` until its next
    report; a forged report first made it lose its identity too. A row its own
    process reported (the kernel's peer pid over ipc is the report's pid) is now
    changed or removed only by that process; the others' attempts are counted."""
    import shmcast.broker._broker as broker_module
    from shmcast.broker.client import reporter_identity

    monkeypatch.setattr(broker_module, "REPORT_TTL", 3600.0)
    assert thread_broker.endpoints is not None
    assert thread_broker.endpoints.control_ro is not None
    segs = {"ticks": {"last_version": 3, "updates": 3}}
    with ControlClient(thread_broker.endpoints.control, timeout=5) as client:
        client.send(
            "report", name="strategy", pid=os.getpid(), segments=segs, **reporter_identity()
        )
        client.request("hello")  # the report went before it: the row is there
        ro = thread_broker.endpoints.control_ro
        subprocess.run(
            [sys.executable, "-c", _FORGER, ro, str(os.getpid())], timeout=60, check=True
        )
        rows = client.request("subscribers")["subscribers"]
        assert [(r["name"], r["segments"]) for r in rows] == [("strategy", segs)]
        assert "started" in rows[0]
        assert thread_broker.stats().errors.get("report_refused") == 3
        client.send("report", name="strategy", pid=os.getpid(), segments={}, gone=True)
        assert client.request("subscribers")["subscribers"] == []


_STOPPING_REPORTER = """
import os, signal, sys
from shmcast.broker.client import ControlClient, reporter_identity
with ControlClient(sys.argv[1], timeout=5) as c:
    segs = {"ticks": {"last_version": 3, "updates": 3}}
    c.send("report", name="strategy", pid=os.getpid(), segments=segs, **reporter_identity())
    c.request("hello")  # the report went before it, on the same connection
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_top_keeps_a_stopped_subscriber_marked_stopped(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber SIGSTOPped (Ctrl-Z, a debugger) stops reporting: before, its row
    left ``shmcast top`` after 5 s, as a dead one's does, and the operator chasing a
    lagging strategy saw it vanish. Its last report now stays, marked stopped,
    while its pid is alive and stopped in top's pid namespace.

    Only its own report: another client (here this test, on the read-only
    socket) naming the stopped process's pid, pid namespace and start time (all
    readable in ``/proc``) is not kept as that process's. Before, one such forged
    report made top show the stranger as a stopped subscriber for a day."""
    import shmcast.broker._broker as broker_module
    from shmcast.broker._lease import pid_namespace, process_start_time
    from shmcast.cli._cmd_top import sample

    monkeypatch.setattr(broker_module, "REPORT_TTL", 0.2)
    brk = Broker(BrokerConfig(namespace=namespace)).start()
    child: subprocess.Popen[bytes] | None = None
    try:
        assert brk.endpoints is not None
        assert brk.endpoints.control_ro is not None
        child = subprocess.Popen(
            [sys.executable, "-c", _STOPPING_REPORTER, brk.endpoints.control_ro]
        )
        pid = child.pid
        wait_for(
            lambda: os.waitpid(pid, os.WUNTRACED | os.WNOHANG)[0] == pid, 10, 0.01, "it to stop"
        )
        with ControlClient(brk.endpoints.control_ro, timeout=5) as client:
            client.send(
                "report",
                name="forged",
                pid=pid,
                segments={"ticks": {"updates": 1}},
                pidns=pid_namespace(),
                started=process_start_time(pid),
            )
            wait_for(
                lambda: (
                    len(client.request("subscribers", stale=True)["subscribers"]) == 2
                    and client.request("subscribers")["subscribers"] == []
                ),
                5,
                0.02,
                "the reports to go stale",
            )
            cur = sample(client)
        assert [(r["name"], r.get("stopped")) for r in cur.subscribers] == [("strategy", True)]
        rows = [ln for ln in render(namespace, "ep", cur, None) if ln.startswith("strategy")]
        assert len(rows) == 1, rows
        assert rows[0].endswith("  stopped"), rows
        assert f" {pid} " in rows[0]
    finally:
        brk.close()
        if child is not None:
            child.kill()
            child.wait(10)


def test_top_keeps_a_stale_row_only_of_a_process_it_sees_stopped() -> None:
    """Rows of a process that runs, is gone, is another with the same pid, or is of
    another pid namespace go once stale; only the stopped one stays."""
    from shmcast.broker._lease import pid_namespace, process_start_time
    from shmcast.cli._cmd_top import _live_or_stopped

    stopped = subprocess.Popen(["sleep", "60"])
    running = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        gone.kill()
        gone.wait(10)
        wait_for(
            lambda: os.waitpid(stopped.pid, os.WUNTRACED | os.WNOHANG)[0] == stopped.pid,
            5,
            0.01,
            "the child to stop",
        )
        ns = pid_namespace()
        assert ns is not None
        start = process_start_time(stopped.pid)
        reports = [
            {"name": name, "pid": pid, "pidns": pidns, "started": started, "stale": True}
            for name, pid, pidns, started in [
                ("strategy", stopped.pid, ns, start),
                ("running", running.pid, ns, process_start_time(running.pid)),
                ("gone", gone.pid, ns, start),
                ("reused", stopped.pid, ns, start + 1),  # its pid, another start time
                ("elsewhere", stopped.pid, ns + 1, start),  # its pid, another namespace
            ]
        ]
        rows = _live_or_stopped({"subscribers": reports})
        assert [(r["name"], r.get("stopped")) for r in rows] == [("strategy", True)]
    finally:
        for p in (stopped, running, gone):
            p.kill()
            p.wait(10)


def test_a_subscribers_report_says_which_process_it_is(
    namespace: str, thread_broker: Broker
) -> None:
    """The report carries the subscriber's pid namespace and start time, which the
    broker keeps: what lets top tell a stopped subscriber from a gone one."""
    from shmcast.broker._lease import pid_namespace, process_start_time

    assert thread_broker.endpoints is not None
    with (
        Publisher("ticks", dtype="f8", shape=(4,), namespace=namespace) as pub,
        Subscriber(["ticks"], namespace=namespace, name="me") as sub,
        ControlClient(thread_broker.endpoints.control, timeout=5) as client,
    ):

        def shown() -> list[dict[str, object]]:
            pub.publish(np.zeros(4))
            for _ in sub.updates(timeout=0.05):
                pass
            rows: list[dict[str, object]] = client.request("subscribers")["subscribers"]
            return rows

        rows = wait_for(shown, 5, 0, "the subscriber's report")
    assert rows[0]["pidns"] == pid_namespace()
    assert rows[0]["started"] == process_start_time(os.getpid())


def test_render_never_cuts_names_and_keeps_columns_aligned() -> None:
    """Two subscribers whose names share their first 16 characters (one process
    may hold both, one pid): before, the SUBSCRIBER column cut both to
    ``strategy-momentu`` and their rows printed the same; a segment name longer
    than 16 pushed its row's columns out of line."""
    stats = {"shm_total": 1, "shm_free": 1}
    names = ("marketdata.eurusd.bid", "t")
    segs = [{"name": n, "version": 5, "age": 0.1, "size": 1, "slots": 2} for n in names]
    subs = [
        {"name": who, "pid": 7, "segments": {n: {"last_version": 5} for n in names}}
        for who in ("strategy-momentum-eu", "strategy-momentum-us")
    ]
    lines = render("ns", "ep", Sample(t=1.0, segments=segs, subscribers=subs, stats=stats), None)
    rows = [ln for ln in lines if ln.startswith("strategy-")]
    assert len(set(rows)) == len(rows) == 4, rows
    assert sum(ln.startswith("strategy-momentum-us ") for ln in rows) == 2
    seg_table = [ln for ln in lines if ln.startswith(("SEGMENT", "marketdata.", "t "))]
    sub_table = [ln for ln in lines if ln.startswith(("SUBSCRIBER", "strategy-"))]
    for table, column in ((seg_table, "VERSION"), (sub_table, "VERSION")):
        end = table[0].index(column) + len(column)  # right-aligned under its header
        assert all(ln[end - 1] == "5" and ln[end] == " " for ln in table[1:]), table


def test_a_report_keeps_only_segment_names_as_its_keys(
    namespace: str, thread_broker: Broker
) -> None:
    """A report's per-segment key that no segment could be named (control
    characters, here 128 of them) is not kept: printed escaped, one such key made
    every row of top's subscriber table over 1,600 characters wide."""
    assert thread_broker.endpoints is not None
    assert thread_broker.endpoints.control_ro is not None
    with ControlClient(thread_broker.endpoints.control_ro, timeout=5) as client:
        segs = {"ticks": {"updates": 1}, "\U000e0001" * 128: {"updates": 1}}
        client.send("report", name="r", pid=1, segments=segs)
        rows = wait_for(lambda: client.request("subscribers")["subscribers"], 5, 0.01, "the report")
    assert rows[0]["segments"] == {"ticks": {"updates": 1}}


def test_a_name_of_control_characters_widens_only_its_own_row() -> None:
    """A subscriber named with control characters (64 of them, as the broker keeps
    it, printed escaped: 256 characters) overflows its own row; the others keep
    the width their names take."""
    stats = {"shm_total": 1, "shm_free": 1}
    honest = {"name": "honest", "pid": 7, "segments": {"ticks": {"last_version": 5}}}
    odd = {"name": "\x1b" * 64, "pid": 8, "segments": {"ticks": {"last_version": 5}}}

    def row(subs: list[dict[str, object]]) -> str:
        cur = Sample(t=1.0, segments=[], subscribers=subs, stats=stats)
        return next(ln for ln in render("ns", "ep", cur, None) if ln.startswith("honest"))

    assert row([honest, odd]) == row([honest])
