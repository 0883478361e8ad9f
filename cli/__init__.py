"""The ``shmcast`` command: one module per command, a thin layer over the libraries."""

from ._main import main as main

__all__ = ["main"]
