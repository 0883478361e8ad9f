"""shmcast's writing side: :class:`Publisher`, the synthetic feeds, the relay and replay
(and :class:`LocalBroker`, which makes the mirrors of the relay and of the bridge)."""

from ._feeds import TICK_DTYPE as TICK_DTYPE
from ._feeds import Feed as Feed
from ._feeds import make_feed as make_feed
from ._publisher import Publisher as Publisher
from ._relay import Relay as Relay
from ._relay import RelayCollector as RelayCollector
from ._relay import RelayConfig as RelayConfig
from ._relay import RelayStats as RelayStats
from ._relay import resolve_relay_config as resolve_relay_config
from ._relay_local import SHM_RESERVE as SHM_RESERVE
from ._relay_local import Created as Created
from ._relay_local import LocalBroker as LocalBroker
from ._relay_local import Mark as Mark
from ._relay_local import MirrorSpec as MirrorSpec
from ._relay_local import Refused as Refused
from ._relay_local import shm_shortfall as shm_shortfall
from ._relay_local import turn_incarnation as turn_incarnation
from ._replay import Replayed as Replayed
from ._replay import Replayer as Replayer
from ._replay import ReplayStats as ReplayStats
from ._replay import replay as replay

__all__ = [
    "SHM_RESERVE",
    "TICK_DTYPE",
    "Created",
    "Feed",
    "LocalBroker",
    "Mark",
    "MirrorSpec",
    "Publisher",
    "Refused",
    "Relay",
    "RelayCollector",
    "RelayConfig",
    "RelayStats",
    "ReplayStats",
    "Replayed",
    "Replayer",
    "make_feed",
    "replay",
    "resolve_relay_config",
    "shm_shortfall",
    "turn_incarnation",
]
