"""Resource exhaustion: a /dev/shm too small (a 64 MB tmpfs in a mount namespace),
and a bounded soak of hundreds of segments and many subscribers (fds, RSS)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from shmcast.broker import Segment
from shmcast.broker.client import ControlClient, Endpoints
from shmcast.cli.testing import BROKER_READY, ShmcastProcess, start, wait_for
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber

SMALL_SHM_CHILD = """
    import json, sys, threading
    import numpy as np
    from shmcast.broker import Broker, BrokerConfig
    from shmcast.broker.errors import ShmSpaceError
    from shmcast.publisher import Publisher
    from shmcast.subscriber import Subscriber

    ns = sys.argv[1]
    broker = Broker(BrokerConfig(namespace=ns))
    thread = threading.Thread(target=broker.run)
    thread.start()
    out = {}
    try:
        assert broker.wait_ready(10)
        data = np.arange(1024 * 1024, dtype="f8")  # 8 MiB, fits
        with Publisher("kept", dtype="f8", shape=data.shape, namespace=ns) as pub:
            pub.publish(data)
            try:
                Publisher("big", dtype="u1", shape=(100 * 2**20,), namespace=ns)
            except ShmSpaceError as exc:
                out["error"] = type(exc).__name__
                out["message"] = str(exc)
                out["needed"], out["free"] = exc.needed, exc.free
            with Subscriber("kept", namespace=ns, timeout=5) as sub:
                snap = sub.latest("kept")
                out["kept_version"] = snap.version
                out["kept_intact"] = bool((snap.array == data).all())
                out["listed"] = [s["name"] for s in sub._client.request("list")["segments"]]
    finally:
        broker.stop()
        thread.join(30)
    print("RESULT " + json.dumps(out), flush=True)
"""


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a mount namespace"
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    rc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        timeout=10,
    ).returncode
    return None if rc == 0 else "unshare --mount is not permitted here (container?)"


@pytest.mark.root
def test_shm_too_small(namespace: str) -> None:
    """Docker's default 64 MB /dev/shm: a 100 MB segment fails clearly, the rest serves."""
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    script = (
        f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} -c "
        f"'{textwrap.dedent(SMALL_SHM_CHILD)}' {namespace}"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sp = ShmcastProcess(["unshare"], proc)
    try:
        line = sp.wait_line("RESULT ", 60)
        assert sp.wait(30) == 0, sp.stderr
    finally:
        sp.stop(timeout=5)
    out = json.loads(line[len("RESULT ") :])
    print("FIGURES shm_too_small " + json.dumps(out))
    assert out["error"] == "ShmSpaceError"
    assert out["needed"] >= 200 * 2**20  # two slots of 100 MiB
    assert out["free"] < 64 * 2**20
    for words in ("200.0 MiB", "free", "--shm-size"):
        assert words in out["message"]
    assert out["kept_version"] == 1
    assert out["kept_intact"] is True
    assert out["listed"] == ["kept"]  # no half-made "big"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _round(ctl: ControlClient, names: list[str], subscribers: int) -> None:
    """Create, publish, read and delete ``names`` with ``subscribers`` subscribers."""
    subs: list[Subscriber] = []
    try:
        for n in names:
            ctl.request("create", name=n, dtype="<f4", shape=[256], slots=2)
        for k in range(subscribers):
            subs.append(Subscriber(names[k % len(names)], timeout=5))
        for n in names[:20]:
            with Publisher(n, timeout=5) as pub:
                pub.publish(np.full(256, 1.0, dtype="f4"))
        for sub in subs[:10]:
            wait_for(lambda s=sub: s.latest(s.names[0]).version == 1, 5, what="a read")
    finally:
        for sub in subs:
            sub.close()
    for n in names:
        ctl.request("delete", name=n)


@pytest.fixture
def broker_proc(namespace: str) -> Iterator[ShmcastProcess]:
    sp = start(["broker"], ready=BROKER_READY)
    try:
        yield sp
    finally:
        sp.stop()


def _soak(
    broker: ShmcastProcess, namespace: str, rounds: int, per_round: int, subs: int
) -> dict[str, Any]:
    with ControlClient(Endpoints.default(namespace).control, timeout=10) as ctl:
        _round(ctl, [f"warm{i}" for i in range(per_round)], subs)  # allocator warm-up
        fds0, rss0 = _fds(broker.pid), _rss(broker.pid)
        for r in range(rounds):
            _round(ctl, [f"r{r}s{i}" for i in range(per_round)], subs)
        # Closed connections are reaped by the broker's I/O thread: poll, then compare.
        wait_for(lambda: _fds(broker.pid) <= fds0 + 4, 10, what="the broker's fds to settle")
        fds1, rss1 = _fds(broker.pid), _rss(broker.pid)
        assert ctl.request("list")["segments"] == []
    figures = {
        "segments_created_and_deleted": rounds * per_round,
        "subscribers_per_round": subs,
        "fds_before": fds0,
        "fds_after": fds1,
        "rss_before_mib": round(rss0 / 2**20, 1),
        "rss_after_mib": round(rss1 / 2**20, 1),
    }
    print("FIGURES soak " + json.dumps(figures))
    assert fds1 <= fds0 + 4, figures
    assert rss1 - rss0 < 8 * 2**20, figures
    return figures


def test_soak_segments_and_subscribers(namespace: str, broker_proc: ShmcastProcess) -> None:
    """300 segments created and deleted, 50 subscribers a round: no fd or memory growth."""
    _soak(broker_proc, namespace, rounds=3, per_round=100, subs=50)


@pytest.mark.slow
def test_soak_long(
    namespace: str, broker_proc: ShmcastProcess, request: pytest.FixtureRequest
) -> None:
    """The same for 3000 segments and 200 subscribers a round (`make soak`)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long soak: run with `make soak` (-m slow)")
    _soak(broker_proc, namespace, rounds=15, per_round=200, subs=200)


OUT_OF_FDS_CHILD = """
    import errno, json, resource, sys
    from shmcast.broker.errors import OutOfDescriptorsError, ShmcastError
    from shmcast.subscriber import Recorder, Subscriber

    ns, output, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    out = {}
    for kind, make in (
        ("subscriber", lambda: Subscriber(names, namespace=ns, wait="futex", timeout=1)),
        ("recorder", lambda: Recorder(names, output, format="parquet", namespace=ns)),
    ):
        try:
            make().close()
        except OSError as exc:
            out[kind] = {
                "type": type(exc).__name__,
                "errno": exc.errno,
                "shmcast_error": isinstance(exc, ShmcastError),
                "open_fds": getattr(exc, "open_fds", None),
                "message": str(exc),
            }
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_subscriber_or_recorder_out_of_descriptors_names_the_limit(
    namespace: str, tmp_path: Any
) -> None:
    """More segments than the open-files limit (40) holds: ``Subscriber`` and
    ``Recorder`` raise ``OutOfDescriptorsError``, an ``OSError`` still of errno
    ``EMFILE`` (no ``ShmcastError``: the broker and the doctor tell it from a damaged
    segment by its kind) naming ``RLIMIT_NOFILE``, ``ulimit -n`` and the descriptors
    open. Before, both raised the bare "[Errno 24] Too many open files"."""
    names = [f"s{i:02d}" for i in range(60)]
    for name in names:
        Segment.create(name, "u1", (8,), namespace=namespace).close()
    try:
        output = str(tmp_path / "rec")
        argv = [sys.executable, "-c", textwrap.dedent(OUT_OF_FDS_CHILD), namespace, output]
        r = subprocess.run(argv + names, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
        out = json.loads(line[len("RESULT ") :])
        assert not os.listdir(tmp_path)  # no recording file made
    finally:
        for name in names:
            Segment.remove(name, namespace=namespace)
    assert set(out) == {"subscriber", "recorder"}, out
    for err in out.values():
        assert err["type"] == "OutOfDescriptorsError", err
        assert err["errno"] == errno.EMFILE
        assert not err["shmcast_error"]
        assert "RLIMIT_NOFILE" in err["message"]
        assert "open-files limit is 40" in err["message"]
        assert "ulimit -n" in err["message"]
        assert f"{err['open_fds']} descriptors open" in err["message"]


MANY_SOCKETS_CHILD = """
    import json, os, resource, sys
    import zmq
    from shmcast.broker.client import ControlClient

    soft = int(sys.argv[2])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    clients, out = [], {}
    try:
        # Each holds three sockets while no reply came (its DEALER, the monitor's two).
        for _ in range(400):
            clients.append(ControlClient(sys.argv[1], timeout=1))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["opened"] = len(clients)
    out["max_sockets"] = clients[0]._sock.context.get(zmq.MAX_SOCKETS) if clients else None
    for c in clients:
        c.close()
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_process_opens_as_many_shmcast_sockets_as_its_open_files_limit_allows(
    tmp_path: Any,
) -> None:
    """ZeroMQ caps a context at 1023 sockets (``ZMQ_MAX_SOCKETS``), whatever ``ulimit
    -n``: on ``zmq.Context.instance()``, 340 ``ControlClient`` objects waiting for a
    reply (or about 510 ``Subscriber`` objects of ``wait="events"``) ended a process
    with ZeroMQ's bare "Too many open files". shmcast's own context takes the
    open-files limit (2048 here) as its cap."""
    import resource

    soft = 2048
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < soft:
        pytest.skip(f"the hard open-files limit is below {soft}")
    endpoint = f"ipc://{tmp_path}/nobody.sock"  # nobody answers: each monitor stays
    argv = [sys.executable, "-c", textwrap.dedent(MANY_SOCKETS_CHILD), endpoint, str(soft)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out == {"opened": 400, "max_sockets": soft}, out


def test_a_context_out_of_sockets_is_an_error_naming_the_cap_and_the_fix(
    tmp_path: Any,
) -> None:
    """Where a context's cap is still met (here one of 10 sockets given by the
    caller), the error names it, the sockets shmcast opened and the fix: the
    caller's context's own cap (``ulimit -n`` does not raise it, nor does sharing a
    Subscriber, which has no ``context=``; both were the fix named before), or
    shmcast's context: an ``OSError`` of errno ``EMFILE``. Before, ZeroMQ's bare
    ``ZMQError: Too many open files``; and a client whose monitor could not be made
    left its socket open."""
    import zmq

    from shmcast.broker import _context
    from shmcast.broker.errors import OutOfDescriptorsError

    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 10)
    clients: list[ControlClient] = []
    try:
        err: OutOfDescriptorsError | None = None
        for _ in range(10):
            try:
                clients.append(ControlClient(f"ipc://{tmp_path}/x.sock", context=ctx))
            except OutOfDescriptorsError as exc:
                err = exc
                break
        assert err is not None, f"{len(clients)} clients in a context of 10 sockets"
        assert err.errno == errno.EMFILE
        assert err.max_sockets == 10
        opened = err.sockets
        assert opened is not None
        assert len(clients) <= opened <= 10, opened
        text = str(err)
        assert "out of ZeroMQ sockets opening a control connection to ipc://" in text
        assert "ZMQ_MAX_SOCKETS 10" in text
        assert f"{opened} of them opened by shmcast" in text
        assert "the context given (context=) is not shmcast's" in text
        assert "ctx.set(zmq.MAX_SOCKETS, n)" in text
        assert "Subscriber([name, ...])" not in text
        assert "ulimit -n" not in text
        # shmcast's own context met its cap: share a Subscriber, or raise ulimit -n
        # before its first socket (the cap is read then).
        own = str(_context._out_of_sockets(_context.context(), errno.EMFILE, "a socket"))
        assert "Subscriber([name, ...])" in own
        assert "ulimit -n" in own
        assert "before the process's first shmcast socket" in own
        assert "context=" not in own
    finally:
        for c in clients:
            c.close()
        ctx.destroy(0)


OUT_OF_FDS_AT_THE_FILE_CHILD = """
    import contextlib, io, json, os, resource, sys
    import h5py, pyarrow.parquet  # imported before the limit: imports open files too
    from shmcast.cli import main
    from shmcast.subscriber import Recorder

    ns, out_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


    def library(fmt, output):
        Recorder(names, output, format=fmt, namespace=ns, wait="futex", timeout=1).close()


    def command(fmt, output):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            argv = ["record", *names, "-o", output, "--format", fmt, "-n", ns, "--duration", "0.01"]
            code = main(argv)
        if code != 0:
            raise RuntimeError(err.getvalue())


    out = {}
    for kind, fmt, make in (
        ("hdf5", "hdf5", library),
        ("parquet", "parquet", library),
        ("command", "hdf5", command),
    ):
        failures = []
        for free in range(64):  # descriptors left free: every step of the start runs out
            output = os.path.join(out_dir, f"{kind}{free}")
            held = []
            with contextlib.suppress(OSError):
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            for fd in held[:free]:
                os.close(fd)
            try:
                make(fmt, output)
            except Exception as exc:
                failures.append({
                    "type": type(exc).__name__,
                    "errno": getattr(exc, "errno", None),
                    "message": str(exc),
                    "output": output,
                })
            else:
                break
            finally:
                for fd in held[free:]:
                    os.close(fd)
            left = [f for f in os.listdir(out_dir) if f.startswith(f"{kind}{free}")]
            failures[-1]["left"] = sorted(left)
        out[kind] = failures
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_recorder_out_of_descriptors_at_its_file_names_the_limit(
    namespace: str, tmp_path: Any
) -> None:
    """A recorder whose process runs out of descriptors opening its output file
    (shmcast's own open and lock of it, HDF5's open, Arrow's): the same
    ``OutOfDescriptorsError`` as a segment's attach, naming the file, the limit and
    the fix, and no file left; ``shmcast record`` prints it. Tried with 0, 1, 2...
    descriptors free until the recorder starts, so each open runs out once. Before,
    a ``RecordingError`` said "cannot create ...: Too many open files" (HDF5: its own
    long message), and Arrow's bare ``OSError`` came out."""
    names = ["r0", "r1"]
    for name in names:
        Segment.create(name, [("x", "<f8")], (4,), namespace=namespace).close()
    try:
        argv = [sys.executable, "-c", textwrap.dedent(OUT_OF_FDS_AT_THE_FILE_CHILD), namespace]
        r = subprocess.run(
            [*argv, str(tmp_path), *names], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr[-2000:]
        line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
        out = json.loads(line[len("RESULT ") :])
    finally:
        for name in names:
            Segment.remove(name, namespace=namespace)
    assert set(out) == {"hdf5", "parquet", "command"}, out
    for kind, failures in out.items():
        at_file = [f for f in failures if "the recording file" in f["message"]]
        assert at_file, (kind, failures)  # the last one before it started, at least
        for f in failures:
            assert f["left"] == [], f  # nothing made is left behind
            if kind == "command":
                assert "out of file descriptors opening" in f["message"], f
                continue
            assert f["type"] == "OutOfDescriptorsError", f
            assert f["errno"] == errno.EMFILE
        for f in at_file:
            assert os.path.basename(f["output"]) in f["message"]
            assert "open-files limit is 64" in f["message"], f
            assert "ulimit -n" in f["message"]


BROKER_OUT_OF_FDS_CHILD = """
    import contextlib, json, os, resource, sys
    import zmq
    from shmcast.broker import Broker, BrokerConfig
    from shmcast.broker._context import context
    from shmcast.broker._events import bind_endpoint
    from shmcast.broker._names import SHM_DIR, list_segment_names, runtime_dir
    from shmcast.broker._nsword import NamespaceWord

    ns, tmp = sys.argv[1], sys.argv[2]


    def fds():
        return len(os.listdir("/proc/self/fd"))


    def left():
        rdir = runtime_dir(ns)
        return {
            "shm": sorted(e for e in os.listdir(SHM_DIR) if e.startswith(f"shmcast.{ns}.")),
            "run": sorted(os.listdir(rdir)) if rdir.exists() else None,
        }


    @contextlib.contextmanager
    def free(n):  # all descriptors taken but n
        held = []
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        for fd in held[:n]:
            os.close(fd)
        try:
            yield
        finally:
            for fd in held[n:]:
                os.close(fd)


    def failure(step):
        try:
            step()
        except Exception as exc:
            return {
                "type": type(exc).__name__,
                "errno": getattr(exc, "errno", None),
                "message": str(exc),
            }
        return None


    # A first start and stop at the full limit: ZeroMQ's threads (which abort the
    # process when they run out) are up before any start runs out.
    Broker(BrokerConfig(namespace=ns)).start(timeout=10).close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    out = {"steps": {}, "starts": [], "started": False}
    # The steps that raised the bare OSError, each out of descriptors on its own.
    before = fds()
    for n in (0, 1):  # the word's open; its mmap's dup()
        with free(n):
            f = failure(lambda: NamespaceWord.serve(ns, epoch=1, interval=1.0).close())
        out["steps"][f"word{n}"] = f
    with free(0):
        out["steps"]["list"] = failure(lambda: list_segment_names(ns))
    sock = context().socket(zmq.ROUTER)
    with free(0):
        out["steps"]["bind"] = failure(
            lambda: bind_endpoint(sock, "control", f"ipc://{tmp}/c.sock", group=None, shared=False)
        )
    sock.close(0)
    out["steps_left"] = left()
    out["fds_after_word"] = fds() - before
    # A whole start with 0, 1, 2... descriptors free until it starts: every step runs
    # out (or, where ZeroMQ closes or keeps a descriptor in its own threads, most).
    for n in range(64):
        with free(n):
            f = failure(lambda: Broker(BrokerConfig(namespace=ns)).start(timeout=10).close())
        if f is None:
            out["started"] = True
            break
        f["left"] = left()
        out["starts"].append(f)
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_broker_started_out_of_descriptors_names_the_limit_and_leaves_nothing(
    namespace: str, tmp_path: Any
) -> None:
    """``Broker.start()`` out of descriptors at each of its steps raises
    ``OutOfDescriptorsError`` (an ``OSError`` of errno ``EMFILE``) naming the limit and
    the fix, and leaves nothing: no lock, socket file or runtime directory, nothing in
    /dev/shm. Before, at an open-files limit of 15 to 17, the namespace word's open
    and mmap and the look at /dev/shm raised the bare "[Errno 24] Too many open
    files"; at 11, 12 and 14 a bind raised an ``EndpointError`` whose fix was "pick
    another address or port"; at the lock's open, the bare error too, and the
    runtime directory made for it stayed."""
    argv = [
        sys.executable,
        "-c",
        textwrap.dedent(BROKER_OUT_OF_FDS_CHILD),
        namespace,
        str(tmp_path),
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    steps = out["steps"]
    assert set(steps) == {"word0", "word1", "list", "bind"}, out
    assert "the namespace word of" in steps["word0"]["message"]
    assert "the namespace word of" in steps["word1"]["message"]
    assert "/dev/shm to list it" in steps["list"]["message"]
    assert f"the control endpoint ipc://{tmp_path}/c.sock" in steps["bind"]["message"]
    assert out["steps_left"] == {"shm": [], "run": None}
    assert out["fds_after_word"] == 0  # the word's descriptor, its mmap failed, closed
    assert out["started"], out
    assert "the lock of namespace" in out["starts"][0]["message"]
    for f in [*steps.values(), *out["starts"]]:
        assert f["type"] == "OutOfDescriptorsError", f
        assert f["errno"] == errno.EMFILE, f
        assert "open-files limit is 64" in f["message"], f
        assert "ulimit -n" in f["message"], f
        assert f.get("left", {"shm": [], "run": None}) == {"shm": [], "run": None}, f


def test_a_socket_out_of_descriptors_names_a_fix_that_applies_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of file descriptors (not of the context's sockets) opening a socket: a
    raised open-files limit counts at once, so the fix is not said to need doing
    before the process's first shmcast socket, as it was (that is only the cap)."""
    from shmcast.broker import _context, errors

    monkeypatch.setattr(errors, "_open_descriptors", lambda limit: limit)  # all taken
    text = str(_context._out_of_sockets(_context.context(), errno.EMFILE, "a socket"))
    assert text.startswith("out of file descriptors opening a socket"), text
    assert "ulimit -n" in text
    assert "Subscriber([name, ...])" in text
    assert "before the process's first shmcast socket" not in text


def test_shmcast_broker_under_a_low_soft_open_files_limit_survives_many_connections(
    namespace: str,
) -> None:
    """libzmq aborts a process whose ipc listener runs out of descriptors ("Too many
    open files (src/ipc_listener.cpp:297)"): a ``shmcast broker`` under a soft limit
    of 64 died of SIGABRT at about the 60th connection to its read-only endpoint
    (under a soft 1024: about 500 ``events`` subscribers). It raises its soft limit
    to the hard one at start: 100 connections, and it still answers."""
    import zmq

    argv = [sys.executable, "-m", "shmcast.cli", "broker", "-n", namespace]
    proc = subprocess.Popen(
        ["sh", "-c", 'ulimit -Sn 64 && exec "$@"', "sh", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    broker = ShmcastProcess(["broker", "-n", namespace], proc)
    try:
        ready = json.loads(broker.wait_line(BROKER_READY, 20)[len(BROKER_READY) :])
        ctx: zmq.Context[Any] = zmq.Context()
        socks: list[zmq.Socket[Any]] = []
        try:
            for _ in range(100):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(ready["control_ro"])
                socks.append(sock)
            with ControlClient(ready["control_ro"], timeout=5) as client:
                assert client.request("hello")["namespace"] == namespace
        finally:
            for sock in socks:
                sock.close()
            ctx.term()
        assert proc.poll() is None, broker.stderr[-5:]
    finally:
        rc = broker.stop()
    assert rc == 0, broker.stderr[-5:]
