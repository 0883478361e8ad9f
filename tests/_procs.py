"""Process helpers shared by the tests that run shmcast commands as processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
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


@contextmanager
def piped(args: Sequence[str], *, stderr: int = subprocess.PIPE) -> Iterator[subprocess.Popen[str]]:
    """``shmcast <args>`` with its output in pipes, for a test that plays ``| head``
    (reads a line, closes the pipe); killed if still running, reaped and its pipes
    closed on the way out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmcast.cli", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
