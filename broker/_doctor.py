"""The checks of ``shmcast doctor``: what users trip over, and what to do for each.

Checks: ``/dev/shm`` size and free space against the configured segments,
objects of namespaces with no live broker (orphans; ``--fix`` unlinks them),
objects that are not valid segments, permissions of segments and runtime
directories, the open-files limit, and the CPU's memory model. Exit code 0 when
nothing is wrong, 1 when a problem was found (warnings alone do not fail).
"""

from __future__ import annotations

import fcntl
import os
import platform
import resource
import shutil
import stat
from dataclasses import dataclass

from ._config import resolve_config
from ._layout import segment_size
from ._names import (
    SHM_DIR,
    catalog_path,
    list_namespaces,
    list_segment_names,
    object_name,
    resolve_namespace,
    runtime_root,
)
from ._segment import Segment, machine_supported
from .errors import ConfigError, ShmcastError

__all__ = ["OK", "PROBLEM", "WARN", "Check", "broker_alive", "diagnose"]

OK, WARN, PROBLEM = "ok", "warn", "problem"
#: File descriptors a broker uses per connected subscriber (control + events).
FDS_PER_SUBSCRIBER = 2


@dataclass
class Check:
    """One finding: what was checked, its status, what it means, what to do."""

    check: str
    status: str
    message: str
    fix: str = ""


def broker_alive(namespace: str) -> bool:
    """Whether a live broker holds ``namespace``'s lock (asked of the kernel, not guessed)."""
    path = runtime_root() / namespace / "broker.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True  # not ours to judge: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe lock
    return False


def _check_shm(config_file: str | None, namespace: str | None) -> list[Check]:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError as exc:
        return [
            Check(
                "shm",
                PROBLEM,
                f"{SHM_DIR} is not usable: {exc}",
                "mount a tmpfs on /dev/shm (docker: --shm-size 1g, compose: shm_size)",
            )
        ]
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    out = [Check("shm", OK, f"{SHM_DIR}: {total / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")]
    if not config_file:
        return out
    try:
        cfg = resolve_config({"namespace": namespace}, config_file=config_file, environ={})
    except ConfigError as exc:
        return [*out, Check("config", PROBLEM, str(exc), "correct the named field")]
    present = set(list_segment_names(resolve_namespace(cfg.namespace)))
    needed = sum(segment_size(s.nbytes, s.slots) for s in cfg.segments if s.name not in present)
    declared = sum(segment_size(s.nbytes, s.slots) for s in cfg.segments)
    if needed > free:
        out.append(
            Check(
                "shm-config",
                PROBLEM,
                f"the {len(cfg.segments)} segments of {config_file} need {needed / 2**20:.1f} "
                f"MiB more but {SHM_DIR} has {free / 2**20:.1f} MiB free",
                f"give /dev/shm at least {declared / 2**20 * 1.25:.0f} MiB (docker run "
                f"--shm-size, compose shm_size, or mount -o remount,size=... /dev/shm)",
            )
        )
    else:
        out.append(
            Check(
                "shm-config",
                OK,
                f"the segments of {config_file} take {declared / 2**20:.1f} MiB; they fit",
            )
        )
    return out


def _check_objects(namespaces: list[str], fix: bool) -> list[Check]:
    out: list[Check] = []
    uid = os.getuid()
    for ns in namespaces:
        alive = broker_alive(ns)
        orphans: list[str] = []
        invalid: list[str] = []
        perms: dict[str, Check] = {}  # reported unless --fix removes the object
        for name in list_segment_names(ns):
            path = os.path.join(SHM_DIR, object_name(ns, name))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_uid != uid:
                continue  # another user's: not ours to judge or fix
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o006:
                perms[name] = Check(
                    "permissions",
                    PROBLEM,
                    f"{path} is readable or writable by every user (mode {mode:04o})",
                    'run the broker with mode = "0600" (or "0640" with a group); '
                    f"chmod o-rw {path}",
                )
            elif mode & 0o060:
                perms[name] = Check(
                    "permissions",
                    WARN,
                    f"{path} is group-accessible (mode {mode:04o}, gid {st.st_gid})",
                    "intended only when the broker is configured with a group",
                )
            try:
                seg = Segment.attach(name, namespace=ns, wait=0.2, prefault=False)
            except PermissionError:
                continue
            except ShmcastError as exc:
                invalid.append(name)
                if not (fix and not alive):
                    out.append(
                        Check(
                            "invalid",
                            PROBLEM,
                            f"{path} is not a valid shmcast segment: {exc}",
                            "shmcast doctor --fix unlinks it when no broker serves the "
                            "namespace (a restarted broker reclaims it too)",
                        )
                    )
                continue
            try:
                writer = seg.writer_alive()
            finally:
                seg.close()
            if not alive and not writer:
                orphans.append(name)
        if orphans and not fix:
            out.append(
                Check(
                    "orphans",
                    PROBLEM,
                    f"namespace {ns!r} has no live broker and {len(orphans)} segment(s) "
                    f"with no writer: {', '.join(orphans[:10])}"
                    + (" ..." if len(orphans) > 10 else ""),
                    f"start `shmcast broker --namespace {ns}` to adopt them, or "
                    f"`shmcast doctor --namespace {ns} --fix` to unlink them",
                )
            )
        removed = set(orphans + invalid) if fix and not alive else set()
        out.extend(c for name, c in perms.items() if name not in removed)
        stale = not alive and (runtime_root() / ns).is_dir()
        if fix and not alive:
            for name in orphans + invalid:
                if Segment.remove(name, namespace=ns):
                    out.append(Check("fixed", OK, f"unlinked {SHM_DIR}/{object_name(ns, name)}"))
            if stale:
                shutil.rmtree(runtime_root() / ns, ignore_errors=True)
                out.append(Check("fixed", OK, f"removed stale runtime dir {runtime_root() / ns}"))
        elif stale:
            out.append(
                Check(
                    "runtime",
                    WARN,
                    f"{runtime_root() / ns} is left from a broker that is not running",
                    "harmless (the next broker reuses it); --fix removes it",
                )
            )
        out.extend(_check_word(ns, alive, fix))
    if not out:
        out.append(Check("objects", OK, f"{len(namespaces)} namespace(s): no orphans, all valid"))
    return out


def _check_word(ns: str, alive: bool, fix: bool) -> list[Check]:
    """The namespace word (``@catalog``) a killed broker left: harmless, the next
    broker takes it over; ``--fix`` unlinks it once no segment is left."""
    word = catalog_path(ns)
    if alive or not os.path.lexists(word):
        return []
    if fix and not list_segment_names(ns):
        os.unlink(word)
        return [Check("fixed", OK, f"unlinked {word}")]
    return [
        Check(
            "runtime",
            WARN,
            f"{word} is left from a broker that is not running",
            "harmless (the next broker takes it over); --fix removes it with the segments",
        )
    ]


def _check_runtime_dirs(namespaces: list[str]) -> list[Check]:
    out: list[Check] = []
    root = runtime_root()
    for path in [root, *(root / ns for ns in namespaces)]:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.getuid():
            out.append(
                Check(
                    "runtime-dir",
                    PROBLEM,
                    f"{path} is owned by uid {st.st_uid}, not you",
                    "remove it, or set XDG_RUNTIME_DIR to a directory of your own",
                )
            )
        elif mode & 0o022 or (path != root and mode & 0o007):
            out.append(
                Check(
                    "runtime-dir",
                    PROBLEM,
                    f"{path} has mode {mode:04o}: others can reach or replace the sockets",
                    f"chmod 0700 {path} (0750 with a configured group)",
                )
            )
    if not out:
        out.append(Check("runtime-dir", OK, f"{root}: owner-only"))
    return out


def _check_limits(subscribers: int) -> list[Check]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FDS_PER_SUBSCRIBER * subscribers + 256
    out = []
    if soft != resource.RLIM_INFINITY and soft < need:
        out.append(
            Check(
                "nofile",
                PROBLEM,
                f"open-files limit {soft} is below the ~{need} a broker needs for "
                f"{subscribers} subscribers ({FDS_PER_SUBSCRIBER} per subscriber + segments)",
                f"ulimit -n {max(need, 4096)} (hard limit {hard}); systemd: LimitNOFILE=, "
                f"docker: --ulimit nofile={max(need, 4096)}",
            )
        )
    else:
        out.append(Check("nofile", OK, f"open-files limit {soft} holds {subscribers} subscribers"))
    out.append(
        Check("memlock", OK, "RLIMIT_MEMLOCK does not matter: segments are not locked in RAM")
    )
    return out


def _check_machine() -> list[Check]:
    if machine_supported():
        return [Check("cpu", OK, f"{platform.machine()}: TSO memory model, the seqlock is sound")]
    return [
        Check(
            "cpu",
            PROBLEM,
            f"{platform.machine()} is weakly ordered: the pure-Python seqlock has no fences, "
            f"a reader may see a version before its bytes",
            "run on x86-64, or copy out with Segment.latest() and compare two reads",
        )
    ]


def diagnose(
    *,
    namespace: str | None = None,
    config_file: str | None = None,
    fix: bool = False,
    subscribers: int = 256,
) -> list[Check]:
    """Run every check; ``namespace=None`` looks at every namespace in ``/dev/shm``."""
    namespaces = [namespace] if namespace else list_namespaces()
    if namespace is None and runtime_root().is_dir():
        namespaces = sorted(set(namespaces) | {p.name for p in runtime_root().iterdir()})
    return [
        *_check_shm(config_file, namespace),
        *_check_objects(namespaces, fix),
        *_check_runtime_dirs(namespaces),
        *_check_limits(subscribers),
        *_check_machine(),
    ]
