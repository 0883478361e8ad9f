"""The doors into each package: ``__all__``, the error tree, and who may import what.

Each package's ``__init__`` only re-exports, and ``__all__`` lists exactly its
public names in ruff's order. Outside ``shmcast.broker`` no module of the
distribution (nor the benchmarks) imports one of its private modules; the tests
are white-box and may. The layers themselves are import-linter contracts in
``pyproject.toml`` (``make lint``).
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

import shmcast.broker
import shmcast.broker.errors
from shmcast.broker import ShmcastError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [
    "shmcast.broker",
    "shmcast.publisher",
    "shmcast.subscriber",
    "shmcast.bridge",
    "shmcast.cli",
]
#: Modules whose __all__ is checked against what they define or re-export.
MODULES = [
    "shmcast.broker.client",
    "shmcast.broker.errors",
    "shmcast.broker.recording",
    "shmcast.cli.testing",
]
#: Directories of code that must use shmcast.broker's public names only.
CLIENT_DIRS = ["publisher", "subscriber", "bridge", "cli", "bench"]


def _ruff_key(name: str) -> tuple[int, str]:
    """Ruff's RUF022 ("isort-style") order: CONSTANTS, then Classes, then functions."""
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def _check_all(mod: types.ModuleType) -> list[str]:
    exported = list(mod.__all__)
    assert exported == sorted(exported, key=_ruff_key), "__all__ is not in ruff's order"
    assert len(set(exported)) == len(exported), "__all__ repeats a name"
    for name in exported:
        assert hasattr(mod, name), f"{mod.__name__}.__all__ names {name!r}, which is not there"
    return exported


@pytest.mark.parametrize("package", PACKAGES)
def test_dunder_all_of_a_package_is_sorted_and_matches_its_public_names(package: str) -> None:
    mod = importlib.import_module(package)
    exported = _check_all(mod)
    public = {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(exported) == public


@pytest.mark.parametrize("module", MODULES)
def test_dunder_all_of_a_public_module_is_sorted_and_complete(module: str) -> None:
    mod = importlib.import_module(module)
    exported = set(_check_all(mod))
    # Every public class or function the module itself defines is exported.
    defined = {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_")
        and isinstance(value, (type, types.FunctionType))
        and value.__module__ == mod.__name__
    }
    assert defined <= exported, f"defined but not exported: {sorted(defined - exported)}"


def _error_classes() -> list[type[BaseException]]:
    classes = {
        obj
        for mod in (shmcast.broker, shmcast.broker.errors)
        for obj in vars(mod).values()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    return sorted(classes, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_derives_from_shmcasterror(cls: type[BaseException]) -> None:
    if cls is shmcast.broker.errors.OutOfDescriptorsError:
        # The one exception, by design: the OS's EMFILE, which the broker and the
        # doctor must not take for a damaged segment (a ShmcastError from attach).
        assert issubclass(cls, OSError)
        assert not issubclass(cls, ShmcastError)
        return
    assert issubclass(cls, ShmcastError)


def test_every_error_is_exported_from_the_broker_package() -> None:
    errors = shmcast.broker.errors
    assert set(errors.__all__) <= set(shmcast.broker.__all__)
    for name in errors.__all__:
        assert getattr(shmcast.broker, name) is getattr(errors, name)


def _private_broker_imports(path: Path) -> list[str]:
    """``shmcast.broker._x`` imports in one file (absolute, or relative from outside)."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        private = [
            name
            for name in names
            if name.split(".")[:2] == ["shmcast", "broker"]
            and any(part.startswith("_") for part in name.split(".")[2:])
        ]
        if private:
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            found.append(f"{where}:{node.lineno}: {private[0]}")
    return found


def test_no_module_outside_broker_imports_a_private_broker_module() -> None:
    files = [f for d in CLIENT_DIRS for f in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, "the scan found too few files to mean anything"
    offenders = [hit for f in files for hit in _private_broker_imports(f)]
    assert offenders == []


def test_the_private_import_scan_sees_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "offender.py"
    bad.write_text(
        "from shmcast.broker._segment import Segment\n"
        "import shmcast.broker._names\n"
        "from shmcast.broker import _layout\n"
        "from shmcast.broker import Segment as Fine\n"
    )
    assert len(_private_broker_imports(bad)) == 3
