"""shmcast's reading side: :class:`Subscriber`, the analytics worker, the recorder, metrics."""

from ._metrics import RecorderCollector as RecorderCollector
from ._metrics import SubscriberCollector as SubscriberCollector
from ._metrics import serve_metrics as serve_metrics
from ._metrics import serve_recorder_metrics as serve_recorder_metrics
from ._recorder import Recorded as Recorded
from ._recorder import Recorder as Recorder
from ._recorder import RecorderStats as RecorderStats
from ._stats import LATENCY_BUCKETS as LATENCY_BUCKETS
from ._stats import SegmentStats as SegmentStats
from ._stats import Update as Update
from ._subscriber import Subscriber as Subscriber
from ._subscriber import WaitMode as WaitMode
from ._worker import analyse as analyse
from ._worker import run_worker as run_worker

__all__ = [
    "LATENCY_BUCKETS",
    "Recorded",
    "Recorder",
    "RecorderCollector",
    "RecorderStats",
    "SegmentStats",
    "Subscriber",
    "SubscriberCollector",
    "Update",
    "WaitMode",
    "analyse",
    "run_worker",
    "serve_metrics",
    "serve_recorder_metrics",
]
