"""Fixtures shared by every test: unique namespaces and a leak check on /dev/shm."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from broker._names import SHM_DIR, runtime_root


def _shm_objects() -> set[str]:
    try:
        return {e for e in os.listdir(SHM_DIR) if e.startswith("shmcast.")}
    except FileNotFoundError:
        return set()


def _runtime_entries() -> set[str]:
    root = runtime_root()
    try:
        return set(os.listdir(root))
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
    ns = "t" + uuid.uuid4().hex[:12]
    monkeypatch.setenv("SHMCAST_NAMESPACE", ns)
    return ns
