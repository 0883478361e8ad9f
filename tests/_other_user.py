"""Run code as another user (``nobody``) without letting it into the checkout.

The clone may live in a directory only its owner can enter (a 0700 home, or
``/root``), so the other user cannot import the package from it, nor run the
virtual environment's interpreter. :func:`prepare` copies what the other user
needs into a world-readable temporary directory once per session: the
installed ``shmcast`` tree, its runtime dependencies (numpy, pyzmq, msgpack,
prometheus-client) and ``tests/_as_other.py``, the helper it runs. The
interpreter is one of the same Python version that the other user can run;
when there is none, the base installation's standard library is copied as well.

A helper that cannot start (an import fails, the interpreter is refused) never
passes for "shut out": :meth:`OtherUser.run` fails the test with its stderr
unless the helper printed its ``RESULT`` line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import shmcast

NOBODY = 65534
HERE = Path(__file__).resolve().parent
HELPER = "_as_other.py"
#: Packages the helper imports (with the ``*.libs`` directories of their wheels).
PACKAGES = ("numpy", "zmq", "msgpack", "prometheus_client")
#: shmcast's subpackages, as installed (shmcast itself is a namespace package).
SHMCAST = tuple(sorted(m.name for m in pkgutil.iter_modules(shmcast.__path__) if m.ispkg))
_STDLIB_SKIP = {"test", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}


def _readable(top: Path) -> None:
    """Everything under ``top`` readable (and directories enterable) by everyone."""
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), symlinks=False)


def _setpriv(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def _probe(python: str, uid: int, gid: int, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``uid`` can run ``python`` and it is this interpreter's version."""
    want = "{}.{}".format(*sys.version_info[:2])
    code = "import sys; print('{}.{}'.format(*sys.version_info[:2]))"
    try:
        proc = subprocess.run(
            [*_setpriv(uid, gid), python, "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", **(env or {})},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == want


def _interpreter(top: Path, uid: int, gid: int) -> tuple[str, dict[str, str]]:
    """A python of this version that ``uid`` can run (and the environment it needs);
    copied into ``top`` if need be."""
    minor = "python{}.{}".format(*sys.version_info[:2])
    candidates = [
        os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        os.path.realpath(sys.executable),
        f"/usr/bin/{minor}",
        f"/usr/local/bin/{minor}",
    ]
    for python in dict.fromkeys(candidates):
        if os.path.exists(python) and _probe(python, uid, gid):
            return python, {}
    # None: copy the base installation's interpreter and standard library.
    base = Path(sys.base_prefix)
    dst = top / "python"
    (dst / "bin").mkdir(parents=True)
    exe = dst / "bin" / minor
    shutil.copy2(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), exe)
    (dst / "lib").mkdir()
    for lib in (base / "lib").glob("libpython*.so*"):
        shutil.copy2(lib, dst / "lib" / lib.name, follow_symlinks=True)
    shutil.copytree(
        base / "lib" / minor,
        dst / "lib" / minor,
        ignore=lambda d, names: [n for n in names if n in _STDLIB_SKIP or n == "__pycache__"],
    )
    (dst / "lib" / minor / "site-packages").mkdir()
    _readable(dst)
    # The copy's own libpython, not the one its RPATH names (which uid cannot read).
    env = {"LD_LIBRARY_PATH": str(dst / "lib")}
    if not _probe(str(exe), uid, gid, env):
        pytest.fail(f"no python {minor} that uid {uid} can run (tried {candidates} and a copy)")
    return str(exe), env


@dataclass
class Running:
    """A long-running helper: its process, its ``READY`` information, its output."""

    proc: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""


@dataclass
class OtherUser:
    """A user other than ours, with a python and a copy of shmcast it can read."""

    uid: int
    gid: int
    python: str
    top: Path
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, command: str, *args: str) -> list[str]:
        helper = str(self.top / HELPER)
        return [*_setpriv(self.uid, self.gid), self.python, "-I", "-B", helper, command, *args]

    @contextlib.contextmanager
    def runtime_dir(self) -> Iterator[Path]:
        """A runtime directory (XDG_RUNTIME_DIR) of the other user's own, removed after."""
        path = Path(tempfile.mkdtemp(prefix="shmcast-other-xdg-"))
        try:
            os.chown(path, self.uid, self.gid)
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _env(self, xdg: Path, env: Mapping[str, str] | None) -> dict[str, str]:
        out = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "XDG_RUNTIME_DIR": str(xdg)}
        out.update(self.env)
        out.update(env or {})
        return out

    def run(
        self, command: str, *args: str, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Run one helper command; return what it printed on its ``RESULT`` line.

        Fails the test (with the helper's stderr) when there is no such line: a
        helper that could not even start is never taken for a refusal.
        """
        with self.runtime_dir() as xdg:
            proc = subprocess.run(
                self.argv(command, *args),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self._env(xdg, env),
                cwd="/",
            )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            pytest.fail(
                f"helper {command!r} as uid {self.uid} did not report (exit {proc.returncode}):\n"
                f"{proc.stderr}"
            )
        result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
        return result

    @contextlib.contextmanager
    def running(
        self, command: str, *args: str, timeout: float = 30, env: Mapping[str, str] | None = None
    ) -> Iterator[Running]:
        """Start a long-running helper; yield it once it printed ``READY``; kill it after
        (its remaining output is then in ``.stdout``/``.stderr``)."""
        with self.runtime_dir() as xdg:
            proc = subprocess.Popen(
                self.argv(command, *args),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self._env(xdg, env),
                cwd="/",
            )
            run = Running(proc)
            try:
                assert proc.stdout is not None
                deadline = time.monotonic() + timeout
                while not run.ready:
                    line = proc.stdout.readline()
                    if line.startswith("READY "):
                        run.ready = json.loads(line[len("READY ") :])
                    elif not line or time.monotonic() > deadline:
                        proc.kill()
                        _, err = proc.communicate(timeout=10)
                        pytest.fail(f"helper {command!r} as uid {self.uid} never got ready:\n{err}")
                yield run
            finally:
                proc.kill()
                run.stdout, run.stderr = proc.communicate(timeout=10)


def skip_unless_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) is not installed")


def prepare(top: Path, uid: int = NOBODY, gid: int = NOBODY) -> OtherUser:
    """Fill ``top`` (a fresh directory) with what ``uid`` needs; see the module docstring."""
    site = top / "site"
    (site / "shmcast").mkdir(parents=True)
    for sub in SHMCAST:
        mod = importlib.import_module(f"shmcast.{sub}")
        _copy_tree(Path(mod.__file__ or "").parent, site / "shmcast" / sub)
    for name in PACKAGES:
        mod = importlib.import_module(name)
        src = Path(mod.__file__ or "").parent
        _copy_tree(src, site / src.name)
        for libs in src.parent.glob("*.libs"):
            if libs.name.split(".")[0] in (name, f"py{name}") and not (site / libs.name).exists():
                _copy_tree(libs, site / libs.name)
    shutil.copy2(HERE / HELPER, top / HELPER)
    _readable(top)
    python, env = _interpreter(top, uid, gid)
    return OtherUser(uid, gid, python, top, env)
