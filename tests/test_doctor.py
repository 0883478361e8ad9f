"""``shmcast doctor``: what it finds, what it says to do, and what --fix repairs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmcast.broker import (
    Broker,
    BrokerConfig,
    InvalidNameError,
    OutOfDescriptorsError,
    Segment,
    SegmentExistsError,
    SegmentNotFoundError,
    diagnose,
)
from shmcast.broker._doctor import _check_runtime_dirs
from shmcast.broker._nsword import NamespaceWord
from shmcast.broker.client import SHM_DIR, object_name, runtime_dir, shm_path
from shmcast.cli._main import main
from shmcast.cli.testing import BROKER_READY, start, wait_for
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber
from tests._other_user import OtherUser


def _doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc = main(["doctor", "--json", *args])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is (rc == 0)
    return rc, report


def _checks(report: dict[str, Any], status: str) -> dict[str, str]:
    return {
        c["check"]: c["message"] + " " + c["fix"] for c in report["checks"] if c["status"] == status
    }


def test_all_ok_with_a_live_broker(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    b = Broker(BrokerConfig(namespace=namespace))
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    try:
        assert b.wait_ready(10)
        with Publisher("ok", dtype="f8", shape=(4,)) as pub:
            pub.publish(np.ones(4))
        rc, report = _doctor(capsys, "--namespace", namespace)
        assert rc == 0, report
        assert {"shm", "objects", "runtime-dir", "nofile", "cpu"} <= set(_checks(report, "ok"))
    finally:
        b.stop()
        t.join(30)


def test_orphans_of_a_killed_broker_and_fix(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = start(["broker"], ready=BROKER_READY)
    try:
        with Publisher("left", dtype="f8", shape=(4,)) as pub:
            pub.publish(np.ones(4))
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
    finally:
        broker.stop()
    assert Segment.list(namespace) == ["left"]
    rc, report = _doctor(capsys, "--namespace", namespace)
    assert rc == 1
    problems = _checks(report, "problem")
    assert "orphans" in problems
    assert "left" in problems["orphans"]
    assert "--fix" in problems["orphans"]
    assert "shmcast broker --namespace" in problems["orphans"]
    rc, report = _doctor(capsys, "--namespace", namespace, "--fix")
    assert rc == 0, report
    assert Segment.list(namespace) == []
    assert not runtime_dir(namespace).exists()


def test_live_writer_is_not_an_orphan(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Segment.create("mine", "f8", (4,), namespace=namespace) as seg:
        rc, _ = _doctor(capsys, "--namespace", namespace, "--fix")
        assert rc == 0
        assert Segment.list(namespace) == ["mine"]
        seg.unlink()


def _age(path: str, seconds: float = 60.0) -> None:
    """Date the object's last change back: --fix leaves one changed less than
    FRESH_SECONDS ago (perhaps a segment being created)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_invalid_object_and_fix(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(SHM_DIR, object_name(namespace, "junk"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"\xff" * 8192)
    os.close(fd)
    _age(path)
    try:
        rc, report = _doctor(capsys, "--namespace", namespace)
        assert rc == 1
        assert "not a valid shmcast segment" in _checks(report, "problem")["invalid"]
        rc, report = _doctor(capsys, "--namespace", namespace, "--fix")
        assert rc == 0, report
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_fix_leaves_a_segment_whose_pages_take_long_to_reserve(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large segment's ``posix_fallocate`` can take seconds (0.3 s a GiB here), and
    until its header is written the object is no valid segment. Its creator now
    holds the writer lease from the moment the object exists; before, it took the
    lease after reserving the pages, so ``doctor --fix`` run meanwhile on an object
    past its 2 s of grace unlinked a segment being made."""
    path = shm_path(namespace, "big")
    seen: list[dict[str, str]] = []
    real = os.posix_fallocate

    def slow_fallocate(fd: int, offset: int, length: int) -> None:
        _age(path)  # as it would be after seconds of reserving
        seen.append(_checks(_doctor(capsys, "--namespace", namespace, "--fix")[1], "problem"))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", slow_fallocate)
    try:
        with Segment.create("big", dtype="f8", shape=(4,), namespace=namespace) as seg:
            monkeypatch.undo()
            assert seg.linked(), "doctor --fix unlinked the segment being made"
            # Reported, not removed: an invalid object a live writer holds.
            ((problem,),) = [list(p.values()) for p in seen]
            assert "a live writer holds it" in problem
            seg.write(np.ones(4))
            with Segment.attach("big", namespace=namespace) as reader:
                assert reader.latest().array.tolist() == [1.0] * 4
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_fix_removes_an_empty_directory_under_a_segment_name(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory under a segment's name: ``--fix`` failed with "[Errno 21] Is a
    directory" while the finding named ``shmcast doctor --fix`` as its fix. An empty
    one is removed now; one holding files is left, with the command that removes it."""
    empty = shm_path(namespace, "d")
    full = shm_path(namespace, "e")
    os.mkdir(empty, 0o700)
    os.mkdir(full, 0o700)
    Path(full, "inside").write_bytes(b"x")
    try:
        rc, report = _doctor(capsys, "--namespace", namespace, "--fix")
        assert not os.path.exists(empty), report
        assert rc == 1
        problem = _checks(report, "problem")["ownership"]
        assert "holding files" in problem
        assert f"rm -r -- {full}" in problem
        assert os.path.exists(os.path.join(full, "inside"))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(empty)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(full, "inside"))
            os.rmdir(full)


def test_the_commands_a_finding_names_quote_the_path(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finding's fix is a command to paste into a shell. An object named
    ``x $(touch ...)`` or ``*`` (this user's own, invalid, world-readable) was named
    bare: ``chmod o-rw /dev/shm/shmcast.<ns>.*`` globs every object of the namespace,
    and a ``$(...)`` runs."""
    names = ["x $(false)", "*"]
    paths = [shm_path(namespace, n) for n in names]
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.fchmod(fd, 0o644)
        os.close(fd)
    try:
        rc, report = _doctor(capsys, "--namespace", namespace)
        assert rc == 1
        fixes = {c["fix"] for c in report["checks"] if c["status"] == "problem"}
        for path in paths:
            quoted = "'" + path + "'"
            assert any(f"chmod o-rw -- {quoted}" in f for f in fixes), fixes
            assert any(f"rm -- {quoted}" in f for f in fixes), fixes
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_the_commands_a_finding_names_work_for_a_name_of_control_characters(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An object named with control characters (an escape sequence, a byte that is no
    UTF-8): the text output escapes them for the terminal, so the single-quoted path
    in 'chmod o-rw -- ...' and 'rm -- ...' named a file that does not exist ('No such
    file or directory'). Now ANSI-C quoted ($'...'): pasted, it names the object."""
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    raw = os.fsencode(shm_path(namespace, "x")) + b"\x1b]0;t\x07 \xff'y"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.fchmod(fd, 0o644)
    os.close(fd)
    try:
        assert main(["doctor", "--namespace", namespace]) == 1
        out = capsys.readouterr().out
        assert "\x1b" not in out
        words = [
            line.split("rm -- ", 1)[1].split("`")[0]
            for line in out.splitlines()
            if "rm -- " in line
        ]
        assert words, out
        for word in words:
            done = subprocess.run(
                [bash, "-c", f"printf %s {word}"], capture_output=True, timeout=10, check=True
            )
            assert done.stdout == raw
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(raw)


def test_fix_reports_a_namespace_word_it_may_not_remove(
    namespace: str, other_user: OtherUser
) -> None:
    """A namespace word others may write, planted by another user (root here), no
    broker: ``shmcast doctor --namespace NS --fix`` run by ``nobody`` died of
    ``PermissionError`` (a traceback) unlinking it from sticky ``/dev/shm``; it now
    reports the word and who can remove it (exit 1)."""
    word = shm_path(namespace, "@catalog")
    fd = os.open(word, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.fchmod(fd, 0o666)
        os.write(fd, bytes(4096))
        os.close(fd)
        out = other_user.run("cli", "doctor", "--namespace", namespace, "--fix")
        assert out["rc"] == 1, out
        assert os.path.exists(word)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(word)


def test_a_config_that_is_a_directory_or_not_utf8_is_named(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config`` naming a directory, or a file that is not UTF-8: ``doctor`` and
    ``broker`` (every command that reads a config file) died of IsADirectoryError or
    UnicodeDecodeError, a traceback, where a missing file or bad TOML were findings
    (doctor) and exit 2 (the services)."""
    latin = tmp_path / "broker.toml"
    latin.write_bytes(b'namespace = "caf\xe9"\n')
    for path, why in ((tmp_path, "Is a directory"), (latin, "not UTF-8 text")):
        rc, report = _doctor(capsys, "--namespace", namespace, "--config", str(path))
        assert rc == 1
        assert why in _checks(report, "problem")["config"]
        assert main(["broker", "-n", namespace, "--config", str(path)]) == 2
        assert why in capsys.readouterr().err


def test_a_config_file_that_is_missing_or_wrong_gets_a_fix_naming_what_to_change(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every bad ``--config`` got the same fix, "correct the named field": for a file
    that does not exist there is no field to correct, and for a bad key the fix did
    not say which, nor in which file."""
    rc, report = _doctor(capsys, "-n", namespace, "--config", str(tmp_path / "none.toml"))
    assert rc == 1
    (check,) = [c for c in report["checks"] if c["check"] == "config"]
    assert "no such file" in check["message"]
    assert "readable TOML file" in check["fix"]
    bad = tmp_path / "broker.toml"
    bad.write_text("metrics_port = 'x'\n")
    rc, report = _doctor(capsys, "-n", namespace, "--config", str(bad))
    assert rc == 1
    (check,) = [c for c in report["checks"] if c["check"] == "config"]
    assert check["fix"] == f"correct 'metrics_port' in {bad}"


def test_world_readable_segment(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Segment.create("open", "f8", (4,), namespace=namespace, mode=0o644) as seg:
        try:
            rc, report = _doctor(capsys, "--namespace", namespace)
            assert rc == 1
            assert "every user" in _checks(report, "problem")["permissions"]
        finally:
            seg.unlink()


def test_config_that_does_not_fit(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text("[[segments]]\nname = 'huge'\ndtype = 'u1'\nshape = [1099511627776]\n")
    rc, report = _doctor(capsys, "--namespace", namespace, "--config", str(cfg))
    assert rc == 1
    msg = _checks(report, "problem")["shm-config"]
    assert "--shm-size" in msg
    assert "free" in msg
    small = tmp_path / "small.toml"
    small.write_text("[[segments]]\nname = 'a'\ndtype = 'f8'\nshape = [16]\n")
    rc, report = _doctor(capsys, "--namespace", namespace, "--config", str(small))
    assert rc == 0, report


def test_open_files_limit(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _doctor(capsys, "--namespace", namespace, "--subscribers", "10000000")
    assert rc == 1
    assert "ulimit -n" in _checks(report, "problem")["nofile"]


def test_a_soft_open_files_limit_the_broker_raises_is_no_problem(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soft limit below what the subscribers need under a hard limit that holds
    them: `shmcast broker` raises its soft limit to the hard one at start (libzmq
    aborts a process out of descriptors at an ipc endpoint), so a warning for a
    Broker in another program, not a problem (exit 1) as before."""
    from types import SimpleNamespace

    from shmcast.broker import _doctor as doctor_module

    limits = SimpleNamespace(
        RLIMIT_NOFILE=0, RLIM_INFINITY=-1, getrlimit=lambda _which: (1024, 524288)
    )
    monkeypatch.setattr(doctor_module, "resource", limits)
    rc, report = _doctor(capsys, "--namespace", namespace, "--subscribers", "1000")
    assert rc == 0, report
    assert "raises it to the hard limit 524288" in _checks(report, "warn")["nofile"]


def test_text_output(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--namespace", namespace]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert "cpu" in out
    assert "all OK" in err


def test_fix_does_not_report_permissions_of_what_it_removed(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seg = Segment.create("lax", "f8", (4,), namespace=namespace, mode=0o644)
    seg.close()  # an orphan: no broker, no writer
    try:
        rc, report = _doctor(capsys, "--namespace", namespace)
        assert rc == 1
        assert "every user" in _checks(report, "problem")["permissions"]
        rc, report = _doctor(capsys, "--namespace", namespace, "--fix")
        assert rc == 0, report
        assert "permissions" not in _checks(report, "problem")
        assert "unlinked" in _checks(report, "ok")["fixed"]
        assert Segment.list(namespace) == []
    finally:
        Segment.remove("lax", namespace=namespace)


def _doctor_elsewhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str
) -> tuple[int, dict[str, Any]]:
    """The doctor with a runtime directory of its own (another XDG_RUNTIME_DIR: sudo,
    ssh, systemd; or a container sharing /dev/shm): no broker lock is in reach."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_RUNTIME_DIR", str(elsewhere))
        return _doctor(capsys, *args)


def test_fix_from_another_runtime_dir_leaves_a_beating_broker_alone(
    namespace: str, thread_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, --fix found no lock in its own runtime directory and unlinked the live
    broker's idle segment and its namespace word; new subscribers then failed."""
    with Publisher("idle", dtype="f8", shape=(4,)) as pub:
        pub.publish(np.ones(4))
    word = shm_path(namespace, "@catalog")
    rc, report = _doctor_elsewhere(capsys, tmp_path, "--namespace", namespace, "--fix")
    assert Segment.list(namespace) == ["idle"]
    assert os.path.exists(word)
    assert rc == 0, report
    warned = _checks(report, "warn")["broker"]
    assert "heartbeat" in warned
    assert "left alone" in warned
    with Subscriber("idle", timeout=2) as sub, sub.read("idle") as snap:
        assert snap.version == 1


def test_fix_that_cannot_read_the_namespace_word_leaves_the_namespace_alone(
    namespace: str, thread_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of descriptors reading the namespace word (an ``OSError``, nothing wrong
    with the word) was taken for "no word": from another runtime directory, --fix
    then unlinked the live broker's idle segment. It says it could not check, and
    leaves the segments and the word alone."""
    import errno

    with Publisher("idle", dtype="f8", shape=(4,)) as pub:
        pub.publish(np.ones(4))
    word = shm_path(namespace, "@catalog")

    def out_of_descriptors(cls: type[NamespaceWord], ns: str | None) -> NamespaceWord | None:
        raise OutOfDescriptorsError.from_os(errno.EMFILE, "the namespace word", word)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NamespaceWord, "attach", classmethod(out_of_descriptors))
        rc, report = _doctor_elsewhere(capsys, tmp_path, "--namespace", namespace, "--fix")
    assert Segment.list(namespace) == ["idle"]
    assert os.path.exists(word)
    assert rc == 0, report
    warned = _checks(report, "warn")["broker"]
    assert "could not check" in warned, report
    assert "left alone" in warned
    assert "open-files limit" in warned


def test_fix_from_another_runtime_dir_leaves_a_stopped_broker_alone(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker whose heartbeats are late (SIGSTOPped, or busy) is alive while the pid
    its namespace word names runs."""
    broker = start(["broker", "--heartbeat", "0.05"], ready=BROKER_READY)
    word = NamespaceWord.attach(namespace)
    assert word is not None
    try:
        with Publisher("idle", dtype="f8", shape=(4,)) as pub:
            pub.publish(np.ones(4))
        broker.send_signal(signal.SIGSTOP)
        wait_for(lambda: not word.broker_up(), timeout=5, what="heartbeats to stop")
        rc, report = _doctor_elsewhere(capsys, tmp_path, "--namespace", namespace, "--fix")
        assert Segment.list(namespace) == ["idle"]
        assert os.path.exists(word.path)
        assert f"pid {broker.proc.pid}" in _checks(report, "warn")["broker"]
        assert rc == 0, report
    finally:
        word.close()
        broker.send_signal(signal.SIGCONT)
        broker.stop()


def _not_a_segment(namespace: str, name: str) -> str:
    path = shm_path(namespace, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"x" * 100)
    os.close(fd)
    return path


def test_fix_removes_what_no_broker_serves_while_one_runs(
    namespace: str, thread_broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """An object that is no segment, under a name the running broker does not serve:
    the broker refuses to create the name and `shmcast rm` finds no segment. Before,
    --fix left it while a broker ran, though every hint named --fix."""
    junk, fresh, held = (_not_a_segment(namespace, n) for n in ("junk", "fresh", "held"))
    _age(junk)
    _age(held)
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer holds it
        with pytest.raises(SegmentExistsError) as info:
            Publisher("junk", dtype="f8", shape=(4,))
        assert junk in str(info.value)
        assert f"shmcast doctor -n {namespace} --fix" in str(info.value)
        # Rebuilt from the broker's reply with its namespace (before: "?").
        assert (info.value.namespace, info.value.segment) == (namespace, "junk")
        with pytest.raises(SegmentNotFoundError, match="create it with a Publisher"):
            Publisher("junk")  # the broker has no such segment; a Publisher creates one
        rc, report = _doctor(capsys, "--namespace", namespace, "--fix")
        assert not os.path.exists(junk)
        assert f"unlinked {junk}" in _checks(report, "ok")["fixed"]
        kept = [c["message"] for c in report["checks"] if c["check"] == "invalid"]
        assert len(kept) == 2, report
        assert any(fresh in m and "still being created" in m for m in kept), kept
        assert any(held in m and "live writer" in m for m in kept), kept
        assert rc == 1
        with Publisher("junk", dtype="f8", shape=(4,)) as pub:
            assert pub.publish(np.ones(4)) == 1
    finally:
        os.close(fd)
        for path in (junk, fresh, held):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _sandbox(tmp_path: Path, mp: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A runtime root of the test's own (``XDG_RUNTIME_DIR``): what is beside and
    inside it, the listing --fix must leave as it is."""
    xdg = tmp_path / "xdg"
    (xdg / "shmcast" / "t-other").mkdir(parents=True)
    for d in (xdg, xdg / "shmcast", xdg / "shmcast" / "t-other"):
        d.chmod(0o700)
    (xdg / "precious.txt").write_text("the user's own data\n")
    (xdg / "shmcast" / "t-other" / "control.sock").touch(mode=0o600)
    mp.setenv("XDG_RUNTIME_DIR", str(xdg))
    return xdg, sorted(str(p.relative_to(xdg)) for p in xdg.rglob("*"))


@pytest.mark.parametrize("ns", ["..", "."])
def test_a_namespace_outside_the_runtime_root_is_refused(
    ns: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, `doctor -n .. --fix` removed the runtime root's parent (the user's
    $XDG_RUNTIME_DIR) and `-n .` the root with every namespace's sockets, both
    saying all OK."""
    with pytest.MonkeyPatch.context() as mp:
        xdg, before = _sandbox(tmp_path, mp)
        assert main(["doctor", "--namespace", ns, "--fix"]) == 2
        assert "invalid namespace name" in capsys.readouterr().err
        with pytest.raises(InvalidNameError):
            diagnose(namespace=ns, fix=True)
    assert sorted(str(p.relative_to(xdg)) for p in xdg.rglob("*")) == before


@pytest.mark.parametrize("ns", ["..", "."])
def test_fix_removes_only_a_directory_directly_below_the_runtime_root(
    ns: str, tmp_path: Path
) -> None:
    """The last guard before the rmtree of a stale runtime dir, for a caller that
    skipped the name's check."""
    with pytest.MonkeyPatch.context() as mp:
        xdg, before = _sandbox(tmp_path, mp)
        assert not [c for c in _check_runtime_dirs([ns], fix=True) if c.check == "fixed"]
        assert sorted(str(p.relative_to(xdg)) for p in xdg.rglob("*")) == before
        (xdg / "shmcast" / "t-stale").mkdir(mode=0o700)
        fixed = _check_runtime_dirs(["t-stale"], fix=True)
        assert [c.message for c in fixed] == [f"removed stale runtime dir {xdg}/shmcast/t-stale"]
    assert sorted(str(p.relative_to(xdg)) for p in xdg.rglob("*")) == before
