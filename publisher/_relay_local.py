"""The requests of a relay or bridge to its local broker, in a thread of their own.

Creating a mirror (a :class:`Publisher`: create and lease requests), telling the
catalog that the upstream is up or down, deleting a mirror, and checking that
the local broker is the one the mirrors were registered with all wait for a
reply. In the relay's data loop a stalled local broker stopped the mirroring
of every segment for as long as each request's timeout; here they queue, one
after the other, and the data loop only picks up what came of them
(:meth:`LocalBroker.results`). Mirrors already made need no request: their
versions are written into shared memory and announced without waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shmcast.broker.client import SHM_DIR, ControlClient, CurveKeyTriple
from shmcast.broker.errors import (
    OutOfDescriptorsError,
    SegmentError,
    SegmentNotFoundError,
    ShmcastError,
)

from ._publisher import Publisher

__all__ = [
    "SHM_RESERVE",
    "Created",
    "LocalBroker",
    "Mark",
    "MirrorSpec",
    "Refused",
    "shm_shortfall",
    "turn_incarnation",
]

log = logging.getLogger(__name__)

Layout = tuple[str, tuple[int, ...], int]

#: Seconds each request of :meth:`LocalBroker.close`'s last word may wait.
LAST_TIMEOUT = 1.0

#: Share of /dev/shm that the mirrors of a relay or bridge leave free for this
#: host's own segments: a mirror that would leave less is refused (each one takes
#: all its bytes at once, and an upstream or any Zenoh peer chooses their sizes).
SHM_RESERVE = 0.1


def _shm_space() -> tuple[int, int] | None:
    """``(size, free bytes)`` of /dev/shm, or None when it cannot be told."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def shm_shortfall(size: int, *, making: int = 0, freed: int = 0) -> str | None:
    """Why a mirror of ``size`` bytes may not be made now, or None if it may: it
    would leave less than :data:`SHM_RESERVE` of /dev/shm free. The limits on
    mirrors (256 of 1 GiB) let an upstream fill /dev/shm alone.

    Args:
        size: the mirror's bytes, all its slots.
        making: bytes of the mirrors being made (not in /dev/shm yet).
        freed: bytes of the mirror it replaces (deleted before it is made).
    """
    space = _shm_space()
    if space is None:
        return None
    total, free = space
    if free + freed - making - size >= total * SHM_RESERVE:
        return None
    return (
        f"a {size}-byte segment, with {free} bytes free of {total} in {SHM_DIR}: "
        f"mirrors leave {SHM_RESERVE:.0%} of it free for this host's own segments; give "
        f"it more room (docker run --shm-size, compose shm_size) or mirror fewer segments"
    )


def turn_incarnation(
    previous: tuple[int, int], current: tuple[int, int], incarnation: int
) -> tuple[tuple[int, int], int | None]:
    """A mirror's counts turning from ``current`` to another ``incarnation`` upstream.

    Args:
        previous: the incarnation before ``current``, and the last version counted
            of it.
        current: the incarnation the counts follow, and the last version counted.
        incarnation: the one they turn to.

    Returns:
        The new ``previous`` (``current``), and the last version counted of
        ``incarnation`` if it is ``previous`` coming back (another one came in
        between: a peer's sample, an upstream going back and forth), counted on
        from there; else None: a new one, its versions counted from 1 (taken for
        a new one, the versions received of it before were counted skipped again).
    """
    back, last = previous
    return current, (last if back == incarnation else None)


@dataclass(frozen=True)
class MirrorSpec:
    """A local segment to make for an upstream one."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    slots: int
    layout: Layout
    created: int
    incarnation: int = 0  # the upstream creation it mirrors (0: an older upstream)
    #: The catalog's ``source`` of this mirror (``None``: the :class:`LocalBroker`'s).
    source: str | None = None
    #: The first version to be written into it (0: not known). A segment taken over
    #: that already holds it or a later one is made afresh: its versions would
    #: refuse the upstream's for ever.
    first: int = 0


#: What the catalog is told of one mirror: name, layout, ``source``, upstream up.
Mark = tuple[str, Layout, str, bool]


@dataclass
class Created:
    spec: MirrorSpec
    pub: Publisher


@dataclass
class Refused:
    spec: MirrorSpec
    reason: str


class LocalBroker:
    """The requests of a relay or bridge to its local broker, served by one thread.

    Args:
        client: a control connection to the local broker (this object owns it
            from now on).
        epoch: the local broker's epoch when the relay started.
        namespace, broker, source: what each mirror's :class:`Publisher` gets.
        curve: the local broker's CURVE keys, as :class:`ControlClient` takes them
            (each mirror's :class:`Publisher` connects with them too).
        timeout: seconds each request waits for its reply.
        notify: called in this object's thread after each :class:`Created` or
            :class:`Refused` is queued (to take it in at once, not at the next
            look at :meth:`results`).
    """

    def __init__(
        self,
        client: ControlClient,
        *,
        epoch: object,
        namespace: str,
        broker: str | None,
        source: str,
        timeout: float,
        notify: Callable[[], None] | None = None,
        curve: CurveKeyTriple | None = None,
    ) -> None:
        self._notify = notify
        self._curve = curve
        self._client = client
        self._epoch = epoch
        self._namespace = namespace
        self._broker = broker
        self._source = source
        self._timeout = timeout
        self._jobs: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._results: queue.Queue[Created | Refused] = queue.Queue()
        self._checking = threading.Event()
        self._closing = threading.Event()
        #: The marks of the job queued last, if an ``annotate`` one: later marks join
        #: it, the latest one of each name kept. (A job per call grew without bound
        #: under a Zenoh peer flapping a liveliness token: 55,000 queued, each two
        #: requests to the broker, the mirrors' own requests behind them.) Never an
        #: earlier job's: a mark would go ahead of a delete or a restart check
        #: asked before it (jobs are done in the order asked).
        self._marks_lock = threading.Lock()
        self._last_marks: dict[str, Mark] | None = None
        self._thread = threading.Thread(target=self._run, name="shmcast-relay-local", daemon=True)
        self._thread.start()

    def create(self, spec: MirrorSpec) -> None:
        """Make the mirror of ``spec``; a :class:`Created` or :class:`Refused` follows."""
        self._put(("create", spec))

    def _put(self, job: tuple[str, Any] | None) -> None:
        """Queue a job other than ``annotate``: marks asked later go after it."""
        with self._marks_lock:
            self._last_marks = None
            self._jobs.put(job)

    def _marks(self, mirrors: list[tuple[str, Layout]], up: bool, source: str | None) -> list[Mark]:
        return [(name, layout, source or self._source, up) for name, layout in mirrors]

    def annotate(
        self, mirrors: list[tuple[str, Layout]], up: bool, source: str | None = None
    ) -> None:
        """Tell the catalog that these mirrors are relayed, and whether the upstream is
        up (``source``: theirs, if not this object's). Marks join the job queued
        last if it is an ``annotate`` one, replacing those of the same names: with
        no other job asked in between, at most one mark per name is queued."""
        if not mirrors:
            return
        with self._marks_lock:
            marks = self._last_marks
            if marks is None:
                marks = self._last_marks = {}
                self._jobs.put(("annotate", marks))
            for mark in self._marks(mirrors, up, source):
                marks[mark[0]] = mark

    def delete(self, name: str) -> None:
        self._put(("delete", name))

    def check(self, mirrors: list[tuple[str, Layout]], up: bool) -> None:
        """Has the local broker restarted? Then annotate the mirrors again. One check
        waits at a time: a stalled broker does not pile them up."""
        self.check_marks(self._marks(mirrors, up, None))

    def check_marks(self, marks: list[Mark]) -> None:
        """:meth:`check`, each mirror with its own ``source`` and upstream state."""
        if not self._checking.is_set():
            self._checking.set()
            self._put(("check", marks))

    def results(self) -> list[Created | Refused]:
        """What came of the :meth:`create` requests since the last call."""
        out: list[Created | Refused] = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._results.get_nowait())
        return out

    def close(self, last: list[Mark] | None = None) -> None:
        """Stop after the request in hand (bounded by its timeout): the requests still
        queued are dropped. The thread closes its connection as it ends; one still
        waiting on a stalled broker when the wait here is over ends by itself.

        Args:
            last: what to tell the catalog of the mirrors before the thread ends
                (the relay's: their upstream is no longer followed), at most
                :data:`LAST_TIMEOUT` seconds a request; a broker that does not answer
                ends it. A mirror no longer in the catalog is not made again, and
                a refused mark does not end it (see :meth:`_annotate`).
        """
        self._closing.set()
        if last:
            self._put(("last", last))
        self._put(None)
        self._thread.join(self._timeout + 1 + (LAST_TIMEOUT if last else 0.0))
        if self._thread.is_alive():
            log.warning("the local broker has not answered for %.0f s: leaving its "
                        "request behind", self._timeout + 1)  # fmt: skip
        for done in self.results():
            if isinstance(done, Created):
                done.pub.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                kind, arg = job
                if self._closing.is_set() and kind != "last":
                    continue  # dropped: close() waits for no more than the last word
                try:
                    if kind == "last":
                        self._annotate(arg, existing=True, timeout=LAST_TIMEOUT)
                    elif kind == "create":
                        self._create(arg)
                    elif kind == "annotate":
                        with self._marks_lock:  # later marks make a job of their own
                            if self._last_marks is arg:
                                self._last_marks = None
                            marks = list(arg.values())
                        self._annotate(marks, existing=True)
                    elif kind == "delete":
                        with contextlib.suppress(ShmcastError):
                            self._client.request("delete", timeout=self._timeout, name=arg)
                    elif kind == "check":
                        self._checking.clear()
                        self._check(arg)
                except Exception:  # the relay's local requests go on whatever one does
                    log.exception("relay request %s to the local broker failed", kind)
        finally:
            self._client.close()  # here: never under a request of this thread's

    def _create(self, spec: MirrorSpec) -> None:
        """Make the mirror; every outcome is a :class:`Created` or :class:`Refused`
        (an OSError, EMFILE, ... too: a create nobody answered stayed pending for ever)."""
        try:
            pub = self._made(spec, spec.source or self._source)
        except Exception as exc:  # every failure is a refusal, tried again later
            # Out of descriptors names the limit and the fix: its message, logged by
            # the relay or bridge with the refusal, says it all (no traceback).
            if not isinstance(exc, (ShmcastError, OutOfDescriptorsError)):
                log.exception("making the mirror %s failed", spec.name)
            self._results.put(Refused(spec, str(exc)))
        else:
            if self._closing.is_set():
                pub.close()  # nobody takes it in any more
            else:
                self._results.put(Created(spec, pub))
        if self._notify is not None:
            self._notify()

    def _made(self, spec: MirrorSpec, source: str) -> Publisher:
        self._clear_leftover(spec, source)
        pub = self._publisher(spec, source)
        if spec.first and pub.version >= spec.first:
            # A segment this source fed before (a restarted broker forgot whose it
            # was) is ahead of the upstream's version: it would refuse every one.
            log.info("mirror %s: at version %d, ahead of the upstream's %d; making it afresh",
                     spec.name, pub.version, spec.first)  # fmt: skip
            pub.close()
            self._delete(spec.name)
            pub = self._publisher(spec, source)
        if spec.incarnation:
            self._note_upstream(spec, source)
        return pub

    def _note_upstream(self, spec: MirrorSpec, source: str) -> None:
        """Tell the catalog which upstream incarnation the mirror copies (its entry's
        ``upstream_incarnation``): a later run of this relay or bridge takes the mirror
        over if it finds it left of that same incarnation (:meth:`_clear_leftover`).
        Only a hint: without it (an older broker, a broker restarted since) a later
        run makes the mirror afresh, as before."""
        dtype, shape, slots = spec.layout
        try:
            self._client.request(
                "create",
                timeout=self._timeout,
                name=spec.name,
                dtype=dtype,
                shape=list(shape),
                slots=slots,
                source=source,
                upstream_incarnation=spec.incarnation,
                pid=os.getpid(),
            )
        except ShmcastError as exc:
            log.debug("mirror %s: its upstream incarnation not noted: %s", spec.name, exc)

    def _publisher(self, spec: MirrorSpec, source: str) -> Publisher:
        return Publisher(
            spec.name,
            dtype=spec.dtype,
            shape=spec.shape,
            slots=spec.slots,
            namespace=self._namespace,
            broker=self._broker,
            source=source,
            timeout=self._timeout,
            curve=self._curve,
        )

    def _clear_leftover(self, spec: MirrorSpec, source: str) -> None:
        """A mirror of ``source`` that an earlier run left (no live writer) is deleted:
        made afresh, it follows the upstream's versions whatever they are now (a new
        incarnation upstream starts over at 1, which the leftover's later versions
        would make stale for ever). Local readers see a new incarnation. One the
        catalog says copies the same upstream incarnation as ``spec`` (its
        ``upstream_incarnation``), with its layout and versions before ``spec.first``,
        is kept and written on: local readers see the same incarnation go on, and
        count as missed only the versions committed upstream while no run wrote it
        (made afresh, they counted those they had received from it again). A
        segment fed by anyone else is the broker's to refuse."""
        name = spec.name
        try:
            entry = self._client.request("describe", timeout=self._timeout, name=name)
        except SegmentNotFoundError:
            return
        if entry.get("source") != source or entry.get("writer_alive"):
            return
        dtype, shape, slots = spec.layout
        version = entry.get("version")
        if (
            spec.incarnation
            and entry.get("upstream_incarnation") == spec.incarnation
            and (entry.get("dtype"), entry.get("shape"), entry.get("slots"))
            == (dtype, list(shape), slots)
            and type(version) is int
            and (not spec.first or version < spec.first)
        ):
            log.info("mirror %s: left by an earlier run, of the same upstream incarnation "
                     "(at version %d): writing on into it", name, version)  # fmt: skip
            return
        log.info("mirror %s: left by an earlier run; making it afresh", name)
        self._delete(name)

    def _delete(self, name: str) -> None:
        """Delete a mirror nobody writes (gone already: nothing to do)."""
        with contextlib.suppress(SegmentNotFoundError):
            self._client.request("delete", timeout=self._timeout, name=name)

    def _annotate(
        self, marks: list[Mark], *, existing: bool = False, timeout: float | None = None
    ) -> None:
        """Tell the catalog of each mark.

        Args:
            existing: only of a mirror the catalog still holds. The mark is a
                ``create``: a mirror deleted here (``shmcast rm --force``), which
                the relay or bridge has not noticed yet, would be made again by it,
                empty (and by the last word for good). The broker checks that in the
                same request (``existing``): a ``describe`` first left a moment in
                which a deletion went unseen and the mark made the mirror again.
            timeout: seconds each request may wait (else this object's timeout); a
                broker that does not answer then ends it (each mark would wait for
                it), while a refusal of one mark (a local publisher's segment now
                holds the name) goes on to the next.
        """
        wait = self._timeout if timeout is None else timeout
        for mark in marks:
            try:
                self._mark(mark, wait, existing=existing)
            except SegmentNotFoundError:
                continue  # deleted here: it stays deleted
            except ShmcastError as exc:
                log.warning("cannot update the catalog entry of %s: %s", mark[0], exc)
                if timeout is not None and not isinstance(exc, SegmentError):
                    return  # not a refusal of this mark: the broker is not answering

    def _mark(self, mark: Mark, timeout: float, *, existing: bool = False) -> None:
        name, (dtype, shape, slots), source, up = mark
        more = {"existing": True} if existing else {}
        self._client.request(
            "create",
            timeout=timeout,
            **more,
            name=name,
            dtype=dtype,
            shape=list(shape),
            slots=slots,
            source=source,
            upstream_up=up,
            pid=os.getpid(),  # the mirrors' writer: a restarted broker believes it
        )

    def _check(self, marks: list[Mark]) -> None:
        """A restarted local broker adopts the mirrors as plain segments: tell it again
        that they are relayed (``source``, ``upstream_up``)."""
        try:
            epoch = self._client.request("hello", timeout=min(self._timeout, 0.5))["epoch"]
        except ShmcastError as exc:
            log.debug("local broker not answering: %s", exc)
            return
        if epoch != self._epoch:
            log.info("local broker restarted (epoch %s -> %s): re-registering mirrors",
                     self._epoch, epoch)  # fmt: skip
            self._epoch = epoch
            self._annotate(marks)
