"""Fixtures shared by every test: a runtime directory and a namespace of the session's
own, unique namespaces per test, a leak check on /dev/shm, another user, and
``each_core``, which runs an engine test on both cores of the seqlock.

The suite never touches what it did not create. The session runs with its own
``XDG_RUNTIME_DIR`` (so the user's real runtime directory, and a broker serving
there, are out of reach) and its own ``SHMCAST_NAMESPACE`` (so code that falls
back to the environment never lands in ``default``). The leak check looks only
at namespaces this process handed out (:func:`unique_namespace`), and cleans up
only those.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmcast.broker import Broker, BrokerConfig
from shmcast.broker._backend import ENV, TSO_MACHINES, compiled
from shmcast.broker.client import SHM_DIR, runtime_root
from shmcast.cli.testing import issued_namespaces, unique_namespace
from tests._other_user import OtherUser, prepare, skip_unless_root

_SESSION: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Before any test (and any child process) runs: the session's own runtime dir
    (traversable by others, like /run/user/<uid>, so a group test can reach a
    shared namespace) and a namespace fallback that is not ``default``."""
    if "XDG_RUNTIME_DIR" in _SESSION:
        return
    run = tempfile.mkdtemp(prefix="shmcast-test-run-")
    os.chmod(run, 0o711)
    for key, value in (("XDG_RUNTIME_DIR", run), ("SHMCAST_NAMESPACE", unique_namespace("s"))):
        _SESSION[key] = os.environ.get(key)
        os.environ[key] = value
    _SESSION["_run"] = run


def pytest_unconfigure(config: pytest.Config) -> None:
    run = _SESSION.pop("_run", None)
    for key in ("XDG_RUNTIME_DIR", "SHMCAST_NAMESPACE"):
        if key not in _SESSION:
            continue
        old = _SESSION.pop(key)
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    if run:
        shutil.rmtree(run, ignore_errors=True)


def _ours(namespace: str) -> bool:
    # Only the namespaces this test process handed out, so that test runs and
    # benchmarks running side by side on one machine never blame each other.
    return namespace in issued_namespaces()


def _shm_objects() -> set[str]:
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return set()
    return {e for e in entries if e.startswith("shmcast.") and _ours(e.split(".")[1])}


def _runtime_entries() -> set[str]:
    try:
        return {e for e in os.listdir(runtime_root()) if _ours(e)}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves shmcast objects in /dev/shm or namespaces in the runtime dir."""
    shm_before = _shm_objects()
    rt_before = _runtime_entries()
    yield
    leaked = sorted(_shm_objects() - shm_before)
    rt_leaked = sorted(_runtime_entries() - rt_before)
    for entry in leaked:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, entry))
    for entry in rt_leaked:
        shutil.rmtree(runtime_root() / entry, ignore_errors=True)
    if leaked or rt_leaked:
        pytest.fail(f"test leaked /dev/shm objects {leaked} / runtime dirs {rt_leaked}")


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch) -> str:
    """A namespace no other test uses; also set as SHMCAST_NAMESPACE for child processes."""
    ns = unique_namespace("t")
    monkeypatch.setenv("SHMCAST_NAMESPACE", ns)
    return ns


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the engine's tests ``engine``: those that run on each core, and
    tests/test_core.py. ``pytest -m engine`` runs them alone (``make test-arm64``
    does, on aarch64)."""
    for item in items:
        if "each_core" in getattr(item, "fixturenames", ()) or item.path.name == "test_core.py":
            item.add_marker(pytest.mark.engine)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item (``item.rep_call``), for fixtures that
    add what they know to a failure."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(params=[pytest.param("c", id="c-core"), pytest.param("python", id="py-core")])
def each_core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once on the compiled core and once on the pure-Python fallback
    (msgpack's model). Set through ``SHMCAST_CORE``, so child processes inherit it.
    Engine test modules use it for every test: ``pytestmark = pytest.mark.usefixtures
    ("each_core")``. ``tests/test_core.py`` fails when the compiled core is missing
    although a compiler is there, so that a skip here never hides a broken build."""
    core: str = request.param
    if core == "c" and compiled() is None:
        pytest.skip("the compiled core is not installed (no C compiler at install time?)")
    if core == "python" and platform.machine() not in TSO_MACHINES:
        pytest.skip(f"the pure-Python fallback refuses {platform.machine()} (x86-64 only)")
    monkeypatch.setenv(ENV, core)
    return core


@pytest.fixture(scope="session")
def _other_user_copy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtherUser]:
    skip_unless_root()
    top = Path(tempfile.mkdtemp(prefix="shmcast-other-"))
    try:
        os.chmod(top, 0o755)
        yield prepare(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def other_user(_other_user_copy: OtherUser) -> OtherUser:
    """User ``nobody`` (uid 65534, group nogroup), able to run ``tests/_as_other.py``
    from a world-readable copy of shmcast; skips unless root (see ``_other_user``)."""
    return _other_user_copy


@pytest.fixture
def thread_broker(namespace: str) -> Iterator[Broker]:
    """A broker of ``namespace`` serving in a thread (heartbeat every 0.1 s)."""
    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.1)).start()
    try:
        yield b
    finally:
        b.close()
