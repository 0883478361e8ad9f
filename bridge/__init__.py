"""shmcast beyond one host on a routing engine: the Zenoh bridge and its wire format.

Needs the ``zenoh`` extra (``pip install 'shmcast[zenoh]'``) to run; importing
this package does not.
"""

from ._wire import KEY_ROOT as KEY_ROOT
from ._wire import AttachmentTemplate as AttachmentTemplate
from ._wire import Frame as Frame
from ._wire import decode_attachment as decode_attachment
from ._wire import encode_attachment as encode_attachment
from ._wire import key_of as key_of
from ._wire import parse_key as parse_key
from ._zenoh import BridgeCollector as BridgeCollector
from ._zenoh import BridgeConfig as BridgeConfig
from ._zenoh import BridgeStats as BridgeStats
from ._zenoh import ZenohBridge as ZenohBridge
from ._zenoh import resolve_bridge_config as resolve_bridge_config

__all__ = [
    "KEY_ROOT",
    "AttachmentTemplate",
    "BridgeCollector",
    "BridgeConfig",
    "BridgeStats",
    "Frame",
    "ZenohBridge",
    "decode_attachment",
    "encode_attachment",
    "key_of",
    "parse_key",
    "resolve_bridge_config",
]
