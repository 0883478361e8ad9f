"""Helpers for the segment engine tests: child Python processes, polling, crafted objects."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def emulator() -> str:
    """The emulator these tests run under, as ``make test-arm64`` names it in
    ``SHMCAST_TEST_EMULATOR`` (``"qemu-aarch64 7.2.22"``), or ``""`` on a real CPU.
    Under qemu-user Python runs several times slower, and the host's memory
    ordering applies: tests size their work by it, never what they assert."""
    return os.environ.get("SHMCAST_TEST_EMULATOR", "")


def spawn(*args: str, stdin: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start ``python <args>`` in the repository with pipes on stdin, stdout and stderr."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker(*args: str) -> subprocess.Popen[str]:
    """Start ``python -m tests._seg_workers <args>``."""
    return spawn("-m", "tests._seg_workers", *args)


def run_python(code: str, *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` in the repository; the environment (namespace) is inherited."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of ``proc``'s stdout; fails with its stderr if it dies or stays silent."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line from pid {proc.pid} within {timeout}s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line.rstrip("\n")
            proc.wait(timeout=5)
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"pid {proc.pid} exited {proc.returncode} early:\n{err}")


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[dict[str, Any], str]:
    """Wait for ``proc``; return the JSON of its last stdout line and its stderr."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"pid {proc.pid} exited {proc.returncode}:\n{err}"
    return json.loads(out.strip().splitlines()[-1]), err


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc`` if it still runs, reap it and close its pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def poll_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (``Z`` for a zombie)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 :].split()[0].decode()


def mappings_of(pid: int, path: str) -> list[str]:
    """Permission fields (``r--s`` …) of ``pid``'s mappings of ``path``."""
    perms = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == path:
                perms.append(fields[1])
    return perms


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
