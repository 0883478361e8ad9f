"""shmcast's writing side: :class:`Publisher` and the synthetic feeds of the CLI."""

from ._publisher import Publisher as Publisher

__all__ = ["Publisher"]
