"""The command line: main([...]) in-process, and the demo as a real process."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from shmcast.broker import Broker, BrokerConfig, Segment
from shmcast.broker.client import shm_path
from shmcast.cli._main import COMMANDS, main
from shmcast.cli.testing import BROKER_READY, running, start
from shmcast.publisher import Publisher
from tests._curve import curve_broker, curve_file
from tests._procs import piped

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [name for name, _ in COMMANDS])
def test_every_command_has_help_with_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"shmcast {command}" in out
    assert "--namespace" in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, _ in COMMANDS:
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def test_ls_json_from_the_broker_and_from_dev_shm(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = Broker(BrokerConfig(namespace=namespace)).start()
    try:
        with Publisher("ls1", dtype="f4", shape=(3, 2), namespace=namespace) as pub:
            pub.publish(np.ones((3, 2), "f4"))
            pub.publish(np.ones((3, 2), "f4"))
            assert main(["ls", "-n", namespace, "--json", "--interval", "0"]) == 0
            listing = json.loads(capsys.readouterr().out)
            assert listing["from"] == "broker"
            (row,) = listing["segments"]
            assert (row["name"], row["shape"], row["version"]) == ("ls1", [3, 2], 2)
            assert main(["ls", "-n", namespace, "--interval", "0"]) == 0
            table = capsys.readouterr().out
            assert re.search(r"^ls1\s+<f4\s+3x2\s+2\s+2\s", table, re.M), table
    finally:
        broker.close()
    seg = Segment.create("orphan", "u2", (4,), namespace=namespace)
    try:
        seg.write(np.zeros(4, "u2"))
        assert main(["ls", "-n", namespace, "--json", "--interval", "0"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert listing["from"] == "shm"
        assert [(r["name"], r["version"]) for r in listing["segments"]] == [("orphan", 1)]
    finally:
        seg.unlink()
        seg.close()


def test_ls_names_a_stopped_broker_not_no_broker(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ls`` of a namespace whose broker is stopped (SIGSTOP) said "no segments (no
    broker)": it still reads /dev/shm, but names the broker's pid and that it is
    stopped (starting another, the fix for no broker, would be refused)."""
    with running(["broker", "-n", namespace], ready=BROKER_READY) as broker:
        pid = broker.ready["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            assert main(["ls", "-n", namespace, "--interval", "0"]) == 0
            out = capsys.readouterr().out
            assert "no broker" not in out, out
            assert f"pid {pid}" in out, out
            assert "stopped" in out, out
            assert main(["ls", "-n", namespace, "--json", "--interval", "0"]) == 0
            listing = json.loads(capsys.readouterr().out)
            assert listing["from"] == "shm"
            assert (listing["broker_pid"], listing["broker_stopped"]) == (pid, True)
        finally:
            os.kill(pid, signal.SIGCONT)  # then `running` stops it


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["publish", "x", "--shape", "0,3"], "positive integers"),
        (["publish", "x", "--shape", "a,b"], "integers like"),
        (["publish", "x", "--source", "random"], "--dtype and --shape"),
        (["publish", "x", "--source", "ticks", "--dtype", "f8"], "implies its dtype"),
        (["publish", "x", "--source", "ticks", "--shape", "4,4"], "ticks are 1-D"),
        (["publish", "x", "--source", "random", "--dtype", "nope", "--shape", "2"], "nope"),
        (["broker", "--config", "/nonexistent.toml"], "no such file"),
        (["subscribe"], "SEGMENT"),
        (["publish", "x", "--dtype", "O", "--shape", "4"], "holds Python objects"),
        (["relay", "--upstream", "tcp://127.0.0.1:99999"], "a port from 1 to 65535"),
        (["relay", "--upstream", "tcp://127.0.0.1"], "a port from 1 to 65535"),
        # No broker: --slots 1 waited 5 s for one, then "no broker answered", exit 1.
        (["publish", "x", "--dtype", "f8", "--shape", "4", "--slots", "1"], "2 to 64 slots"),
        (["publish", "x", "--dtype", "f8", "--shape", "4", "--slots", "65"], "2 to 64 slots"),
        # Two wait modes: --spin won silently, busy-polling where events were asked for.
        (["subscribe", "x", "--wait", "events", "--spin"], "--spin is --wait spin"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(
    argv: list[str], needle: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # argparse usage errors
    assert code == 2
    assert needle in capsys.readouterr().err


def test_no_broker_names_the_fix_a_command_line_user_can_give(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no broker, every command said "or pass broker=<its control endpoint>",
    a keyword of the library that no command takes: the command line's way to name
    a broker elsewhere is --broker (or $SHMCAST_BROKER)."""
    assert main(["health", "-n", namespace, "--timeout", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "no broker answered" in err
    assert "--broker ENDPOINT" in err
    assert "$SHMCAST_BROKER" in err


@pytest.mark.parametrize("duration", ["0", "1e7"])
def test_record_duration_says_it_must_be_above_0(
    duration: str, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``record --duration 1e7`` said "give a number of seconds >= 0 and at most 1e+06",
    and ``--duration 0`` then said "--duration must be positive": the first message
    offered a value the command refuses."""
    out = tmp_path / "r.h5"
    with pytest.raises(SystemExit) as exc:
        main(["record", "x", "-n", namespace, "-o", str(out), "--duration", duration])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--duration" in err
    assert "seconds > 0" in err
    assert not out.exists()


def test_the_random_feed_makes_booleans_of_false_and_true() -> None:
    """It wrote random bytes into bool arrays: numpy reads 127 as True, but a view
    of the bytes (and anything that takes the data as bytes) gave 127."""
    from shmcast.publisher import make_feed

    out = np.zeros(1000, bool)
    make_feed("random", np.dtype(bool), (1000,)).fill(out, 1)
    assert set(out.view(np.uint8).tolist()) == {0, 1}


def test_the_random_feed_makes_booleans_of_false_and_true_in_records_too() -> None:
    """The fix above masked bool arrays only: a record's bool fields (`--dtype
    "[('ok','?'),('x','<i4')]"`) still got random bytes, 255 and the like."""
    from shmcast.publisher import make_feed

    inner = np.dtype([("flags", "?", (3,)), ("v", "<f8")])
    dt = np.dtype([("ok", "?"), ("x", "<i4"), ("sub", inner)])
    out = np.zeros(500, dt)
    make_feed("random", dt, (500,)).fill(out, 1)
    for flags in (out["ok"], out["sub"]["flags"]):
        assert set(flags.view(np.uint8).reshape(-1).tolist()) == {0, 1}
    assert len(set(out["x"].tolist())) > 400  # the other fields stay random


def test_publish_with_slots_the_broker_refuses_exits_2(
    namespace: str, thread_broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad argument, as the parser's own: it exited 1, like a failure (and now
    the parser refuses it, before any broker is asked)."""
    with pytest.raises(SystemExit) as exc:
        main(["publish", "t", "--dtype", "f8", "--shape", "4", "--slots", "1"])
    assert exc.value.code == 2
    assert "argument --slots: '1': give a ring of 2 to 64 slots" in capsys.readouterr().err
    assert Segment.list(namespace) == []


def test_publish_feeds_a_declared_segment_with_the_slots_it_has(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/broker.toml declares ``frames`` with 3 slots. Before, the README's
    ``shmcast publish frames --source frames`` into it was refused ("exists as ...
    slots=3, requested ... slots=2"): ``--slots`` asked for 2 by default."""
    from shmcast.broker import SegmentSpec

    spec = SegmentSpec("frames", "uint16", (8, 8), slots=3)
    with Broker(BrokerConfig(namespace=namespace, segments=(spec,))).start():
        argv = ["publish", "frames", "--source", "frames", "--shape", "8,8", "--rate", "0"]
        assert main([*argv, "--count", "2", "-n", namespace]) == 0
        with Segment.attach("frames", namespace=namespace) as seg:
            assert (seg.version, seg.slots) == (2, 3)
        capsys.readouterr()
        # Asked for in so many words, another ring is still refused, naming both.
        assert main([*argv, "--count", "1", "--slots", "2", "-n", namespace]) == 1
        assert "slots=3, requested" in capsys.readouterr().err


def test_a_book_of_ticks_too_large_is_refused_by_the_publisher_not_a_traceback(
    namespace: str, thread_broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tick feed made its arrays (3 x 8 bytes a symbol) before the Publisher
    checked /dev/shm: 10^11 symbols ended in a MemoryError traceback."""
    assert main(["publish", "t", "--source", "ticks", "--shape", str(10**11)]) == 1
    assert "of shared memory but" in capsys.readouterr().err
    assert Segment.list(namespace) == []


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        # Tracebacks before: OverflowError from bind(), the clocks, or an int too large.
        (["subscribe", "x", "--metrics-port", "70000"], "--metrics-port"),
        (["subscribe", "x", "--metrics-port", "-1"], "--metrics-port"),
        (["relay", "--upstream", "tcp://127.0.0.1:9", "--metrics-port", "65536"], "--metrics-port"),
        (["publish", "x", "--dtype", "u1", "--shape", "4", "--rate", "1e-300"], "--rate"),
        (["ls", "--interval", "1e300"], "--interval"),
        (["top", "--once", "--interval", "1e300"], "--interval"),
        (["health", "--timeout", "1e300"], "--timeout"),
        # Flat out before, exit 0.
        (["publish", "x", "--dtype", "u1", "--shape", "4", "--rate", "nan"], "--rate"),
        (["publish", "x", "--dtype", "u1", "--shape", "4", "--rate", "-5"], "--rate"),
        (["demo", "--tick-rate", "inf"], "--tick-rate"),
        # Never stopped, stopped after one update, or was taken as is.
        (["publish", "x", "--dtype", "u1", "--shape", "4", "--count", "-1"], "--count"),
        (["subscribe", "x", "--count", "-1"], "--count"),
        (["subscribe", "x", "--name", ""], "--name"),
        (["record", "x", "-o", "x.h5", "--count", "-1"], "--count"),
        (["record", "x", "-o", "x.h5", "--name", ""], "--name"),
        (["doctor", "--subscribers", "-5"], "--subscribers"),
        # An empty address (an unset $VARIABLE): served the metrics on every interface.
        (["subscribe", "x", "--metrics-port", "0", "--metrics-host", ""], "--metrics-host"),
        (["broker", "--metrics-port", "0", "--metrics-host", ""], "--metrics-host"),
        (["relay", "--upstream", "tcp://127.0.0.1:9", "--metrics-host", " "], "--metrics-host"),
        (["bridge", "zenoh", "--export", "*", "--metrics-host", ""], "--metrics-host"),
    ],
)
def test_bad_values_exit_2_naming_the_option(
    argv: list[str], option: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["ls", "--name"], ["rm", "s", "--names"], ["health", "--namesp"]])
def test_an_abbreviated_option_is_refused_not_taken_for_another(
    argv: list[str], namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse took a prefix of an option for it: `--name X` in a command without
    a --name of its own (`ls`, `rm`, `record` before its --name) was --namespace X,
    and `shmcast rm s --name X` deleted `s` in namespace X. (The test's own namespace
    is given: taken, it names nothing of anyone else.)"""
    with pytest.raises(SystemExit) as info:
        main([*argv, namespace])
    assert info.value.code == 2
    assert f"unrecognized arguments: {argv[-1]}" in capsys.readouterr().err


def test_the_option_types_take_their_whole_range() -> None:
    from shmcast.cli._options import per_second, port_number, positive_seconds

    assert [port_number(p) for p in ("0", "65535")] == [0, 65535]
    assert [per_second(r) for r in ("0", "1e-6", "1e9")] == [0.0, 1e-6, 1e9]
    assert positive_seconds("1e6") == 1e6


def test_frames_smaller_than_the_spot_are_filled(namespace: str) -> None:
    """Before, `publish --source frames --shape 8,8` created the segment, then died
    of a ValueError (the 32-pixel spot did not fit), leaving it at version 0."""
    from shmcast.publisher import make_feed

    for shape in ((8, 8), (2, 2), (3, 100)):
        feed = make_feed("frames", None, shape)
        out = np.empty(shape, np.uint16)
        for i in range(0, 360, 7):
            feed.fill(out, i)
            assert out.max() > 100  # the spot is in the frame
    with pytest.raises(ValueError, match="at least 2x2"):
        make_feed("frames", None, (1, 5))
    assert main(["publish", "x", "--source", "frames", "--shape", "1,5"]) == 2  # nothing made


def test_bad_config_file_names_the_field(
    tmp_path: Path, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text('[[segments]]\nname = "s"\ndtype = "float64"\nshape = [2, -1]\n')
    assert main(["broker", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "segments[0]" in err
    assert str(cfg) in err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("max_segment_bytes", v) for v in (-1, 0, True, 1.5, "64MiB")],
        ("metrics_port", True),
        ("heartbeat_interval", True),
        ("max_relays", True),
    ],
)
def test_a_limit_that_is_not_a_count_is_refused_naming_it(field: str, value: object) -> None:
    """max_segment_bytes was never checked: -1 refused every create at run time and
    "64MiB" failed each with a TypeError answered as BadRequest; a bool passed as a
    port or a number (True is an int to Python)."""
    from shmcast.broker import ConfigError

    with pytest.raises(ConfigError, match=field):
        BrokerConfig(**{field: value})  # type: ignore[arg-type]


def test_a_negative_max_segment_bytes_in_a_file_is_refused(tmp_path: Path) -> None:
    from shmcast.broker import ConfigError, resolve_config

    cfg = tmp_path / "b.toml"
    cfg.write_text("max_segment_bytes = -1\n")
    with pytest.raises(ConfigError, match="max_segment_bytes") as exc:
        resolve_config({}, config_file=str(cfg), environ={})
    assert exc.value.source == str(cfg)
    assert BrokerConfig(max_segment_bytes=1).max_segment_bytes == 1


def test_subscribe_json_count(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    seg = Segment.create("js", "f8", (10,), namespace=namespace)
    try:
        seg.write(np.arange(10.0))
        # futex mode needs no broker: the already-published version is not replayed,
        # so publish one more from a timer thread once the subscriber waits.
        import threading

        t = threading.Timer(0.3, lambda: seg.write(np.arange(10.0) * 2))
        t.start()
        code = main(
            [
                *("subscribe", "js", "-n", namespace, "--wait", "futex"),
                *("--json", "--stats", "--count", "1", "--timeout", "10"),
            ]
        )
        t.join()
        assert code == 0
        rec = json.loads(capsys.readouterr().out.strip())
        assert rec["segment"] == "js"
        assert rec["version"] == 2
        assert rec["max"] == 18.0
        assert rec["mean"] == pytest.approx(9.0)
    finally:
        seg.unlink()
        seg.close()


def _await_ready(stderr: IO[str], timeout: float) -> float:
    """Read ``stderr`` until the ready line, within ``timeout`` s; the deadline."""
    deadline = time.monotonic() + timeout
    ready = ""
    while "ready" not in ready:
        assert time.monotonic() < deadline, "no ready line"
        if select.select([stderr], [], [], 0.5)[0]:
            ready = stderr.readline()
            assert ready, "subscribe exited early"
    return deadline


def test_subscribe_into_a_pipe_its_reader_closed_stops_cleanly(namespace: str) -> None:
    """``shmcast subscribe x | head -1``: before, the next line died of a
    BrokenPipeError traceback (exit 1, no summary line)."""
    seg = Segment.create("bp", "f8", (4,), namespace=namespace)
    try:
        with piped(["subscribe", "bp", "-n", namespace, "--wait=futex"]) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            deadline = _await_ready(proc.stderr, 30)
            seg.write(np.zeros(4))
            assert select.select([proc.stdout], [], [], 10)[0], "no update line"
            assert proc.stdout.readline().startswith("bp v1 ")
            proc.stdout.close()  # what head does after its line
            while proc.poll() is None:
                assert time.monotonic() < deadline, "subscribe did not stop"
                seg.write(np.zeros(4))
                time.sleep(0.01)
            err = proc.stderr.read()
            assert proc.returncode == 0, err
            assert "Traceback" not in err
            assert "shmcast subscribe done: " in err
    finally:
        seg.unlink()
        seg.close()


def test_subscribe_into_a_pipe_its_reader_closed_with_stderr_too_stops_cleanly(
    namespace: str,
) -> None:
    """``shmcast subscribe x 2>&1 | head -2``: stderr is the closed pipe too. Before,
    the summary line died of a BrokenPipeError traceback on stderr, exit 1."""
    seg = Segment.create("bq", "f8", (4,), namespace=namespace)
    try:
        with piped(
            ["subscribe", "bq", "-n", namespace, "--wait=futex"], stderr=subprocess.STDOUT
        ) as proc:
            assert proc.stdout is not None
            deadline = time.monotonic() + 30
            assert select.select([proc.stdout], [], [], 30)[0], "no ready line"
            assert "ready" in proc.stdout.readline()
            seg.write(np.zeros(4))
            assert select.select([proc.stdout], [], [], 10)[0], "no update line"
            assert proc.stdout.readline().startswith("bq v1 ")
            proc.stdout.close()  # what head does after its lines
            while proc.poll() is None:
                assert time.monotonic() < deadline, "subscribe did not stop"
                seg.write(np.zeros(4))
                time.sleep(0.01)
            assert proc.returncode == 0
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_subscribe_into_a_full_disk_says_so_and_gives_its_summary(namespace: str) -> None:
    """``shmcast subscribe x > file`` on a full disk (here ``/dev/full``): before, the
    first line died of an ``OSError: [Errno 28]`` traceback, exit 1, and the summary
    line with the four counters was never printed."""
    seg = Segment.create("df", "f8", (4,), namespace=namespace)
    try:
        with open("/dev/full", "w") as full:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shmcast.cli",
                    "subscribe",
                    "df",
                    "-n",
                    namespace,
                    "--wait=futex",
                ],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:
            assert proc.stderr is not None
            deadline = _await_ready(proc.stderr, 30)
            while proc.poll() is None:
                assert time.monotonic() < deadline, "subscribe did not stop"
                seg.write(np.zeros(4))
                time.sleep(0.01)
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        assert "shmcast subscribe done: " in err
        assert "cannot write the updates to stdout: No space left on device" in err
        assert "--quiet" in err
    finally:
        seg.unlink()
        seg.close()


def test_subscribe_json_is_json_for_nan_and_infinity(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--json --stats`` of a version holding NaN or infinity: before, the line said
    ``"mean": NaN`` / ``Infinity``, which is no JSON (jq refuses it)."""
    seg = Segment.create("jn", "f8", (4,), namespace=namespace)
    try:
        t = threading.Timer(0.3, lambda: seg.write(np.array([np.inf, 1.0, 2.0, np.nan])))
        t.start()
        code = main(
            [
                *("subscribe", "jn", "-n", namespace, "--wait", "futex"),
                *("--json", "--stats", "--count", "1", "--timeout", "10"),
            ]
        )
        t.join()
        assert code == 0

        def refuse(constant: str) -> None:
            raise ValueError(f"{constant} is no JSON")

        rec = json.loads(capsys.readouterr().out.strip(), parse_constant=refuse)
        assert rec["version"] == 1
        assert (rec["mean"], rec["std"], rec["max"]) == (None, None, None)
    finally:
        seg.unlink()
        seg.close()


def test_demo_runs_and_leaves_nothing(namespace: str) -> None:
    demo = start(["demo", "-n", namespace, "--duration", "3", "--refresh", "0.5"])
    try:
        assert demo.wait(90) == 0, "\n".join(demo.stderr[-20:])
    finally:
        demo.stop(sig=signal.SIGINT)
    out = "\n".join(demo.stdout)
    assert re.search(r"broker metrics:\s+http://127\.0\.0\.1:\d+/metrics", out)
    for name in ("strategy", "viewer"):
        assert re.search(rf"^{name}\s+\d+", out, re.M), out[-2000:]
    # The recorder records both feeds to a temporary file, reports it, removes it.
    assert re.search(r"^recorder\s+ticks, frames -> \S+\.h5 \(\d", out, re.M), out[-2000:]
    report = re.search(r"^recording: (\S+\.h5), [\d.]+ MiB: ticks (\d+) versions", out, re.M)
    assert report, out[-2000:]
    assert int(report.group(2)) > 0
    assert "removed (--keep-recording keeps it)" in out
    assert not Path(report.group(1)).exists()
    assert "clean exit" in out
    assert Segment.list(namespace) == []


def test_demo_keeps_its_recording_when_asked(namespace: str) -> None:
    from shmcast.broker.recording import open_recording

    # --refresh past --duration: the demo ran until the first refresh (here 1000 s),
    # not for --duration.
    argv = ["demo", "-n", namespace, "--duration", "2", "--refresh", "1000", "--keep-recording"]
    demo = start(argv)
    try:
        assert demo.wait(90) == 0, "\n".join(demo.stderr[-20:])
    finally:
        demo.stop(sig=signal.SIGINT)
    out = "\n".join(demo.stdout)
    report = re.search(r"^recording: (\S+\.h5), ", out, re.M)
    assert report, out[-2000:]
    path = Path(report.group(1))
    try:
        with open_recording(path) as rec:
            assert set(rec.segments) == {"ticks", "frames"}
            assert len(rec.segments["frames"]) > 0
            assert rec.segments["frames"].layout.shape == (512, 512)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def test_demo_ctrl_c_exits_clean(namespace: str) -> None:
    demo = start(["demo", "-n", namespace, "--duration", "0", "--refresh", "0.3"])
    try:
        demo.wait_line("shmcast demo", timeout=60)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0, "\n".join(demo.stderr[-20:])
    finally:
        demo.stop()
    assert "clean exit" in "\n".join(demo.stdout)
    assert Segment.list(namespace) == []


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("segments = 5", "segments"),  # was "bad value for 'config': 'int' object ..."
        ("window = true", "window"),  # these three were taken, as 1 or for ever
        ("heartbeat_timeout = true", "heartbeat_timeout"),
        ("heartbeat_timeout = inf", "heartbeat_timeout"),
        ("metrics_port = true", "metrics_port"),
    ],
)
def test_a_relay_config_value_of_the_wrong_kind_is_refused_naming_it(
    tmp_path: Path, line: str, field: str
) -> None:
    from shmcast.broker import ConfigError
    from shmcast.publisher import resolve_relay_config

    f = tmp_path / "relay.toml"
    f.write_text(f'upstream = "tcp://127.0.0.1:1"\n{line}\n')
    with pytest.raises(ConfigError, match=f"^bad value for '{field}' in "):
        resolve_relay_config({}, config_file=str(f), environ={})


@pytest.mark.parametrize(
    ("command", "line", "flags", "env"),
    [
        ("broker", "namespace = 3", {"namespace": "given"}, {}),  # shmcast broker -n given
        ("broker", "namespace = 3", {}, {"SHMCAST_NAMESPACE": "given"}),
        ("broker", 'metrics_port = "abc"', {"metrics_port": 9100}, {}),
        ("broker", "heartbeat_interval = true", {"heartbeat_interval": 1.0}, {}),
        ("broker", "heartbeat_interval = true", {}, {}),  # was taken as 1.0 s
        ("broker", 'tcp_open = "yes"', {"tcp_open": True}, {}),
        ("relay", 'window = "8"', {"window": 4}, {}),
        ("relay", "segments = 5", {"segments": ["a*"]}, {}),
    ],
)
def test_a_config_value_of_the_wrong_type_is_refused_though_a_flag_overrides_it(
    tmp_path: Path, command: str, line: str, flags: dict[str, object], env: dict[str, str]
) -> None:
    """`shmcast broker --config FILE -n NS` with `namespace = 3` in FILE was accepted:
    the flag's value was taken and the file's never looked at, so the wrong type
    went unnoticed until the day the flag was left out (as with the environment,
    and with the relay's and doctor's --config). It is refused, naming the file,
    the key and the type expected (or the coercion's own error)."""
    from shmcast.broker import ConfigError, resolve_config
    from shmcast.publisher import resolve_relay_config

    f = tmp_path / f"{command}.toml"
    up = 'upstream = "tcp://127.0.0.1:1"\n' if command == "relay" else ""
    f.write_text(f"{up}{line}\n")
    resolve = resolve_relay_config if command == "relay" else resolve_config
    field = line.split(" = ")[0]
    with pytest.raises(ConfigError, match=f"^bad value for '{field}' in ") as exc:
        resolve(flags, config_file=str(f), environ=env)  # type: ignore[operator]
    assert exc.value.source == str(f)
    assert re.search(r": (expected (a|an|true)|'abc' is not an integer)", str(exc.value))


@pytest.mark.parametrize(
    ("line", "flags", "env", "why"),
    [
        ('namespace = "a.b"', {"namespace": "ok"}, {}, "no dots"),  # shmcast broker -n ok
        ('namespace = "a.b"', {}, {"SHMCAST_NAMESPACE": "ok"}, "no dots"),
        ("metrics_port = 70000", {"metrics_port": 0}, {}, "not a port"),
        ("metrics_port = 70000", {}, {"SHMCAST_METRICS_PORT": "9100"}, "not a port"),
        ("heartbeat_interval = 0.0", {"heartbeat_interval": 0.5}, {}, "between 0.01 and 60"),
    ],
)
def test_an_invalid_config_value_is_refused_though_a_flag_overrides_it(
    tmp_path: Path, line: str, flags: dict[str, object], env: dict[str, str], why: str
) -> None:
    """`shmcast broker --config FILE -n ok` with `namespace = "a.b"` in FILE started:
    only the value's type was checked under a flag or the environment, not the value
    (a port of 70000, a heartbeat of 0 s too). It is refused as it would be the day
    the override is left out, naming the file, the key and the fix."""
    from shmcast.broker import ConfigError, resolve_config

    f = tmp_path / "broker.toml"
    f.write_text(f"{line}\n")
    field = line.split(" = ")[0]
    with pytest.raises(ConfigError, match=f"^bad value for '{field}' in ") as exc:
        resolve_config(flags, config_file=str(f), environ=env)
    assert exc.value.source == str(f)
    assert why in str(exc.value)
    assert "correct the file, or remove the key" in str(exc.value)
    f.write_text(f"{line.split(' = ')[0]} = {'0.25' if 'interval' in line else 9101}\n")
    if "namespace" not in line:  # a valid value under the same override: taken
        resolve_config(flags, config_file=str(f), environ=env)


def test_a_relay_config_takes_its_patterns_as_a_list_or_one_string() -> None:
    """The type check of `segments` (made for `segments = 5` in a file) refused a
    list of patterns from Python, "give one or more fnmatch patterns" of one that
    was; a string (one pattern in the file and the environment) was refused too,
    and before the check it was taken as a pattern per character."""
    from shmcast.broker import ConfigError
    from shmcast.publisher import RelayConfig

    up = "tcp://127.0.0.1:1"
    assert RelayConfig(upstream=up, segments=["a*", "b"]).segments == ("a*", "b")  # type: ignore[arg-type]
    assert RelayConfig(upstream=up, segments="frames*").segments == ("frames*",)  # type: ignore[arg-type]
    for bad in ([], ["a", ""], [5]):
        with pytest.raises(ConfigError, match=r"^bad value for 'segments'"):
            RelayConfig(upstream=up, segments=bad)  # type: ignore[arg-type]


def test_relay_curve_keys_that_are_not_keys_are_refused_naming_them(tmp_path: Path) -> None:
    """40 characters outside z85 passed the check and ZeroMQ refused them when the
    socket was made: `shmcast relay` ended in a ZMQError traceback. A key pair
    that is not one made the upstream silent, with no hint at the keys' mismatch."""
    import zmq

    from shmcast.broker import ConfigError
    from shmcast.publisher import RelayConfig

    with pytest.raises(ConfigError, match=r"^bad value for 'curve_server_key'"):
        RelayConfig(upstream="tcp://127.0.0.1:1", curve_server_key="~" * 40)
    public, secret = (k.decode() for k in zmq.curve_keypair())
    other = zmq.curve_keypair()[0].decode()
    with pytest.raises(ConfigError, match=r"^bad value for 'curve_public_key'"):
        RelayConfig(
            upstream="tcp://127.0.0.1:1",
            curve_server_key=public,
            curve_public_key=other,
            curve_secret_key=secret,
        )


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('curve_secret_key = "tooshort"', "curve_secret_key"),  # was a ZMQError traceback
        ('curve_secret_key = "{sec}"\ncurve_clients = ["{e40}"]', "curve_clients"),  # same
        ('curve_secret_key = "{sec}"\ncurve_readers = ["abc"]', "curve_readers"),
        ('curve_secret_key = "{sec}"\ncurve_public_key = "{other}"', "curve_public_key"),
        ('curve_clients = ["{other}"]', "curve_clients"),  # no secret key: CURVE off
    ],
)
def test_broker_curve_keys_that_are_not_keys_are_refused_naming_them(
    tmp_path: Path, namespace: str, capsys: pytest.CaptureFixture[str], toml: str, field: str
) -> None:
    """A broker's CURVE keys went to ZeroMQ unchecked: a bad secret key or a
    non-ASCII client key ended `shmcast broker` in a traceback, and a client key
    that is no key, a public key that is not the secret key's, or an allow-list
    with no secret key (CURVE off) started a broker every such client timed out on."""
    import zmq

    secret = zmq.curve_keypair()[1].decode()
    other = zmq.curve_keypair()[0].decode()
    from shmcast.broker import ConfigError, resolve_config

    cfg = tmp_path / "b.toml"
    cfg.write_text(toml.format(sec=secret, other=other, e40="\u00e9" * 40) + "\n")
    with pytest.raises(ConfigError) as info:  # before anything is bound
        resolve_config({}, config_file=str(cfg), environ={})
    assert str(info.value).startswith(f"bad value for '{field}' in {cfg}")
    assert secret not in str(info.value)
    if field == "curve_secret_key":  # the command: exit 2 and the message
        assert main(["broker", "--config", str(cfg)]) == 2
        assert f"bad value for '{field}' in {cfg}" in capsys.readouterr().err


def test_every_config_file_loads() -> None:
    from shmcast.broker import resolve_config

    files = sorted((ROOT / "configs").iterdir())
    assert any(f.suffix == ".toml" for f in files)
    for f in files:
        if f.name == "relay.toml":
            from shmcast.publisher import resolve_relay_config

            resolve_relay_config({}, config_file=str(f), environ={})
        elif f.suffix == ".toml":
            resolve_config({}, config_file=str(f), environ={})
        elif f.suffix in (".yml", ".yaml"):
            import yaml

            assert yaml.safe_load(f.read_text()) is not None, f
        elif f.suffix == ".json":
            json.loads(f.read_text())


def test_demo_latency_quantile_interpolates_inside_the_bucket() -> None:
    from shmcast.cli._cmd_demo import _quantile

    cumulative = {1e-4: 10.0, 2e-4: 60.0, 5e-4: 100.0, float("inf"): 100.0}
    assert _quantile(cumulative, 0.5) == pytest.approx(1.8e-4)  # 40 of the 50 in (100, 200] us
    assert _quantile(cumulative, 0.99) == pytest.approx(4.925e-4)
    assert _quantile({1e-4: 0.0, float("inf"): 5.0}, 0.5) == 1e-4  # beyond the last bound
    assert _quantile({}, 0.5) is None


# ------------------------------------------------------------ issue 12: rough edges


@pytest.fixture
def lab(namespace: str) -> Iterator[Broker]:
    """A broker in a thread serving ``frames`` and ``ticks`` (no writer on either)."""
    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.1)).start()
    try:
        for name in ("frames", "ticks"):
            Publisher(name, dtype="u2", shape=(4,), namespace=namespace).close()
        yield b
    finally:
        b.close()


def test_rm_deletes_through_the_broker_and_refuses_a_live_writer(
    namespace: str, lab: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rm", "-n", namespace, "ticks"]) == 0
    assert "deleted ticks" in capsys.readouterr().out
    assert Segment.list(namespace) == ["frames"]
    with Publisher("frames", namespace=namespace) as pub:  # a live writer holds the lease
        assert main(["rm", "-n", namespace, "frames", "nope"]) == 1
        err = capsys.readouterr().err
        assert f"segment 'frames' of namespace '{namespace}' has a live writer (pid " in err
        assert "--force" in err
        assert f"no segment 'nope' in namespace '{namespace}'" in err
        assert Segment.list(namespace) == ["frames"]
        assert main(["rm", "-n", namespace, "frames", "--force"]) == 0
        assert pub.version == 0
    assert Segment.list(namespace) == []


def test_rm_force_names_the_writer_it_cuts_off(
    namespace: str, lab: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """``shmcast rm --force`` of a segment a publisher writes printed only "deleted
    frames": nothing said that the writer goes on into an object no reader finds."""
    with Publisher("frames", namespace=namespace):
        assert main(["rm", "-n", namespace, "frames", "ticks", "--force"]) == 0
        out, err = capsys.readouterr()
        assert out.splitlines() == ["deleted frames", "deleted ticks"]
        assert f"segment 'frames' had a live writer (pid {os.getpid()})" in err
        assert "ticks" not in err  # no writer there: nothing to say


def test_the_broker_refuses_to_delete_a_live_writers_segment_unless_forced(
    namespace: str, lab: Broker
) -> None:
    """The refusal is the broker's, not only ``shmcast rm``'s: a plain ``delete``
    request (or one sent after a writer arrived) does not unlink under a writer."""
    from shmcast.broker import WriterBusyError
    from shmcast.broker.client import ControlClient

    assert lab.endpoints is not None
    with (
        Publisher("frames", namespace=namespace) as pub,
        ControlClient(lab.endpoints.control, timeout=5) as ctl,
    ):
        with pytest.raises(WriterBusyError, match=f"process {os.getpid()}.*--force"):
            ctl.request("delete", name="frames")
        assert pub.segment.linked()
        assert "frames" in lab.catalog
        assert ctl.request("delete", name="frames", force=True)["name"] == "frames"
        assert not pub.segment.linked()
    # No writer: no force needed. The broker holds the lease while it unlinks, so a
    # writer that opened the object just before (as an attach does) cannot lease
    # it and write where nobody reads: emulated by opening it first.
    fd = os.open(shm_path(namespace, "ticks"), os.O_RDWR)
    try:
        with ControlClient(lab.endpoints.control, timeout=5) as ctl:
            ctl.request("delete", name="ticks")
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert Segment.list(namespace) == []


def test_a_layout_conflict_names_the_segment_and_how_to_delete_it(
    namespace: str, lab: Broker
) -> None:
    from shmcast.broker import LayoutConflictError

    with pytest.raises(LayoutConflictError) as exc:
        Publisher("frames", dtype="f8", shape=(4,), namespace=namespace)
    assert f"delete 'frames' first: `shmcast rm frames -n {namespace}`" in str(exc.value)


def test_subscribe_names_a_missing_segment_and_a_timeout_with_nothing_fails(
    namespace: str, lab: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["subscribe", "frame", "-n", namespace, "--timeout", "1.5"]) == 1
    err = capsys.readouterr().err
    assert f"no segment 'frame' in namespace '{namespace}' yet; existing: frames, ticks" in err
    assert "nothing received from frame in 1.5 s" in err
    # futex mode needs the segment at start: it says the same at once, and fails.
    assert main(["subscribe", "frame", "-n", namespace, "--wait", "futex"]) == 1
    assert "existing: frames, ticks" in capsys.readouterr().err


def test_subscribe_with_a_timeout_and_updates_exits_0(
    namespace: str, lab: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    with Publisher("ticks", namespace=namespace) as pub:
        t = threading.Timer(0.3, lambda: pub.publish(np.ones(4, "u2")))
        t.start()
        code = main(["subscribe", "ticks", "-n", namespace, "--timeout", "1", "--stats"])
        t.join()
    assert code == 0
    out, err = capsys.readouterr()
    assert re.search(r"^ticks v1 .* mean=1 ", out, re.M), out
    done = json.loads(err.split("shmcast subscribe done: ")[1].splitlines()[0])
    assert done["ticks"]["updates"] == 1
    assert {"missed", "overrun", "torn"} <= set(done["ticks"])


@pytest.mark.parametrize(
    ("dtype", "field", "stats"),
    [
        ("S8", None, False),
        ("<M8[ns]", None, False),
        ("<c16", None, False),  # float() dropped the imaginary part, with a warning
        ([("sym", "S8")], None, False),
        ([("sym", "S8"), ("v", "<f8", (3,))], "v", True),  # a sub-array field is numbers
        ([("last", "S4"), ("px", "<f4")], "px", True),
    ],
)
def test_the_worker_takes_statistics_of_numbers_and_says_so_of_the_rest(
    lab: Broker, dtype: object, field: str | None, stats: bool
) -> None:
    """--stats exited 1 with a traceback on strings, dates and records of sub-array
    fields: every version now gets its line, with an error naming the dtype where
    there are no real numbers to summarise."""
    import io

    from shmcast.subscriber import Subscriber, run_worker

    out = io.StringIO()
    with Publisher("d", dtype=dtype, shape=(4,)) as pub, Subscriber("d", timeout=5) as sub:
        for _ in range(2):
            pub.publish(np.zeros(4, dtype=pub.segment.dtype))
        assert run_worker(sub, out, stats=True, as_json=True, count=2, timeout=5) == 2
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["version"] for r in recs] == [1, 2]
    for r in recs:
        if stats:
            assert (r["field"], r["mean"], r["max"]) == (field, 0.0, 0.0)
        else:
            assert "no statistics of" in r["error"]
            assert "mean" not in r


def test_the_workers_idle_look_comes_while_updates_keep_coming(namespace: str) -> None:
    """``shmcast subscribe ticks tikcs`` with ticks at 10 Hz: the worker called
    ``idle`` (which says a segment is still absent, after a second) only when no
    update came for 0.2 s, so a misspelt name beside a segment updating faster than
    5 Hz was never reported (3 s in a reproducer). Here every line the worker writes
    publishes the next version: updates never stop, and the look comes all the same."""
    import io

    from shmcast.subscriber import Subscriber, run_worker

    seg = Segment.create("flow", "i8", (2,), namespace=namespace)
    try:
        with Subscriber(["flow"], namespace=namespace, wait="futex") as sub:
            stop = threading.Event()
            deadline = time.monotonic() + 3
            flowing: list[bool] = []

            class Feed(io.StringIO):
                def write(self, text: str) -> int:
                    if time.monotonic() < deadline:  # the next version, at once
                        seg.write(np.zeros(2, "i8"))
                    return super().write(text)

            def idle(elapsed: float) -> None:
                flowing.append(time.monotonic() < deadline)
                stop.set()

            seg.write(np.zeros(2, "i8"))
            handled = run_worker(sub, Feed(), timeout=15, stop=stop, idle=idle)
        assert flowing[:1] == [True], "the look came only once the updates stopped"
        assert handled > 1
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize(
    ("values", "mean", "std"),
    [
        (np.ones(65536, np.float16), 1.0, 0.0),  # the float16 sum overflowed: std inf
        (np.array([0, 1000], np.float16), 500.0, 500.0),  # squares past 65504: inf
        (np.array([0, 1e20], np.float32), 5e19, 5e19),  # squares past 3.4e38: inf
        (np.zeros(4, [("a", "<f8", (0,)), ("b", "<i2", (2,))]), 0.0, 0.0),  # field 'b'
        (np.array(2.5), 2.5, 0.0),  # a version of shape (): TypeError from analyse()
        (np.array(-7, np.int8), -7.0, 0.0),
        (np.full((), 3, [("a", "S2"), ("last", "<u4")]), 3.0, 0.0),  # a 0-d record
    ],
)
def test_the_workers_statistics_are_those_of_float64(
    values: np.ndarray, mean: float, std: float
) -> None:
    """``--stats`` of float16 and float32 versions said std=inf (null in --json) of
    numbers whose std float64 holds: numpy summed the squares in their own type.
    A record's field of no numbers (a sub-array of shape (0,)) is passed over."""
    from shmcast.subscriber import analyse

    out = analyse(values)
    assert (out["mean"], out["std"]) == pytest.approx((mean, std), rel=1e-6)


def test_the_workers_statistics_of_a_big_version_are_taken_in_small_steps() -> None:
    """Mean, std and max in place, as the README says: numpy's std made a float64
    temporary of the whole version (64 MiB for 8 Mi float64 numbers, per version)."""
    import tracemalloc

    from shmcast.subscriber import analyse

    values = np.arange(8 * 2**20, dtype=np.float64).reshape(2**20, 8)
    tracemalloc.start()
    try:
        out = analyse(values)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n = values.size
    assert out["mean"] == pytest.approx((n - 1) / 2)
    assert out["std"] == pytest.approx(np.sqrt((n * n - 1) / 12))
    assert peak < values.nbytes / 4


def test_ls_gives_no_rate_to_a_segment_created_again_between_its_samples(
    namespace: str, lab: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``shmcast ls`` takes the rate from two samples of the catalog. A segment deleted
    and created again in between started its versions over: the rate was negative
    (-63.1/s for 100 versions, then 5 of the new incarnation), as ``top`` knew."""
    import types

    from shmcast.broker.client import ControlClient, resolve_endpoint
    from shmcast.cli import _cmd_ls

    with Publisher("frames", dtype="u2", shape=(4,), namespace=namespace) as pub:
        for _ in range(100):
            pub.publish(np.zeros(4, "u2"))

    def recreate(_: float) -> None:  # between the two samples
        with ControlClient(resolve_endpoint(None, namespace), timeout=5) as client:
            client.request("delete", name="frames")
        with Publisher("frames", dtype="u2", shape=(4,), namespace=namespace) as pub:
            for _ in range(5):
                pub.publish(np.zeros(4, "u2"))

    clock = types.SimpleNamespace(sleep=recreate, monotonic=time.monotonic)
    monkeypatch.setattr(_cmd_ls, "time", clock)
    assert main(["ls", "-n", namespace, "--json", "--interval", "0.1"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["segments"]}
    assert rows["frames"]["version"] == 5
    assert rows["frames"].get("rate") is None
    assert rows["ticks"]["rate"] == 0.0  # the same incarnation: a rate


def test_ls_and_doctor_escape_control_characters_of_names_in_dev_shm(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any local user may create a file in ``/dev/shm`` under a namespace's prefix:
    ``shmcast ls`` (no broker) and ``shmcast doctor`` printed its name as it was, so
    an escape sequence in it reached the terminal (retitle it, clear it) and a
    newline forged a line of the table."""
    path = shm_path(namespace, "x\x1b]0;pwned\x07\x1b[2J\nfake")
    Path(path).write_bytes(b"x")
    try:
        assert main(["ls", "-n", namespace, "--interval", "0"]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out
        assert "x\\x1b]0;pwned" in out
        assert "\nfake" not in out
        main(["doctor", "-n", namespace])
        out = capsys.readouterr().out
        assert "\x1b" not in out
        assert "\nfake" not in out
        # subscribe's "no segment ... yet; existing: ..." (no broker: read from /dev/shm)
        from shmcast.cli._cmd_subscribe import _missing

        said = _missing("nope", namespace, f"ipc://{tmp_path}/none.sock")
        assert "\x1b" not in said
        assert "x\\x1b]0;pwned" in said
    finally:
        os.unlink(path)


def test_a_broker_endpoint_that_is_no_endpoint_is_named_so(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--broker garbage`` (or ``tcp//host:5555``, ``foo://x``): ZeroMQ refuses the
    address at once. Before, that was "no broker answered at garbage within 0s; start
    one with `shmcast broker`", the wrong cause and fix; and ``ls`` took it for no
    broker and listed this host's /dev/shm instead (exit 0)."""
    assert main(["health", "--broker", "garbage"]) == 1
    err = capsys.readouterr().err
    assert "'garbage' is not an endpoint ZeroMQ can connect to" in err
    assert "start one" not in err
    assert main(["ls", "-n", namespace, "--broker", "tcp//localhost:5555"]) == 2
    out, err = capsys.readouterr()
    assert "ipc:///PATH or tcp://HOST:PORT" in err
    assert out == ""
    assert main(["rm", "x", "-n", namespace, "--broker", "foo://x"]) == 2
    assert "Protocol not supported" in capsys.readouterr().err


def test_ls_honours_shmcast_broker(
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    control = f"ipc://{tmp_path}/control.sock"  # not the namespace's default socket
    b = Broker(BrokerConfig(namespace=namespace, control=control)).start()
    try:
        assert b.endpoints is not None
        Publisher("e", dtype="i1", shape=1, namespace=namespace, broker=b.endpoints.control).close()
        monkeypatch.setenv("SHMCAST_BROKER", b.endpoints.control)
        assert main(["ls", "-n", namespace, "--json", "--interval", "0"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert listing["from"] == "broker"  # not the /dev/shm fallback
        assert [r["name"] for r in listing["segments"]] == ["e"]
    finally:
        b.close()


def test_the_relay_takes_its_local_broker_from_shmcast_broker() -> None:
    """README: every --broker defaults to $SHMCAST_BROKER. The relay ignored it and
    looked for the namespace's ipc socket (exit 1, no broker there)."""
    from shmcast.publisher import resolve_relay_config

    env = {"SHMCAST_BROKER": "ipc:///tmp/elsewhere/control.sock"}
    flags = {"upstream": "tcp://127.0.0.1:9"}
    assert resolve_relay_config(flags, environ=env).broker == env["SHMCAST_BROKER"]
    given = {**flags, "broker": "ipc:///tmp/given/control.sock"}
    assert resolve_relay_config(given, environ=env).broker == given["broker"]


@pytest.mark.parametrize("command", [name for name, _ in COMMANDS])
def test_every_broker_option_names_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    if "--broker ENDPOINT" in out:
        assert "(default: $SHMCAST_BROKER, else the namespace's ipc endpoint)" in out


def test_ls_shows_the_version_and_age_of_its_second_sample(
    namespace: str, lab: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading
    import time

    with Publisher("ticks", namespace=namespace) as pub:
        pub.publish(np.ones(4, "u2"))
        stamp: list[float] = []

        def later() -> None:
            pub.publish(np.ones(4, "u2"))
            stamp.append(time.monotonic())

        t = threading.Timer(0.4, later)
        t.start()
        assert main(["ls", "-n", namespace, "--json", "--interval", "0.6"]) == 0
        done = time.monotonic()
        t.join()
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["segments"]}
    assert rows["ticks"]["version"] == 2  # the later sample's, not the first's
    # The age of version 2 when the second sample was taken, not the interval.
    assert rows["ticks"]["age"] <= done - stamp[0] + 0.05 < 0.6


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        ("publish", "--rate RATE      versions per second (0: flat out) (default: 10.0)"),
        ("subscribe", "(default: shm)"),
        ("ls", "(default: 0.5)"),
        ("demo", "(default: 30.0)"),
    ],
)
def test_help_shows_the_defaults(
    command: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(needle.split()) in out
    assert "(default: None)" not in out
    assert "(default: False)" not in out


def test_doctor_help_says_it_checks_every_namespace_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, its --namespace said "else 'default'", as every other command's."""
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: $SHMCAST_NAMESPACE, else every namespace)" in out
    assert "else 'default'" not in out


def test_every_option_with_a_default_shows_it_in_help() -> None:
    """The README promises each option's default in --help. Before, an option with a
    default and no help text showed neither (argparse formats no help at all):
    ``publish --source`` (random) and ``subscribe --metrics-host`` (127.0.0.1)."""
    import argparse

    from shmcast.cli._main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    hidden = []
    for command, p in commands.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.default in (None, False, argparse.SUPPRESS):
                continue
            text = (formatter._get_help_string(action) or "") if action.help else ""
            if "default" not in text and str(action.default) not in text:
                hidden.append(f"{command} {action.option_strings[0]}={action.default!r}")
    assert not hidden


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root and unshare(1) to give a process a /dev/shm of its own",
)
@pytest.mark.parametrize("mode", ["shm", "events"])
def test_a_subscriber_that_cannot_see_the_brokers_dev_shm_fails_clearly(
    namespace: str, lab: Broker, mode: str
) -> None:
    """A container that did not join the broker's IPC namespace: the broker answers
    and lists the segment, but /dev/shm here is empty."""
    import subprocess

    script = (
        "mount -t tmpfs tmpfs /dev/shm && exec "
        f"{sys.executable} -m shmcast.cli subscribe frames -n {namespace} --wait {mode}"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "does not share the broker's /dev/shm" in proc.stderr
    assert "--ipc container:" in proc.stderr


# ------------------------------------------------------------ CURVE on the command line


def test_health_and_ls_reach_a_curve_broker_with_curve_keys_and_say_so_without(
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``health``, ``ls``, ``rm`` and ``top`` had no way to give CURVE keys: against a
    CURVE broker's TCP control endpoint ``health`` said "no broker answered" (start
    one), and ``ls`` listed /dev/shm as if no broker ran."""
    from shmcast.broker import curve_keypair

    server_pub, server_sec = curve_keypair()
    client_pub, client_sec = curve_keypair()
    stranger_pub, stranger_sec = curve_keypair()
    keys = curve_file(tmp_path / "keys.toml", server_pub, client_pub, client_sec)
    stranger = curve_file(tmp_path / "stranger.toml", server_pub, stranger_pub, stranger_sec)
    b = curve_broker(namespace, server_sec, client_pub)
    try:
        assert b.endpoints is not None
        at = ["-n", namespace, "--broker", b.endpoints.control]
        assert main(["health", *at, "--curve-keys", keys, "--timeout", "5"]) == 0
        assert capsys.readouterr().out.startswith("ok: broker ")
        monkeypatch.setenv("SHMCAST_CURVE_KEYS", keys)  # the default of --curve-keys
        assert main(["ls", *at, "--json", "--interval", "0"]) == 0
        assert json.loads(capsys.readouterr().out)["from"] == "broker"
        monkeypatch.delenv("SHMCAST_CURVE_KEYS")

        assert main(["health", *at, "--timeout", "0.5"]) == 1
        err = capsys.readouterr().err
        assert "no broker answered" not in err
        assert "CURVE" in err, err
        assert "--curve-keys" in err, err
        assert main(["ls", *at, "--interval", "0"]) == 1  # not /dev/shm's listing
        out, err = capsys.readouterr()
        assert "--curve-keys" in err, err
        assert not out
        assert main(["health", *at, "--curve-keys", stranger, "--timeout", "0.5"]) == 1
        err = capsys.readouterr().err
        assert "refused this client's CURVE key" in err, err
        assert "curve_clients" in err
    finally:
        b.close()


def test_publish_subscribe_record_and_replay_take_the_curve_keys_their_error_names(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused handshake's error says "shmcast: --curve-keys FILE or
    $SHMCAST_CURVE_KEYS", but only health, ls, rm and top took either: ``shmcast
    publish`` (``subscribe``, ``record``, ``replay``) against a CURVE broker's TCP
    endpoint could not be given keys, ``--curve-keys`` was an unrecognized argument
    (exit 2) and the variable was ignored (the same error again)."""
    from shmcast.broker import curve_keypair

    server_pub, server_sec = curve_keypair()
    client_pub, client_sec = curve_keypair()
    keys = curve_file(tmp_path / "keys.toml", server_pub, client_pub, client_sec)
    b = curve_broker(namespace, server_sec, client_pub)
    try:
        assert b.endpoints is not None
        at = ["-n", namespace, "--broker", b.endpoints.control, "--curve-keys", keys]
        publish = ["publish", "k", "--dtype", "f8", "--shape", "2", "--count", "1", "--rate", "0"]
        assert main([*publish, *at]) == 0, capsys.readouterr().err
        capsys.readouterr()
    finally:
        b.close()
        Segment.remove("k", namespace=namespace)
    bad = tmp_path / "bad.toml"
    bad.write_text("curve_server_key = 1\n")
    for argv in (
        ["subscribe", "k"],
        ["record", "k", "-o", str(tmp_path / "r.h5")],
        ["replay", "f"],
    ):
        assert main([*argv, "--curve-keys", str(bad)]) == 2, argv
        assert "'curve_server_key'" in capsys.readouterr().err, argv


def test_curve_key_files_that_are_wrong_are_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shmcast.broker import curve_keypair

    public, secret = curve_keypair()
    other, _ = curve_keypair()
    bad = tmp_path / "bad.toml"
    cases = [
        (f'curve_server_key = "{"~" * 40}"', "'curve_server_key'"),
        (f'curve_public_key = "{public}"\ncurve_secret_key = "{secret}"', "'curve_server_key'"),
        (f'curve_server_key = "{public}"\ncurve_secret_key = "{secret}"', "'curve_secret_key'"),
        (
            f'curve_server_key = "{public}"\ncurve_public_key = "{other}"\n'
            f'curve_secret_key = "{secret}"',
            "'curve_public_key'",
        ),
        (f'curve_server_key = "{public}"\nserver_key = "{public}"', "unknown keys ['server_key']"),
        ("curve_server_key = ", "not valid TOML"),
    ]
    for text, named in cases:
        bad.write_text(text)
        bad.chmod(0o600)  # the content is wrong, not the mode
        assert main(["health", "--curve-keys", str(bad)]) == 2, text
        assert named in capsys.readouterr().err, text
    assert main(["rm", "x", "--curve-keys", str(tmp_path / "none.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_curve_key_file_others_may_read_or_write_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--curve-keys`` read any file: one holding the client's secret key that every
    user may read (0644), one any user may write (and so choose the broker key the
    client trusts), a FIFO (the read waited for a writer), and ``--curve-keys ""``
    (an unset variable: silently no keys). Each is refused (exit 2) naming the fix."""
    from shmcast.broker import curve_keypair

    server, _ = curve_keypair()
    public, secret = curve_keypair()
    keys = Path(curve_file(tmp_path / "keys.toml", server, public, secret))
    for mode, said in ((0o644, "others may read it (mode 0644)"), (0o622, "others may write")):
        keys.chmod(mode)
        assert main(["health", "--curve-keys", str(keys)]) == 2, oct(mode)
        err = capsys.readouterr().err
        assert said in err, err
        assert f"chmod 600 {keys}" in err, err
    server_only = Path(curve_file(tmp_path / "server.toml", server, None, None))
    server_only.chmod(0o644)  # a public key alone: readable is fine
    assert main(["health", "--curve-keys", str(server_only), "--broker", "tcp://127.0.0.1:1",
                 "--timeout", "0.1"]) == 1  # fmt: skip
    assert "--curve-keys" not in capsys.readouterr().err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["health", "--curve-keys", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert main(["health", "--curve-keys", ""]) == 2
    assert "an empty path" in capsys.readouterr().err


def test_a_name_holding_a_backslash_does_not_print_as_one_holding_a_control_character(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``printable`` left backslashes alone: a segment named with the four characters
    ``\\x1b`` printed as one whose name holds an ESC, in ``ls``, ``doctor``, ``top``
    and ``subscribe``. A backslash is doubled now."""
    from shmcast.cli._cmd_subscribe import _missing
    from shmcast.cli._text import printable

    assert printable("a\\x1bb") == "a\\\\x1bb"
    assert printable("a\x1bb") == "a\\x1bb"
    assert printable("a\\b", shell=True) == "a\\b"  # doctor's fixes: quoted already
    literal, control = "lit\\x1bz", "ctl\x1bz"
    paths = [shm_path(namespace, n) for n in (literal, control)]
    for path in paths:
        Path(path).write_bytes(b"x")
    try:
        assert main(["ls", "-n", namespace, "--interval", "0"]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out
        rows = [line.split()[0] for line in out.splitlines()[1:] if line.startswith(("lit", "ctl"))]
        assert sorted(rows) == ["ctl\\x1bz", "lit\\\\x1bz"], out
        main(["doctor", "-n", namespace])
        out = capsys.readouterr().out
        assert "\x1b" not in out
        assert "ctl\\x1bz" in out
        assert "lit\\\\x1bz" in out
        said = _missing("nope", namespace, f"ipc://{tmp_path}/none.sock")
        assert "ctl\\x1bz" in said
        assert "lit\\\\x1bz" in said
    finally:
        for path in paths:
            os.unlink(path)


def test_a_name_an_error_quotes_prints_escaped_once(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error quotes a name as ``repr`` writes it (escaped already), and ``printable``
    escaped it again: ``ls`` showed the error of ``frames\\xa0`` as ``'frames\\\\xa0'``
    beside the ``frames\\xa0`` of its row, and ``doctor`` (its invalid name, an
    ``OSError`` fixing it) the same, though the path it names was escaped once."""
    import errno

    from shmcast.broker import _doctor
    from shmcast.cli._text import printable

    literal, nbsp = "lit\\x1bz", "nb\xa0z"
    paths = {n: shm_path(namespace, n) for n in (literal, nbsp)}
    for path in paths.values():
        Path(path).write_bytes(b"x")
    try:
        assert main(["ls", "-n", namespace, "--interval", "0"]) == 0
        out = capsys.readouterr().out
        for name in paths:
            (row,) = [line for line in out.splitlines() if line.startswith(printable(name))]
            assert f"invalid segment name {name!r}: use" in row, row  # as repr wrote it
        main(["doctor", "-n", namespace])
        out = capsys.readouterr().out
        for path in paths.values():
            said = f"{printable(path)} is not a valid shmcast segment: invalid segment name: use"
            assert said in out, out
        os.chmod(paths[literal], 0o666)  # others may write it: doctor --fix fixes it

        def refused(path: str, *args: object) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)

        monkeypatch.setattr(_doctor, "_fix_object", refused)
        main(["doctor", "-n", namespace, "--fix"])
        out = capsys.readouterr().out
        assert "fixing failed: Operation not permitted\n" in out, out
    finally:
        for path in paths.values():
            Path(path).unlink(missing_ok=True)


def test_running_out_of_file_descriptors_is_an_error_naming_the_limit(namespace: str) -> None:
    """A subscriber of more segments than its open-files limit holds (each attached
    segment holds a descriptor): exit 1 with one line naming the limit and how to
    raise it. Before, the command died with a traceback of the bare ``OSError``
    ("[Errno 24] Too many open files")."""
    segs = [Segment.create(f"s{i}", np.uint8, (8,), namespace=namespace) for i in range(60)]
    try:
        argv = [sys.executable, "-m", "shmcast.cli", "subscribe", *(s.name for s in segs)]
        argv += ["-n", namespace, "--wait", "futex", "--timeout", "0.1", "--quiet"]
        r = subprocess.run(
            ["sh", "-c", 'ulimit -n 40 && exec "$@"', "sh", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for s in segs:
            s.unlink()
            s.close()
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "shmcast subscribe: error: out of file descriptors" in r.stderr
    assert "open-files limit is 40" in r.stderr
    assert "ulimit -n 4096" in r.stderr


def test_publish_says_so_once_its_segment_is_deleted_under_it(namespace: str) -> None:
    """`shmcast publish` whose segment is unlinked under it (`shmcast rm --force`, a
    broker stopped with --unlink-on-exit) says so on stderr, once, within about a
    second (the Publisher's own warning), goes on, and its done line says
    segment_deleted. Before, it published on into the unlinked object and said
    nothing: its done line counted versions no reader could find."""
    from shmcast.cli._cmd_publish import DONE
    from shmcast.cli.testing import PUBLISH_READY, wait_for

    with Broker(BrokerConfig(namespace=namespace)).start():
        sp = start(
            [
                *("publish", "p", "-n", namespace, "--source", "random"),
                *("--dtype", "u1", "--shape", "4", "--rate", "200"),
            ],
            ready=PUBLISH_READY,
        )
        try:
            Segment.remove("p", namespace=namespace)
            said = "was deleted under this publisher"
            wait_for(lambda: any(said in ln for ln in sp.stderr), 10, what="the warning")
            assert sp.proc.poll() is None  # it goes on: stopping is the user's call
        finally:
            sp.stop()
    lines = [ln for ln in sp.stderr if said in ln]
    assert len(lines) == 1, lines  # once
    assert "WARNING: segment 'p' of namespace" in lines[0]
    assert f"of namespace {namespace!r} was deleted under this publisher" in lines[0]
    assert "stop it and start it again" in lines[0]
    done = [json.loads(ln[len(DONE) :]) for ln in sp.stdout if ln.startswith(DONE)]
    assert [d["segment_deleted"] for d in done] == [True]
