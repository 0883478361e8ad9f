"""Synthetic feeds for ``shmcast publish``: market ticks, detector frames, random data.

A feed fills a preallocated array in place (so the CLI can publish through a
zero-copy loan) and allocates nothing per version.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["FRAME_SHAPE", "TICK_DTYPE", "Feed", "FrameFeed", "RandomFeed", "TickFeed", "make_feed"]

#: One quote/trade record per symbol.
TICK_DTYPE = np.dtype(
    [
        ("ts", "<i8"),
        ("symbol", "<u4"),
        ("bid_size", "<u4"),
        ("bid", "<f8"),
        ("ask", "<f8"),
        ("ask_size", "<u4"),
        ("last_size", "<u4"),
        ("last", "<f8"),
    ]
)
TICK_SYMBOLS = 256
FRAME_SHAPE = (512, 512)


class Feed(Protocol):
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    def fill(self, out: npt.NDArray[Any], i: int) -> None: ...


class TickFeed:
    """A book of ``symbols`` instruments whose prices random-walk each version."""

    def __init__(self, symbols: int = TICK_SYMBOLS, seed: int = 1) -> None:
        self.dtype = TICK_DTYPE
        self.shape: tuple[int, ...] = (symbols,)
        self._rng = np.random.default_rng(seed)
        # Made at the first fill: a book too large for /dev/shm is refused by the
        # Publisher first, not by a MemoryError of these arrays.
        self._mid = self._steps = np.empty(0)
        self._ids = np.empty(0, np.uint32)

    def fill(self, out: npt.NDArray[Any], i: int) -> None:
        if not self._ids.size:
            symbols = self.shape[0]
            self._mid = 100.0 + self._rng.random(symbols) * 50
            self._steps = np.empty(symbols)
            self._ids = np.arange(symbols, dtype=np.uint32)
        self._rng.standard_normal(out=self._steps)
        self._mid += self._steps * 0.01
        np.abs(self._mid, out=self._mid)
        out["ts"] = time.time_ns()
        out["symbol"] = self._ids
        out["bid"] = self._mid - 0.01
        out["ask"] = self._mid + 0.01
        out["bid_size"] = 100 + (i % 7) * 10
        out["ask_size"] = 100 + (i % 5) * 10
        out["last"] = self._mid
        out["last_size"] = 1 + i % 100


class FrameFeed:
    """2-D uint16 detector frames: a flat background with a bright spot moving on a circle.

    The spot (``2 * spot`` pixels wide) shrinks to fit frames smaller than it.

    Raises:
        ValueError: a frame smaller than 2x2, which holds no spot.
    """

    def __init__(self, shape: tuple[int, int] = FRAME_SHAPE, spot: int = 16) -> None:
        self.dtype = np.dtype(np.uint16)
        self.shape: tuple[int, ...] = shape
        h, w = shape
        spot = min(spot, h // 2, w // 2)
        if spot < 1:
            raise ValueError(f"frames need a shape of at least 2x2; got {shape}")
        yy, xx = np.mgrid[-spot:spot, -spot:spot]
        self._spot = (4000 * np.exp(-(xx**2 + yy**2) / (spot**2 / 2))).astype(np.uint16)
        self._r = max(1, min(h, w) // 2 - 2 * spot)

    def position(self, i: int) -> tuple[int, int]:
        """Top-left corner of the spot in frame ``i``."""
        h, w = self.shape
        s = self._spot.shape[0]
        a = 2 * math.pi * (i % 360) / 360
        y = int(h / 2 + self._r * math.sin(a)) - s // 2
        x = int(w / 2 + self._r * math.cos(a)) - s // 2
        return max(0, min(h - s, y)), max(0, min(w - s, x))

    def fill(self, out: npt.NDArray[Any], i: int) -> None:
        out.fill(100)
        y, x = self.position(i)
        s = self._spot.shape[0]
        out[y : y + s, x : x + s] += self._spot


class RandomFeed:
    """Random bytes of any dtype and shape (uniform floats for float dtypes, False
    and True for booleans).

    Native float64 and float32 are drawn in place; other dtypes draw a temporary
    array per version (the one exception to "allocates nothing per version").
    """

    def __init__(self, dtype: np.dtype[Any], shape: tuple[int, ...], seed: int = 1) -> None:
        self.dtype = dtype
        self.shape = shape
        self._rng = np.random.default_rng(seed)

    def fill(self, out: npt.NDArray[Any], i: int) -> None:
        if out.dtype in (np.float64, np.float32) and out.dtype.isnative and out.flags.c_contiguous:
            self._rng.random(dtype=out.dtype, out=out)
        elif out.dtype.kind == "f" and out.dtype.names is None:
            out[...] = self._rng.random(out.shape)
        else:
            raw = out.reshape(-1).view(np.uint8)
            raw[...] = self._rng.integers(0, 256, raw.shape, dtype=np.uint8)
            for flags in _bools(out):
                # A bool's byte is 0 or 1: numpy reads others as True, but a view of
                # the bytes (and anything that takes the data as bytes) sees 127.
                as_bytes = flags.view(np.uint8)
                np.bitwise_and(as_bytes, 1, out=as_bytes)


def _bools(arr: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
    """The bool parts of ``arr``: itself, or the bool fields of its records (nested
    records and fields of several bools too)."""
    if arr.dtype.names is None:
        if arr.dtype.kind == "b":
            yield arr
        return
    for name in arr.dtype.names:
        yield from _bools(arr[name])


def make_feed(source: str, dtype: Any = None, shape: tuple[int, ...] | None = None) -> Feed:
    """The feed named ``source``; ``ticks`` and ``frames`` imply dtype and shape
    (a given shape overrides the default size)."""
    if source == "ticks":
        if shape is not None and len(shape) != 1:
            raise ValueError(f"ticks are 1-D, one record per symbol: give --shape N, not {shape}")
        return TickFeed(shape[0] if shape else TICK_SYMBOLS)
    if source == "frames":
        if shape is not None and len(shape) != 2:
            raise ValueError(f"frames are 2-D; got shape {shape}")
        return FrameFeed((shape[0], shape[1]) if shape else FRAME_SHAPE)
    if source == "random":
        if dtype is None or shape is None:
            raise ValueError("--source random needs --dtype and --shape")
        return RandomFeed(np.dtype(dtype), shape)
    raise ValueError(f"unknown source {source!r}; use ticks, frames or random")
