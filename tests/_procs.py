"""Process helpers shared by the tests that run shmcast commands as processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shmcast.cli.testing import ShmcastProcess


@contextmanager
def procs() -> Iterator[list[ShmcastProcess]]:
    """Every process appended here is stopped (terminate, wait, kill) on the way out."""
    started: list[ShmcastProcess] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop(timeout=10)


def done(sp: ShmcastProcess, prefix: str) -> dict[str, Any]:
    """The JSON of a command's ``shmcast <command> done: {json}`` line."""
    line = sp.wait_line(prefix, 10)
    return dict(json.loads(line[len(prefix) :]))
