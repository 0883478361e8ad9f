"""shmcast's data server: the segment format and engine, the broker, the wire protocol."""

from ._auth import curve_keypair as curve_keypair
from ._broker import Broker as Broker
from ._config import BrokerConfig as BrokerConfig
from ._config import SegmentSpec as SegmentSpec
from ._names import DEFAULT_NAMESPACE as DEFAULT_NAMESPACE
from ._names import resolve_namespace as resolve_namespace
from ._segment import LAYOUT_VERSION as LAYOUT_VERSION
from ._segment import Segment as Segment
from ._segment import SegmentInfo as SegmentInfo
from ._segment import Snapshot as Snapshot
from ._segment import segment_size as segment_size
from .errors import ArrayMismatchError as ArrayMismatchError
from .errors import BrokerError as BrokerError
from .errors import BrokerRunningError as BrokerRunningError
from .errors import BrokerUnavailableError as BrokerUnavailableError
from .errors import ClosedError as ClosedError
from .errors import ConfigError as ConfigError
from .errors import InvalidNameError as InvalidNameError
from .errors import LayoutConflictError as LayoutConflictError
from .errors import LayoutError as LayoutError
from .errors import LayoutVersionError as LayoutVersionError
from .errors import NotASegmentError as NotASegmentError
from .errors import NoVersionError as NoVersionError
from .errors import ReadOnlyError as ReadOnlyError
from .errors import RemoteError as RemoteError
from .errors import SegmentError as SegmentError
from .errors import SegmentExistsError as SegmentExistsError
from .errors import SegmentNotFoundError as SegmentNotFoundError
from .errors import ShmcastError as ShmcastError
from .errors import ShmSpaceError as ShmSpaceError
from .errors import TornReadError as TornReadError
from .errors import VersionUnavailableError as VersionUnavailableError
from .errors import WriterBusyError as WriterBusyError

__all__ = [
    "DEFAULT_NAMESPACE",
    "LAYOUT_VERSION",
    "ArrayMismatchError",
    "Broker",
    "BrokerConfig",
    "BrokerError",
    "BrokerRunningError",
    "BrokerUnavailableError",
    "ClosedError",
    "ConfigError",
    "InvalidNameError",
    "LayoutConflictError",
    "LayoutError",
    "LayoutVersionError",
    "NoVersionError",
    "NotASegmentError",
    "ReadOnlyError",
    "RemoteError",
    "Segment",
    "SegmentError",
    "SegmentExistsError",
    "SegmentInfo",
    "SegmentNotFoundError",
    "SegmentSpec",
    "ShmSpaceError",
    "ShmcastError",
    "Snapshot",
    "TornReadError",
    "VersionUnavailableError",
    "WriterBusyError",
    "curve_keypair",
    "resolve_namespace",
    "segment_size",
]
