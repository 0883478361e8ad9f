"""The analytics worker: statistics over each version, computed in place."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from shmcast.broker.errors import ShmcastError, TornReadError, VersionUnavailableError

from ._subscriber import Subscriber, Update

#: Kinds of numbers the statistics are taken of: integers, floats, booleans.
NUMERIC = "iufb"


def numeric_view(array: npt.NDArray[Any]) -> tuple[str | None, npt.NDArray[Any]]:
    """The numbers to summarise: the array, or for records the ``last`` (else first
    numeric) field, sub-array fields included. A view, never a copy.

    Raises:
        ValueError: nothing in the array is a real number (strings, dates, complex).
    """
    names = array.dtype.names
    if not names:
        if array.dtype.kind not in NUMERIC:
            raise ValueError(f"no statistics of {array.dtype}: not real numbers")
        return None, array
    fields = array.dtype.fields
    assert fields is not None
    # A field of no bytes (a sub-array of shape (0,)) holds no numbers to summarise.
    numeric = [n for n in names if fields[n][0].base.kind in NUMERIC and fields[n][0].itemsize > 0]
    pick = "last" if "last" in numeric else (numeric[0] if numeric else None)
    if pick is None:
        raise ValueError(f"no statistics of {array.dtype}: no field of real numbers")
    return pick, array[pick]


#: Numbers a step of :func:`analyse` turns into float64 at most (4 MiB of them): the
#: temporaries of a version's statistics stay this small whatever its size.
CHUNK = 1 << 19


def _chunks(values: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
    """Views of ``values`` of at most about :data:`CHUNK` numbers, covering it once."""
    if values.size <= CHUNK or values.ndim == 0:
        yield values
        return
    row = values[0].size
    if row > CHUNK:  # one row is bigger than a chunk: its rows in turn
        for sub in values:
            yield from _chunks(sub)
        return
    step = max(1, CHUNK // max(row, 1))
    for start in range(0, len(values), step):
        yield values[start : start + step]


def analyse(array: npt.NDArray[Any]) -> dict[str, Any]:
    """Mean, standard deviation and maximum over a version, zero-copy.

    Sums are taken in float64 (float16 and float32 summed in their own precision
    overflowed: the std of a float16 version of 65536 numbers, or of numbers 256
    from their mean, was inf), a chunk at a time, so that the temporaries stay small
    whatever the version's size (numpy's ``std`` made one of the whole version).
    """
    fieldname, values = numeric_view(array)
    if values.ndim == 0:
        # A version of shape () (or a record's 0-d field): its number as a 1-d view.
        # The subtraction below gave a numpy scalar, which np.multiply(out=) refused
        # with TypeError (a traceback from the worker, not caught as a ValueError).
        values = values.reshape(1)
    n = values.size
    if n == 0:
        raise ValueError(f"no statistics of {array.dtype}: the version holds no numbers")
    wide = np.longdouble if values.dtype == np.longdouble else np.float64
    total = wide(0)
    for part in _chunks(values):
        total += np.sum(part, dtype=wide)
    mean = total / n
    squares = wide(0)
    for part in _chunks(values):
        dev = np.subtract(part, mean, dtype=wide)
        squares += np.sum(np.multiply(dev, dev, out=dev), dtype=wide)
    out: dict[str, Any] = {
        "mean": float(mean),
        "std": float(np.sqrt(squares / n)),
        "max": float(np.max(values)),
    }
    if fieldname:
        out["field"] = fieldname
    return out


def process(sub: Subscriber, update: Update, *, stats: bool) -> dict[str, Any]:
    """One update as a record; with ``stats``, the statistics of the version read.

    A torn read is reported (``"torn": true``) and its numbers discarded.
    """
    rec: dict[str, Any] = {
        "segment": update.segment,
        "version": update.version,
        "latency_us": round(update.latency_s * 1e6, 1),
        "missed": update.missed,
    }
    if stats:
        try:
            with sub.read(update) as snap:  # exactly this version, in place
                result = analyse(snap.array)
                read_version = snap.version
        except TornReadError:
            rec["torn"] = True
            return rec
        except VersionUnavailableError:
            rec["overrun"] = True
            return rec
        except (ShmcastError, ValueError) as exc:  # ValueError: a dtype of no numbers
            rec["error"] = str(exc)
            return rec
        rec["read_version"] = read_version
        rec.update(result)
    return rec


#: Seconds between two looks at the stop event while no update arrives.
STOP_CHECK = 0.2


def run_worker(
    sub: Subscriber,
    out: TextIO,
    *,
    stats: bool = False,
    as_json: bool = False,
    quiet: bool = False,
    count: int = 0,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    idle: Callable[[float], None] | None = None,
) -> int:
    """Consume updates and print one line each, until ``count`` updates, ``timeout``
    seconds without one, or ``stop`` is set. ``idle`` is called with the seconds
    since the start whenever no update came for a little while, and every
    :data:`STOP_CHECK` seconds or so while updates keep coming. Returns how many
    were handled."""
    n = 0
    start = last = time.monotonic()
    next_idle = start + STOP_CHECK
    while stop is None or not stop.is_set():
        for update in sub.updates(timeout=STOP_CHECK):
            last = time.monotonic()
            _emit(process(sub, update, stats=stats), out, as_json=as_json, quiet=quiet)
            n += 1
            if (count and n >= count) or (stop is not None and stop.is_set()):
                return n
            if idle is not None and last >= next_idle:
                # One segment's updates never leave the wait idle for STOP_CHECK: the
                # look is due all the same (another segment may still be absent).
                next_idle = last + STOP_CHECK
                idle(last - start)
        if idle is not None:
            now = time.monotonic()
            next_idle = now + STOP_CHECK
            idle(now - start)
        if timeout is not None and time.monotonic() - last >= timeout:
            break
    return n


def _emit(rec: dict[str, Any], out: TextIO, *, as_json: bool, quiet: bool) -> None:
    if quiet:
        return
    if as_json:
        # NaN and infinities are no JSON (jq and most parsers refuse them): null, as
        # JavaScript's JSON.stringify writes them.
        safe = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()
        }
        out.write(json.dumps(safe, allow_nan=False) + "\n")
    else:
        extra = ""
        if "mean" in rec:
            extra = f" mean={rec['mean']:.4g} std={rec['std']:.4g} max={rec['max']:.4g}"
        if rec.get("torn"):
            extra = " TORN (discarded)"
        if rec.get("overrun"):
            extra = " OVERRUN (lapped before the read)"
        if "error" in rec:
            extra = f" ({rec['error']})"
        out.write(
            f"{rec['segment']} v{rec['version']} latency={rec['latency_us']}us "
            f"missed={rec['missed']}{extra}\n"
        )
    out.flush()
