"""The docs stay true to the tree: README links stay inside the repository, and
docs/ARCHITECTURE.md names every module there is (Python or C) and none that is not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("broker", "publisher", "subscriber", "bridge", "cli")
DOCS = [
    "README.md",
    "docs/ARCHITECTURE.md",
    "docs/RELIABILITY.md",
    "docs/ZENOH.md",
    "docker/README.md",
    "bench/README.md",
]


@pytest.mark.parametrize("doc", DOCS)
def test_links_stay_inside_the_repository(doc: str) -> None:
    path = ROOT / doc
    text = path.read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        assert not re.match(r"[a-z]+://", target), f"{doc} links outside: {target}"
        local = (path.parent / target.split("#")[0]).resolve()
        assert local.is_relative_to(ROOT), f"{doc} links outside the repository: {target}"
        assert local.exists(), f"{doc}: dead link {target}"


def _modules() -> set[str]:
    """Python modules and C sources (the compiled core) of the packages."""
    return {
        f"{d}/{p.name}"
        for d in PACKAGE_DIRS
        for pattern in ("*.py", "*.c")
        for p in (ROOT / d).glob(pattern)
        if p.name not in ("__init__.py", "__main__.py")
    }


def test_architecture_names_every_module() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for module in sorted(_modules()):
        name = module.split("/")[1]
        if name.startswith("_cmd_"):
            continue  # covered by "one _cmd_<command>.py per command"
        if f"`{name}`" not in text:
            missing.append(module)
    assert missing == []


def test_architecture_names_no_module_that_is_gone() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    names = {m.split("/")[1] for m in _modules()}
    mentioned = set(re.findall(r"`(_?[a-z_]+\.(?:py|c))`", text)) - {"__init__.py", "__main__.py"}
    assert mentioned - names == set()


def test_every_command_has_its_module() -> None:
    from shmcast.cli._main import COMMANDS

    for name, module in COMMANDS:
        assert module.__name__ == f"shmcast.cli._cmd_{name}"
        assert (ROOT / "cli" / f"_cmd_{name}.py").exists()
