"""The rules of DESIGN.md that a segment must keep (issue 2, part 2).

Each test breaks if its rule is broken: pages reserved up front, read-only
readers, no resource tracker, clean refusal of foreign objects, views that
outlive close(), a writer lease the kernel releases, owner-only modes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from shmcast.broker import (
    ConfigError,
    LayoutVersionError,
    NotASegmentError,
    ReadOnlyError,
    Segment,
    WriterBusyError,
    _segment,
    segment_size,
)
from shmcast.broker._layout import DESCR_OFF, LAYOUT_VERSION, PAGE, W_NBYTES, W_STRIDE
from shmcast.broker._segment import select_core
from shmcast.broker.client import shm_path

from ._seg_util import (
    ROOT,
    kill,
    mappings_of,
    poll_until,
    process_state,
    read_line,
    run_python,
    spawn,
    worker,
    write_file,
)

# The engine's tests run on both cores of the seqlock (conftest.each_core).
pytestmark = pytest.mark.usefixtures("each_core")


@pytest.fixture
def removed(namespace: str) -> Iterator[list[str]]:
    """Segment names to remove from the test's namespace afterwards, whatever happened."""
    names: list[str] = []
    try:
        yield names
    finally:
        for name in names:
            Segment.remove(name, namespace=namespace)


def _publish(name: str, values: np.ndarray, *, slots: int = 2) -> None:
    """Create ``name``, publish ``values`` as version 1 and let go of the writer lease."""
    with Segment.create(name, values.dtype, values.shape, slots=slots) as seg:
        seg.write(values)


# ------------------------------------------------------------- (a) posix_fallocate


def _unshare_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot mount a private tmpfs on /dev/shm here: {probe.stderr.strip()}"
    return None


_SMALL_TMPFS_CHILD = """
import json, os
import numpy as np
from shmcast.broker import Segment, ShmSpaceError
from shmcast.broker.client import shm_path

def free():
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize

ns = os.environ["SHMCAST_NAMESPACE"]
out = {"total": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize}
small = Segment.create("small", "<f8", (1 << 20,))
data = np.arange(1 << 20, dtype="<f8")
small.write(data)
out["free_before"] = free()
try:
    big = Segment.create("big", "u1", (50_000_000,))
except ShmSpaceError as exc:
    out.update(error=str(exc), needed=exc.needed, free=exc.free)
else:
    out["error"] = None
    big.close()
    big.unlink()
out["free_after"] = free()
out["listed"] = Segment.list(ns)
out["big_exists"] = os.path.exists(shm_path(ns, "big"))
with Segment.attach("small") as reader:
    out["small_intact"] = bool(np.array_equal(reader.latest().array, data))
    small.write(data[::-1].copy())  # the small segment's pages still work
    out["small_writes"] = bool(np.array_equal(reader.latest().array, data[::-1]))
small.close()
small.unlink()
print(json.dumps(out))
"""


@pytest.mark.root
def test_segment_that_does_not_fit_is_a_clear_error(namespace):
    problem = _unshare_problem()
    if problem:
        pytest.skip(problem)
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" -c "$1"',
            sys.executable,
            _SMALL_TMPFS_CHILD,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # ftruncate alone would "succeed" and the first write would die of SIGBUS (-7).
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["total"] == 64 << 20
    needed = segment_size(50_000_000, 2)
    assert needed > 100_000_000
    assert out["error"] is not None, "creating ~100 MB on a 64 MB /dev/shm did not fail"
    message = out["error"]
    assert out["needed"] == needed
    assert str(needed) in message
    assert f"{needed / 2**20:.1f} MiB" in message
    assert abs(out["free"] - out["free_before"]) <= 1 << 20
    assert f"{out['free'] / 2**20:.1f} MiB" in message
    assert "--shm-size" in message
    assert "'big'" in message
    # Nothing left behind: no object, and the pages the attempt took are back.
    assert not out["big_exists"]
    assert out["listed"] == ["small"]
    assert out["free_after"] == out["free_before"]
    assert out["small_intact"]
    assert out["small_writes"]


# ------------------------------------------------------------ (b) read-only readers


_READER_CHILD = """
import sys
from shmcast.broker import Segment
seg = Segment.attach("ro")
with seg.read() as snap:
    arr = snap.array
    for attempt in ("arr[0] = -1.0", "arr.fill(-1.0)", "arr.flags.writeable = True"):
        try:
            exec(attempt)
        except ValueError:
            pass
        else:
            sys.exit(f"{attempt} did not raise")
    copy = seg.latest().array
    copy[:] = -1.0  # a private copy is the reader's own to change
print("READY", flush=True)
sys.stdin.read()
seg.close()
"""


def test_readers_map_the_object_read_only(namespace, removed):
    removed.append("ro")
    data = np.arange(64, dtype="<f8")
    _publish("ro", data)
    path = shm_path(namespace, "ro")
    proc = spawn("-c", _READER_CHILD)
    try:
        assert read_line(proc, 30) == "READY"
        perms = mappings_of(proc.pid, path)
        assert perms, f"the reader has no mapping of {path}"
        assert all(p == "r--s" for p in perms), perms
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        kill(proc)
    with Segment.attach("ro") as reader:
        snap = reader.latest()
        assert snap.version == 1
        assert np.array_equal(snap.array, data)


def test_a_readers_array_cannot_be_written_in_process(namespace, removed):
    removed.append("ro")
    data = np.arange(64, dtype="<f8")
    _publish("ro", data)
    with Segment.attach("ro") as reader, reader.read() as snap:
        with pytest.raises(ValueError, match="read-only"):
            snap.array[:] = 0
        with pytest.raises(ValueError, match="read-only"):
            np.copyto(snap.array, 0.0)
        with pytest.raises(ValueError, match="WRITEABLE"):
            snap.array.setflags(write=True)
        with pytest.raises(TypeError, match="read-only"):
            memoryview(snap.array)[0] = 0.0
        assert np.array_equal(snap.array, data)


# ------------------------------------------------------- (c) no resource tracker


_ATTACH_AND_EXIT = """
import multiprocessing.resource_tracker as rt
import numpy as np
from shmcast.broker import Segment
rt.ensure_running()  # a tracker that would unlink whatever got registered with it
seg = Segment.attach("kept")
print(float(seg.latest().array.sum()))
{close}
"""


@pytest.mark.parametrize("close", ["seg.close()", "pass"], ids=["closes", "just-exits"])
def test_reader_process_exiting_leaves_the_segment_alive(namespace, removed, close):
    removed.append("kept")
    data = np.arange(1000, dtype="<f8")
    _publish("kept", data)
    path = shm_path(namespace, "kept")
    inode = os.stat(path).st_ino
    for _ in range(2):
        proc = run_python(_ATTACH_AND_EXIT.format(close=close), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert float(proc.stdout.strip()) == float(data.sum())
        assert "resource_tracker" not in proc.stderr
        assert "leaked" not in proc.stderr
        assert proc.stderr == ""
        assert os.stat(path).st_ino == inode
    with Segment.attach("kept") as reader:
        assert np.array_equal(reader.latest().array, data)


# ------------------------------------------------------------- (d) foreign objects

# Byte offsets of the header fields, from the layout spec in broker/_segment.py.
OFF_MAGIC, OFF_LAYOUT, OFF_HSIZE, OFF_SLOTS, OFF_STRIDE, OFF_NBYTES = 0, 8, 16, 24, 32, 40
OFF_DESCR_LEN, OFF_NDIM, OFF_SHAPE, OFF_DESCR = 104, 112, 120, DESCR_OFF


def _template(namespace: str) -> bytes:
    """The bytes of a real segment ('<f8', shape (4,), two slots) with one version."""
    with Segment.create("template", "<f8", (4,)) as seg:
        seg.write(np.arange(4, dtype="<f8"))
        with open(seg.path, "rb") as f:
            raw = f.read()
        seg.unlink()
    return raw


def _u64(raw: bytes, off: int, value: int) -> bytes:
    return raw[:off] + value.to_bytes(8, "little") + raw[off + 8 :]


def _descr(raw: bytes, text: bytes) -> bytes:
    raw = raw[:OFF_DESCR] + text + raw[OFF_DESCR + len(text) :]
    return _u64(raw, OFF_DESCR_LEN, len(text))


BROKEN = {
    "random-bytes": lambda raw: b"\x5a" + os.urandom(len(raw) - 1),
    "wrong-magic": lambda raw: b"SHMCAST\x01" + raw[8:],
    "zero-page-then-garbage": lambda raw: bytes(8) + os.urandom(len(raw) - 8),
    "empty": lambda raw: b"",
    "tiny": lambda raw: raw[:100],
    "header-only": lambda raw: raw[:4096],
    "truncated-slot": lambda raw: raw[:-1],
    "grown": lambda raw: raw + bytes(4096),
    "slots-0": lambda raw: _u64(raw, OFF_SLOTS, 0),
    "slots-1": lambda raw: _u64(raw, OFF_SLOTS, 1),
    "slots-huge": lambda raw: _u64(raw, OFF_SLOTS, 2**63),
    "slots-3": lambda raw: _u64(raw, OFF_SLOTS, 3),
    "header-size": lambda raw: _u64(raw, OFF_HSIZE, 8192),
    "stride": lambda raw: _u64(raw, OFF_STRIDE, 2**40),
    "nbytes-huge": lambda raw: _u64(raw, OFF_NBYTES, 2**62),
    "nbytes-mismatch": lambda raw: _u64(raw, OFF_NBYTES, 48),
    "ndim-17": lambda raw: _u64(raw, OFF_NDIM, 17),
    "ndim-huge": lambda raw: _u64(raw, OFF_NDIM, 2**64 - 1),
    "shape-wrong": lambda raw: _u64(raw, OFF_SHAPE, 5),
    "shape-zero": lambda raw: _u64(_u64(raw, OFF_SHAPE, 0), OFF_NBYTES, 0),
    "shape-overflow": lambda raw: _u64(_u64(raw, OFF_NDIM, 2), OFF_SHAPE + 8, 2**63),
    "descr-len-0": lambda raw: _u64(raw, OFF_DESCR_LEN, 0),
    "descr-len-huge": lambda raw: _u64(raw, OFF_DESCR_LEN, 2**40),
    "descr-not-ascii": lambda raw: _descr(raw, b"'\xff\xfe'"),
    "descr-not-literal": lambda raw: _descr(raw, b"__import__('os')"),
    "descr-not-dtype": lambda raw: _descr(raw, b"{'a': 1}"),
    "descr-int": lambda raw: _descr(raw, b"7"),
    "descr-nested": lambda raw: _descr(raw, b"[" * 1000),
    "descr-other-size": lambda raw: _descr(raw, b"'<f4'"),
    "descr-object": lambda raw: _descr(raw, b"'|O'"),
    "descr-object-field": lambda raw: _descr(raw, b"[('a', '|O')]"),
    "descr-void-0": lambda raw: _u64(_descr(raw, b"'|V0'"), OFF_NBYTES, 0),
    "descr-subarray": lambda raw: _u64(_descr(raw, b"('<f8', (4,))"), OFF_SHAPE, 1),
}


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("how", list(BROKEN), ids=list(BROKEN))
@pytest.mark.parametrize("writable", [False, True], ids=["reader", "writer"])
def test_objects_that_are_not_segments_are_refused_cleanly(namespace, how, writable):
    raw = BROKEN[how](_template(namespace))
    path = shm_path(namespace, "bogus")
    write_file(path, raw)
    try:
        fds = _open_fds()
        with pytest.raises(NotASegmentError) as info:
            Segment.attach("bogus", writable=writable, wait=0.05).close()
        assert path in str(info.value)
        assert info.value.segment == "bogus"
        assert _open_fds() == fds, "a refused attach leaked a file descriptor"
        with open(path, "rb") as f:
            assert f.read() == raw, "a refused attach changed the object"
    finally:
        os.unlink(path)


@pytest.mark.parametrize("layout", [0, LAYOUT_VERSION - 1, LAYOUT_VERSION + 1, 2**64 - 1])
def test_other_layout_versions_are_refused(namespace, layout):
    raw = _u64(_template(namespace), OFF_LAYOUT, layout)
    path = shm_path(namespace, "future")
    write_file(path, raw)
    try:
        fds = _open_fds()
        with pytest.raises(LayoutVersionError) as info:
            Segment.attach("future").close()
        assert (info.value.found, info.value.supported) == (layout, LAYOUT_VERSION)
        assert str(layout) in str(info.value)
        assert _open_fds() == fds
    finally:
        os.unlink(path)


def test_the_template_itself_attaches(namespace):
    """The crafted objects above are broken by what each changes, not by the template."""
    path = shm_path(namespace, "fine")
    write_file(path, _template(namespace))
    try:
        with Segment.attach("fine") as seg:
            snap = seg.latest()
            assert (seg.dtype, seg.shape, snap.version) == (np.dtype("<f8"), (4,), 1)
            assert snap.array.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        os.unlink(path)


def test_a_header_rewritten_after_its_check_is_not_used(namespace, removed, monkeypatch):
    """attach builds on the layout read_header checked: whoever may write the object
    can rewrite its sizes in between, and the core must never copy past the mapping."""
    removed.append("s")
    with Segment.create("s", np.float64, (1,), namespace=namespace) as w:
        w.write(np.array([1.0]))
        w.write(np.array([2.0]))  # in slot 1: a stride of 8184 would read past the end
    checked = _segment.read_header

    def then_rewritten(*args: Any, **kwargs: Any) -> Any:
        got = checked(*args, **kwargs)
        with open(shm_path(namespace, "s"), "r+b") as f, mmap.mmap(f.fileno(), PAGE) as mm:
            q = memoryview(mm).cast("Q")
            q[W_STRIDE] = q[W_NBYTES] = 8184
            q.release()
        return got

    monkeypatch.setattr(_segment, "read_header", then_rewritten)
    with Segment.attach("s", namespace=namespace) as r:
        assert (r.nbytes, r.latest().array.tolist()) == (8, [2.0])
        out = bytearray(8)
        assert r.read_into(out)[0] == 2
        assert np.frombuffer(out).tolist() == [2.0]


def test_the_core_refuses_a_layout_larger_than_its_mapping():
    core = select_core()
    mm = mmap.mmap(-1, 3 * PAGE)  # a header page and two slots of one page
    for slots, stride, nbytes in [(2, 8184, 8184), (3, PAGE, 8), (2, 2**63, 8), (4, 2**62, 8)]:
        with pytest.raises(ValueError, match="impossible mapping or layout"):
            core.ring(mm, slots, PAGE, stride, nbytes, False, False)
    ring = core.ring(mm, 2, PAGE, PAGE, PAGE, False, False)  # exactly fits
    assert ring.latest() == 0


# --------------------------------------------------------- (e) close with live views


_CLOSE_WITH_VIEWS = """
import gc, json, os
import numpy as np
from shmcast.broker import Segment

def mapped(path):
    with open("/proc/self/maps") as f:
        return sum(path in line for line in f)

w = Segment.create("views", "<f8", (1000,), slots=3)
path = w.path
w.write(np.arange(1000, dtype="<f8"))
w.write(np.full(1000, 2.0))
r = Segment.attach("views")
with r.read(1) as s:
    a1 = s.array
with r.read() as s:
    a2 = s.array
with w.read() as s:
    mine = s.array
with w.loan() as loaned:
    loaned[:] = 3.0
every_tenth = a1[::10]
r.close()
w.close()
with Segment.attach("views", writable=True) as heir:  # the lease left with close()
    out = {"heir_version": heir.version}
w.unlink()
gc.collect()
out.update(closed=[r.closed, w.closed], mapped_while_views_live=mapped(path))
try:
    loaned[:] = 4.0  # a loan's array is read-only after its block
except ValueError:
    out["loan_read_only"] = True
out["sums"] = [float(x.sum()) for x in (a1, a2, mine, loaned, every_tenth)]
del a1, a2, mine, loaned, every_tenth, s
gc.collect()
out["mapped_after_views_died"] = mapped(path)
print(json.dumps(out))
"""


def test_closing_with_live_views_never_crashes(namespace, removed):
    removed.append("views")
    proc = run_python(_CLOSE_WITH_VIEWS, timeout=60)
    # A view over an unmapped segment dies of SIGSEGV: returncode -11.
    assert proc.returncode == 0, f"child died with {proc.returncode}:\n{proc.stderr}"
    assert proc.stderr == ""
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["closed"] == [True, True]
    assert out["heir_version"] == 3
    assert out["loan_read_only"]
    assert out["sums"] == [499500.0, 2000.0, 2000.0, 3000.0, float(sum(range(0, 1000, 10)))]
    assert out["mapped_while_views_live"] >= 1
    assert out["mapped_after_views_died"] == 0, "the mapping outlived every view"


# ---------------------------------------------------------- (f) the writer lease


def test_header_names_the_writer_and_the_kernel_frees_its_lease(namespace, removed):
    removed.append("lease")
    _publish("lease", np.full(16, 1.0))
    holder = worker("hold", "lease")
    try:
        line = read_line(holder, 30)
        assert line == f"READY {holder.pid}"
        with Segment.attach("lease") as reader:
            info = reader.info()
            assert info.writer_pid == holder.pid
            assert info.writer_alive
            assert reader.writer_alive()
            with pytest.raises(WriterBusyError) as busy:
                Segment.attach("lease", writable=True)
            assert busy.value.pid == holder.pid
            assert str(holder.pid) in str(busy.value)

            holder.send_signal(signal.SIGKILL)
            # Not reaped yet: the pid still exists (a zombie with the same start
            # time), so only the kernel's release of the flock can say it is dead.
            poll_until(lambda: not reader.writer_alive(), 10, "the lease to be released")
            assert process_state(holder.pid) == "Z"
            assert reader.info().writer_pid == holder.pid
            assert not reader.info().writer_alive

            with Segment.attach("lease", writable=True) as heir:
                assert heir.info().writer_pid == os.getpid()
                assert reader.writer_alive()
                assert heir.write(np.full(16, 2.0)) == 2
            assert reader.latest().array.tolist() == [2.0] * 16
            assert not reader.writer_alive()
    finally:
        kill(holder)


def test_a_second_writer_in_another_process_is_refused(namespace, removed):
    removed.append("lease")
    with Segment.create("lease", "<f8", (16,)) as seg:
        seg.write(np.full(16, 1.0))
        code = textwrap.dedent(
            """
            from shmcast.broker import Segment, WriterBusyError
            try:
                Segment.attach("lease", writable=True)
            except WriterBusyError as exc:
                print(exc.pid)
            """
        )
        proc = run_python(code, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(os.getpid())
        assert seg.version == 1
    # The lease went with close(): now the same child becomes the writer.
    proc = run_python(
        'from shmcast.broker import Segment\nSegment.attach("lease", writable=True).close()',
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def _reaped(pid: int, *, timeout: float) -> int:
    """The exit code of the forked child ``pid``; killed after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the forked child {pid} did not exit in {timeout}s")
        time.sleep(0.001)


def test_a_forked_child_closing_its_copy_keeps_the_parents_lease(namespace, removed):
    """The flock is on the open file description parent and child share after
    os.fork: the child's close() (or its exit's __del__) must not unlock it, nor
    touch the header. Before, it freed the lease of a writer that went on writing."""
    removed.append("forked")
    with Segment.create("forked", "<f8", (4,)) as seg:
        seg.write(np.full(4, 1.0))
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                seg.close()
                code = 0
            finally:
                os._exit(code)
        assert _reaped(pid, timeout=10) == 0
        with pytest.raises(WriterBusyError), Segment.attach("forked", writable=True):
            pass
        assert seg.info().writer_pid == os.getpid()
        assert seg.write(np.full(4, 2.0)) == 2


def test_a_forked_child_cannot_write_through_its_copy(namespace, removed):
    """The lease still says the parent writes: a write of the child's would go under
    the parent's and its readers' feet. Before, write, write_bytes and loan through
    the inherited handle all committed (the parent then read the child's 9.0s)."""
    removed.append("forked")
    with Segment.create("forked", "<f8", (4,)) as seg:
        seg.write(np.full(4, 1.0))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child: never back into pytest)
            try:
                os.close(r)
                out: list[str] = []

                def loan() -> None:
                    with seg.loan() as arr:
                        arr[:] = 9.0

                for write in (
                    lambda: seg.write(np.full(4, 9.0)),
                    lambda: seg.write_bytes(np.full(4, 9.0).tobytes()),
                    loan,
                ):
                    try:
                        write()
                        out.append("written")
                    except ReadOnlyError as exc:
                        out.append(str(exc))
                out.append(str(seg.latest().array.tolist()))  # reading goes on
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = json.loads(f.read() or b"[]")
        assert _reaped(pid, timeout=10) == 0
        assert len(out) == 4, out
        for message in out[:3]:
            assert f"opened by process {os.getpid()}" in message
            assert "inherited across fork" in message
            assert "open a new Publisher" in message
        assert out[3] == "[1.0, 1.0, 1.0, 1.0]"
        assert seg.version == 1
        assert seg.latest().array.tolist() == [1.0] * 4
        assert seg.write(np.full(4, 2.0)) == 2


def test_a_forked_child_takes_the_lease_once_its_opener_ended(namespace, removed):
    """The opener ends without closing (os._exit): the child, refused a write through
    its inherited copy, opens a writer of its own as the error says, its copy still
    open. Before, the copy shared the open file description the lease is a flock on,
    so the lease lived on in the child until it closed the copy (the error said so)."""
    removed.append("orphan")
    r, w = os.pipe()
    opener = os.fork()
    if opener == 0:  # pragma: no cover (the forked processes: never back into pytest)
        try:
            os.close(r)
            me = os.getpid()
            seg = Segment.create("orphan", "<f8", (4,))
            if os.fork() == 0:
                signal.alarm(10)  # not the test's child: it may not be left behind
                out: list[str] = []
                while os.getppid() == me:
                    time.sleep(0.001)  # until the opener has ended
                try:
                    seg.write(np.full(4, 9.0))
                    out.append("written")
                except ReadOnlyError as exc:
                    out.append(str(exc))
                try:
                    with Segment.attach("orphan", writable=True) as mine:
                        out.append(str(mine.write(np.full(4, 2.0))))
                except Exception as exc:
                    out.append(f"{type(exc).__name__}: {exc}")
                out.append(str(seg.latest().array.tolist()))  # the copy reads on
                os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)  # the opener ends without closing its writer
    os.close(w)
    assert _reaped(opener, timeout=10) == 0
    with os.fdopen(r, "rb") as f:  # until the grandchild is done (it holds the write end)
        out = json.loads(f.read() or b"[]")
    assert len(out) == 3, out
    assert "Close this copy" not in out[0]
    assert "open a new Publisher" in out[0]
    assert out[1] == "1"  # the child took the lease, its copy open
    assert out[2] == "[2.0, 2.0, 2.0, 2.0]"


def test_a_writers_lease_is_free_once_its_opener_is_killed_though_a_forked_child_lives(
    namespace, removed
):
    """A forked child that never writes kept the lease of its SIGKILLed opener (the
    flock is on the open file description its inherited descriptors and mapping
    share): every new writer got WriterBusyError naming the dead opener, for as long
    as the child lived."""
    removed.append("killed")
    said_r, said_w = os.pipe()  # the child: its pid and what its copy reads
    hold_r, hold_w = os.pipe()  # the child lives until the test closes hold_w
    opener = os.fork()
    if opener == 0:  # pragma: no cover (the forked processes: never back into pytest)
        try:
            signal.alarm(30)  # bounded, whatever happens to the test
            os.close(said_r)
            os.close(hold_w)
            seg = Segment.create("killed", "<f8", (4,))
            seg.write(np.full(4, 1.0))
            if os.fork() == 0:
                said = json.dumps([os.getpid(), seg.latest().array.tolist()])
                os.write(said_w, said.encode() + b"\n")
                os.read(hold_r, 1)  # until the test closes its end
            else:
                time.sleep(30)  # the opener, until it is killed
        finally:
            os._exit(0)
    os.close(said_w)
    os.close(hold_r)
    try:
        with os.fdopen(said_r, "rb") as f:
            said = f.readline()
        assert said, "the forked child said nothing"
        child, latest = json.loads(said)
        assert latest == [1.0] * 4  # the child's copy reads the same pages
        with pytest.raises(WriterBusyError), Segment.attach("killed", writable=True):
            pass  # the opener lives: the lease is its own still
        os.kill(opener, signal.SIGKILL)
        assert _reaped(opener, timeout=10) == -signal.SIGKILL
        opener = 0
        os.kill(child, 0)  # the child lives on
        with Segment.attach("killed", writable=True) as seg:
            assert seg.write(np.full(4, 2.0)) == 2
    finally:
        if opener:
            os.kill(opener, signal.SIGKILL)
            os.waitpid(opener, 0)
        os.close(hold_w)  # the child ends


def _fork_beside_a_writer_opening(name: str, hold_up: Callable[[Any, Any], None]) -> None:
    """Fork, from a process (the opener) one of whose threads is opening a writer of
    ``name`` and is held up by ``hold_up(entered, go)`` (a patch it installs, which
    sets ``entered`` at the point to fork at and waits for ``go``); SIGKILL the opener
    once its thread holds the lease; a new writer must open at once, the child alive."""
    Segment.create(name, "<f8", (4,)).close()
    said_r, said_w = os.pipe()  # the child: its pid
    hold_r, hold_w = os.pipe()  # the child lives until the test closes hold_w
    opener = os.fork()
    if opener == 0:  # pragma: no cover (the forked processes: never back into pytest)
        try:
            signal.alarm(30)  # bounded, whatever happens to the test
            os.close(said_r)
            os.close(hold_w)
            entered, go = threading.Event(), threading.Event()
            hold_up(entered, go)
            kept: list[Segment] = []
            t = threading.Thread(target=lambda: kept.append(Segment.attach(name, writable=True)))
            t.start()
            entered.wait(20)
            forked_r, forked_w = os.pipe()
            if os.fork() == 0:
                signal.alarm(30)
                os.write(forked_w, b".")  # the child's fork hooks have run
                os.write(said_w, f"{os.getpid()}\n".encode())
                os.read(hold_r, 1)  # until the test closes its end
            else:
                # Only then: the hooks would otherwise, now and then, run after the
                # thread's flock, and see (and move) what they must do without.
                os.read(forked_r, 1)
                go.set()
                t.join(20)
                time.sleep(30)  # the opener, until it is killed
        finally:
            os._exit(0)
    os.close(said_w)
    os.close(hold_r)
    try:
        with os.fdopen(said_r, "rb") as f:
            said = f.readline()
        assert said, "the forked child said nothing"
        child = int(said)
        deadline = time.monotonic() + 10
        while True:  # the opener's thread finishes its attach
            try:
                with Segment.attach(name, writable=True):
                    pass
            except WriterBusyError:
                break
            assert time.monotonic() < deadline, "the opener never took the lease"
            time.sleep(0.01)
        os.kill(opener, signal.SIGKILL)
        assert _reaped(opener, timeout=10) == -signal.SIGKILL
        opener = 0
        os.kill(child, 0)  # the child lives on
        with Segment.attach(name, writable=True) as seg:
            assert seg.write(np.full(4, 2.0)) == 1
    finally:
        if opener:
            os.kill(opener, signal.SIGKILL)
            os.waitpid(opener, 0)
        os.close(hold_w)  # the child ends


def test_a_lease_taken_by_another_thread_at_the_fork_is_free_once_its_opener_is_killed(
    namespace, removed
):
    """A thread of the opener was opening a writer when another forked: the lease was
    taken and mapped, the handle not yet made (nor tracked), so the fork hook knew
    nothing of it (and was not even registered before a first writer). The child kept
    the lease of its SIGKILLed opener: every new writer got WriterBusyError for as long
    as the child lived."""
    removed.append("midway")

    def hold_up(entered: Any, go: Any) -> None:
        setup = Segment._setup

        def held_up(self: Segment, *args: Any, **kwargs: Any) -> None:
            entered.set()  # the lease is taken and mapped: fork now
            go.wait(20)
            setup(self, *args, **kwargs)

        Segment._setup = held_up  # type: ignore[method-assign]

    _fork_beside_a_writer_opening("midway", hold_up)


def test_a_lease_opened_but_not_locked_at_the_fork_is_free_once_its_opener_is_killed(
    namespace, removed
):
    """Another thread had opened the object for a writer, and not locked it yet (it
    read the header), when the fork came: the child's fork hook saw no lock, the
    parent then took its flock on the description the child shares, and the child
    held the lease of its SIGKILLed opener (WriterBusyError for every new writer)."""
    from shmcast.broker import _segment

    removed.append("unlocked")

    def hold_up(entered: Any, go: Any) -> None:
        read_header = _segment.read_header

        def held_up(*args: Any, **kwargs: Any) -> Any:
            entered.set()  # opened, not locked yet: fork now
            go.wait(20)
            return read_header(*args, **kwargs)

        _segment.read_header = held_up  # type: ignore[assignment]

    _fork_beside_a_writer_opening("unlocked", hold_up)


_PROBE_AT_FORK_CHILD = """
import fcntl, os, signal, sys, threading
from shmcast.broker import Segment, WriterBusyError

signal.alarm(30)
reader = Segment.attach("probed")  # a process that only reads: no writer ever
entered, go = threading.Event(), threading.Event()
flock = fcntl.flock

def held_up(fd, op):
    flock(fd, op)
    if op == fcntl.LOCK_SH | fcntl.LOCK_NB:  # writer_alive()'s probe holds the lock
        entered.set()
        go.wait(20)

fcntl.flock = held_up
t = threading.Thread(target=reader.writer_alive)
t.start()
entered.wait(20)
hold_r, hold_w = os.pipe()
child = os.fork()
if child == 0:
    os.close(hold_w)
    os.read(hold_r, 1)  # lives until its parent says
    os._exit(0)
os.close(hold_r)
fcntl.flock = flock
go.set()
t.join(20)
try:
    with Segment.attach("probed", writable=True):
        print("writer taken")
except WriterBusyError as exc:
    print(exc)
finally:
    os.close(hold_w)
    os.waitpid(child, 0)
    reader.close()
"""


def test_a_child_forked_while_a_reader_probes_the_lease_keeps_no_writer_out(namespace, removed):
    """A process that only reads (no writer ever: the fork hook was not registered)
    forked while another of its threads was in writer_alive(), whose probe holds a
    shared flock for a moment: the child kept that lock, orphaned, for its whole life,
    and every new writer got WriterBusyError."""
    removed.append("probed")
    Segment.create("probed", "<f8", (4,)).close()
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE_AT_FORK_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "writer taken", proc.stdout


def test_a_forked_childs_own_descriptors_of_a_written_object_are_left_alone(namespace, removed):
    """The fork hook moved every descriptor of a writer's object to a new open file
    description, the application's own os.open of it too: in the child its offset
    read 0 (not 100), O_NONBLOCK was gone, and a seek no longer moved the parent's
    (POSIX: a forked child shares its descriptions). Only descriptors that hold the
    lease are moved; a reader handle's and the application's are not."""
    removed.append("own")
    with Segment.create("own", "<f8", (4,)) as seg:
        seg.write(np.full(4, 1.0))
        reader = Segment.attach("own")
        own = os.open(seg.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.read(own, 100)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child)
                try:
                    os.close(r)
                    out = [
                        os.lseek(own, 0, os.SEEK_CUR),
                        bool(fcntl.fcntl(own, fcntl.F_GETFL) & os.O_NONBLOCK),
                        reader.latest().array.tolist(),
                    ]
                    os.lseek(own, 7, os.SEEK_SET)  # the parent's offset moves too
                    os.write(w, json.dumps(out).encode())
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                out = json.loads(f.read() or b"[]")
            assert _reaped(pid, timeout=10) == 0
            assert out == [100, True, [1.0] * 4]
            assert os.lseek(own, 0, os.SEEK_CUR) == 7
        finally:
            os.close(own)
            reader.close()
        with pytest.raises(WriterBusyError), Segment.attach("own", writable=True):
            pass  # the lease is the parent's still
        assert seg.write(np.full(4, 2.0)) == 2


# ------------------------------------------------------------------------ (g) modes


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o777])
def test_objects_are_owner_only_by_default(namespace, removed, umask):
    removed.append("m")
    old = os.umask(umask)
    try:
        with Segment.create("m", "<f8", (8,)) as seg:
            assert _mode(seg.path) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o600, 0o400])
@pytest.mark.parametrize("umask", [0o000, 0o077, 0o777])
def test_mode_is_honoured_regardless_of_umask(namespace, removed, mode, umask):
    removed.append("m")
    old = os.umask(umask)
    try:
        with Segment.create("m", "<f8", (8,), mode=mode) as seg:
            assert _mode(seg.path) == mode
            assert seg.write(np.ones(8)) == 1
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "mode", [0o666, 0o660, 0o4600, 0o700, 0o000, 0o044, -1, 2**40, True], ids=repr
)
def test_a_mode_attach_would_refuse_is_refused_by_create(namespace, mode):
    """The broker's mode rule: read/write bits only, the owner's among them, nobody
    else may write. Before, create() made such objects (or raised OverflowError),
    and attach then refused the group- or world-writable ones."""
    with pytest.raises(ConfigError, match="'mode'"):
        Segment.create("m", "<f8", (8,), mode=mode)
    assert Segment.list(namespace) == []


def test_a_fifo_under_a_freed_name_blocks_no_probe_attach_nor_fork(namespace: str) -> None:
    """Anyone may put a FIFO in /dev/shm under a name that is free: a segment's that
    was deleted, a namespace word's. ``writer_alive()`` of a reader handle (its probe
    reopens the path), ``Segment.attach`` and the namespace word's attach opened it
    for reading and waited for a writer for ever; the probe did so under the lock
    every fork of the process takes, so a fork hung too. Now each opens without
    blocking and refuses what is not a regular file."""
    from shmcast.broker._names import catalog_path
    from shmcast.broker._nsword import NamespaceWord

    seg = Segment.create("fifo", "<f8", (4,))
    reader = Segment.attach("fifo")
    seg.close()
    os.unlink(reader.path)
    fifos = [reader.path, catalog_path(namespace)]
    for path in fifos:
        os.mkfifo(path, 0o600)
    said: list[object] = []

    def probe() -> None:
        said.append(reader.writer_alive())
        for attach in (lambda: Segment.attach("fifo"), lambda: NamespaceWord.attach(namespace)):
            try:
                attach()
            except NotASegmentError as exc:
                said.append(exc.reason)
        pid = os.fork()  # took the lock the probe held
        if pid == 0:  # pragma: no cover (the child)
            os._exit(0)
        said.append(os.waitpid(pid, 0)[1])

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    try:
        t.join(10)
        assert not t.is_alive(), f"blocked in an open of a FIFO (so far: {said})"
        assert said == [False, "not a regular file", "not a regular file", 0]
    finally:
        for _ in range(50):  # a blocked open of a FIFO returns once a writer opens it
            if not t.is_alive():
                break
            for path in fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            t.join(0.1)
        for path in fifos:
            os.unlink(path)
        reader.close()
