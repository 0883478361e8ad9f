"""The Zenoh wire format of shmcast segments, for any Zenoh client in any language.

One key per segment, ``shmcast/<namespace>/<segment>`` (both names as shmcast
validates them: letters, digits, ``_``, ``-``, and ``.`` inside segment names),
carrying three things:

- **samples** (``put``): one per version. The payload is the array's bytes in C
  order, nothing else. The attachment is a msgpack map::

      {"version": uint, "timestamp_ns": uint, "dtype": str, "shape": [uint, ...],
       "incarnation": uint}

  ``version`` counts the segment's versions (they only go forward within an
  incarnation; a reader sees gaps in it). ``timestamp_ns`` is the commit time on
  the exporting host's wall clock (ns since the Unix epoch). ``dtype`` is a numpy
  type: for plain arrays the array-protocol string, endianness, kind and item size
  (``"<u2"``, ``"<f8"``, ``"|u1"``); for records the Python literal of numpy's
  ``dtype.descr`` list (``"[('ts', '<i8'), ('bid', '<f8')]"``). ``incarnation``
  identifies one creation of the segment: a different one means the segment was
  deleted and created again, its versions start over, and its dtype and shape may
  differ.
- a **liveliness token** on the same key while the exporter serves the segment:
  its appearance announces the segment, its disappearance the loss of it.
- a **queryable** on the same key that answers a ``get`` with the latest version
  (same payload and attachment), so a late joiner starts at once.

Decoding in Python without shmcast::

    meta = msgpack.unpackb(sample.attachment.to_bytes())
    array = numpy.frombuffer(sample.payload.to_bytes(), dtype=meta["dtype"]).reshape(meta["shape"])

(``numpy.dtype`` reads the plain strings directly; record descriptions go
through ``ast.literal_eval`` first.)
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from shmcast.broker import dtype_str, normalize_layout
from shmcast.broker.client import validate_namespace, validate_segment_name

__all__ = ["KEY_ROOT", "Frame", "decode_attachment", "encode_attachment", "key_of", "parse_key"]

#: The first chunk of every shmcast key.
KEY_ROOT = "shmcast"
#: Largest attachment accepted (the dtype description is the only variable part).
MAX_ATTACHMENT = 64 * 1024


@dataclass(frozen=True)
class Frame:
    """What one sample's attachment says about its payload."""

    version: int
    timestamp_ns: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    incarnation: int

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape) * self.dtype.itemsize)


def key_of(namespace: str, segment: str) -> str:
    """The Zenoh key of a segment: ``shmcast/<namespace>/<segment>``."""
    return f"{KEY_ROOT}/{validate_namespace(namespace)}/{validate_segment_name(segment)}"


def parse_key(key: str) -> tuple[str, str]:
    """``(namespace, segment)`` of a shmcast key.

    Raises:
        ValueError: not a key of this format (the message says why).
    """
    parts = str(key).split("/")
    if len(parts) != 3 or parts[0] != KEY_ROOT:
        raise ValueError(f"{key!r} is not a shmcast key ({KEY_ROOT}/<namespace>/<segment>)")
    return validate_namespace(parts[1]), validate_segment_name(parts[2])


def encode_attachment(
    version: int, timestamp_ns: int, dtype: np.dtype[Any], shape: tuple[int, ...], incarnation: int
) -> bytes:
    return attachment_encoder(dtype, shape, incarnation)(version, timestamp_ns)


def attachment_encoder(
    dtype: np.dtype[Any], shape: tuple[int, ...], incarnation: int
) -> Callable[[int, int], bytes]:
    """``encode(version, timestamp_ns)`` for one segment's layout and incarnation: the
    dtype described once (``dtype_str`` costs more than the rest of an encoding)."""
    text, dims = dtype_str(dtype), list(shape)

    def encode(version: int, timestamp_ns: int) -> bytes:
        return msgpack.packb(  # type: ignore[no-any-return]
            {
                "version": version,
                "timestamp_ns": timestamp_ns,
                "dtype": text,
                "shape": dims,
                "incarnation": incarnation,
            },
            use_bin_type=True,
        )

    return encode


def _parse_dtype(text: str) -> np.dtype[Any]:
    if text.startswith("["):
        dt: np.dtype[Any] = np.dtype(ast.literal_eval(text))
        return dt
    return np.dtype(text)


@functools.lru_cache(maxsize=256)
def _layout(dtype: str, shape: tuple[Any, ...]) -> tuple[np.dtype[Any], tuple[int, ...]]:
    # A stream repeats one layout: parsing and checking it each sample cost more than
    # the rest of a decoding. Only valid layouts are kept (errors are not cached).
    return normalize_layout(_parse_dtype(dtype), shape)


def decode_attachment(data: bytes) -> Frame:
    """The :class:`Frame` an attachment describes, checked.

    Raises:
        ValueError: not a shmcast attachment, or one describing an impossible array.
    """
    if len(data) > MAX_ATTACHMENT:
        raise ValueError(f"attachment of {len(data)} bytes is over {MAX_ATTACHMENT}")
    try:
        meta = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many kinds for garbage
        raise ValueError(f"attachment is not msgpack: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError("attachment is not a map")
    numbers: dict[str, int] = {}
    for name in ("version", "timestamp_ns", "incarnation"):
        value = meta.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"attachment field {name!r} is not a non-negative integer")
        numbers[name] = value
    shape, dtype = meta.get("shape"), meta.get("dtype")
    if not isinstance(dtype, str) or not isinstance(shape, list):
        raise ValueError("attachment needs 'dtype' (a string) and 'shape' (a list)")
    try:
        dt, shp = _layout(dtype, tuple(shape))  # TypeError: an unhashable shape
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"attachment describes no storable array: {exc}") from exc
    return Frame(numbers["version"], numbers["timestamp_ns"], dt, shp, numbers["incarnation"])
