"""Names and places: namespaces, segment names, shared-memory paths, runtime dirs.

Everything here is resolved at call time; nothing is read at import.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import InvalidNameError

SHM_DIR = "/dev/shm"
PREFIX = "shmcast"
NAMESPACE_ENV = "SHMCAST_NAMESPACE"
DEFAULT_NAMESPACE = "default"
#: The namespace word's name in place of a segment's (``@`` starts no segment name).
CATALOG_OBJECT = "@catalog"

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_-]{1,48}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def resolve_namespace(namespace: str | None) -> str:
    """Return ``namespace``, else ``$SHMCAST_NAMESPACE``, else ``"default"``, validated.

    The one place the namespace's environment default is read, at call time.
    """
    if namespace is None:
        namespace = namespace_from_env() or DEFAULT_NAMESPACE
    return validate_namespace(namespace)


def namespace_from_env() -> str | None:
    """``$SHMCAST_NAMESPACE`` when it is set and not empty (validated), else None."""
    value = os.environ.get(NAMESPACE_ENV)
    return validate_namespace(value) if value else None


def validate_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidNameError(
            "namespace", namespace, "use 1-48 letters, digits, '_' or '-' (no dots)"
        )
    return namespace


def validate_segment_name(name: object) -> str:
    if not isinstance(name, str) or not _SEGMENT_RE.fullmatch(name):
        raise InvalidNameError(
            "segment",
            name,
            "use 1-128 letters, digits, '_', '-' or '.', not starting with '.'",
        )
    return name


def object_name(namespace: str, segment: str) -> str:
    """The file name of a segment's object in ``/dev/shm``."""
    return f"{PREFIX}.{namespace}.{segment}"


def shm_path(namespace: str, segment: str) -> str:
    return os.path.join(SHM_DIR, object_name(namespace, segment))


def catalog_path(namespace: str) -> str:
    """The path of a namespace's word (see ``_nsword``), beside its segments."""
    return shm_path(namespace, CATALOG_OBJECT)


def list_segment_names(namespace: str) -> list[str]:
    """Names of the segment objects of ``namespace`` in ``/dev/shm`` (valid or not);
    the namespace word (``@catalog``) is not a segment."""
    prefix = f"{PREFIX}.{namespace}."
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(
        e[len(prefix) :]
        for e in entries
        if e.startswith(prefix) and len(e) > len(prefix) and e[len(prefix)] != "@"
    )


def list_namespaces() -> list[str]:
    """Namespaces that have at least one object in ``/dev/shm``."""
    found: set[str] = set()
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    for entry in entries:
        parts = entry.split(".", 2)
        if len(parts) == 3 and parts[0] == PREFIX and _NAMESPACE_RE.fullmatch(parts[1]):
            found.add(parts[1])
    return sorted(found)


def runtime_root() -> Path:
    """The per-user directory that holds each namespace's sockets and lock."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / PREFIX
    return Path("/tmp") / f"{PREFIX}-{os.getuid()}"


def runtime_dir(namespace: str, *, create: bool = False) -> Path:
    """``<runtime root>/<namespace>``; created owner-only (0700) when asked."""
    path = runtime_root() / namespace
    if create:
        for p in (path.parent, path):
            try:
                p.mkdir(mode=0o700)
            except FileExistsError:
                st = p.lstat()
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                    raise PermissionError(
                        f"{p} exists but is not a directory owned by uid {os.getuid()}; "
                        f"remove it or set XDG_RUNTIME_DIR"
                    ) from None
    return path


def share_runtime_dir(path: Path, gid: int) -> None:
    """Open a namespace's runtime dir to one group (a broker configured with ``group``).

    The per-user root becomes traverse-only for others (0711: no listing, and each
    namespace dir keeps its own mode); the namespace dir becomes group-owned 0750,
    so the group can reach the sockets (themselves group-owned 0660) and nobody else can.
    """
    root = path.parent
    os.chmod(root, stat.S_IMODE(root.stat().st_mode) | 0o011)
    os.chown(path, -1, gid)
    os.chmod(path, 0o750)
