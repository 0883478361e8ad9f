"""Fixtures shared by every test: unique namespaces and a leak check on /dev/shm."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

from shmcast.broker import Broker, BrokerConfig
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


@pytest.fixture
def thread_broker(namespace: str) -> Iterator[Broker]:
    """A broker of ``namespace`` serving in a thread (heartbeat every 0.1 s)."""
    b = Broker(BrokerConfig(namespace=namespace, heartbeat_interval=0.1)).start()
    try:
        yield b
    finally:
        b.close()
