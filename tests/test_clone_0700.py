"""Issue 16: the tests that act as another user pass wherever the clone lives.

A copy of the clone goes into a directory only root may enter (as a home made
0700 by Debian and Ubuntu, or /root), and the permission tests run there, with
the package imported from that copy: ``nobody`` cannot read a byte of it, so
they pass only if what ``nobody`` runs comes from elsewhere
(``tests/_other_user.py``), and a helper that cannot start fails them.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
#: The directories pyproject.toml maps to shmcast.* (``shmcast.<name>`` = ``<name>/``).
PACKAGES = tuple(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].values()
)


@pytest.mark.root
def test_permission_tests_pass_from_a_clone_in_a_0700_directory() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to act as another user")
    home = Path(tempfile.mkdtemp(prefix="shmcast-home-"))  # 0700, as a home directory
    try:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        clone = home / "shmcast"
        clone.mkdir()
        ignore = shutil.ignore_patterns("__pycache__")
        for name in (*PACKAGES, "tests", "configs"):
            shutil.copytree(ROOT / name, clone / name, ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", clone / "pyproject.toml")
        # shmcast.* from the copy, as an install inside the clone would map it.
        site = clone / "site" / "shmcast"
        site.mkdir(parents=True)
        for name in PACKAGES:
            (site / name).symlink_to(clone / name)
        # A virtual environment inside the clone too, as `make` makes one; it sees
        # this one's dependencies (a path in a .pth: its own .pth files, such as
        # the editable install of this checkout, are not run).
        venv = clone / ".venv"
        base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        (deps,) = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
        (lib,) = (venv / "lib").glob("python3*/site-packages")
        (lib / "deps.pth").write_text(deps + "\n")
        python = str(venv / "bin" / "python")
        env = {**os.environ, "PYTHONPATH": str(clone / "site")}
        where = subprocess.run(
            [python, "-c", "import shmcast.broker as b; print(b.__file__)"],
            env=env,
            cwd=clone,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert where.stdout.strip().startswith(str(clone)), where.stdout + where.stderr
        pytest_args = ["-q", "-p", "no:cacheprovider", "-rs", "tests/test_permissions.py"]
        run = subprocess.run(
            [python, "-m", "pytest", *pytest_args],
            env=env,
            cwd=clone,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tail = run.stdout[-3000:] + run.stderr[-2000:]
        assert run.returncode == 0, tail
        assert "skipped" not in run.stdout.splitlines()[-1], tail
    finally:
        shutil.rmtree(home, ignore_errors=True)
