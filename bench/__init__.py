"""shmcast's benchmark suite: ``python -m bench [--quick] [--only NAME ...] [--json PATH]``."""

from ._main import BENCHMARKS as BENCHMARKS
from ._main import main as main

__all__ = ["BENCHMARKS", "main"]
