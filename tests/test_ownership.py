"""Trust (issue 11, class 2): runtime directories and /dev/shm objects that another
user made, or that others may write, are refused by every process with an error
naming the path, its owner and mode and ``shmcast doctor --fix``; ``doctor``
reports them and ``--fix`` repairs what it safely can. The other user is
``nobody``, run with ``setpriv`` (see ``tests/_other_user.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmcast.broker import Broker, BrokerConfig, OwnershipError, Segment
from shmcast.broker.client import shm_path
from shmcast.cli._main import main
from shmcast.cli.testing import unique_namespace
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber
from tests._other_user import NOBODY, OtherUser

pytestmark = pytest.mark.root


def _doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    rc = main(["doctor", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)["checks"]


def _names_path_owner_mode_fix(exc: BaseException, path: str, uid: int, mode: int) -> None:
    msg = str(exc)
    for part in (path, f"uid {uid}", f"mode {mode:04o}", "shmcast doctor --fix"):
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.fixture
def open_xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime base anyone may write (sticky, like /tmp): where another user can
    make our runtime root before we do."""
    path = Path(tempfile.mkdtemp(prefix="shmcast-open-xdg-"))
    os.chmod(path, 0o1777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("case", ["root-of-another-user", "root-is-a-link", "namespace-dir-open"])
def test_untrusted_runtime_dirs_are_refused_then_fixed(
    case: str,
    namespace: str,
    open_xdg: Path,
    other_user: OtherUser,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = open_xdg / "shmcast"
    rdir = root / namespace
    if case == "root-of-another-user":
        other_user.run("mkdir", str(root), "0777")
        refused, owner, mode = root, NOBODY, 0o777
    elif case == "root-is-a-link":
        theirs = open_xdg / "theirs"
        other_user.run("mkdir", str(theirs), "0777")
        other_user.run("symlink", str(theirs), str(root))
        refused, owner, mode = root, NOBODY, 0o777
    else:
        root.mkdir()
        os.chmod(root, 0o711)  # as a broker sharing with a group leaves it
        rdir.mkdir()
        os.chmod(rdir, 0o777)  # ours, but anyone may plant a socket in it
        refused, owner, mode = rdir, 0, 0o777
    # Another user's broker waits where ours would be; nothing may reach it.
    with other_user.running("fake-broker", str(rdir)) as fake:
        with pytest.raises(OwnershipError) as info:
            Publisher("p", dtype="f8", shape=(4,), timeout=1)
        _names_path_owner_mode_fix(info.value, str(refused), owner, mode)
        with pytest.raises(OwnershipError):
            Subscriber("p", timeout=1)
        for tool in (["ls", "--interval", "0"], ["health", "--timeout", "1"]):
            assert main(tool) == 1
            assert "shmcast doctor --fix" in capsys.readouterr().err
        with pytest.raises(OwnershipError) as info:
            Broker(BrokerConfig(namespace=namespace)).run()
        _names_path_owner_mode_fix(info.value, str(refused), owner, mode)
    assert "GOT" not in fake.stdout, f"a request reached the other user's broker: {fake.stdout}"

    rc, checks = _doctor(capsys, "--namespace", namespace)
    assert rc == 1
    found = [c for c in checks if c["check"] == "runtime-dir" and c["status"] == "problem"]
    assert found, checks
    assert str(refused) in found[0]["message"]
    assert f"uid {owner}" in found[0]["message"]
    rc, checks = _doctor(capsys, "--namespace", namespace, "--fix")
    assert rc == 0, checks
    assert any(c["check"] == "fixed" and str(refused) in c["message"] for c in checks), checks

    with Broker(BrokerConfig(namespace=namespace)).start():
        with Publisher("p", dtype="f8", shape=(4,)) as pub:
            assert pub.publish(np.ones(4)) == 1
        assert os.stat(root).st_uid == os.getuid()
        assert not root.is_symlink()


def _template(namespace: str, name: str) -> Path:
    """The bytes of a valid segment (``f8``, shape 4, version 1), in a file anyone can
    read: what another user needs to forge a valid-looking object."""
    with Segment.create(name, "f8", (4,), namespace=namespace) as seg:
        seg.write(np.full(4, 7.0))
        data = Path(seg.path).read_bytes()
        seg.unlink()
    fd, path = tempfile.mkstemp(prefix="shmcast-template-")
    os.write(fd, data)
    os.close(fd)
    os.chmod(path, 0o644)
    return Path(path)


def test_objects_of_another_user_or_links_are_not_adopted(
    namespace: str, other_user: OtherUser, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = unique_namespace("t")
    real = Segment.create("real", "f8", (4,), namespace=elsewhere)
    template = _template(unique_namespace("t"), "tpl")
    squat, link = shm_path(namespace, "squat"), shm_path(namespace, "link")
    try:
        real.write(np.full(4, 3.0))
        # Before our broker starts, nobody forges a valid segment and links to another
        # namespace's segment, both under names of our namespace.
        other_user.run("copy-file", str(template), squat, "0666")
        other_user.run("symlink", real.path, link)
        with Broker(BrokerConfig(namespace=namespace)).start() as broker:
            assert broker.catalog.names() == [], "adopted an object it must not trust"
            assert os.path.exists(squat)
            assert os.path.lexists(link)  # another user's: refused, left alone
            for name, path, mode, kind in (
                ("squat", squat, 0o666, "regular file"),
                ("link", link, 0o777, "symbolic link"),
            ):
                with pytest.raises(OwnershipError) as info:
                    Publisher(name, dtype="f8", shape=(4,))
                _names_path_owner_mode_fix(info.value, path, NOBODY, mode)
                assert kind in str(info.value)
            assert broker.stats().errors.get("OwnershipError", 0) >= 4

            rc, checks = _doctor(capsys, "--namespace", namespace)
            assert rc == 1
            problems = [c["message"] for c in checks if c["check"] == "ownership"]
            assert len(problems) == 2, checks
            assert all("uid 65534" in m and "shmcast doctor --fix" in m for m in problems)
            # root may unlink another user's objects squatting names of a namespace of ours
            rc, checks = _doctor(capsys, "--namespace", namespace, "--fix")
            assert rc == 0, checks
            assert not os.path.lexists(squat)
            assert not os.path.lexists(link)
            assert os.path.exists(real.path), "--fix followed the link"
            with Publisher("squat", dtype="f8", shape=(4,)) as pub:
                assert pub.publish(np.ones(4)) == 1
    finally:
        for path in (squat, link):
            if os.path.lexists(path):
                os.unlink(path)
        real.unlink()
        real.close()
        template.unlink()


def test_own_object_others_may_write_is_not_adopted_until_fixed(
    namespace: str, other_user: OtherUser, capsys: pytest.CaptureFixture[str]
) -> None:
    seg = Segment.create("lax", "f8", (4,), namespace=namespace)
    try:
        os.chmod(seg.path, 0o666)  # create() refuses such a mode; chmod does not
        seg.write(np.ones(4))  # its writer lives on: not an orphan for --fix to unlink
        assert other_user.run("can-write", shm_path(namespace, "lax")) == {"can_write": True}
        with Broker(BrokerConfig(namespace=namespace)).start() as broker:
            assert broker.catalog.names() == []
            with pytest.raises(OwnershipError, match="writable by group or others"):
                Publisher("lax", dtype="f8", shape=(4,))
        _, checks = _doctor(capsys, "--namespace", namespace, "--fix")
        assert any("write access of group and others removed" in c["message"] for c in checks)
        assert os.stat(shm_path(namespace, "lax")).st_mode & 0o022 == 0
        assert other_user.run("can-write", shm_path(namespace, "lax")) == {"can_write": False}
        with Broker(BrokerConfig(namespace=namespace)).start() as broker:
            assert broker.catalog.names() == ["lax"]
            assert broker.catalog.entry("lax").seg.version == 1
    finally:
        seg.unlink()
        seg.close()
        # The brokers' clean stops kept the live segment, and the namespace word beside it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_path(namespace, "@catalog"))


def _remove_all(namespace: str) -> None:
    """What a killed helper of the other user left in /dev/shm (root may unlink it)."""
    for name in [*Segment.list(namespace), "@catalog"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_path(namespace, name))


def test_root_fix_leaves_another_users_live_namespace(
    namespace: str, other_user: OtherUser, capsys: pytest.CaptureFixture[str]
) -> None:
    """Root's `doctor -n NS --fix` took naming NS for owning it and unlinked every
    segment of another user's namespace while that user's broker served it and a
    publisher held a lease. The namespace word says whose the namespace is."""
    try:
        with other_user.running("serve", namespace, "1"):
            assert Segment.list(namespace) == ["idle", "live"]
            rc, checks = _doctor(capsys, "--namespace", namespace, "--fix")
            assert Segment.list(namespace) == ["idle", "live"]
            assert os.path.exists(shm_path(namespace, "@catalog"))
            (found,) = [c for c in checks if c["check"] == "namespace"]
            assert f"uid {NOBODY}'s" in found["message"]
            assert "its broker is live" in found["message"]
            assert not [c for c in checks if c["check"] == "fixed"], checks
            assert rc == 0, checks
    finally:
        _remove_all(namespace)


def test_root_fix_leaves_another_users_object_a_writer_holds(
    namespace: str, other_user: OtherUser, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no broker (no namespace word), root's --fix may unlink another user's
    object squatting a name of a namespace it names, but never one whose writer
    lease is held: that writer is alive and writing into it."""
    try:
        with other_user.running("serve", namespace, "0"):
            rc, checks = _doctor(capsys, "--namespace", namespace, "--fix")
            assert Segment.list(namespace) == ["live"]  # "idle" had no writer
            (held,) = [c for c in checks if c["check"] == "ownership"]
            assert shm_path(namespace, "live") in held["message"]
            assert "live writer" in held["message"]
            assert rc == 1, checks
    finally:
        _remove_all(namespace)
