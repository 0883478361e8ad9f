"""shmcast's data server: the segment format and engine, the broker service, the wire protocol.

Its public names are the only door into it: :mod:`shmcast.publisher`,
:mod:`shmcast.subscriber` and the command line use these, :mod:`.client` (the
control client, endpoints and namespaces) and :mod:`.errors`, never a private module.
"""

from ._auth import CurveKeys as CurveKeys
from ._auth import curve_keypair as curve_keypair
from ._auth import curve_public as curve_public
from ._auth import is_z85_key as is_z85_key
from ._broker import Broker as Broker
from ._catalog import Catalog as Catalog
from ._catalog import CatalogEntry as CatalogEntry
from ._closing import Closing as Closing
from ._config import BrokerConfig as BrokerConfig
from ._config import SegmentSpec as SegmentSpec
from ._config import resolve_config as resolve_config
from ._config import resolve_layers as resolve_layers
from ._doctor import OK as OK
from ._doctor import PROBLEM as PROBLEM
from ._doctor import WARN as WARN
from ._doctor import Check as Check
from ._doctor import diagnose as diagnose
from ._layout import LAYOUT_VERSION as LAYOUT_VERSION
from ._layout import MAX_SLOTS as MAX_SLOTS
from ._layout import dtype_str as dtype_str
from ._layout import normalize_layout as normalize_layout
from ._layout import parse_dtype as parse_dtype
from ._layout import segment_size as segment_size
from ._metrics import BrokerStats as BrokerStats
from ._metrics import MetricsServer as MetricsServer
from ._metrics import start_metrics_server as start_metrics_server
from ._names import DEFAULT_NAMESPACE as DEFAULT_NAMESPACE
from ._names import resolve_namespace as resolve_namespace
from ._nsword import NamespaceWord as NamespaceWord
from ._nsword import notify_words as notify_words
from ._nsword import wait_segments as wait_segments
from ._nsword import wait_words as wait_words
from ._segment import BytesLike as BytesLike
from ._segment import Segment as Segment
from ._segment import SegmentInfo as SegmentInfo
from ._segment import Snapshot as Snapshot
from ._segment import engine_core as engine_core
from ._segment import machine_supported as machine_supported
from ._segment import wait_any as wait_any
from ._service import Service as Service
from .errors import AccessError as AccessError
from .errors import ArrayMismatchError as ArrayMismatchError
from .errors import BrokerError as BrokerError
from .errors import BrokerHandshakeError as BrokerHandshakeError
from .errors import BrokerRunningError as BrokerRunningError
from .errors import BrokerUnavailableError as BrokerUnavailableError
from .errors import ClosedError as ClosedError
from .errors import ConfigError as ConfigError
from .errors import EndpointError as EndpointError
from .errors import ForbiddenError as ForbiddenError
from .errors import InvalidNameError as InvalidNameError
from .errors import LayoutConflictError as LayoutConflictError
from .errors import LayoutError as LayoutError
from .errors import LayoutVersionError as LayoutVersionError
from .errors import MissingExtraError as MissingExtraError
from .errors import NamespaceMismatchError as NamespaceMismatchError
from .errors import NotARecordingError as NotARecordingError
from .errors import NotASegmentError as NotASegmentError
from .errors import NoVersionError as NoVersionError
from .errors import OutOfDescriptorsError as OutOfDescriptorsError
from .errors import OwnershipError as OwnershipError
from .errors import ReadOnlyError as ReadOnlyError
from .errors import RecordingError as RecordingError
from .errors import RecordingExistsError as RecordingExistsError
from .errors import RecordingSpaceError as RecordingSpaceError
from .errors import RemoteError as RemoteError
from .errors import SegmentError as SegmentError
from .errors import SegmentExistsError as SegmentExistsError
from .errors import SegmentNotFoundError as SegmentNotFoundError
from .errors import SegmentUnreachableError as SegmentUnreachableError
from .errors import ShmcastError as ShmcastError
from .errors import ShmSpaceError as ShmSpaceError
from .errors import SlotStuckError as SlotStuckError
from .errors import TornReadError as TornReadError
from .errors import VersionUnavailableError as VersionUnavailableError
from .errors import WriterBusyError as WriterBusyError

__all__ = [
    "DEFAULT_NAMESPACE",
    "LAYOUT_VERSION",
    "MAX_SLOTS",
    "OK",
    "PROBLEM",
    "WARN",
    "AccessError",
    "ArrayMismatchError",
    "Broker",
    "BrokerConfig",
    "BrokerError",
    "BrokerHandshakeError",
    "BrokerRunningError",
    "BrokerStats",
    "BrokerUnavailableError",
    "BytesLike",
    "Catalog",
    "CatalogEntry",
    "Check",
    "ClosedError",
    "Closing",
    "ConfigError",
    "CurveKeys",
    "EndpointError",
    "ForbiddenError",
    "InvalidNameError",
    "LayoutConflictError",
    "LayoutError",
    "LayoutVersionError",
    "MetricsServer",
    "MissingExtraError",
    "NamespaceMismatchError",
    "NamespaceWord",
    "NoVersionError",
    "NotARecordingError",
    "NotASegmentError",
    "OutOfDescriptorsError",
    "OwnershipError",
    "ReadOnlyError",
    "RecordingError",
    "RecordingExistsError",
    "RecordingSpaceError",
    "RemoteError",
    "Segment",
    "SegmentError",
    "SegmentExistsError",
    "SegmentInfo",
    "SegmentNotFoundError",
    "SegmentSpec",
    "SegmentUnreachableError",
    "Service",
    "ShmSpaceError",
    "ShmcastError",
    "SlotStuckError",
    "Snapshot",
    "TornReadError",
    "VersionUnavailableError",
    "WriterBusyError",
    "curve_keypair",
    "curve_public",
    "diagnose",
    "dtype_str",
    "engine_core",
    "is_z85_key",
    "machine_supported",
    "normalize_layout",
    "notify_words",
    "parse_dtype",
    "resolve_config",
    "resolve_layers",
    "resolve_namespace",
    "segment_size",
    "start_metrics_server",
    "wait_any",
    "wait_segments",
    "wait_words",
]
