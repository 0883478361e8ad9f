"""The checks of ``shmcast doctor``: what users trip over, and what to do for each.

Checks: ``/dev/shm`` size and free space against the configured segments,
objects of namespaces with no live broker (orphans; ``--fix`` unlinks them; a
broker is live when it holds its lock in our runtime directory, or when the
namespace word in ``/dev/shm`` beats or names a running process: a broker of
another runtime directory or container),
objects that are not valid segments (``--fix`` unlinks them once no writer
holds them, a broker running or not), permissions of segments, what shmcast
refuses to trust (runtime directories and objects of another user, links, or
writable by others; ``--fix`` repairs what it safely can: the mode of ours,
links, empty directories, and as root another user's squatters that no live
writer holds; a
namespace whose word another user owns is theirs, and left alone), the
open-files limit, and which
core runs the seqlock (the compiled core is sound on any CPU; the pure-Python
fallback on x86-64 only). Exit code 0 when
nothing is wrong, 1 when a problem was found (warnings alone do not fail).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import resource
import shlex
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ._backend import ENV, compiled, core_status
from ._config import resolve_config
from ._layout import segment_size
from ._lease import lease_held, pid_running
from ._names import (
    NAMESPACE_MODES,
    NAMESPACE_RE,
    ROOT_MODES,
    SHM_DIR,
    catalog_path,
    list_namespaces,
    list_segment_names,
    owned_problem,
    resolve_namespace,
    runtime_dir_problem,
    runtime_root,
    shm_path,
    validate_namespace,
)
from ._nsword import NamespaceWord
from ._segment import Segment
from .errors import (
    ConfigError,
    InvalidNameError,
    NotASegmentError,
    OwnershipError,
    SegmentNotFoundError,
    ShmcastError,
)

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
    """Whether a live broker of ours holds ``namespace``'s lock (asked of the kernel).

    A runtime directory we do not trust holds no broker of ours.
    """
    return _lock_state(namespace)[0]


def _lock_state(namespace: str) -> tuple[bool, int | None]:
    """Whether our runtime directory's lock of ``namespace`` is held, and when it is
    not, the pid of the broker that held it last (it wrote it there): a broker that
    died, in this pid namespace."""
    rdir = runtime_root() / namespace
    for path, root in ((rdir.parent, True), (rdir, False)):
        try:
            if runtime_dir_problem(path, path.lstat(), root=root) is not None:
                return False, None
        except FileNotFoundError:
            return False, None
    try:
        fd = os.open(rdir / "broker.lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False, None
    except OSError:
        return True, None  # not ours to judge: leave it alone
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, None
        with contextlib.suppress(OSError, ValueError):
            return False, int(os.read(fd, 32).strip() or 0) or None
        return False, None
    finally:
        os.close(fd)  # also drops the probe lock


def _word_alive(namespace: str, dead: int | None = None) -> str | None:
    """Why the namespace word (``@catalog``) says a broker serves ``namespace``, or None.

    The word lives in ``/dev/shm``, so it speaks for a broker whatever its runtime
    directory (another ``XDG_RUNTIME_DIR``: sudo, ssh, systemd; another container
    sharing ``/dev/shm``). Heartbeats younger than three intervals are a live broker;
    so is the pid it names, running (a stopped or busy broker beats late). In
    another pid namespace that pid means nothing here, and the heartbeat decides;
    an unrelated process that got the pid only makes us more careful. ``dead`` is
    the pid of a broker whose lock in our runtime directory nobody holds: when the
    word names it and it is gone, its last heartbeats are those of a dead broker.

    Raises:
        OutOfDescriptorsError: the word could not be read (or another ``OSError``):
            nothing is known of a broker. (Taken for no word, --fix unlinked the
            segments of a broker serving the namespace from elsewhere.)
    """
    try:
        word = NamespaceWord.attach(namespace)
    except ShmcastError:
        return None  # no word we trust: it speaks for nobody
    if word is None:
        return None
    with word:
        pid, age = word.pid, word.heartbeat_age()
        beating = word.broker_up()
    if pid == dead and not pid_running(pid):
        return None
    if beating and age is not None:
        return f"its namespace word {word.path} had a heartbeat {age:.1f} s ago (broker pid {pid})"
    if pid > 0 and pid_running(pid):
        return f"pid {pid}, named by its namespace word {word.path} as its broker, is running"
    return None


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
        if exc.field == "--config":  # the file itself: missing, a directory, not TOML
            fix = "give --config a readable TOML file (configs/broker.toml is an example)"
        else:
            fix = f"correct {exc.field!r}" + (f" in {exc.source}" if exc.source else "")
        return [*out, Check("config", PROBLEM, str(exc), fix)]
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


def _is_ours(namespace: str, explicit: bool) -> bool:
    """Whether a namespace is this user's: named on the command line, served (or
    once served) by a broker of ours, or holding an object of ours."""
    if explicit or broker_alive(namespace):
        return True
    with contextlib.suppress(OSError):
        st = (runtime_root() / namespace).lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            return True
    for name in list_segment_names(namespace):
        with contextlib.suppress(OSError):
            if os.lstat(shm_path(namespace, name)).st_uid == os.getuid():
                return True
    return False


def _not_ours_to_fix(check: str, problem: OwnershipError, otherwise: str) -> Check:
    """Another user's file or directory, which only its owner or root may remove."""
    fix = f"only uid {problem.uid} or root can remove it: ask them, or {otherwise}"
    return Check(check, PROBLEM, str(problem), fix)


def _shell_word(path: str) -> str:
    """``path`` as one word for a shell command a finding names, as it is printed.

    A path with characters that are not printable (anyone may name an object in
    ``/dev/shm``: an escape sequence) is written in ANSI-C quotes (``$'...'``, bash,
    zsh, ksh), each byte of such a character escaped (``\\x1b``):
    the terminal gets no control character, and the command pasted names the very
    object. In single quotes, escaped for the terminal, it named a path that does
    not exist ('No such file or directory')."""
    if path.isprintable():
        return shlex.quote(path)
    out: list[str] = []
    for c in path:
        if c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:  # its bytes in the file name (a byte no UTF-8 is os.listdir's surrogate)
            try:
                raw = os.fsencode(c)
            except UnicodeEncodeError:  # a lone surrogate of no byte (not from a name)
                raw = c.encode("utf-8", "surrogatepass")
            out.extend(f"\\x{b:02x}" for b in raw)
    return "$'" + "".join(out) + "'"


def _fix_object(path: str, st: os.stat_result, problem: OwnershipError, ours: bool) -> Check:
    """Repair one untrusted object of a namespace of ours, if that can be done safely."""
    uid = os.getuid()
    if st.st_uid == uid and stat.S_ISREG(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022, follow_symlinks=False)
        return Check("fixed", OK, f"{path}: write access of group and others removed")
    if st.st_uid != uid and not (uid == 0 and ours):
        return _not_ours_to_fix("ownership", problem, "use another namespace")
    if st.st_uid != uid and stat.S_ISREG(st.st_mode) and lease_held(path):
        return Check(
            "ownership",
            PROBLEM,
            f"{problem}; a live writer holds it (its lease): not removed",
            f"stop its writer (a process of uid {st.st_uid}), then `shmcast doctor --fix`",
        )
    if stat.S_ISDIR(st.st_mode):
        # A directory under a segment's name (no segment can be one): removed when
        # empty; what it holds is not ours to judge. Before, os.unlink failed with
        # EISDIR and the finding named --fix, the command that had just failed.
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return Check(
                "ownership",
                PROBLEM,
                f"{problem}; it is a directory holding files: not removed",
                f"look inside, then remove it: rm -r -- {_shell_word(path)}",
            )
        return Check("fixed", OK, f"removed {path} (an empty directory of uid {st.st_uid})")
    # A link, a special file, or (root only) another user's object squatting a name
    # of our namespace that no writer holds: unlinking it touches nothing it points to.
    os.unlink(path)
    return Check("fixed", OK, f"unlinked {path} (a {problem.kind} of uid {st.st_uid})")


#: An invalid object changed this recently may be a segment still being created
#: (its creator holds the writer lease from the moment the object exists; this
#: covers the microseconds before it takes it).
FRESH_SECONDS = 2.0


def _keep_invalid(path: str, st: os.stat_result, exc: ShmcastError, alive: bool) -> str | None:
    """Why ``--fix`` must not unlink an object that is no valid segment, or None."""
    age = time.time() - st.st_mtime
    if age < FRESH_SECONDS:
        return (
            f"it changed {max(age, 0):.1f} s ago and may be a segment still being "
            f"created; run --fix again in {FRESH_SECONDS:.0f} s"
        )
    if stat.S_ISREG(st.st_mode) and lease_held(path):
        return "a live writer holds it (its lease); stop that writer first"
    if alive and not isinstance(exc, NotASegmentError):
        # e.g. another layout version: a broker of another shmcast may serve it.
        return "a broker serves the namespace; stop it first"
    return None


def _unlink_same(path: str, st: os.stat_result) -> bool:
    """Unlink ``path`` if it still names the object ``st`` describes."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _check_objects(
    namespaces: list[str], fix: bool, explicit: bool, dead: dict[str, int | None]
) -> list[Check]:
    out: list[Check] = []
    uid = os.getuid()
    for ns in namespaces:
        locked = broker_alive(ns)
        unknown: OSError | None = None
        try:
            elsewhere = None if locked else _word_alive(ns, dead.get(ns))
        except OSError as exc:  # not known: a broker may serve it, nothing is removed
            elsewhere, unknown = None, exc
        alive = locked or elsewhere is not None or unknown is not None
        owner = None if locked else _word_owner(ns)
        if owner is not None and owner != uid:
            if explicit:  # naming it does not make it ours: its word says whose it is
                out.append(_not_our_namespace(ns, owner, elsewhere))
            continue
        if elsewhere is not None:
            out.append(_served_elsewhere(ns, elsewhere))
        elif unknown is not None:
            out.append(_not_known_if_served(ns, unknown))
        ours = _is_ours(ns, explicit)
        orphans: list[str] = []
        invalid: dict[str, os.stat_result] = {}  # --fix unlinks them
        perms: dict[str, Check] = {}  # reported unless --fix removes the object
        for name in list_segment_names(ns):
            path = shm_path(ns, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            problem = owned_problem(path, st, uid)
            if problem is not None:
                if not ours:
                    continue  # another user's namespace: not ours to judge or fix
                if not fix:
                    out.append(Check("ownership", PROBLEM, str(problem), "shmcast doctor --fix"))
                    continue
                try:
                    found = _fix_object(path, st, problem, ours)
                except OSError as exc:
                    found = Check(
                        "ownership", PROBLEM, f"{problem}; fixing failed: {_os_reason(exc, path)}"
                    )
                out.append(found)
                if found.status != OK or not os.path.exists(path):
                    continue
                st = os.lstat(path)
            if st.st_uid != uid:
                continue  # root's: trusted, not ours to judge
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o004:
                perms[name] = Check(
                    "permissions",
                    PROBLEM,
                    f"{path} is readable by every user (mode {mode:04o})",
                    'run the broker with mode = "0600" (or "0640" with a group); '
                    f"chmod o-rw -- {_shell_word(path)}",
                )
            elif mode & 0o040:
                perms[name] = Check(
                    "permissions",
                    WARN,
                    f"{path} is group-readable (mode {mode:04o}, gid {st.st_gid})",
                    "intended only when the broker is configured with a group",
                )
            try:
                seg = Segment.attach(name, namespace=ns, wait=0.2, prefault=False)
            except PermissionError:
                continue
            except SegmentNotFoundError:
                continue  # gone meanwhile
            except ShmcastError as exc:
                kept = _keep_invalid(path, st, exc, alive) if fix else None
                if fix and kept is None:
                    invalid[name] = st
                    continue
                out.append(
                    Check(
                        "invalid",
                        PROBLEM,
                        f"{path} is not a valid shmcast segment: "
                        # The path names it: not the name again, repr'd (which the
                        # command line's escaping of the path would escape twice).
                        + _without_name(exc)
                        + (f"; not removed: {kept}" if kept else ""),
                        f"`shmcast doctor --namespace {ns} --fix` unlinks it once no writer "
                        f"holds it (or `rm -- {_shell_word(path)}` then; a restarted broker "
                        f"reclaims it too)",
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
        if not fix or alive:
            orphans = []
        out.extend(c for name, c in perms.items() if name not in {*orphans, *invalid})
        for name in orphans:
            if Segment.remove(name, namespace=ns):
                out.append(Check("fixed", OK, f"unlinked {shm_path(ns, name)}"))
        for name, st in invalid.items():
            if _unlink_same(shm_path(ns, name), st):
                out.append(Check("fixed", OK, f"unlinked {shm_path(ns, name)} (no segment)"))
        out.extend(_check_word(ns, alive, fix, ours))
    if not out:
        out.append(Check("objects", OK, f"{len(namespaces)} namespace(s): no orphans, all valid"))
    return out


def _without_name(exc: ShmcastError) -> str:
    """What is wrong with an object whose path the finding names already."""
    if isinstance(exc, NotASegmentError):
        return exc.reason
    if isinstance(exc, InvalidNameError):
        return f"invalid {exc.kind} name: {exc.rule}"
    return str(exc)


def _os_reason(exc: OSError, path: object) -> str:
    """An OSError of ``path``, which the finding names already: its reason, not the
    path again as its ``str`` writes it (repr'd). Of another path: all of it."""
    if exc.strerror and exc.filename is not None and str(exc.filename) == str(path):
        return exc.strerror
    return str(exc)


def _word_owner(namespace: str) -> int | None:
    """The uid of the namespace word: the user whose broker serves (or served) the
    namespace. None without a word we trust (none, a link, one others may write)."""
    try:
        st = os.lstat(catalog_path(namespace))
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o022:
        return None
    return st.st_uid


def _not_our_namespace(ns: str, owner: int, live: str | None) -> Check:
    """Another user's namespace (its word says so): reported, never touched."""
    whose = f"namespace {ns!r} is uid {owner}'s (it owns the namespace word)"
    if live is not None:
        return Check("namespace", WARN, f"{whose} and its broker is live ({live}): left alone")
    return Check(
        "namespace",
        WARN,
        f"{whose}; its broker is not running: left alone",
        f"run `shmcast doctor --namespace {ns} --fix` as uid {owner}",
    )


def _served_elsewhere(ns: str, why: str) -> Check:
    """A broker serves ``ns`` from a runtime directory that is not ours."""
    return Check(
        "broker",
        WARN,
        f"namespace {ns!r} is served by a live broker that does not use "
        f"{runtime_root() / ns} ({why}): its segments and namespace word are left alone",
        "clients here reach it only with the broker's runtime directory (its "
        "XDG_RUNTIME_DIR) or its endpoints given explicitly",
    )


def _not_known_if_served(ns: str, exc: OSError) -> Check:
    """The namespace word could not be read: a broker may serve ``ns`` from elsewhere."""
    return Check(
        "broker",
        WARN,
        f"could not check whether a broker serves namespace {ns!r} from another runtime "
        f"directory: its namespace word could not be read ({exc}): its segments and "
        f"namespace word are left alone",
        "run `shmcast doctor` again once the word can be read",
    )


def _fix_runtime_dir(path: Path, st: os.stat_result, problem: OwnershipError, root: bool) -> Check:
    """Repair one untrusted runtime directory, if that can be done safely."""
    mine = st.st_uid == os.getuid() and stat.S_ISDIR(st.st_mode)
    if mine and (root or broker_alive(path.name)):
        # Ours, with a mode too open: close it. What others put inside meanwhile
        # is refused on its own (a namespace's directory, a stale socket).
        allowed = ROOT_MODES if root else NAMESPACE_MODES
        os.chmod(path, stat.S_IMODE(st.st_mode) & allowed)
        fix = "" if root else "; restart the broker: its sockets may have been replaced"
        return Check("fixed", OK, f"{path}: mode {stat.S_IMODE(st.st_mode) & allowed:04o}{fix}")
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)  # a link or a file: removing it touches nothing it points to
        return Check("fixed", OK, f"removed {path} (a {problem.kind} of uid {st.st_uid})")
    if (mine or os.getuid() == 0) and (root or _directly_below(path, runtime_root())):
        # Ours with no broker (its contents cannot be trusted), or another user's
        # squatting our name: the next broker makes it anew. rmtree does not follow links.
        shutil.rmtree(path)
        return Check("fixed", OK, f"removed {path} (uid {st.st_uid}, mode {problem.mode:04o})")
    return _not_ours_to_fix(
        "runtime-dir", problem, "set XDG_RUNTIME_DIR to a directory of your own"
    )


def _check_word(ns: str, alive: bool, fix: bool, ours: bool) -> list[Check]:
    """The namespace word (``@catalog``) a killed broker left: harmless, the next
    broker takes it over; ``--fix`` unlinks it once no segment is left.

    Another user's namespace is not ours to judge (a word we do not trust, one
    others may write, says nothing of whose it is); a word we may not unlink (in
    sticky ``/dev/shm``, another user's) is reported. Before, ``--fix`` unlinked
    it whatever the namespace and died of ``PermissionError`` (a traceback) on a
    world-writable word any user could plant."""
    word = catalog_path(ns)
    try:
        st = os.lstat(word)
    except FileNotFoundError:
        return []
    if alive or not (ours or st.st_uid == os.getuid()):
        return []
    if fix and not list_segment_names(ns):
        try:
            os.unlink(word)
        except FileNotFoundError:
            return []
        except OSError as exc:
            return [
                Check(
                    "runtime",
                    PROBLEM,
                    f"{word} is left from a broker that is not running; it could not be "
                    f"removed: {exc.strerror}",
                    f"only uid {st.st_uid} or root can remove it: ask them, or use "
                    f"another namespace",
                )
            ]
        return [Check("fixed", OK, f"unlinked {word}")]
    return [
        Check(
            "runtime",
            WARN,
            f"{word} is left from a broker that is not running",
            "harmless (the next broker takes it over); --fix removes it with the segments",
        )
    ]


def _directly_below(path: Path, root: Path) -> bool:
    """Whether ``path`` is a namespace's directory: a direct child of the runtime root,
    resolved. The last guard before an ``rmtree`` (``root / ".."`` is the root's parent,
    ``root / "."`` the root itself)."""
    return NAMESPACE_RE.fullmatch(path.name) is not None and path.resolve().parent == root.resolve()


def _check_runtime_dirs(namespaces: list[str], fix: bool) -> list[Check]:
    out: list[Check] = []
    root = runtime_root()
    for path in [root, *(root / ns for ns in namespaces)]:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        problem = runtime_dir_problem(path, st, root=path == root)
        if problem is None:
            continue
        if not fix:
            out.append(Check("runtime-dir", PROBLEM, str(problem), "shmcast doctor --fix"))
        else:
            try:
                out.append(_fix_runtime_dir(path, st, problem, path == root))
            except OSError as exc:
                out.append(
                    Check(
                        "runtime-dir", PROBLEM, f"{problem}; fixing failed: {_os_reason(exc, path)}"
                    )
                )
        if path == root and not (fix and out[-1].status == OK):
            break  # nothing below an untrusted root is ours
    for ns in namespaces:
        rdir = root / ns
        if not _directly_below(rdir, root) or not rdir.is_dir() or rdir.is_symlink():
            continue
        if broker_alive(ns):
            continue
        if runtime_dir_problem(rdir, rdir.lstat(), root=False) is not None:
            continue
        if fix:
            shutil.rmtree(rdir, ignore_errors=True)
            out.append(Check("fixed", OK, f"removed stale runtime dir {rdir}"))
        else:
            out.append(
                Check(
                    "runtime",
                    WARN,
                    f"{rdir} is left from a broker that is not running",
                    "harmless (the next broker reuses it); --fix removes it",
                )
            )
    if not out:
        out.append(Check("runtime-dir", OK, f"{root}: owner-only"))
    return out


def _check_limits(subscribers: int) -> list[Check]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FDS_PER_SUBSCRIBER * subscribers + 256
    out = []
    if hard != resource.RLIM_INFINITY and hard < need:
        out.append(
            Check(
                "nofile",
                PROBLEM,
                f"open-files limit {soft} (hard limit {hard}) is below the ~{need} a "
                f"broker needs for {subscribers} subscribers ({FDS_PER_SUBSCRIBER} per "
                f"subscriber + segments)",
                f"ulimit -n {max(need, 4096)} (as root: the hard limit too); systemd: "
                f"LimitNOFILE=, docker: --ulimit nofile={max(need, 4096)}",
            )
        )
    elif soft != resource.RLIM_INFINITY and soft < need:
        # `shmcast broker` raises its soft limit to the hard one at start (libzmq
        # aborts at EMFILE on an ipc endpoint); a Broker in another program does not.
        out.append(
            Check(
                "nofile",
                WARN,
                f"open-files limit {soft} is below the ~{need} a broker needs for "
                f"{subscribers} subscribers; `shmcast broker` raises it to the hard "
                f"limit {hard} at start, a Broker in your own program does not",
                f"for a Broker in your own program: ulimit -n {max(need, 4096)}; "
                f"systemd: LimitNOFILE=, docker: --ulimit nofile={max(need, 4096)}",
            )
        )
    else:
        out.append(Check("nofile", OK, f"open-files limit {soft} holds {subscribers} subscribers"))
    out.append(
        Check("memlock", OK, "RLIMIT_MEMLOCK does not matter: segments are not locked in RAM")
    )
    return out


def _check_machine() -> list[Check]:
    machine = platform.machine()
    name, why = core_status()
    if name == "c":
        return [Check("cpu", OK, f"{machine}: {why}; the seqlock is sound on any CPU")]
    if name == "python":
        chosen = os.environ.get(ENV, "").strip().lower() == "python"
        if compiled() is None and not chosen:  # the fallback because the extension is missing
            return [
                Check(
                    "cpu",
                    WARN,
                    f"{machine}: the compiled core is not installed; the pure-Python "
                    f"fallback runs, sound on this CPU (TSO) but every commit makes a "
                    f"wake syscall",
                    "install a C compiler (Debian: apt-get install gcc python3-dev) and "
                    f"reinstall shmcast, or set {ENV}=python to choose the fallback knowingly",
                )
            ]
        return [Check("cpu", OK, f"{machine}: {why}, chosen by {ENV}=python; sound here")]
    return [Check("cpu", PROBLEM, f"{machine}: no usable core", why)]


def diagnose(
    *,
    namespace: str | None = None,
    config_file: str | None = None,
    fix: bool = False,
    subscribers: int = 256,
) -> list[Check]:
    """Run every check; ``namespace=None`` looks at every namespace in ``/dev/shm``.

    Raises:
        InvalidNameError: ``namespace`` is not a namespace name (``..`` would
            reach outside the runtime root).
    """
    if namespace is not None:
        validate_namespace(namespace)
    namespaces = [namespace] if namespace is not None else list_namespaces()
    root = runtime_root()
    with contextlib.suppress(OSError):
        if namespace is None and runtime_dir_problem(root, root.lstat(), root=True) is None:
            found = {p.name for p in root.iterdir() if NAMESPACE_RE.fullmatch(p.name)}
            namespaces = sorted(set(namespaces) | found)
    # The pids of brokers that died here, read before --fix removes their runtime dirs.
    dead = {ns: _lock_state(ns)[1] for ns in namespaces}
    # Directories first: with --fix, what they repair decides which brokers are ours.
    dirs = _check_runtime_dirs(namespaces, fix)
    return [
        *_check_shm(config_file, namespace),
        *_check_objects(namespaces, fix, explicit=namespace is not None, dead=dead),
        *dirs,
        *_check_limits(subscribers),
        *_check_machine(),
    ]
