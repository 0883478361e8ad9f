"""What ``pip install`` puts on a user's machine: one import package, ``shmcast``.

PyPI has projects called ``broker``, ``publisher``, ``subscriber`` and ``bench``;
the wheel must not collide with any of them. Builds a wheel from the working
tree, reads it, then installs it into a fresh virtual environment next to
PyPI's ``broker`` and imports both (needs the package index; skipped without it).
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 300


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        if "No matching distribution" in proc.stderr or "Could not find" in proc.stderr:
            pytest.skip(
                f"the package index is unreachable (setuptools for the build): {proc.stderr[-300:]}"
            )
        raise AssertionError(f"pip wheel failed:\n{proc.stderr}")
    (found,) = out.glob("shmcast-*.whl")
    return found


def test_the_wheel_holds_only_shmcast(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"shmcast", next(t for t in top if t.endswith(".dist-info"))}
    packages = {n.rsplit("/", 1)[0] for n in names if n.startswith("shmcast/")}
    assert packages == {
        "shmcast/broker",
        "shmcast/publisher",
        "shmcast/subscriber",
        "shmcast/bridge",
        "shmcast/cli",
    }
    for pkg in packages:
        assert f"{pkg}/py.typed" in names, f"{pkg} ships no py.typed"
    assert not [n for n in names if "bench" in n or "/tests/" in n or n.startswith("tests/")]
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_the_wheel_carries_the_compiled_core_for_every_cpython_from_310(wheel: Path) -> None:
    """One abi3 build of ``broker/_core.c`` (the limited API of 3.10), not its source."""
    names = zipfile.ZipFile(wheel).namelist()
    if "shmcast/broker/_core.abi3.so" not in names:
        pytest.skip("no compiled core in the wheel: built without a C compiler")
    assert "-cp310-abi3-" in wheel.name
    assert "shmcast/broker/_core.pyi" in names
    assert not [n for n in names if n.endswith(".c")]


def test_the_wheel_declares_an_spdx_license_and_the_command(wheel: Path) -> None:
    z = zipfile.ZipFile(wheel)
    meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    assert re.search(r"^License-Expression: MIT$", meta, re.M)
    entry = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"^shmcast = shmcast\.cli:main$", entry, re.M)


def test_it_installs_next_to_pypis_broker_package(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip takes seconds): this interpreter's pip installs into it.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    py = venv / "bin" / "python"
    # This interpreter's site-packages comes after the new venv's own (a .pth line adds
    # a directory without running that directory's .pth files, so this project's
    # editable install stays out): pip finds numpy and the rest installed and does not
    # fetch them again (18 s at best, 111 s on a slow day), and the wheel still goes in
    # beside PyPI's broker, with the dependencies both declare checked.
    site_dir = next((venv / "lib").glob("python3*/site-packages"))
    (site_dir / "shmcast-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    proc = subprocess.run(
        [*pip, "install", "-q", str(wheel), "broker==0.8.11"],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        if "No matching distribution" in proc.stderr or "Could not find a version" in proc.stderr:
            pytest.skip(f"PyPI's broker package is not reachable here: {proc.stderr[-300:]}")
        raise AssertionError(f"pip install failed:\n{proc.stderr}")
    code = (
        "import broker, shmcast.broker, shmcast.publisher, shmcast.subscriber, shmcast.cli\n"
        "print(broker.__file__)\n"
        "print(shmcast.broker.__file__)\n"
        "print(hasattr(broker, 'Segment'), hasattr(shmcast.broker, 'Segment'))\n"
        "print(shmcast.broker.engine_core())\n"
    )
    out = subprocess.run(
        [str(py), "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path
    ).stdout.split("\n")
    site = str(venv)
    assert out[0].startswith(site)
    assert out[0].endswith("broker/__init__.py")
    assert out[1].startswith(site)
    assert out[1].endswith("shmcast/broker/__init__.py")
    assert out[2] == "False True"  # PyPI's broker is PyPI's; ours is ours
    if "_core.abi3.so" in "".join(zipfile.ZipFile(wheel).namelist()):
        assert out[3] == "c"  # the installed wheel runs the compiled core
    help_text = subprocess.run(
        [str(venv / "bin" / "shmcast"), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "broker" in help_text
    assert "subscribe" in help_text
