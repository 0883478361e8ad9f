"""Fixtures shared by every test: unique namespaces, a leak check on /dev/shm, and
``each_core``, which runs an engine test on both cores of the seqlock."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from shmcast.broker._backend import ENV, TSO_MACHINES, compiled
from shmcast.broker.client import SHM_DIR, runtime_root
from shmcast.cli.testing import issued_namespaces, unique_namespace


def _ours(namespace: str) -> bool:
    # Only the namespaces this test process handed out (and 'default'), so that test
    # runs and benchmarks running side by side on one machine never blame each other.
    return namespace == "default" or namespace in issued_namespaces()


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
