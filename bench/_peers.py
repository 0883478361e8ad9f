"""The peers shmcast is measured against that need setting up: iceoryx2 and redis-server.

Each peer is optional: ``*_missing()`` returns the reason it cannot run (printed and
recorded as a skip), or None.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from shmcast.broker.client import SHM_DIR

# ------------------------------------------------------------------------ iceoryx2


def iox_missing() -> str | None:
    try:
        import iceoryx2  # noqa: F401
    except ImportError as exc:
        return f"iceoryx2 is not installed (pip install 'shmcast[iceoryx]'): {exc}"
    return None


#: ``<prefix>:<root directory>`` of the run's iceoryx2 objects, set by the run for
#: itself and its children: iceoryx2 keeps a global management object in /dev/shm
#: and a directory under /tmp after its nodes are gone, so the suite gives its own
#: nodes a prefix and a root of their own and removes both when the run ends.
IOX_ENV = "SHMCAST_BENCH_IOX"


def iox_node() -> Any:
    import iceoryx2 as iox2

    iox2.set_log_level(iox2.LogLevel.Error)
    builder = iox2.NodeBuilder.new()
    prefix, _, root = os.environ.get(IOX_ENV, "").partition(":")
    if prefix and root:
        config = iox2.config.default()
        config.global_cfg.prefix = iox2.FileName.new(prefix)
        config.global_cfg.root_path = iox2.Path.new(root.rstrip("/") + "/")
        builder = builder.config(config)
    return builder.signal_handling_mode(iox2.SignalHandlingMode.Disabled).create(
        iox2.ServiceType.Ipc
    )


@contextlib.contextmanager
def iox_objects(run_id: str, tmpdir: str) -> Iterator[None]:
    """Give the run's iceoryx2 nodes (this process's and its children's) a prefix
    and a root directory of their own, and remove what they leave in /dev/shm."""
    prefix = f"iox2{run_id}_"
    old = os.environ.get(IOX_ENV)
    os.environ[IOX_ENV] = f"{prefix}:{os.path.join(tmpdir, 'iceoryx2')}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(IOX_ENV, None)
        else:
            os.environ[IOX_ENV] = old
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(SHM_DIR):
                if entry.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(SHM_DIR, entry))


def iox_pubsub(node: Any, name: str, *, buffer: int = 2, subscribers: int = 8) -> Any:
    """A publish-subscribe service of byte slices (open or create)."""
    import iceoryx2 as iox2

    return (
        node.service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .subscriber_max_buffer_size(buffer)
        .max_subscribers(subscribers)
        .enable_safe_overflow(True)
        .open_or_create()
    )


def iox_event(node: Any, name: str) -> Any:
    import iceoryx2 as iox2

    return node.service_builder(iox2.ServiceName.new(name)).event().open_or_create()


def iox_publisher(service: Any, max_len: int) -> Any:
    return service.publisher_builder().initial_max_slice_len(max_len).create()


def iox_send_stamp(pub: Any, nbytes: int, t: int, flag: int) -> None:
    """Loan a sample, write (t, flag) into its first two u64 words, send it."""
    smp = pub.loan_slice_uninit(nbytes)
    words = (ctypes.c_uint64 * 2).from_address(smp.payload_ptr)
    words[0] = t
    words[1] = flag
    smp.assume_init().send()


def iox_read_stamp(sample: Any) -> tuple[int, int]:
    words = (ctypes.c_uint64 * 2).from_address(sample.payload_ptr)
    return int(words[0]), int(words[1])


def iox_duration(seconds: float) -> Any:
    import iceoryx2 as iox2

    return iox2.Duration.from_micros(int(seconds * 1e6))


def iox_service_name(namespace: str, what: str) -> str:
    return f"shmcast-bench/{namespace}/{what}"


# --------------------------------------------------------------------------- redis


def redis_missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make system-deps, or apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        return f"the redis client is not installed (pip install 'shmcast[bench]'): {exc}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(timeout: float = 10.0) -> Iterator[int]:
    """Start a throwaway redis-server on a loopback port (no persistence); yield the port."""
    import redis

    port = _free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=port)
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{out[-2000:]}")
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {port}") from None
                time.sleep(0.01)
        client.close()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
