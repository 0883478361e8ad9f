"""The command line: main([...]) in-process, and the demo as a real process."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from shmcast.broker import Broker, BrokerConfig, Segment
from shmcast.cli._main import COMMANDS, main
from shmcast.cli.testing import start
from shmcast.publisher import Publisher

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


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["publish", "x", "--shape", "0,3"], "positive integers"),
        (["publish", "x", "--shape", "a,b"], "integers like"),
        (["publish", "x", "--source", "random"], "--dtype and --shape"),
        (["publish", "x", "--source", "ticks", "--dtype", "f8"], "implies its dtype"),
        (["publish", "x", "--source", "random", "--dtype", "nope", "--shape", "2"], "nope"),
        (["broker", "--config", "/nonexistent.toml"], "no such file"),
        (["subscribe"], "SEGMENT"),
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


def test_bad_config_file_names_the_field(
    tmp_path: Path, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text('[[segments]]\nname = "s"\ndtype = "float64"\nshape = [2, -1]\n')
    assert main(["broker", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "segments[0]" in err
    assert str(cfg) in err


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

    demo = start(["demo", "-n", namespace, "--duration", "2", "--keep-recording"])
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
