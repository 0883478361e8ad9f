"""Names and places: namespaces, segment names, shared-memory paths, runtime dirs
(and the one check of a number of seconds a client is given).

Everything here is resolved at call time; nothing is read at import.
"""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import os
import re
import stat
from pathlib import Path

from .errors import ConfigError, InvalidNameError, OutOfDescriptorsError, OwnershipError

SHM_DIR = "/dev/shm"
PREFIX = "shmcast"
NAMESPACE_ENV = "SHMCAST_NAMESPACE"
DEFAULT_NAMESPACE = "default"
#: The namespace word's name in place of a segment's (``@`` starts no segment name).
CATALOG_OBJECT = "@catalog"

NAMESPACE_RE = re.compile(r"[A-Za-z0-9_-]{1,48}")
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
    if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
        raise InvalidNameError(
            "namespace", namespace, "use 1-48 letters, digits, '_' or '-' (no dots)"
        )
    return namespace


def validate_seconds(what: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a number of seconds: finite, and ``>= 0`` (``> 0`` if ``positive``).

    NaN would make a deadline that never comes, and a negative one ends a wait
    before it begins: both are a caller's mistake, named here.

    Raises:
        ValueError: naming ``what`` and what it takes.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
        if math.isfinite(seconds) and (seconds > 0 if positive else seconds >= 0):
            return seconds
    bound = "> 0" if positive else ">= 0"
    raise ValueError(f"{what} must be a finite number of seconds {bound}, not {value!r}")


def validate_metrics_host(host: object) -> str:
    """``host`` as the address a metrics endpoint binds: a non-empty string.

    An empty one is no address: the socket layer takes it for every interface,
    so a ``--metrics-host "$HOST"`` whose variable was unset served the metrics
    beyond the host, saying ``http://:PORT/metrics``. Serving every interface is
    for those who write it out (``0.0.0.0``, ``::``).

    Raises:
        ConfigError: naming ``metrics_host`` and what it takes.
    """
    if isinstance(host, str) and host.strip():
        return host
    raise ConfigError(
        "metrics_host",
        f"{host!r} is no address (empty, it would serve the metrics on every interface): "
        "give an address of this host (127.0.0.1 by default: this host only), or "
        "0.0.0.0 (or ::) to serve every interface",
    )


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


def _shm_entries() -> list[str]:
    """What ``/dev/shm`` holds (nothing when there is none).

    Raises:
        OutOfDescriptorsError: no descriptor for the listing (naming the limit and
            the fix; before, a broker started at an open-files limit of 17 raised
            the bare "[Errno 24] Too many open files: '/dev/shm'").
    """
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        raise OutOfDescriptorsError.from_os(exc.errno, f"{SHM_DIR} to list it") from exc


def list_segment_names(namespace: str) -> list[str]:
    """Names of the segment objects of ``namespace`` in ``/dev/shm`` (valid or not);
    the namespace word (``@catalog``) is not a segment."""
    prefix = f"{PREFIX}.{namespace}."
    entries = _shm_entries()
    return sorted(
        e[len(prefix) :]
        for e in entries
        if e.startswith(prefix) and len(e) > len(prefix) and e[len(prefix)] != "@"
    )


def list_namespaces() -> list[str]:
    """Namespaces that have at least one object in ``/dev/shm``."""
    found: set[str] = set()
    for entry in _shm_entries():
        parts = entry.split(".", 2)
        if len(parts) == 3 and parts[0] == PREFIX and NAMESPACE_RE.fullmatch(parts[1]):
            found.add(parts[1])
    return sorted(found)


def runtime_root() -> Path:
    """The per-user directory that holds each namespace's sockets and lock."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / PREFIX
    return Path("/tmp") / f"{PREFIX}-{os.getuid()}"


#: Permission bits a runtime directory may have: the root (0711 when shared with a
#: group: others may only traverse it) and a namespace's directory (0750 when shared).
ROOT_MODES = 0o711
NAMESPACE_MODES = 0o750


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return "regular file"
    return "special file"


def owned_problem(path: str, st: os.stat_result, owner_uid: int) -> OwnershipError | None:
    """What is wrong with a ``/dev/shm`` object, by its ``lstat``/``fstat``, or None.

    Trusted: a regular file (never a link) owned by ``owner_uid`` (the namespace's
    owner) or root, that nobody else may write (group or others).
    """
    whose = f"uid {owner_uid} or root" if owner_uid else "root"
    expected = f"regular files of {whose} that nobody else may write"
    reason = ""
    if not stat.S_ISREG(st.st_mode):
        reason = f"a {_kind(st)}, not a segment"
    elif st.st_uid not in (owner_uid, 0):
        reason = "owned by another user"
    elif st.st_mode & 0o022:
        reason = "writable by group or others"
    if not reason:
        return None
    return OwnershipError(
        path,
        reason,
        uid=st.st_uid,
        mode=stat.S_IMODE(st.st_mode),
        kind=_kind(st),
        expected=expected,
    )


def check_owned(path: str, st: os.stat_result, owner_uid: int) -> None:
    """Refuse a ``/dev/shm`` object shmcast must not adopt, attach or write.

    Args:
        path: the object's path (for the message).
        st: its ``os.lstat`` (or ``os.fstat`` of an ``O_NOFOLLOW`` descriptor).
        owner_uid: the uid of the namespace's owner (the broker's).

    Raises:
        OwnershipError: not a regular file, owned by someone else than the owner
            or root, or writable by group or others (the message names the path,
            owner and mode and says ``shmcast doctor --fix``).
    """
    problem = owned_problem(path, st, owner_uid)
    if problem is not None:
        raise problem


def runtime_dir_problem(path: Path, st: os.stat_result, *, root: bool) -> OwnershipError | None:
    """What is wrong with a runtime directory, by its ``lstat``, or None.

    Trusted: a directory (never a link) of this user, mode 0700 (the root may be
    0711 and a namespace's directory 0750 when shared with a group).
    """
    allowed = ROOT_MODES if root else NAMESPACE_MODES
    mode = stat.S_IMODE(st.st_mode)
    reason = ""
    if not stat.S_ISDIR(st.st_mode):
        reason = f"a {_kind(st)}, not a directory"
    elif st.st_uid != os.getuid():
        reason = "owned by another user"
    elif mode & ~allowed:
        reason = "others may reach or replace what is inside"
    if not reason:
        return None
    shared = "0711" if root else "0750"
    return OwnershipError(
        str(path),
        reason,
        uid=st.st_uid,
        mode=mode,
        kind=_kind(st),
        expected=f"a directory of uid {os.getuid()}, mode 0700 ({shared} when shared with a group)",
    )


def _check_dir(path: Path, *, root: bool, create: bool) -> bool:
    """Make (owner-only) and check one runtime directory; False if it does not exist."""
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    problem = runtime_dir_problem(path, st, root=root)
    if problem is not None:
        raise problem
    return True


def runtime_dir(namespace: str, *, create: bool = False) -> Path:
    """``<runtime root>/<namespace>``: where a namespace's broker keeps its sockets and lock.

    Without ``create`` only the path. With ``create`` (the broker) both levels
    are made owner-only and checked.

    Raises:
        OwnershipError: with ``create``, a level that is not this user's own
            directory, or that others may write (see :func:`trusted_runtime_dir`).
    """
    path = runtime_root() / namespace
    if create:
        _check_dir(path.parent, root=True, create=True)
        _check_dir(path, root=False, create=True)
    return path


def trusted_runtime_dir(namespace: str) -> Path:
    """The namespace's runtime directory, checked before a client connects inside it.

    The root is made (owner-only) when missing, so that nobody else can make it
    first and plant a fake broker's sockets; a namespace directory that exists
    must be ours as well. Every process that uses the default ipc endpoints
    (publishers, subscribers, tools) goes through this.

    Raises:
        OwnershipError: the root or the namespace's directory is not this user's
            own directory (another user's, a symbolic link), or others may write it.
    """
    path = runtime_root() / namespace
    _check_dir(path.parent, root=True, create=True)
    _check_dir(path, root=False, create=False)
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
