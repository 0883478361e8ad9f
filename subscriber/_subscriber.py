"""The reading side: attach to segments zero-copy and learn of each new version.

Four ways to learn of a version (``wait=``):

- ``"shm"`` (default): through shared memory, without a broker hop per version.
  The subscriber sleeps in one ``futex_waitv`` on the notify words of the
  segments it has attached plus the namespace word, which the broker bumps on
  every create and delete and at every heartbeat. The broker is asked once, at
  start, for the catalog (after the namespace word's value was taken: the ZeroMQ
  guide's Clone pattern over shared memory), and hears a report about once a
  second; while it is down the mapped segments stay readable, and ``broker_up``
  says so from the heartbeats.
- ``"events"``: the broker's announcements over ZeroMQ (the Clone pattern:
  subscribe, then the catalog snapshot, then newer updates). When the broker's
  heartbeats stop, the subscriber polls the mapped headers instead, and picks
  the broker up again (a new epoch means a new snapshot).
- ``"futex"``: like ``shm`` without asking a broker anything: the segments must
  exist; the namespace word is used when there is one.
- ``"spin"``: busy-poll the headers; the lowest latency, one core burnt.

In every mode the subscriber walks the ring: versions committed while it was busy
are delivered from their slots while they are there, not skipped. Each version
ends in one of four counters (:mod:`._stats`). A segment deleted and created again
(a new incarnation: versions start over at 1) is noticed by every mode, re-attached,
and its versions are delivered or counted.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

import zmq

from shmcast.broker import (
    Closing,
    NamespaceWord,
    Segment,
    Snapshot,
    notify_words,
    wait_segments,
)
from shmcast.broker.client import (
    BROKER_TOPIC,
    ControlClient,
    CurveKeyTriple,
    check_broker_namespace,
    client_curve,
    open_socket,
    reader_endpoint,
    reporter_identity,
    resolve_endpoint,
    resolve_namespace,
    shm_path,
    shmcast_context,
    topic,
    unpack,
    validate_seconds,
    validate_segment_name,
)
from shmcast.broker.errors import (
    BrokerUnavailableError,
    ClosedError,
    ConfigError,
    NotASegmentError,
    NoVersionError,
    RemoteError,
    SegmentNotFoundError,
    SegmentUnreachableError,
    ShmcastError,
    TornReadError,
    VersionUnavailableError,
)

from ._stats import LATENCY_BUCKETS, SegmentStats, Update

__all__ = ["LATENCY_BUCKETS", "SegmentStats", "Subscriber", "Update", "WaitMode"]

log = logging.getLogger(__name__)

WaitMode = Literal["shm", "events", "futex", "spin"]
#: ``Update`` made without its named-tuple ``__new__`` (a Python function, ~0.7 µs):
#: it is made for every version.
_new_update = tuple.__new__
WAIT_MODES: tuple[str, ...] = ("shm", "events", "futex", "spin")

#: Seconds between the reports a subscriber sends its broker (``shm``, ``events``).
REPORT_INTERVAL = 1.0
#: Seconds the control socket may take, once closed, to send the broker our goodbye.
GOODBYE_LINGER = 0.1
#: The subscribers of this process that reported to a broker, while open: the
#: broker keeps one row per name and pid, which those of one name share, and a
#: goodbye drops it. Guarded by _REPORTERS_LOCK (several threads open and close;
#: reentrant: a signal handler's close() may interrupt its own thread's report).
_REPORTERS: weakref.WeakSet[Subscriber] = weakref.WeakSet()
_REPORTERS_LOCK = threading.RLock()
#: Longest single wait of a reading loop: how soon it sees close() from another thread.
WAIT_SLICE = 0.1
#: Seconds between an ``aupdates()`` loop's own looks at a segment attached since its
#: helper thread began a sleep, until the thread sleeps on it too (at most WAIT_SLICE).
NEW_SEGMENT_POLL = 0.001
#: Seconds close() waits for a reading thread to leave its wait.
CLOSE_WAIT = 2.0
#: Seconds close() waits for the hand-off lock (held for a few steps, never while
#: waiting): past them, it is its own thread's, which a signal handler interrupted.
HAND_WAIT = 0.1
#: Seconds between two looks at the segments' paths (a safety net: a recreated
#: segment is normally noticed at once, through the namespace word or the events).
PATH_CHECK = 0.5
#: Seconds a look at the paths waits, once per object, for a header still being
#: written (a creator reserving the pages of a large segment takes seconds).
HEADER_WAIT = 0.5
#: Seconds between an ``aupdates()`` loop's looks at an object whose header is still
#: being written, for :data:`HEADER_WAIT` from the first: its loop waits for nothing.
HEADER_POLL = 0.01
#: Seconds a segment the broker serves may stay invisible here before that is an error.
UNREACHABLE_AFTER = 2.0
#: What a report carries at most: the segments and the characters of the name a broker
#: keeps of one (more would only make the report outgrow the broker's largest message).
REPORT_SEGMENTS = 64
REPORT_NAME = 64
#: Seconds a handle replaced for reads of the latest (its object deleted) stays open,
#: for a read of it still running to end; then it is closed at the next look.
REPLACED_GRACE = 1.0


class _Track:
    """One subscribed segment: its current handle and its counters."""

    __slots__ = ("ino", "missing_since", "name", "seg", "st")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seg: Segment | None = None
        self.ino = 0
        self.st = SegmentStats()
        self.missing_since = 0.0


class Subscriber(Closing):
    """Read one or more segments of a namespace as they are published.

    Iterate :meth:`updates` (or ``async for`` over :meth:`aupdates`) and read each
    version exactly with ``with sub.read(update) as snap:`` (``snap.array`` is a
    read-only zero-copy view, validated when the block ends), or keep a validated
    private copy with :meth:`copy`. ``sub.read(name)`` reads the latest version.

    Args:
        segments: a segment name or names; they need not exist yet (``shm``,
            ``events``).
        namespace: ``None`` means ``$SHMCAST_NAMESPACE`` or ``"default"``.
        broker: the broker's control endpoint (``shm``, ``events``); ``None``
            means the namespace's default ipc endpoint.
        wait: ``"shm"`` (default), ``"events"``, ``"futex"`` or ``"spin"`` (see
            the module docstring).
        timeout: seconds to wait for the broker's replies, or (``futex``/``spin``)
            for the segments to exist.
        heartbeat_timeout: seconds without a heartbeat before the broker is
            considered down (default: 3 heartbeat intervals + 0.2 s).
        curve: ``(server_public, client_public, client_secret)`` CURVE keys, for a
            broker whose endpoints are CURVE-authenticated.
        name: how this subscriber names itself in the reports it sends the broker
            about once a second (``shm``, ``events``; ``shmcast top`` shows them),
            and the ``subscriber`` label of its metrics.

    Raises:
        BrokerUnavailableError: ``shm``/``events`` mode and no broker answered.
        SegmentUnreachableError: the broker serves the namespace but this process
            does not see its ``/dev/shm`` (a container outside its IPC namespace).
        SegmentNotFoundError: ``futex``/``spin`` mode and a segment never appeared.
        NotASegmentError: ``futex``/``spin`` mode and what holds a name is no
            valid segment (named with its fix, ``shmcast doctor --fix``).
        ConfigError: ``events`` mode and more segments than the broker's events
            endpoint holds topics (its ``max_subscriptions``), or than it has room
            for beside other subscribers' topics; ``shm``/``events`` and a
            ``broker`` that is no endpoint ZeroMQ can connect to.
        OutOfDescriptorsError: the process is out of file descriptors (each
            attached segment holds one), or of ZeroMQ sockets (``shm``: one a
            subscriber, ``events``: two; shmcast's context allows as many as the
            open-files limit): an ``OSError`` of errno ``EMFILE``, naming the limit,
            the count open and the fix.
        ValueError: a bad segment name or wait mode, a ``name`` that is no
            non-empty string, or a ``timeout`` or ``heartbeat_timeout`` that is not
            a finite number of seconds > 0.
    """

    def __init__(
        self,
        segments: str | Sequence[str],
        *,
        namespace: str | None = None,
        broker: str | None = None,
        wait: WaitMode = "shm",
        timeout: float = 5.0,
        heartbeat_timeout: float | None = None,
        curve: CurveKeyTriple | None = None,
        name: str = "subscriber",
    ) -> None:
        self._closed = True
        self._client: ControlClient | None = None
        self._owner: int | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._word: NamespaceWord | None = None
        #: The new namespace word could not be read (out of descriptors): said once.
        self._word_unread = False
        self._tracks: dict[str, _Track] = {}
        self._retired: list[Segment] = []
        names = [segments] if isinstance(segments, str) else list(segments)
        if not names:
            raise ValueError("subscribe to at least one segment")
        if wait not in WAIT_MODES:
            modes = ", ".join(map(repr, WAIT_MODES))
            raise ValueError(f"wait must be one of {modes}, not {wait!r}")
        self.names = [validate_segment_name(n) for n in dict.fromkeys(names)]
        timeout = validate_seconds("timeout", timeout, positive=True)
        if heartbeat_timeout is not None:
            heartbeat_timeout = validate_seconds(
                "heartbeat_timeout", heartbeat_timeout, positive=True
            )
        self.namespace = resolve_namespace(namespace)
        self._curve = client_curve(curve)  # ConfigError before anything is opened
        self.mode: WaitMode = wait
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, not {name!r}")
        self.name = name
        self._tracks = {n: _Track(n) for n in self.names}
        self._track_list = list(self._tracks.values())
        self.stats: dict[str, SegmentStats] = {n: t.st for n, t in self._tracks.items()}
        # (name, incarnation) -> handle: an Update is read through the handle of its
        # own incarnation, kept until the updates queued from it are consumed.
        self._handles: dict[tuple[str, int], Segment] = {}
        self.events_missed = 0
        self.bad_messages = 0
        self.epoch_changes = 0
        self._broker_up: bool | None = None
        self._was_up: bool | None = None
        self.epoch: int | None = None
        self.heartbeat_timeout = heartbeat_timeout
        #: Not given: it follows the broker's heartbeat interval, across restarts too.
        self._hb_given = heartbeat_timeout is not None
        self._heartbeat_interval = 0.5
        self._endpoint = ""
        self._tseq: dict[bytes, int] = {}
        self._pending: deque[Update] = deque()
        self._unsettled: Update | None = None
        #: Updates still out with their aupdates() iterator's task when another task's
        #: iterator handed out the next: each is settled by its own read, by its
        #: iterator asking for the next, or at close() (tasks may share a subscriber).
        self._held: list[Update] = []
        #: The event loop of each update out with an aupdates() iterator, by id (the
        #: update is the one out, or held, while it is here): one whose loop was
        #: closed under its iterator (``loop.close()`` without ``shutdown_asyncgens()``)
        #: is settled when retired handles are looked at, not held until close().
        self._out_loops: dict[int, asyncio.AbstractEventLoop] = {}
        #: Held to hand an update out and to settle one (``_unsettled``, ``_held``,
        #: and the counters ``updates``, ``overrun``, ``torn``): the event loops of
        #: several threads may iterate aupdates() at once (outside ``_io``, which a
        #: wait holds), and a read may end in any thread. Never held while waiting.
        self._hand = threading.Lock()
        self._io = threading.RLock()
        self._next_report = 0.0
        self._next_paths = 0.0
        self._next_check = 0.0
        self._last_heartbeat = 0.0
        self._last_cross = 0.0
        self._gaps_crossed = 0
        self._extra: dict[str, Segment] = {}
        #: Handles of the objects the names of followed segments lead to now, for reads
        #: of the latest while the followed handle is of a deleted object.
        self._fresh: dict[str, Segment] = {}
        #: Held to replace those handles (_extra, _fresh): several threads may read the
        #: latest at once (a dashboard's request threads).
        self._latest_lock = threading.RLock()
        #: Per name, the handle reads of the latest went through before the last
        #: replacement, and when it was replaced: closed REPLACED_GRACE seconds later
        #: (at a look), so that a read of it still running (in another thread, or a
        #: ``with sub.read(name)`` block) ends first.
        self._replaced: dict[str, tuple[Segment, float]] = {}
        self._word_seen = 0
        self._word_state = (0, 0, 0)
        self._wait_segs: list[Segment] = []
        self._wait_stats: list[SegmentStats] = []
        #: Names where something other than a valid segment was found, and why.
        self._not_segments: dict[str, NotASegmentError] = {}
        #: The object (inode) found there: its header was waited for once already.
        self._not_segment_inos: dict[str, int] = {}
        #: Per name, until when an ``aupdates()`` loop looks again soon at an object
        #: whose header it found being written (it never waits for one: HEADER_POLL).
        self._header_due: dict[str, float] = {}
        #: Set while an ``aupdates()`` loop looks (under ``_io``): attaching then
        #: neither waits for a header nor populates the mapping, which would stall
        #: the loop's other tasks (0.5 s, and about 0.4 s a GiB).
        self._in_loop = False
        #: The aupdates() iterators waiting on the SUB socket's fd (``events``): the
        #: loop's one reader on it wakes each of them (tasks may share a subscriber).
        self._fd_wakers: list[_Waker] = []
        #: The helper thread of each event loop whose aupdates() iterators sleep on
        #: the notify words (``shm``, ``futex``): one per loop, shared by its
        #: iterators, ending at its next slice after the last of them leaves.
        self._watches: dict[asyncio.AbstractEventLoop, _Watch] = {}
        self._watch_lock = threading.Lock()
        try:
            if wait == "events":
                self._connect(broker, timeout, heartbeat_timeout)
            elif wait == "shm":
                self._connect_shm(broker, timeout, heartbeat_timeout)
            else:
                self._attach_all(timeout)
        except BaseException:
            self._teardown()
            raise
        self._closed = False

    # ------------------------------------------------------------------ set-up

    def _control(self, broker: str | None, timeout: float, hb_timeout: float | None) -> Any:
        # A reader of a group the namespace is shared with cannot open the owner's
        # control socket; the read-only one beside it serves all a subscriber asks.
        self._endpoint = reader_endpoint(resolve_endpoint(broker, self.namespace))
        self._client = ControlClient(self._endpoint, timeout=timeout, curve=self._curve)
        # A broker= (or $SHMCAST_BROKER) of another namespace is refused: its
        # catalog and events are not this namespace's.
        hello = check_broker_namespace(self._client, self.namespace)
        # The namespace's owner: only its objects (or root's) are attached.
        uid = hello.get("uid")
        self._owner = uid if isinstance(uid, int) and uid >= 0 else None
        self._take_interval(hello)
        return hello

    def _take_interval(self, hello: dict[str, Any]) -> None:
        """The broker's heartbeat interval (from its ``hello``), and the timeout it sets
        unless one was given."""
        interval = float(hello.get("heartbeat_interval", 0.5))
        self._heartbeat_interval = interval
        if not self._hb_given:
            self.heartbeat_timeout = 3 * interval + 0.2

    def _connect(self, broker: str | None, timeout: float, hb_timeout: float | None) -> None:
        hello = self._control(broker, timeout, hb_timeout)
        # A topic per segment, and the broker's own: past the topics its events
        # endpoint holds, it resets the endpoint, over and over (everyone's events).
        limit = hello.get("max_subscriptions")
        if isinstance(limit, int) and len(self.names) + 1 > limit:
            raise ConfigError(
                "segments",
                f"{len(self.names)} segments in wait='events' take {len(self.names) + 1} "
                f"topics of the broker's events endpoint, which holds at most {limit} "
                f"(max_subscriptions); use wait='shm' (no topic per segment), or raise "
                f"the broker's max_subscriptions",
            )
        # Asked always (a broker that says how many topics it holds can tell): two
        # subscribers starting at the same instant each saw room in their hello, and
        # took the endpoint over together.
        promised = False
        if isinstance(limit, int) and isinstance(hello.get("subscriptions"), int):
            promised = self._check_room(hello, limit)
        try:
            self._subscribe(hello)
        except BaseException:
            if promised:
                self._release_room()
            raise

    def _subscribe(self, hello: dict[str, Any]) -> None:
        # shmcast's context, its socket cap raised to the open-files limit: before,
        # Context.instance()'s 1023 ended a process at about 510 Subscribers.
        sub = open_socket(shmcast_context(), zmq.SUB, f"the events of namespace {self.namespace!r}")
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        if self._curve is not None:
            sub.curve_serverkey, sub.curve_publickey, sub.curve_secretkey = self._curve
        for name in self.names:
            sub.setsockopt(zmq.SUBSCRIBE, topic(name))
        sub.setsockopt(zmq.SUBSCRIBE, BROKER_TOPIC)
        sub.connect(str(hello["events"]))
        self._sub = sub
        # Clone pattern: we are subscribed; now the snapshot, then newer updates.
        self._snapshot(first=True)
        self._broker_up = True
        self._last_heartbeat = time.monotonic()

    def _release_room(self) -> None:
        """Let go of the topics the broker promised us (:meth:`_check_room`): failing
        to start, we will not subscribe, and they kept other subscribers out for 5 s.
        Best effort, briefly: the failure itself is what the caller is told."""
        assert self._client is not None
        with contextlib.suppress(ShmcastError, ValueError):
            self._client.request("topics", timeout=0.5, names=[], release=True)

    def _check_room(self, hello: dict[str, Any], limit: int) -> bool:
        """Refuse to take the broker's events endpoint past its ``max_subscriptions``
        with the topics other subscribers hold: it would reset, they and we would
        subscribe again, and it would reset again, for ever (23 resets in 3 s for
        three subscribers of 8 segments over 16; each lost announcements). The
        broker says how many of our topics it does not hold yet (a broker without
        the ``topics`` request is not asked). Returns whether topics were promised
        to us (a broker that promises, and they fit)."""
        most = hello.get("max_message_bytes")
        budget = max(512, (most if isinstance(most, int) else 1024) // 2)
        chunks: list[list[str]] = [[]]
        size = 0
        for name in self.names:
            if chunks[-1] and size + len(name) + 8 > budget:
                chunks.append([])
                size = 0
            chunks[-1].append(name)
            size += len(name) + 8
        assert self._client is not None
        new, held, fits = 0, 0, True
        try:
            for i, chunk in enumerate(chunks):
                # reserve: the topics that fit are promised to us until we subscribe,
                # so a subscriber asking in the same instant counts them. Once a chunk
                # does not fit, the broker let our promises go: the rest only counted.
                reply = self._client.request("topics", names=chunk, broker=i == 0, reserve=fits)
                new += int(reply["new"])
                if i == 0:
                    held = int(reply["held"])  # the next chunks count ours promised
                # A broker that does not promise: its count alone.
                fits = fits and bool(reply.get("fits", held + new <= limit))
        except (RemoteError, KeyError, TypeError, ValueError):
            return False  # an older broker: the endpoint's reset still bounds it
        if fits:
            return "fits" in reply  # a broker that promises (b2f43be) promised them
        raise ConfigError(
            "segments",
            f"{len(self.names)} segments in wait='events' add {new} topics to the "
            f"{held} the broker's events endpoint holds or has promised to other "
            f"subscribers, over its max_subscriptions ({limit}): it would reset over "
            f"and over, every events subscriber losing announcements; use wait='shm' "
            f"(no topic per segment), or raise the broker's max_subscriptions",
        )

    def _connect_shm(self, broker: str | None, timeout: float, hb_timeout: float | None) -> None:
        self._control(broker, timeout, hb_timeout)
        word = NamespaceWord.attach(self.namespace)
        if word is None:
            raise SegmentUnreachableError(
                "@catalog", self.namespace, shm_path(self.namespace, "@catalog"), self._endpoint
            )
        self._word = word
        # Clone pattern over shared memory: the word's value first, then the catalog;
        # a change after the value was taken wakes the first wait.
        self._word_seen = word.notify
        self._word_state = word.state()
        self.epoch = self._word_state[1]
        self._snapshot(first=True)

    def _snapshot(self, *, first: bool = False) -> None:
        """The broker's catalog: attach what it lists (checking each incarnation)."""
        assert self._client is not None
        reply = self._client.request("list")
        if self.mode == "events":
            self.epoch = int(reply["epoch"])
        catalog = {str(s["name"]): s for s in reply["segments"]}
        for tr in self._track_list:
            entry = catalog.get(tr.name)
            if entry is None:
                if tr.seg is not None:
                    self._retire(tr)
                elif first:
                    # Made without the broker (the engine API): its versions so far
                    # are history to this subscriber, as a listed segment's are.
                    self._attach(tr, start_at_latest=True)
                    if tr.seg is not None and self.mode == "events":
                        log.warning(
                            "segment %r exists but the broker of namespace %r does not serve "
                            "it (made with Segment.create?): wait='events' hears of none of "
                            "its versions; use wait='shm', or create it with a Publisher",
                            tr.name, self.namespace,
                        )  # fmt: skip
                continue
            inc = int(entry.get("incarnation", 0) or 0)
            if tr.seg is None or (inc and tr.st.incarnation != inc):
                if tr.seg is not None:
                    self._from_header(tr)  # what the old incarnation still has
                    self._retire(tr)
                self._attach(tr, start_at_latest=first)
                if tr.seg is None and first and self._reachable_check(tr.name):
                    raise SegmentUnreachableError(
                        tr.name, self.namespace, shm_path(self.namespace, tr.name), self._endpoint
                    )
        self._tseq.clear()

    def _reachable_check(self, name: str) -> bool:
        """True when the broker still lists ``name`` but this process cannot see it."""
        if os.path.exists(shm_path(self.namespace, name)) or self._client is None:
            return False
        try:
            self._client.request("describe", name=name)
        except ShmcastError:
            return False  # deleted meanwhile: simply absent
        return not os.path.exists(shm_path(self.namespace, name))

    def _attach(self, tr: _Track, *, start_at_latest: bool = False) -> Segment | None:
        """Attach ``tr``'s segment; a new incarnation starts counting from version 0,
        and (``start_at_latest``) a late joiner from the current version."""
        path = shm_path(self.namespace, tr.name)
        in_loop = self._in_loop
        for _ in range(3):
            try:
                ino = os.stat(path, follow_symlinks=False).st_ino
                # A header still being written is waited for once per object: one
                # that never completes (a creator that died) would otherwise stall
                # every look at the paths, and the other segments' reads with it.
                # An aupdates() loop waits for none: it looks again soon instead.
                seen = self._not_segment_inos.get(tr.name) == ino
                wait = 0.0 if seen or in_loop else HEADER_WAIT
                seg = Segment.attach(
                    tr.name,
                    namespace=self.namespace,
                    wait=wait,
                    prefault=not in_loop,
                    owner=self._owner,
                )
            except (SegmentNotFoundError, FileNotFoundError):
                return None
            except NotASegmentError as exc:
                # Something else holds the name: kept, to be named rather than "no
                # segment" when the wait for it ends (the fix differs).
                if tr.name not in self._not_segments:
                    log.info("%s (waiting for a segment there)", exc)
                self._not_segments[tr.name] = exc
                self._not_segment_inos[tr.name] = ino
                if in_loop:
                    now = time.monotonic()
                    if not seen:
                        self._header_due[tr.name] = now + HEADER_WAIT
                    if now < self._header_due.get(tr.name, 0.0):  # while a wait would last
                        self._next_paths = self._next_check = now + HEADER_POLL
                return None
            self._not_segments.pop(tr.name, None)
            self._not_segment_inos.pop(tr.name, None)
            self._header_due.pop(tr.name, None)
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == ino
            except FileNotFoundError:
                same = False
            if same:  # the object we mapped is the one the path names (we hold it open)
                break
            seg.close()
        else:
            return None
        st = tr.st
        inc = seg.incarnation
        if inc != st.incarnation:
            if st.incarnation:
                log.info("segment %r was created again: following the new incarnation", tr.name)
            st.incarnations += 1
            st.incarnation = inc
            st.last_version = seg.version if start_at_latest else 0
        tr.seg = seg
        tr.ino = ino
        tr.missing_since = 0.0
        self._handles[(tr.name, inc)] = seg
        self._tracks_changed()
        return seg

    def _retire(self, tr: _Track) -> None:
        """Stop following ``tr``'s handle; it stays mapped while updates queued from
        it wait to be read."""
        seg = tr.seg
        tr.seg = None
        tr.ino = 0
        if seg is not None:
            self._retired.append(seg)
        self._tracks_changed()

    def _tracks_changed(self) -> None:
        self._wait_segs = [t.seg for t in self._track_list if t.seg is not None]
        self._wait_stats = [t.st for t in self._track_list if t.seg is not None]

    def _release_retired(self) -> None:
        """Close retired handles once no queued or unsettled update can need them."""
        if not self._retired:
            return
        # Under _hand: another thread's loop may have taken the last queued update
        # off the queue and not yet made it the update out (neither would be seen).
        # Nothing is queued meanwhile: that takes _io, which the caller holds.
        with self._hand:
            if self._out_loops:
                self._let_go_closed_loops()
            if self._pending or self._unsettled is not None or self._held:
                return
        for seg in self._retired:
            for key in [k for k, v in self._handles.items() if v is seg]:
                del self._handles[key]
            seg.close()
        self._retired.clear()

    def _let_go_closed_loops(self) -> None:
        """Settle the updates out with aupdates() iterators whose event loop was
        closed under them: delivered (the news was), as close() counts those out.
        Nothing else would settle them before close(), and while one was out every
        retired incarnation's handle stayed mapped (a deleted segment's memory kept
        taken). Called with ``_hand`` held."""
        for key, loop in list(self._out_loops.items()):
            if not loop.is_closed():
                continue
            for up in (self._unsettled, *self._held):
                if up is not None and id(up) == key and self._take_unsettled(up):
                    self._tracks[up.segment].st.updates += 1
                    break
            self._out_loops.pop(key, None)

    def _attach_all(self, timeout: float) -> None:
        with contextlib.suppress(ShmcastError, OSError):
            self._word = NamespaceWord.attach(self.namespace)
        if self._word is not None:
            self._word_seen = self._word.notify
            self._word_state = self._word.state()
            self.epoch = self._word_state[1] or None
        deadline = time.monotonic() + timeout
        for tr in self._track_list:
            while self._attach(tr, start_at_latest=True) is None:
                if time.monotonic() >= deadline:
                    raise self._not_found(tr.name)
                time.sleep(0.01)

    def _not_found(self, name: str) -> ShmcastError:
        """Why ``name`` could not be attached: not there, or not a segment there."""
        return self._not_segments.get(name) or SegmentNotFoundError(name, self.namespace)

    # ------------------------------------------------------------------ reading

    def segment(self, name: str) -> Segment:
        """The attached read-only :class:`~shmcast.broker.Segment` (attaches if needed)."""
        self._check_open()
        tr = self._tracks.get(name)
        if tr is None:  # not one we follow: attached for reads of the latest only
            extra = self._extra.get(name)
            if extra is None:
                with self._latest_lock:
                    extra = self._extra.get(name)
                    if extra is None:
                        extra = self._attach_latest(validate_segment_name(name))
                        self._extra[name] = extra
            return extra
        seg = tr.seg or self._attach(tr)
        if seg is None:
            raise self._not_found(name)
        return seg

    def absent(self) -> list[str]:
        """The subscribed segments that are not attached (they do not exist yet)."""
        return [t.name for t in self._track_list if t.seg is None]

    def read(
        self, what: Update | str, version: int | None = None
    ) -> contextlib.AbstractContextManager[Snapshot]:
        """A zero-copy, read-only, validated read: ``with sub.read(update) as snap:``.

        ``sub.read(update)`` reads exactly ``update.version`` and settles its count
        (delivered, overrun or torn); ``sub.read(name)`` reads the latest version
        of that segment (``version=`` reads that one), outside the accounting.

        Work done inside the block sees the bytes as they are while it runs: if the
        writer laps the slot meanwhile, the block's results must be discarded, and
        leaving the block says so with TornReadError. A view stays valid while the
        writer has not come round to its slot (K-1 publish intervals with K slots).

        Raises:
            VersionUnavailableError: on entering, the version has left the ring.
            TornReadError: on leaving the block, the writer overwrote the slot meanwhile.
            SegmentNotFoundError: ``sub.read(name)`` of a segment that does not
                exist (any more).
            ValueError: an update of another subscriber's segments, or with a
                ``version`` other than its own.
        """
        if isinstance(what, Update):
            if version is not None and version != what.version:
                raise ValueError(
                    f"sub.read(update) reads version {what.version}, the update's own, not "
                    f"version={version!r}; to read another, name the segment: "
                    f"sub.read({what.segment!r}, version={version!r})"
                )
            return _ExactRead(self, what)
        return self._now(what).read(version)

    def copy(self, update: Update) -> Snapshot:
        """A validated private copy of exactly ``update.version``, returned only once
        validation has passed (for data kept past the block, or acted upon).

        Raises:
            VersionUnavailableError: the version has left the ring (counted overrun).
            TornReadError: it was overwritten while being copied (counted torn).
            TypeError: ``update`` is no :class:`Update` (a copy of the latest version
                of a segment is :meth:`latest`).

        Whatever the copy itself raises (``MemoryError``, ``KeyboardInterrupt``)
        goes through; its version, read but never handed over, is counted torn.
        """
        if not isinstance(update, Update):
            raise TypeError(
                f"copy() takes an Update this subscriber yielded, not {update!r}; a private "
                f"copy of a segment's latest version is sub.latest(name)"
            )
        reading = _ExactRead(self, update)
        snap = reading.__enter__()
        try:
            data = snap.array.copy()
        except BaseException:
            reading.failed()
            raise
        reading.__exit__(None, None, None)
        return Snapshot(snap.segment, snap.version, snap.timestamp_ns, data, snap.monotonic_ns)

    def latest(self, segment: str) -> Snapshot:
        """A validated private copy of the latest version.

        Raises:
            SegmentNotFoundError: the segment does not exist (any more).
        """
        return self._now(segment).latest()

    def _now(self, name: str) -> Segment:
        """The handle of the object ``name`` leads to now, for reads of the latest:
        never one of a segment deleted (or deleted and created again) since it was
        attached, whose data nobody writes any more. A followed segment's own handle
        is replaced only where :meth:`updates` looks (its last versions are counted
        there); until then reads of the latest go through a handle of their own.

        The check is :meth:`Segment.linked` at every read (one ``stat``, about a
        third of such a read's time). The namespace word's catalog generation cannot
        stand in for it: only the broker moves it, and for the segments in its
        catalog alone; a plain unlink of one (``Segment.remove``, ``rm`` of the
        path) only at its next look (up to a second and a heartbeat interval
        later), one made beside it (``Segment.create``, not adopted yet) or while
        no broker runs never. Meanwhile a read would return a deleted object's
        data."""
        if self._replaced:
            self._let_go_replaced()
        seg = self.segment(name)
        if seg.linked():
            if name in self._fresh:  # the followed handle was replaced meanwhile
                with self._latest_lock:
                    fresh = self._fresh.pop(name, None)
                    if fresh is not None:
                        self._replace_latest(name, fresh)
            return seg
        with self._latest_lock:
            if name not in self._tracks:  # read only for its latest: attached anew
                if self._extra.get(name) is seg:  # not replaced by another thread yet
                    del self._extra[name]
                    self._replace_latest(name, seg)
                return self.segment(name)
            fresh = self._fresh.get(name)
            if fresh is None or not fresh.linked():
                if fresh is not None:
                    del self._fresh[name]
                    self._replace_latest(name, fresh)
                fresh = self._attach_latest(name)
                self._fresh[name] = fresh
            return fresh

    def _attach_latest(self, name: str) -> Segment:
        """Attach ``name`` for reads of the latest. A header still being written is
        waited for once per object, as for the followed segments (:meth:`_attach`):
        an object whose creator died before its header made every read of the
        latest of that name wait a second before its ``NotASegmentError``."""
        path = shm_path(self.namespace, name)
        try:
            ino = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            raise SegmentNotFoundError(name, self.namespace) from None
        wait = 0.0 if self._not_segment_inos.get(name) == ino else 1.0
        try:
            seg = Segment.attach(name, namespace=self.namespace, wait=wait, owner=self._owner)
        except NotASegmentError:
            self._not_segment_inos[name] = ino
            raise
        self._not_segment_inos.pop(name, None)
        return seg

    def _replace_latest(self, name: str, seg: Segment) -> None:
        """``seg`` is no longer read for the latest of ``name``: closed a little later
        (:data:`REPLACED_GRACE`, or at the next replacement), not now. Closing it at
        once failed reads of it still running (another thread's, or the block of an
        outer ``sub.read(name)``) with ``ClosedError: segment is closed``, and two
        threads replacing it at once raised ``KeyError``."""
        old = self._replaced.pop(name, None)
        if old is not None:
            old[0].close()
        self._replaced[name] = (seg, time.monotonic())

    def _let_go_replaced(self) -> None:
        """Close the replaced handles whose grace is over (each maps a deleted object,
        whose shared memory stays taken while it is mapped)."""
        now = time.monotonic()
        if all(now - t < REPLACED_GRACE for _, t in list(self._replaced.values())):
            return
        with self._latest_lock:
            for name, (seg, t) in list(self._replaced.items()):
                if now - t >= REPLACED_GRACE:
                    del self._replaced[name]
                    seg.close()

    def staleness(self, segment: str, now_ns: int | None = None) -> float | None:
        """Seconds since the latest commit of ``segment`` (what its header says, else the
        last version learnt), on this host's monotonic clock; None before any.
        Safe from another thread (a metrics scrape)."""
        tr = self._tracks.get(segment)
        if tr is None:
            return None
        mono = tr.st.last_mono
        seg = tr.seg
        if seg is not None:
            with contextlib.suppress(ShmcastError, ValueError, TypeError):
                mono = max(mono, seg.info().monotonic_ns)
        if not mono:
            return None
        now = time.monotonic_ns() if now_ns is None else now_ns
        return max(0.0, (now - mono) / 1e9)

    def torn_reads(self, segment: str) -> int:
        """Versions whose exact read was torn (``stats[segment].torn``)."""
        st = self.stats.get(segment)
        return st.torn if st is not None else 0

    def _settle(self) -> None:
        """The consumer asked for the next update: the last one, unread, was delivered."""
        if self._unsettled is None:
            # Nothing out (the usual case after a read): no lock to take. Only the
            # consumer's own step makes an update out of updates(); another thread
            # (a read ending there) only settles it.
            return
        with self._hand:
            up = self._unsettled
            if up is not None:
                self._unsettled = None
                self._out_loops.pop(id(up), None)
                self._tracks[up.segment].st.updates += 1

    def _take_unsettled(self, up: Update) -> bool:
        """Whether ``up`` was still to be settled (out, neither read nor delivered);
        it no longer is: the caller counts it. Called with ``_hand`` held."""
        if self._unsettled is up:
            self._unsettled = None
            self._out_loops.pop(id(up), None)
            return True
        held = self._held
        for i, other in enumerate(held):
            if other is up:
                del held[i]
                self._out_loops.pop(id(up), None)
                return True
        return False

    def _settle_own(self, up: Update) -> None:
        """An aupdates() iterator asks for the next update: its last one, unread, was
        delivered (another task's stays theirs to settle)."""
        with self._hand:
            if self._take_unsettled(up):
                self._tracks[up.segment].st.updates += 1

    # ------------------------------------------------------------------ updates

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Yield an :class:`Update` per new version learnt, oldest first; with a
        ``timeout``, end after that many seconds without one.

        Raises:
            ClosedError: the subscriber was closed, also from another thread while
                this one waits (it notices within :data:`WAIT_SLICE` seconds).
            SegmentUnreachableError: the broker serves a segment this process
                cannot see.
            ValueError: ``timeout`` is not a finite number of seconds >= 0.
        """
        if timeout is not None:
            timeout = validate_seconds("timeout", timeout)
        self._check_open()
        inner = self._updates(timeout)
        # The waiting and reading happen inside next(), under the I/O lock that
        # close() takes before it tears the sockets and mappings down; the caller's
        # own code between two updates runs without it. Asking for the next update
        # settles the last one (delivered, unless a read of it decided otherwise).
        try:
            while True:
                with self._io:
                    self._settle()
                    if self._closed:
                        raise ClosedError("subscriber")
                    try:
                        update = next(inner)
                    except StopIteration:
                        if self._closed:
                            raise ClosedError("subscriber") from None
                        return
                    except (zmq.ZMQError, ValueError, ShmcastError) as exc:
                        if self._closed:
                            raise ClosedError("subscriber") from exc
                        raise
                    # No lock: _settle() above took the last one under it, and
                    # another thread (a read ending there) only sets this to None
                    # when it holds that update, under the lock.
                    self._unsettled = update
                yield update
        finally:
            if not self._closed:
                with self._io:
                    self._settle()

    def _updates(self, timeout: float | None) -> Iterator[Update]:
        pending = self._pending
        idle_deadline = None if timeout is None else time.monotonic() + timeout
        spin = self.mode == "spin"
        n = 0
        while True:
            if pending:
                yield pending.popleft()
                if timeout is not None:
                    idle_deadline = time.monotonic() + timeout
                continue
            if self._closed:
                return
            self._collect()
            if pending:
                continue
            if spin:
                n += 1
                if n & 0x3FF:
                    continue
            now = time.monotonic()
            if now >= self._next_check:
                self._housekeeping(now)
                if pending:
                    continue
            if idle_deadline is not None and now >= idle_deadline:
                return
            if not spin:
                step = self._step(now)
                if idle_deadline is not None:
                    step = min(step, max(0.0, idle_deadline - now))
                self._block(step)

    async def aupdates(self, timeout: float | None = None) -> AsyncIterator[Update]:
        """``async for update in sub.aupdates(timeout=...)``: the same updates and
        counters as :meth:`updates`, on the running asyncio loop, which keeps
        serving other tasks while it waits. ``events`` has the loop watch the SUB
        socket; ``shm`` and ``futex`` have one helper thread per subscriber and
        event loop (whatever the number of segments and iterators; started at an
        iterator's first wait, ending within 0.1 s of its last iterator's end) sleep
        on the notify words, GIL released, and wake the loop's iterators when one
        moves; ``spin`` polls on the loop between other tasks. A segment it attaches
        (made again, or late) is mapped without populating its pages (the reads fault
        them in), and a header still being written is looked at again every 10 ms,
        never waited for in the loop.
        Do not iterate :meth:`updates` and :meth:`aupdates` at the same time.
        Several tasks (of one event loop, or of several threads' loops) may each
        iterate :meth:`aupdates` of one subscriber: each version goes to one of them,
        and each task's update is settled (delivered, overrun or torn) by that
        task's read of it or its next step, as with one consumer.

        Cancelling a task while it waits for the next update (``asyncio.wait_for(
        anext(it), t)`` timing out, ``asyncio.timeout``, ``task.cancel()``) ends that
        iterator, as it ends any async generator: its next step raises
        ``StopAsyncIteration``. Nothing is lost: take the next updates from a new
        ``aupdates()``; for a bound on the wait, give ``timeout``.

        Raises:
            ClosedError, SegmentUnreachableError, ValueError: as :meth:`updates`.
        """
        if timeout is not None:
            timeout = validate_seconds("timeout", timeout)
        self._check_open()
        loop = asyncio.get_running_loop()
        waker = _Waker(self, loop)
        pending = self._pending
        idle_deadline = None if timeout is None else time.monotonic() + timeout
        mine: Update | None = None
        try:
            while True:
                if self._closed:
                    raise ClosedError("subscriber")
                if pending:
                    # Another task's iterator (or an iterator not closed yet) may have
                    # an update out: it is held, still its own to settle, and not
                    # replaced (counted nowhere) nor settled before its read ends.
                    # Under _hand: another thread's loop may hand one out at once
                    # (both held the same update, and one's new one went uncounted),
                    # or take the last one queued after this one looked.
                    with self._hand:
                        try:
                            up = pending.popleft()
                        except IndexError:
                            continue
                        if self._unsettled is not None:
                            self._held.append(self._unsettled)
                        self._unsettled = mine = up
                        self._out_loops[id(up)] = loop
                    yield up
                    self._settle_own(mine)
                    if timeout is not None:
                        idle_deadline = time.monotonic() + timeout
                    continue
                waker.clear()  # before looking: a change after the look wakes the wait
                with self._io:
                    if self._closed:
                        raise ClosedError("subscriber")
                    self._in_loop = True
                    try:
                        self._collect()
                        now = time.monotonic()
                        if not pending and now >= self._next_check:
                            self._housekeeping(now)
                    finally:
                        self._in_loop = False
                if pending:
                    continue
                if idle_deadline is not None and now >= idle_deadline:
                    return
                if self.mode == "spin":
                    await asyncio.sleep(0)
                    continue
                step = self._step(now)
                if idle_deadline is not None:
                    step = min(step, max(0.0, idle_deadline - now))
                await waker.wait(step)
        finally:
            waker.close()
            if not self._closed and mine is not None:
                self._settle_own(mine)

    # ------------------------------------------------------------- the wait loop

    def _collect(self) -> None:
        """Queue what is new, without blocking."""
        if self._sub is not None:
            self._drain_events()
            return
        word = self._word
        if word is not None and word.notify != self._word_seen:
            self._on_word()
        for tr in self._track_list:
            seg = tr.seg
            if seg is not None and seg.version > tr.st.last_version:
                self._from_header(tr)

    def _step(self, now: float) -> float:
        """How long the next wait may be."""
        step = min(WAIT_SLICE, max(0.0, self._next_check - now))
        if self._sub is not None:
            late = now - self._last_heartbeat > 1.5 * self._heartbeat_interval
            step = min(step, 0.001 if late or not self._broker_up else 0.05)
        return step

    def _block(self, step: float) -> None:
        """Sleep until something may be new, at most ``step`` seconds."""
        if self._sub is not None:
            self._sub.poll(int(step * 1000) + (0 if step == 0 else 1), zmq.POLLIN)
            return
        segs = self._wait_segs
        if not segs and self._word is None:
            time.sleep(step)
            return
        wait_segments(
            segs,
            [st.last_version for st in self._wait_stats],
            step,
            word=self._word,
            seen=self._word_seen,
        )

    def _housekeeping(self, now: float) -> None:
        """What is due at most a few times a second: reports, the broker's health,
        the paths of the segments, and handles no longer needed."""
        self._next_check = now + min(WAIT_SLICE, PATH_CHECK)
        self._release_retired()
        if self._replaced:
            self._let_go_replaced()
        if self._sub is not None:
            self._events_housekeeping(now)
        else:
            self._word_housekeeping()
        if now >= self._next_paths:
            self._next_paths = now + PATH_CHECK
            self._check_paths()
        if now >= self._next_report:
            self._next_report = now + REPORT_INTERVAL
            self._report()

    def _word_housekeeping(self) -> None:
        word = self._word
        if word is None or (not self._word_up(word) and word.replaced()):
            # A broker made a new word (ours is gone with the old one), or none yet.
            try:
                new = NamespaceWord.attach(self.namespace)
                self._word_unread = False
            except ShmcastError:
                new = None
            except OSError as exc:  # out of descriptors: tried again at each look
                new = None
                if not self._word_unread:
                    self._word_unread = True
                    log.warning(
                        "cannot follow the new broker of namespace %r (its namespace word: "
                        "%s); trying again",
                        self.namespace, exc,
                    )  # fmt: skip
            if new is not None and (word is None or new.ino != word.ino):
                if word is not None:
                    word.close()
                self._word = word = new
                self._word_seen = new.notify - 1  # look at it now
            elif new is not None:
                new.close()
        if word is not None and not self._hb_given:
            with contextlib.suppress(ShmcastError, ValueError):
                self.heartbeat_timeout = 3 * word.interval + 0.2
        up = self.broker_up
        if up is not None and up != self._was_up:
            if self._was_up is not None:
                if up:
                    log.info("broker of namespace %r is back", self.namespace)
                else:
                    log.warning(
                        "broker of namespace %r is silent; the mapped segments stay readable",
                        self.namespace,
                    )
            self._was_up = up

    def _on_word(self) -> None:
        """The namespace word moved: a catalog change, a heartbeat or a new broker."""
        word = self._word
        assert word is not None
        self._word_seen = word.notify
        state = word.state()
        if state == self._word_state:
            return  # a heartbeat
        old_epoch = self._word_state[1]
        self._word_state = state
        if state[1] != old_epoch and state[1]:
            if old_epoch:
                log.info("broker epoch changed (%s -> %s)", old_epoch, state[1])
                self.epoch_changes += 1
            self.epoch = state[1]
        self._check_paths()

    def _check_paths(self) -> None:
        """Follow each segment's path: gone is retired (after its last versions were
        queued), a new object there is a new incarnation, attached and counted."""
        for tr in self._track_list:
            path = shm_path(self.namespace, tr.name)
            try:
                ino = os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                ino = 0
            if tr.seg is not None and ino == tr.ino:
                continue
            if tr.seg is None and not ino:
                continue
            if tr.seg is not None:
                self._from_header(tr)  # the old incarnation's last versions
                self._retire(tr)
            if ino:
                self._attach(tr)
                if tr.seg is not None and tr.seg.version > tr.st.last_version:
                    self._from_header(tr)

    # ------------------------------------------------------ learning of versions

    def _from_header(self, tr: _Track) -> None:
        """Queue the versions of ``tr`` newer than the last one learnt, oldest first,
        from the ring: the latest, and the ones before it still in their slots."""
        seg = tr.seg
        st = tr.st
        last = st.last_version
        if seg is None:
            return
        try:
            v, _i, _s, ts, mono = seg.acquire_timed()
        except (NoVersionError, ClosedError):
            return
        except ShmcastError as exc:
            # The header names a slot that never comes whole (something writes outside
            # the protocol): reported once and passed over, never spun on.
            v = seg.version
            log.warning("%s; counting versions up to %d as missed", exc, v)
            st.missed += max(0, v - last)
            st.last_version = max(last, v)
            return
        if v <= last:
            return
        if v == last + 1:
            self._learn(tr, v, ts, mono, 0)
            return
        self._walk(tr, last, v)
        self._learn(tr, v, ts, mono, v - st.last_version - 1)

    def _walk(self, tr: _Track, last: int, v: int) -> None:
        """Queue versions between ``last`` and ``v`` (exclusive) still in the ring; the
        ring holds at most K-1 versions before the latest, so only those are looked up."""
        seg = tr.seg
        assert seg is not None
        st = tr.st
        for u in range(max(last + 1, v - seg.slots + 1), v):
            try:
                _u, _i, _s, ts, mono = seg.acquire_timed(u)
            except ShmcastError:
                continue  # lapped already, or never published (a relay skips numbers)
            self._learn(tr, u, ts, mono, u - st.last_version - 1)

    def _learn(self, tr: _Track, version: int, ts: int, mono: int, missed: int) -> None:
        st = tr.st
        now_mono = time.monotonic_ns()
        # Monotonic on one host; the wall clock only when the version is gone already.
        latency = (now_mono - mono) / 1e9 if mono else (time.time_ns() - ts) / 1e9
        if latency < 0.0:
            latency = 0.0
        st.missed += missed
        st.last_version = version
        st.last_ts = ts
        st.last_mono = mono or now_mono
        st.observe(latency)
        self._pending.append(
            _new_update(
                Update, (tr.name, version, ts, time.time_ns(), missed, latency, st.incarnation)
            )
        )

    # ------------------------------------------------------------- events mode

    def _drain_events(self) -> None:
        sub = self._sub
        assert sub is not None
        for _ in range(1000):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_event(frames)
        else:
            return  # more queued: no header cross-check while behind
        now = time.monotonic()
        if now >= self._cross_check_at(now):
            # Cross-check the headers: a notification lost at the high-water mark or
            # while the broker was down still becomes an update. Only once the queue
            # is drained, and only when announcements were lost or are late: a
            # subscriber that is merely behind, or a broker a little late, gets every
            # announced version instead of jumping ahead and counting them missed.
            self._last_cross = now
            self._gaps_crossed = self.events_missed
            for tr in self._track_list:
                if tr.seg is None and self._broker_up is False:
                    self._attach(tr)
                self._from_header(tr)

    def _cross_check_at(self, now: float) -> float:
        if not self._broker_up or now - self._last_heartbeat > 1.5 * self._heartbeat_interval:
            return self._last_cross + 0.001  # the broker is silent: poll the headers
        if self.events_missed != self._gaps_crossed:
            return self._last_cross + 0.25  # announcements were lost
        return float("inf")  # the broker announces every version: wait for its news

    def _events_housekeeping(self, now: float) -> None:
        if self._broker_up and now - self._last_heartbeat > (self.heartbeat_timeout or 1.7):
            log.warning("broker of namespace %r is silent; polling headers", self.namespace)
            self._broker_up = False
        for tr in self._track_list:
            if tr.missing_since and now - tr.missing_since > UNREACHABLE_AFTER:
                tr.missing_since = 0.0
                if self._reachable_check(tr.name):
                    raise SegmentUnreachableError(
                        tr.name, self.namespace, shm_path(self.namespace, tr.name), self._endpoint
                    )

    def _on_event(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 2:
                raise ValueError(f"{len(frames)} frames")
            tpc, body = frames
            msg = unpack(body)
            kind = msg["kind"]
            epoch = int(msg["epoch"])
            tseq = int(msg["tseq"])
            if not isinstance(kind, str):
                raise ValueError("kind is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            self.bad_messages += 1
            log.debug("dropped a malformed event: %s", exc)
            return
        if epoch != self.epoch:
            self._new_epoch(epoch)
        last = self._tseq.get(tpc)
        if last is not None and tseq > last + 1:
            self.events_missed += tseq - last - 1
        self._tseq[tpc] = tseq
        if kind == "heartbeat":
            self._last_heartbeat = time.monotonic()
            if not self._broker_up:
                log.info("broker of namespace %r is back", self.namespace)
                self._broker_up = True
            return
        name = msg.get("segment")
        tr = self._tracks.get(name) if isinstance(name, str) else None
        if tr is None:
            self.bad_messages += 1
            return
        if kind in ("created", "deleted"):
            self._check_paths()
        elif kind == "version":
            version, ts = msg.get("version"), msg.get("ts")
            if not isinstance(version, int) or not isinstance(ts, int):
                self.bad_messages += 1
                return
            self._announced(tr, version, ts)

    def _announced(self, tr: _Track, version: int, ts: int) -> None:
        seg = tr.seg
        if seg is None:
            self._check_paths()
            seg = tr.seg
            if seg is None:
                if not tr.missing_since:
                    tr.missing_since = time.monotonic()
                return
        # Versions are announced after they are committed to the header: one beyond
        # it is forged or corrupt, and would wedge last_version forever (unless the
        # segment was created again and we missed that news: look at the path first).
        if version > seg.version:
            self._check_paths()
            seg = tr.seg
            if seg is None or version > seg.version:
                self.bad_messages += 1
                return
        st = tr.st
        last = st.last_version
        if version <= last:
            if version < last:
                self._next_paths = 0.0  # an older number: perhaps a new incarnation
            return
        mono = 0
        try:
            _v, i, _s, _ts = seg.acquire(version)
            mono = seg.monotonic_ns(i)
        except ShmcastError:
            pass  # lapped already: still news; its read will say overrun
        if version > last + 1:
            self._walk(tr, last, version)
        self._learn(tr, version, ts, mono, version - st.last_version - 1)

    def _new_epoch(self, epoch: int) -> None:
        """A broker restarted: take a fresh snapshot (segments were adopted or remade)."""
        log.info("broker epoch changed (%s -> %s): resynchronising", self.epoch, epoch)
        self.epoch_changes += 1
        self._last_heartbeat = time.monotonic()
        self._broker_up = True
        try:
            self._snapshot()
            assert self._client is not None
            # The new broker's heartbeat interval (it may run with another one).
            self._take_interval(self._client.request("hello"))
        except (BrokerUnavailableError, ShmcastError) as exc:
            log.warning("snapshot after restart failed: %s", exc)
            self.epoch = epoch
        self._tseq.clear()

    # ---------------------------------------------------------------- reporting

    @property
    def broker_up(self) -> bool | None:
        """Whether the broker's heartbeats arrive (None: not known in this mode).

        ``events`` hears them on the events socket; ``shm`` (and ``futex``/``spin``
        where the namespace has a word) reads them from the namespace word.
        """
        if self.mode == "events":
            return self._broker_up
        word = self._word
        if word is None or word.closed:
            return False if self.mode == "shm" else None
        return self._word_up(word)

    def _word_up(self, word: NamespaceWord) -> bool:
        """The word's heartbeats are recent: within the timeout given, else within three
        of the intervals the broker now writing it beats at (one restarted with another
        interval is judged by its own)."""
        return word.broker_up(self.heartbeat_timeout if self._hb_given else None)

    def _report(self) -> None:
        """Tell the broker our counters (one-way, never blocks; for ``shmcast top``):
        those of the first :data:`REPORT_SEGMENTS` segments, which the broker keeps
        (the counters of all of them may outgrow the broker's largest message)."""
        if self._client is None or not self.broker_up:
            return
        segs = {
            name: {
                "last_version": st.last_version,
                "updates": st.updates,
                "missed": st.missed,
                "overrun": st.overrun,
                "torn": st.torn,
                "p50": st.percentile(50),
                "p99": st.percentile(99),
            }
            for name, st in list(self.stats.items())[:REPORT_SEGMENTS]
        }
        self._client.send(
            "report",
            name=self.name[:REPORT_NAME],
            pid=os.getpid(),
            segments=segs,
            **reporter_identity(),  # lets top tell a stopped subscriber from a gone one
        )
        if self not in _REPORTERS:
            with _REPORTERS_LOCK:
                _REPORTERS.add(self)

    def _say_goodbye(self) -> None:
        """Tell the broker we are gone, so ``shmcast top`` drops our row at once.
        Before, a closed subscriber stayed in the table with its last report's counts
        and a growing lag until the report expired (``REPORT_TTL``, 5 s)."""
        if self._client is None or not self._next_report:  # never reported: no row
            return
        name = self.name[:REPORT_NAME]
        with contextlib.suppress(Exception):  # best effort: the row expires anyway
            with _REPORTERS_LOCK:
                _REPORTERS.discard(self)
                # Another open subscriber of this process with this name, of this
                # broker, reports under the same row: it stays (before, it went until
                # that one's next report). The last of them says goodbye.
                shared = any(
                    not other._closed and other.name[:REPORT_NAME] == name
                    and other._endpoint == self._endpoint
                    for other in _REPORTERS
                )  # fmt: skip
            if not shared and self.broker_up:
                self._client.send("report", name=name, pid=os.getpid(), segments={}, gone=True)

    # ------------------------------------------------------------------ closing

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("subscriber")

    @property
    def closed(self) -> bool:
        return self._closed

    def _teardown(self) -> None:
        self._say_goodbye()
        for tr in self._track_list:
            tr.seg = None
        for seg in [
            *self._handles.values(),
            *self._retired,
            *self._extra.values(),
            *self._fresh.values(),
            *(seg for seg, _ in self._replaced.values()),
        ]:
            seg.close()
        self._extra.clear()
        self._fresh.clear()
        self._replaced.clear()
        self._handles.clear()
        self._retired.clear()
        self._wait_segs = []
        if self._word is not None:
            self._word.close()
            self._word = None
        if self._sub is not None:
            self._sub.close(0)
            self._sub = None
        if self._client is not None:
            # A moment for the goodbye to leave (in ZeroMQ's I/O thread; close does
            # not wait for it).
            self._client.close(linger=GOODBYE_LINGER)
            self._client = None

    def close(self) -> None:
        """Detach every segment and close the sockets. Idempotent.

        Safe from another thread: a thread waiting in :meth:`updates` ends with
        :class:`ClosedError` instead of finding its sockets gone. Safe from a signal
        handler: when it interrupts its own thread handing an update out or settling
        a read, the settling and teardown end in a thread of their own (at once
        after the interrupted step), and this returns after :data:`HAND_WAIT`.
        """
        if self._closed:
            return
        self._closed = True
        # A signal handler's close() may interrupt its own thread handing an update
        # out or settling one, under _hand (not reentrant): waiting for it here
        # would wait for ever. Then the rest runs in a thread of its own, once the
        # interrupted step let go (a bare one: starting it takes none of threading's
        # locks, which the interrupted thread may hold too).
        if not self._hand.acquire(timeout=HAND_WAIT):
            _thread.start_new_thread(self._close_apart, ())
            return
        self._hand.release()
        self._close_rest()

    def _close_apart(self) -> None:
        try:
            self._close_rest()
        except Exception:  # no caller to raise it to
            log.exception("closing subscriber %s", self.name)

    def _close_rest(self) -> None:
        """close() once the subscriber is marked closed: settle, count, tear down."""
        # Wait (bounded) for a reading thread to leave its wait slice first.
        locked = self._io.acquire(timeout=CLOSE_WAIT)
        try:
            self._settle()
            with self._hand:
                for up in self._held:  # out with other tasks, unread: delivered as news
                    self._tracks[up.segment].st.updates += 1
                self._held.clear()
                self._out_loops.clear()
            self._drop_readers()
            # Versions learnt of but never handed out (a consumer that stopped early,
            # --count): counted, or they would be in no counter at all.
            # (Taken one by one: without the lock a reading thread may still queue.)
            while self._pending:
                try:
                    up = self._pending.popleft()
                except IndexError:
                    break
                self._tracks[up.segment].st.missed += 1
            if locked:
                self._count_unlearnt()
            self._teardown()
        finally:
            if locked:
                self._io.release()

    def _count_unlearnt(self) -> None:
        """At close: the versions each followed segment's header shows beyond the last
        one learnt (committed since the last look, or announced and still queued in
        ``events``) are missed, or they would be in no counter at all. Called with
        ``_io`` held: no reading thread learns of a version meanwhile."""
        for tr in self._track_list:
            seg = tr.seg
            if seg is None:
                continue
            try:
                latest = seg.version
            except ShmcastError:
                continue
            st = tr.st
            if latest > st.last_version:
                st.missed += latest - st.last_version
                st.last_version = latest

    def _drop_readers(self) -> None:
        """Take the loops' readers off the SUB socket's fd before it is closed.

        An ``aupdates()`` iterator still open (its task holding an update, or one not
        collected yet) keeps its loop's reader on the fd: once the socket is closed,
        the next socket (a new Subscriber's) may get the same fd number, and the loop,
        which already has a reader registered under it, only swaps the callback and
        never watches the new file (its iterators woke only on their 50 ms step), and
        the old iterator's close removed the new one's reader. A loop of this thread
        drops its reader now; another thread's loop at its next turn."""
        wakers, self._fd_wakers = self._fd_wakers, []
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        done: set[int] = set()
        for waker in wakers:
            fd, waker._fd = waker._fd, None
            if fd is None or id(waker._loop) in done:
                continue
            done.add(id(waker._loop))
            with contextlib.suppress(Exception):  # a loop closed already
                if waker._loop is running:
                    waker._loop.remove_reader(fd)
                else:
                    waker._loop.call_soon_threadsafe(waker._loop.remove_reader, fd)

    def __repr__(self) -> str:
        return f"<Subscriber {self.namespace}/{','.join(self.names)} wait={self.mode}>"


class _ExactRead:
    """The context manager of ``sub.read(update)``: the version exactly, and its count
    settled by how the read ends. A class, not a generator: it is on every read."""

    __slots__ = ("_counted", "_seg", "_seq", "_slot", "_sub", "_up")

    def __init__(self, sub: Subscriber, update: Update) -> None:
        self._sub = sub
        self._up = update
        self._seg: Segment | None = None
        self._counted = False
        self._slot = 0
        self._seq = 0

    def __enter__(self) -> Snapshot:
        sub = self._sub
        up = self._up
        if sub._closed:
            raise ClosedError("subscriber")
        if up.segment not in sub._tracks:
            raise ValueError(
                f"{up!r} is not an update of this subscriber (it reads {sub.names}); "
                f"read it with the subscriber that yielded it"
            )
        if sub._unsettled is up:
            # The one consumer's update out (the usual case): no lock to take. Only
            # a hint: __exit__ settles it under the lock, if it is still out then.
            self._counted = True
        else:
            with sub._hand:
                self._counted = sub._unsettled is up or any(other is up for other in sub._held)
        seg = sub._handles.get((up.segment, up.incarnation))
        try:
            if seg is None:
                raise VersionUnavailableError(
                    up.segment, up.version, 0, 2,
                    f"version {up.version} of segment {up.segment!r} is of an incarnation "
                    f"of it this subscriber no longer maps (it was created again since, or "
                    f"the update is not one this subscriber yielded); read the latest",
                )  # fmt: skip
            v, i, s, ts, mono = seg.acquire_timed(up.version)
        except (VersionUnavailableError, NoVersionError):
            if self._counted:
                with sub._hand:
                    if sub._take_unsettled(up):
                        sub._tracks[up.segment].st.overrun += 1
            if seg is None:
                raise
            raise VersionUnavailableError(up.segment, up.version, seg.version, seg.slots) from None
        self._seg, self._slot, self._seq = seg, i, s
        return Snapshot(up.segment, v, ts, seg.view(i), mono)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        seg = self._seg
        if seg is None:
            return
        sub = self._sub
        up = self._up
        try:
            ok = seg.validate(self._slot, self._seq)
        except ClosedError:
            # Closed inside the block (from another thread): the read cannot be
            # validated, which is not the writer tearing it.
            if exc_type is None:
                raise
            return
        if self._counted:
            with sub._hand:
                if sub._take_unsettled(up):
                    st = sub._tracks[up.segment].st
                    if ok:
                        st.updates += 1
                    else:
                        st.torn += 1
        if not ok and exc_type is None:
            raise TornReadError(up.segment, up.version)

    def failed(self) -> None:
        """The read began and its data never reached the consumer (the copy of
        :meth:`Subscriber.copy` raised): settled torn, not delivered. Before, the
        update stayed out and the consumer's next step counted it delivered."""
        sub = self._sub
        up = self._up
        if self._counted:
            with sub._hand:
                if sub._take_unsettled(up):
                    sub._tracks[up.segment].st.torn += 1


class _Waker:
    """What an :meth:`Subscriber.aupdates` iterator sleeps on, without blocking the loop.

    ``events``: the loop watches the SUB socket's file descriptor. ``shm`` and
    ``futex``: the loop's helper thread (a :class:`_Watch`) wakes it. ``spin``
    needs neither.
    """

    def __init__(self, sub: Subscriber, loop: asyncio.AbstractEventLoop) -> None:
        self._sub = sub
        self._loop = loop
        self._woken = False
        self._fut: asyncio.Future[None] | None = None
        self._stop = False
        self._fd: int | None = None
        #: The loop's helper thread, joined at this iterator's first wait.
        self._watch: _Watch | None = None
        if sub._sub is not None:
            # Under _io, as every use of the socket: close() from another thread
            # closes it, and drops the loops' readers, under that lock. Before, a
            # close right then ended the iterator with ZMQError ("Socket operation
            # on non-socket"), not ClosedError. Closed: no reader; the iterator's
            # first look says so.
            with sub._io:
                if not sub._closed and sub._sub is not None:
                    self._watch_fd(sub._sub, loop)
        #: ``shm`` and ``futex`` sleep in the loop's helper thread, joined (started
        #: when the loop has none) by the first wait: an iterator that only takes
        #: what is queued (``break`` after one update, ``timeout=0``) needs none.
        #: Before, every iterator started one, which slept on for up to WAIT_SLICE
        #: after its close (hundreds, in a loop that took one update an iterator
        #: without yielding to the event loop; 42 at once, in one making iterators
        #: with a 2 ms timeout).
        self._threaded = sub.mode in ("shm", "futex")

    def _watch_fd(self, sock: zmq.Socket[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` watch the SUB socket's file descriptor (``events``)."""
        sub = self._sub
        fd = sock.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        if not any(w._loop is loop for w in sub._fd_wakers):
            # A reader already on this fd number in this loop is a stale one, of a
            # socket closed since (another thread's close() drops its loop's at the
            # loop's next turn): add_reader would only swap its callback, and the
            # loop would never watch this socket's file.
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        # Those of loops closed under their iterators (loop.close() without
        # shutdown_asyncgens()) would be kept, with their loops, until close().
        sub._fd_wakers[:] = [w for w in sub._fd_wakers if not w._loop.is_closed()]
        sub._fd_wakers.append(self)
        # One reader per loop and fd (adding another replaces it): it wakes every
        # iterator of this loop. Before, each iterator's own reader replaced the
        # last, and the other tasks' iterators woke only on their 50 ms step.
        loop.add_reader(fd, _wake_all, sub._fd_wakers, loop)

    def clear(self) -> None:
        self._woken = False

    def _wake(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)
        else:
            self._woken = True

    async def wait(self, step: float) -> None:
        sub = self._sub
        if sub._sub is not None:
            # Under _io, as every use of the socket: close() (from another thread)
            # closes it under that lock, and a ZeroMQ socket is not thread-safe
            # (ZMQ_EVENTS processes its commands, as another loop's recv does).
            # Before, a close between the look and the question ended the iterator
            # with ZMQError ("Socket operation on non-socket"), not ClosedError.
            with sub._io:
                sock = sub._sub
                if sub._closed or sock is None:
                    return  # the iterator's next look says ClosedError
                if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    return  # the fd signals edges: what is queued already would not wake us
        if self._woken:
            return
        if self._threaded and self._watch is None and not self._stop:
            self._watch = _Watch.join(self._sub, self._loop, self)
        if self._watch is not None:
            watching = self._watch.watching
            if any(id(seg) not in watching for seg in self._sub._wait_segs):
                # Attached after the helper thread began its sleep (at most
                # WAIT_SLICE): the loop looks itself meanwhile. It slept through
                # the first versions of a segment attached in its loop, and the
                # 2-slot ring lapped them (missed).
                step = min(step, NEW_SEGMENT_POLL)
        fut = self._loop.create_future()
        self._fut = fut
        timer = self._loop.call_later(step, _resolve, fut, None)
        try:
            await fut
        finally:
            timer.cancel()
            self._fut = None

    def close(self) -> None:
        self._stop = True
        if self._watch is not None:
            self._watch.leave(self)
            self._watch = None
        if self._fd is not None:
            # An iterator left with ``break`` is closed when it is collected, maybe
            # after the next one registered on the same fd: the reader goes with the
            # last iterator of this loop, not with the first to close.
            wakers = self._sub._fd_wakers
            with contextlib.suppress(ValueError):
                wakers.remove(self)
            if not any(w._loop is self._loop for w in wakers):
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._fd)
            self._fd = None


class _Watch:
    """The helper thread of one (:class:`Subscriber`, event loop): it sleeps on the
    notify words (segments' and the namespace word's; never on version numbers,
    which the loop is consuming) and wakes the loop's ``aupdates()`` iterators
    waiting on them (:class:`_Waker`) whenever one moves.

    It loads the words before it calls the loop, and an iterator clears its flag
    before it looks at the segments, so a commit between the two is never lost:
    either the look sees it, or the words differ from what the thread sleeps on
    and its next load (after the commit) calls the loop again, which wakes every
    iterator joined by then; a thread's first load calls it anyway (a commit
    since the look of the iterator that started it). One thread serves all the
    iterators of a loop, and ends at the end of its sleep (at most WAIT_SLICE)
    once the last has left, unless another joins meanwhile.
    """

    __slots__ = ("_loop", "_sub", "thread", "wakers", "watching")

    def __init__(self, sub: Subscriber, loop: asyncio.AbstractEventLoop) -> None:
        self._sub = sub
        self._loop = loop
        self.wakers: list[_Waker] = []
        self.thread: threading.Thread | None = None
        #: The segments the thread sleeps on now (their ids): one attached since
        #: its sleep began wakes nobody until that sleep's slice ends.
        self.watching: frozenset[int] = frozenset()

    @staticmethod
    def join(sub: Subscriber, loop: asyncio.AbstractEventLoop, waker: _Waker) -> _Watch:
        """``waker``'s loop's helper thread, started if the loop has none running."""
        with sub._watch_lock:
            watch = sub._watches.get(loop)
            if watch is None:
                watch = sub._watches[loop] = _Watch(sub, loop)
            watch.wakers.append(waker)
            if watch.thread is None:
                watch.thread = threading.Thread(
                    target=watch._run, name="shmcast-aupdates", daemon=True
                )
                watch.thread.start()
        return watch

    def leave(self, waker: _Waker) -> None:
        with self._sub._watch_lock, contextlib.suppress(ValueError):
            self.wakers.remove(waker)

    def _done(self) -> bool:
        """Whether the thread ends now: it is no longer needed (taken off its
        subscriber's watches, so that the next iterator starts a new one)."""
        sub = self._sub
        with sub._watch_lock:
            if self.wakers and not sub._closed and not self._loop.is_closed():
                return False
            self.thread = None
            if sub._watches.get(self._loop) is self:
                del sub._watches[self._loop]
            return True

    def _wake_all(self) -> None:
        """In the loop: wake each iterator waiting on this thread."""
        for waker in list(self.wakers):
            waker._wake()

    def _run(self) -> None:
        sub = self._sub
        loop = self._loop
        before: list[int] | None = None
        while not self._done():
            try:
                # Versions first, then the notify words: a commit after the first
                # look ends the sleep below, one before it moved a word.
                segs = list(sub._wait_segs)
                self.watching = frozenset(map(id, segs))
                afters = [seg.version for seg in segs]
                _, vals = notify_words(segs, sub._word)
            except (ValueError, TypeError, ShmcastError):  # closed under us: look again
                segs, afters, vals = [], [], []
            if vals != before:
                try:
                    loop.call_soon_threadsafe(self._wake_all)
                except RuntimeError:  # the loop is closed: the next look ends the thread
                    continue
            before = vals
            try:
                # Announced in each segment's waiters word (the segments' writers
                # wake it), and on the namespace word: as the synchronous wait.
                word = sub._word
                seen = vals[0] if word is not None and vals else 0
                wait_segments(segs, afters, WAIT_SLICE, word=word, seen=seen)
            except (ValueError, OSError, ShmcastError):
                time.sleep(0.001)


def _wake_all(wakers: list[_Waker], loop: asyncio.AbstractEventLoop) -> None:
    """The loop's reader on a SUB socket's fd: wake each iterator of that loop."""
    for waker in list(wakers):
        if waker._loop is loop:
            waker._wake()


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
