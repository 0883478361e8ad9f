"""The writing side: a Publisher creates-or-gets a segment through the broker,
takes its writer lease and writes versions in place; the broker learns of each
one from the segment's notify word and announces it."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from shmcast.broker import BytesLike, Closing, Segment, dtype_str, normalize_layout
from shmcast.broker.client import (
    ControlClient,
    CurveKeyTriple,
    check_broker_namespace,
    resolve_endpoint,
    resolve_namespace,
    validate_seconds,
    validate_segment_name,
)
from shmcast.broker.errors import ClosedError

__all__ = ["Publisher"]

log = logging.getLogger(__name__)

#: Seconds between two looks, made by :meth:`Publisher.publish` and its kin, at
#: whether the segment's name still leads to the object this publisher writes (one
#: ``stat``; between looks a publish costs one compare of its version more, and
#: every :data:`LOOK_STEP_MAX`-th at most one ``time.monotonic_ns()``).
LINKED_EVERY = 1.0

#: Versions between two reads of the clock by the publish path, at most: it reads
#: it at the next version after a look, then doubles the step while the look is not
#: due (a clock read per commit cost a publish of 8 bytes 7 %, ~100 ns of 1.3 µs).
#: It is also how many publishes a look can come late once it is due: a publisher
#: that slows down after a burst (at 1024, one at 1 Hz looked 17 minutes late).
LOOK_STEP_MAX = 16


class Publisher(Closing):
    """The one writer of a segment, announced through the namespace's broker.

    Args:
        segment: segment name.
        dtype: numpy dtype of each version; with ``shape``, ``None`` means
            "the segment must already exist" (get, never create).
        shape: array shape of each version.
        slots: ring size for a segment created now (an existing segment must match).
        namespace: ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``.
        broker: the broker's control endpoint; ``None`` means the namespace's
            default ipc endpoint.
        timeout: seconds to wait for each broker reply.
        source: what the catalog's ``source`` field says about this segment
            (``"local"`` unless set, e.g. ``"relay:tcp://host:5557"``). Set, it
            makes this a mirror: a segment that exists fed by anyone else (a local
            publisher, another source) is refused.
        announce: also send the broker a one-way commit message per version. Not
            needed: the broker's commit watcher learns of every version from the
            segment's notify word and announces it about 0.1 ms later, once the
            readers woken by the commit have run. With ``True`` the broker
            announces at once (``events`` subscribers and relays hear 0.1 ms
            sooner), but ZeroMQ and broker threads wake up beside the readers at
            every commit, which costs them tens of microseconds on a busy host.

    Raises:
        ValueError: ``timeout`` is not a finite number of seconds > 0.
        BrokerUnavailableError: no broker answered.
        ConfigError: ``broker`` is no endpoint ZeroMQ can connect to.
        NamespaceMismatchError: the broker at ``broker`` serves another namespace.
        LayoutConflictError: the segment exists with another layout, or (with
            ``source``) is fed by another source.
        WriterBusyError: another process writes this segment.
        ShmSpaceError: ``/dev/shm`` cannot hold the segment.
    """

    def __init__(
        self,
        segment: str,
        *,
        dtype: npt.DTypeLike | None = None,
        shape: int | tuple[int, ...] | None = None,
        slots: int = 2,
        namespace: str | None = None,
        broker: str | None = None,
        timeout: float = 5.0,
        curve: CurveKeyTriple | None = None,
        source: str | None = None,
        announce: bool = False,
    ) -> None:
        self._closed = True
        self._seg: Segment | None = None
        self._client: ControlClient | None = None
        self.namespace = resolve_namespace(namespace)
        self.name = validate_segment_name(segment)
        timeout = validate_seconds("timeout", timeout, positive=True)
        endpoint = resolve_endpoint(broker, self.namespace)
        client = ControlClient(endpoint, timeout=timeout, curve=curve)
        try:
            if (dtype is None) != (shape is None):
                raise TypeError("give both dtype and shape, or neither to get an existing one")
            check_broker_namespace(client, self.namespace)
            if dtype is None or shape is None:
                client.request("describe", name=self.name)
            else:
                dt, shp = normalize_layout(dtype, shape)
                extra: dict[str, Any] = {} if source is None else {"source": source}
                client.request(
                    "create",
                    name=self.name,
                    dtype=dtype_str(dt),
                    shape=list(shp),
                    slots=slots,
                    **extra,
                )
            client.request("lease", name=self.name, pid=os.getpid())
            self._seg = Segment.attach(self.name, namespace=self.namespace, writable=True)
        except BaseException:
            client.close()
            raise
        self._client = client
        self.announcements_dropped = 0
        self.announce = announce
        self._deleted = False
        self._mirror = source is not None
        self._next_look_ns = time.monotonic_ns() + int(LINKED_EVERY * 1e9)
        self._look_at = 0  # the version from which a commit reads the clock
        self._look_step = 1
        self._closed = False

    @property
    def segment(self) -> Segment:
        """The underlying writer :class:`~shmcast.broker.Segment`."""
        if self._seg is None or self._closed:
            raise ClosedError(f"publisher of {self.name!r}")
        return self._seg

    @property
    def version(self) -> int:
        return self.segment.version

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.segment.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.segment.shape

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def segment_deleted(self) -> bool:
        """Whether the segment was deleted under this publisher (``shmcast rm
        --force``, a broker stopped with ``--unlink-on-exit``, or deleted and made
        anew): the versions it publishes from then on reach no reader; close it and
        open a new Publisher (which makes the segment anew), unless another one made
        it anew and writes it (the warning says which). Asking looks now (one
        ``stat``). Publishing also looks, at most once per :data:`LINKED_EVERY`
        seconds, and the first look that finds it deleted logs a warning (logger
        ``shmcast.publisher._publisher``), once per publisher; not for a mirror
        (``source`` given), which its relay or bridge makes again, saying so."""
        if not self._deleted and not self._closed:
            self._look()
        return self._deleted

    def publish(
        self,
        array: npt.NDArray[Any],
        *,
        version: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Copy ``array`` in as the next version, announce it, return its number.

        ``version`` commits exactly that number (newer than the latest), as a relay
        does; ``timestamp_ns`` records that commit time (wall clock) instead of now,
        as a bridge does for its upstream's versions.

        Raises:
            ArrayMismatchError: wrong dtype or shape (nothing is published).
            ReadOnlyError: this Publisher was inherited across ``fork``: a child
                opens a Publisher of its own (once the parent has closed this one,
                or ended).
        """
        v = self.segment.write(array, version=version, timestamp_ns=timestamp_ns)
        self._committed(v, timestamp_ns)
        return v

    def publish_bytes(
        self, data: BytesLike, *, version: int | None = None, timestamp_ns: int | None = None
    ) -> int:
        """:meth:`publish` for a version that arrives as raw bytes (C order, exactly
        the segment's ``nbytes``), as a bridge receives it: no array is built.

        Raises:
            ArrayMismatchError: not a C-contiguous buffer of ``nbytes`` bytes
                (nothing is published).
        """
        v = self.segment.write_bytes(data, version=version, timestamp_ns=timestamp_ns)
        self._committed(v, timestamp_ns)
        return v

    @contextlib.contextmanager
    def loan(
        self, *, version: int | None = None, timestamp_ns: int | None = None
    ) -> Iterator[npt.NDArray[Any]]:
        """Yield the next slot as a writable array; commit and announce on exit.

        If the block raises, nothing is published. ``version`` as in :meth:`publish`.
        """
        seg = self.segment
        with seg.loan(version=version, timestamp_ns=timestamp_ns) as arr:
            yield arr
        self._committed(seg.version, timestamp_ns)

    def _committed(self, version: int, timestamp_ns: int | None) -> None:
        """After each commit: announce it if asked, and look whether the segment
        is still there once per LINKED_EVERY seconds (a version compare per commit;
        the clock read every ``_look_step`` versions, no syscall but the look's)."""
        if version >= self._look_at:
            self._clock(version)
        if self.announce:
            self._announce(version, timestamp_ns)

    def _clock(self, version: int) -> None:
        """Read the clock: look if the look is due (and halve the step), else double
        the step, so that a steady publisher reads it about twice per interval."""
        if time.monotonic_ns() >= self._next_look_ns:
            self._look_step = max(1, self._look_step // 2)
            self._look()
        else:
            self._look_step = min(LOOK_STEP_MAX, self._look_step * 2)
        if not self._deleted:
            self._look_at = version + self._look_step

    def _look(self) -> None:
        if self._seg is None or self._seg.linked():
            self._next_look_ns = time.monotonic_ns() + int(LINKED_EVERY * 1e9)
            return
        self._deleted = True
        self._next_look_ns = self._look_at = 1 << 63  # it stays deleted: no more looks
        if self._mirror:  # its relay or bridge looks too, and makes it again
            return
        if os.path.exists(self._seg.path):
            # Made anew meanwhile, most likely by another publisher, which writes it
            # now: starting this one again would be refused (WriterBusyError).
            log.warning(
                "segment %r of namespace %r was deleted under this publisher and made "
                "anew (another publisher, or the broker's declaration): the versions "
                "this one publishes from now on reach no reader; close it (the name is "
                "the new segment's; `shmcast ls` shows its writer)",
                self.name,
                self.namespace,
            )
            return
        log.warning(
            "segment %r of namespace %r was deleted under this publisher (`shmcast rm "
            "--force`, a broker stopped with --unlink-on-exit): the versions it "
            "publishes from now on reach no reader; stop it and start it again (a new "
            "publisher makes the segment anew)",
            self.name,
            self.namespace,
        )

    def _announce(self, version: int, timestamp_ns: int | None = None) -> None:
        client = self._client
        assert client is not None
        # One-way and non-blocking: a slow or absent broker never stalls the writer.
        # Readers still find the version in the header; the broker's next tick
        # announces versions whose commit message was dropped.
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        if not client.send("commit", name=self.name, version=version, ts=ts):
            self.announcements_dropped += 1

    def close(self) -> None:
        """Release the lease and disconnect; the segment stays (the broker owns it)."""
        if self._closed:
            return
        self._closed = True
        if self._seg is not None:
            self._seg.close()
        if self._client is not None:
            self._client.close()

    def _unclosed(self) -> str:
        return f"publisher of {self.name!r} was not closed"

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"version={self.version}"
        return f"<Publisher {self.namespace}/{self.name} {state}>"
