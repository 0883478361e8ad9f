"""Test helpers: run shmcast commands as real processes, unique namespaces, polling waits."""

from ._process import BROKER_READY as BROKER_READY
from ._process import PUBLISH_READY as PUBLISH_READY
from ._process import SUBSCRIBE_READY as SUBSCRIBE_READY
from ._process import ShmcastProcess as ShmcastProcess
from ._process import running as running
from ._process import start as start
from ._process import unique_namespace as unique_namespace
from ._process import wait_for as wait_for

__all__ = [
    "BROKER_READY",
    "PUBLISH_READY",
    "SUBSCRIBE_READY",
    "ShmcastProcess",
    "running",
    "start",
    "unique_namespace",
    "wait_for",
]
