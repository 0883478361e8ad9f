"""Test helpers: run shmcast commands as real processes, unique namespaces, polling waits."""

from ._cmd_broker import READY as BROKER_READY
from ._cmd_publish import READY as PUBLISH_READY
from ._cmd_record import DONE as RECORD_DONE
from ._cmd_record import READY as RECORD_READY
from ._cmd_replay import DONE as REPLAY_DONE
from ._cmd_replay import READY as REPLAY_READY
from ._cmd_subscribe import READY as SUBSCRIBE_READY
from ._process import ShmcastProcess as ShmcastProcess
from ._process import issued_namespaces as issued_namespaces
from ._process import running as running
from ._process import start as start
from ._process import unique_namespace as unique_namespace
from ._process import wait_for as wait_for

__all__ = [
    "BROKER_READY",
    "PUBLISH_READY",
    "RECORD_DONE",
    "RECORD_READY",
    "REPLAY_DONE",
    "REPLAY_READY",
    "SUBSCRIBE_READY",
    "ShmcastProcess",
    "issued_namespaces",
    "running",
    "start",
    "unique_namespace",
    "wait_for",
]
