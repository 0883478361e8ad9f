"""The reading side (issue 12): exact reads, four counters that add up to the
versions published in every wait mode, validated copies, asyncio."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import zmq

from shmcast.broker import (
    Broker,
    ClosedError,
    NotASegmentError,
    Segment,
    TornReadError,
    VersionUnavailableError,
)
from shmcast.broker.client import shm_path
from shmcast.cli._main import main
from shmcast.publisher import Publisher
from shmcast.subscriber import Subscriber, Update
from shmcast.subscriber import _subscriber as subscriber_module

from ._seg_util import finish, kill, read_line, spawn

MODES = ["shm", "events", "futex", "spin"]


def _publisher(name: str, count: int, rate: float, slots: int = 2) -> subprocess.Popen[str]:
    """A publisher process, leased and ready; it publishes when :func:`_go` says so."""
    proc = spawn("-m", "tests._reading_workers", "publish", name, str(count), str(rate), str(slots))
    try:
        assert read_line(proc, 30) == "READY"
    except BaseException:
        kill(proc)
        raise
    return proc


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _consume_until_done(
    sub: Subscriber,
    name: str,
    proc: subprocess.Popen[str],
    count: int,
    each: Callable[[Update], None],
) -> dict[str, int]:
    """Run ``each`` on every update until the publisher has exited and the subscriber
    has learnt its last version and drained (bounded)."""
    deadline = time.monotonic() + 60
    while True:
        n = 0
        for up in sub.updates(timeout=0.3):
            each(up)
            n += 1
        if proc.poll() is not None and n == 0 and sub.stats[name].last_version >= count:
            break
        assert time.monotonic() < deadline, f"stuck at {sub.stats[name]}"
    summary, _ = finish(proc, 30)
    return summary


@pytest.mark.parametrize("consumer", ["fast", "slow", "never"])
@pytest.mark.parametrize("mode", MODES)
def test_every_version_is_delivered_missed_overrun_or_torn(
    namespace: str, thread_broker: Broker, mode: str, consumer: str
) -> None:
    """For a subscriber present from the first version:
    distinct versions delivered + missed + overrun + torn == versions published."""
    count = 400
    proc = _publisher("acc", count, 2000)
    delivered: list[int] = []

    def read(up: Update) -> None:
        if consumer == "never":  # delivered as news: the update was handed out
            delivered.append(up.version)
            return
        try:
            with sub.read(up) as snap:
                if consumer == "slow":
                    time.sleep(0.002)  # slow work: the writer laps the 2-slot ring meanwhile
                good = bool((snap.array == up.version).all())
        except (VersionUnavailableError, TornReadError):
            return
        assert good, f"version {up.version} read as other bytes"  # exact, never torn
        delivered.append(up.version)

    try:
        with Subscriber("acc", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
            _go(proc)
            summary = _consume_until_done(sub, "acc", proc, count, read)
            st = sub.stats["acc"]
    finally:
        kill(proc)
    assert summary["published"] == count
    assert len(delivered) == len(set(delivered)) == st.updates
    assert st.updates + st.missed + st.overrun + st.torn == count, st
    assert st.accounted == count
    assert st.updates > 0
    if consumer == "slow":
        assert st.torn + st.overrun > 0, st  # the slow reader was lapped, and it shows


@pytest.mark.parametrize("mode", ["shm", "futex", "events"])
def test_a_segment_the_broker_does_not_serve_starts_at_its_latest_version(
    namespace: str, thread_broker: Broker, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Made with the engine API while a broker runs: its 10 versions before the
    subscriber are history, not 'missed' (shm counted them, as futex never did)."""
    w = Segment.create("a", np.int64, (4,), slots=2)
    try:
        for i in range(10):
            w.write(np.full(4, i))
        with Subscriber("a", wait=mode, timeout=5) as sub:
            for i in range(3):
                w.write(np.full(4, i))
            got = [u.version for u in sub.updates(timeout=1.0)]
            st = sub.stats["a"]
        if mode == "events":  # no announcements of it: nothing, and a warning says why
            assert (got, st.missed, st.accounted) == ([], 3, 3)  # counted at close
            assert "does not serve it" in caplog.text
        else:
            assert got[-1] == 13
            assert (st.accounted, st.missed + st.updates) == (3, 3)
    finally:
        w.unlink()
        w.close()


def _first_error(sub: Subscriber, timeout: object) -> BaseException | None:
    """What the first step of ``updates(timeout)`` raises, within 5 s (a NaN
    timeout waited for ever: the subscriber is closed to end such a wait)."""
    out: list[BaseException | None] = [None]

    def first() -> None:
        try:
            next(iter(sub.updates(timeout=timeout)), None)  # type: ignore[arg-type]
        except BaseException as exc:  # whichever: the test looks at it
            out[0] = exc

    t = threading.Thread(target=first, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        sub.close()
        t.join(5)
        return TimeoutError("updates() was still waiting after 5 s")
    return out[0]


@pytest.mark.parametrize("bad", [float("nan"), -1, float("inf"), "5", True])
def test_bad_timeouts_are_refused_naming_the_argument(
    namespace: str, thread_broker: Broker, bad: object
) -> None:
    """NaN waited for ever, -1 returned nothing at once, and the constructor blamed
    a broker that was running: each is now a ValueError naming the argument."""
    with pytest.raises(ValueError, match="timeout must be a finite number"):
        Subscriber("a", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heartbeat_timeout must be a finite number"):
        Subscriber("a", heartbeat_timeout=bad)  # type: ignore[arg-type]
    with Subscriber("a") as sub:
        err = _first_error(sub, bad)
        assert isinstance(err, ValueError), err
        assert str(err).startswith("timeout must be a finite number")

        async def first() -> None:
            async for _ in sub.aupdates(timeout=bad):  # type: ignore[arg-type]
                break

        with pytest.raises(ValueError, match="timeout must be a finite number"):
            asyncio.run(asyncio.wait_for(first(), 5))


@pytest.mark.parametrize("mode", ["shm", "events"])
def test_a_huge_timeout_is_a_long_wait(namespace: str, thread_broker: Broker, mode: str) -> None:
    """``Subscriber(timeout=1e300)`` (finite, so accepted): before, its first request
    to the broker died of an OverflowError (a poll of 1e303 ms)."""
    with Subscriber("a", wait=mode, timeout=1e300, heartbeat_timeout=1e300) as sub:  # type: ignore[arg-type]
        assert list(sub.updates(timeout=0.05)) == []


def test_a_read_ended_by_close_says_closed_not_torn(namespace: str, thread_broker: Broker) -> None:
    """The writer never touched the slot: leaving the block raised TornReadError
    ("overwritten by the writer"), while the counts said delivered."""
    with Publisher("c", dtype="f8", shape=(4,)) as pub, Subscriber("c", timeout=5) as sub:
        pub.publish(np.ones(4))
        up = next(iter(sub.updates(timeout=5)))
        reading = sub.read(up)
        assert reading.__enter__().version == up.version
        sub.close()
        with pytest.raises(ClosedError):
            reading.__exit__(None, None, None)
        assert (sub.stats["c"].torn, sub.stats["c"].updates) == (0, 1)


def test_errors_of_reads_say_what_is_wrong(namespace: str, thread_broker: Broker) -> None:
    """An update of another segment, one of an unknown incarnation, or a version not
    committed yet: each named as such (each said 'latest is 0 ... create the
    segment with more slots')."""
    with Publisher("a", dtype="f8", shape=(4,), slots=4) as pub, Subscriber("a") as sub:
        pub.publish(np.ones(4))
        up = next(iter(sub.updates(timeout=5)))
        with pytest.raises(ValueError, match="not an update of this subscriber"):
            sub.read(up._replace(segment="b")).__enter__()
        with pytest.raises(VersionUnavailableError, match="incarnation of it this subscriber"):
            sub.read(up._replace(incarnation=0)).__enter__()
        with pytest.raises(VersionUnavailableError, match=r"not committed yet \(latest is 1\)"):
            sub.read("a", version=99).__enter__()
        with sub.read(up) as snap:
            assert snap.version == 1
        # A name where an update goes: an AttributeError from inside copy().
        with pytest.raises(TypeError, match=r"sub.latest\(name\)"):
            sub.copy("a")  # type: ignore[arg-type]
        # A version beside an update was ignored: read(update, 5) read the update's.
        with pytest.raises(ValueError, match=r"sub.read\('a', version=5\)"):
            sub.read(up, 5)
        with sub.read(up, 1) as snap:
            assert snap.version == 1


@pytest.mark.parametrize("mode", ["futex", "spin"])
def test_a_name_held_by_no_segment_is_named_so(namespace: str, mode: str) -> None:
    """After the wait, the error said 'no segment ...; create it', which fails: the
    name is taken. It is the reason the object is not a segment, and its fix."""
    path = shm_path(namespace, "a")
    with open(path, "xb") as f:
        f.write(b"not a segment" * 100)
    try:
        with pytest.raises(NotASegmentError, match="doctor"):
            Subscriber("a", wait=mode, timeout=0.3)  # type: ignore[arg-type]
    finally:
        os.unlink(path)


def test_read_update_is_exact_and_settles_its_count(namespace: str, thread_broker: Broker) -> None:
    with (
        Subscriber("e", namespace=namespace) as sub,
        Publisher("e", dtype="i8", shape=4, slots=3, namespace=namespace) as pub,
    ):
        pub.publish(np.full(4, 1, "i8"))
        pub.publish(np.full(4, 2, "i8"))
        it = sub.updates(timeout=2)
        u1 = next(it)
        assert (u1.version, u1.missed) == (1, 0)
        with sub.read(u1) as snap:  # exactly version 1, although 2 is the latest
            assert snap.version == 1
            assert (snap.array == 1).all()
            assert not snap.array.flags.writeable
        with sub.read("e") as snap:  # the name: the latest
            assert snap.version == 2
        u2 = next(it)
        assert u2.version == 2
        for i in (3, 4, 5):  # three more versions: the 3-slot ring no longer holds 2
            pub.publish(np.full(4, i, "i8"))
        with pytest.raises(VersionUnavailableError), sub.read(u2):
            pass
        st = sub.stats["e"]
        assert (st.updates, st.overrun, st.torn) == (1, 1, 0)
        u3 = next(it)  # walked from the ring, oldest first: 3, 4 and 5 are all there
        assert (u3.version, u3.missed) == (3, 0)
        with pytest.raises(TornReadError), sub.read(u3) as snap:
            pub.publish(np.full(4, 6, "i8"))  # the writer laps version 3's slot meanwhile
        assert st.torn == 1
        u4 = next(it)
        assert u4.version == 4
        u5 = next(it)  # u4 was not read: asking for the next one delivered it as news
        assert st.updates == 2
        kept = sub.copy(u5)  # private, validated: survives the writer going round
        for i in range(7, 12):
            pub.publish(np.full(4, i, "i8"))
        assert kept.version == 5
        assert (kept.array == 5).all()
        assert st.updates == 3
        for _ in it:  # 6 is gone (missed or overrun), then 9, 10, 11 from the ring
            pass
        assert st.updates + st.missed + st.overrun + st.torn == pub.version == 11


def test_a_read_of_an_update_read_before_changes_no_count(
    namespace: str, thread_broker: Broker
) -> None:
    with (
        Publisher("twice", dtype="i8", shape=1, slots=2, namespace=namespace) as pub,
        Subscriber("twice", namespace=namespace, wait="futex") as sub,
    ):
        pub.publish(np.ones(1, "i8"))
        up = next(sub.updates(timeout=2))
        with sub.read(up):
            pass
        with sub.read(up):  # a second read of the same version: no second count
            pass
        for _ in range(3):
            pub.publish(np.ones(1, "i8"))
        with pytest.raises(VersionUnavailableError), sub.read(up):
            pass  # gone now, but it was delivered already
        st = sub.stats["twice"]
        assert (st.updates, st.overrun, st.torn) == (1, 0, 0)


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_a_copy_that_raises_counts_its_version_torn_not_delivered(
    namespace: str, thread_broker: Broker, monkeypatch: pytest.MonkeyPatch, error: type
) -> None:
    """Before, the read was never settled: the update stayed out and the consumer's
    next step counted it delivered, its data never handed over (2 of 2 delivered)."""

    class Fails(np.ndarray):
        """A slot's view whose copy raises, as one out of memory would."""

        def copy(self, order: Any = "C") -> Any:
            raise error("the copy")

    with (
        Publisher("cp", dtype="i8", shape=4, slots=3, namespace=namespace) as pub,
        Subscriber("cp", namespace=namespace) as sub,
    ):
        pub.publish(np.full(4, 1, "i8"))
        pub.publish(np.full(4, 2, "i8"))
        it = sub.updates(timeout=0.5)
        u1 = next(it)
        seg = sub._handles[(u1.segment, u1.incarnation)]
        real = seg.view
        with monkeypatch.context() as patch:
            patch.setattr(seg, "view", lambda i: real(i).view(Fails))
            with pytest.raises(error):
                sub.copy(u1)
        u2 = next(it)
        assert (sub.copy(u2).array == 2).all()
        for _ in it:
            pass
        st = sub.stats["cp"]
        assert (st.updates, st.missed, st.overrun, st.torn) == (1, 0, 0, 1)


# ------------------------------------------------------------------------ asyncio


@pytest.mark.parametrize("mode", MODES)
def test_aupdates_adds_up_and_never_blocks_the_loop(
    namespace: str, thread_broker: Broker, mode: str
) -> None:
    count = 300
    proc = _publisher("aio", count, 1000)

    async def run(sub: Subscriber) -> tuple[list[int], int, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        threads = threading.active_count()
        most = threads
        delivered: list[int] = []
        _go(proc)
        deadline = time.monotonic() + 60
        while True:
            n = 0
            async for up in sub.aupdates(timeout=0.3):
                n += 1
                most = max(most, threading.active_count())
                try:
                    with sub.read(up) as snap:
                        good = bool((snap.array == up.version).all())
                except (VersionUnavailableError, TornReadError):
                    continue
                assert good  # only once the read validated: inside, bytes may be torn
                delivered.append(up.version)
            if proc.poll() is not None and n == 0 and sub.stats["aio"].last_version >= count:
                break
            assert time.monotonic() < deadline
        # Idle: nothing is published while aupdates waits; the other task keeps running.
        before = ticks
        async for _ in sub.aupdates(timeout=0.5):
            pass
        idle_ticks = ticks - before
        task.cancel()
        return delivered, idle_ticks, most - threads

    try:
        with Subscriber("aio", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
            delivered, idle_ticks, extra_threads = asyncio.run(run(sub))
            st = sub.stats["aio"]
        finish(proc, 30)
    finally:
        kill(proc)
    assert len(delivered) == len(set(delivered)) == st.updates
    assert st.updates + st.missed + st.overrun + st.torn == count, st
    assert idle_ticks >= 50, f"the loop ran {idle_ticks} 1-ms ticks in 0.5 s of waiting"
    assert extra_threads <= 1  # one helper thread per iterator at most, none per segment


def test_an_aupdates_left_with_break_leaves_the_next_ones_wake_up_alone(
    namespace: str, thread_broker: Broker
) -> None:
    """``events``: an iterator left with ``break`` is closed when it is collected,
    which may be after the next iterator registered its reader on the same socket
    fd; that close removed the new reader, and the new iterator only woke on its
    50 ms poll step (about 20 ms late per update)."""

    async def run(sub: Subscriber, pub: Publisher) -> bool:
        pub.publish(np.zeros(4))
        old = sub.aupdates(timeout=5)
        async for _ in old:
            break
        pub.publish(np.ones(4))
        new = sub.aupdates(timeout=5)
        await asyncio.wait_for(anext(new), 5)  # the new iterator's reader is registered
        await old.aclose()  # the abandoned one is finalized now
        assert sub._sub is not None
        # True when a reader was still registered on the fd: the new iterator's.
        registered = asyncio.get_running_loop().remove_reader(sub._sub.getsockopt(zmq.FD))
        await new.aclose()
        return registered

    with (
        Publisher("brk", dtype="f8", shape=(4,)) as pub,
        Subscriber("brk", wait="events", timeout=5) as sub,
    ):
        assert asyncio.run(run(sub, pub))


async def _next_publishing(it: AsyncIterator[Update], pub: Publisher) -> None:
    """The iterator's next update, publishing until it comes (5 s at most): an
    ``events`` subscriber's subscription reaches the broker a moment after it is
    made, and an announcement before that is not its own."""
    nxt = asyncio.ensure_future(anext(it))
    deadline = time.monotonic() + 5
    while not nxt.done():
        assert time.monotonic() < deadline, "no update within 5 s"
        pub.publish(np.ones(4))
        await asyncio.wait([nxt], timeout=0.05)
    nxt.result()


def test_events_aupdates_of_two_tasks_keep_a_wake_up_while_either_runs(
    namespace: str, thread_broker: Broker
) -> None:
    """``events``: two tasks each iterate ``aupdates()`` of one subscriber. Each
    iterator's reader on the SUB socket's fd replaced the other's, so only the last
    one woke when an announcement came (the first waited out its 50 ms step: 26 ms
    median latency instead of 0.7), and when that one closed it removed the reader
    the other still needed."""

    async def run(sub: Subscriber, pub: Publisher) -> bool:
        first = sub.aupdates(timeout=5)
        await _next_publishing(first, pub)
        second = sub.aupdates(timeout=5)
        await _next_publishing(second, pub)
        await second.aclose()  # the first iterator goes on
        assert sub._sub is not None
        registered = asyncio.get_running_loop().remove_reader(sub._sub.getsockopt(zmq.FD))
        await first.aclose()
        return registered

    with (
        Publisher("two", dtype="f8", shape=(4,)) as pub,
        Subscriber("two", wait="events", timeout=5) as sub,
    ):
        assert asyncio.run(run(sub, pub))


def test_events_subscriber_closed_under_an_open_aupdates_leaves_no_reader(
    namespace: str, thread_broker: Broker
) -> None:
    """``events``: a subscriber closed while its ``aupdates()`` iterator is still open
    (its task holds an update). The loop's reader stayed on the closed socket's fd;
    the next subscriber's socket got the same fd number, add_reader then only swapped
    the callback, and its iterators never woke on the fd (37 ms median latency
    instead of 0.7); closing the old iterator removed the new one's reader."""

    async def run(pub: Publisher) -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        sub1 = Subscriber("fd", wait="events", timeout=5)
        assert sub1._sub is not None
        fd1 = sub1._sub.getsockopt(zmq.FD)
        old = sub1.aupdates(timeout=5)
        await _next_publishing(old, pub)  # open, at its yield
        sub1.close()
        stale = loop.remove_reader(fd1)
        with Subscriber("fd", wait="events", timeout=5) as sub2:
            assert sub2._sub is not None
            fd2 = sub2._sub.getsockopt(zmq.FD)
            new = sub2.aupdates(timeout=5)
            await _next_publishing(new, pub)
            await old.aclose()
            kept = loop.remove_reader(fd2)
            await new.aclose()
        return stale, kept

    with Publisher("fd", dtype="f8", shape=(4,)) as pub:
        stale, kept = asyncio.run(run(pub))
    assert not stale
    assert kept


def test_aupdates_has_the_first_versions_of_a_segment_attached_in_its_loop(
    namespace: str, thread_broker: Broker
) -> None:
    """README's asyncio example: the subscriber made before the segment, versions 1-3
    published 10 ms apart once the loop runs. The helper thread slept up to 0.1 s on
    the segments it knew, none; version 1 was lapped (missed 1), where the
    synchronous iterator delivers all three."""

    async def run(sub: Subscriber, pub: Publisher) -> list[int]:
        loop = asyncio.get_running_loop()
        for i in range(1, 4):
            loop.call_later(0.01 * i, pub.publish, np.full(4, i))
        return [up.version async for up in sub.aupdates(timeout=0.5)]

    with (
        Subscriber("late", namespace=namespace) as sub,
        Publisher("late", dtype="i8", shape=(4,), namespace=namespace) as pub,
    ):
        assert asyncio.run(run(sub, pub)) == [1, 2, 3]
        assert sub.stats["late"].missed == 0


def test_aupdates_over_many_segments_uses_one_thread(namespace: str, thread_broker: Broker) -> None:
    names = [f"s{i}" for i in range(6)]
    pubs = [Publisher(n, dtype="i8", shape=1, namespace=namespace) for n in names]
    try:
        with Subscriber(names, namespace=namespace) as sub:

            async def run() -> tuple[set[str], int]:
                loop = asyncio.get_running_loop()
                base = threading.active_count()
                most = base
                for k, p in enumerate(pubs):
                    loop.call_later(0.02 * (k + 1), p.publish, np.ones(1, "i8"))
                seen: set[str] = set()
                async for up in sub.aupdates(timeout=1.0):
                    most = max(most, threading.active_count())
                    seen.add(up.segment)
                    if len(seen) == len(names):
                        break
                return seen, most - base

            seen, extra = asyncio.run(run())
        assert seen == set(names)
        assert extra <= 1
    finally:
        for p in pubs:
            p.close()


def test_a_cancelled_wait_ends_the_aupdates_iterator_and_loses_nothing(namespace: str) -> None:
    """As README and the docstring say: a task cancelled while it waits in
    ``aupdates()`` (here ``wait_for`` timing out) ends that iterator (its next step
    is ``StopAsyncIteration``, as any async generator's); a new one goes on with
    nothing lost."""
    seg = Segment.create("cw", "i8", (2,), namespace=namespace)
    try:
        with Subscriber("cw", namespace=namespace, wait="futex") as sub:

            async def run() -> tuple[bool, list[int]]:
                it = sub.aupdates(timeout=5)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(anext(it), 0.05)
                seg.write(np.full(2, 1, "i8"))
                ended = False
                try:
                    await asyncio.wait_for(anext(it), 5)
                except StopAsyncIteration:
                    ended = True
                got = [up.version async for up in sub.aupdates(timeout=0.2)]
                return ended, got

            ended, got = asyncio.run(run())
            assert ended
            assert got == [1]
            assert sub.stats["cw"].updates == 1
    finally:
        seg.unlink()
        seg.close()


def test_aupdates_of_two_tasks_sharing_a_subscriber_add_up(namespace: str) -> None:
    """Two tasks iterate ``aupdates()`` of one subscriber; one holds its update (awaits
    something) while the other takes the next, and reads it once the writer lapped
    it. Before, the second hand-out replaced the first's unsettled update, which no
    counter ever got (2 delivered, 1 counted); settling it at that hand-out instead
    would count a version whose read failed (overrun) as delivered."""
    seg = Segment.create("two", "i8", (2,), slots=8, namespace=namespace)
    try:
        with Subscriber("two", namespace=namespace, wait="futex") as sub:

            async def run() -> tuple[list[int], list[int]]:
                hold = asyncio.Event()
                got: list[int] = []
                lapped: list[int] = []

                async def consumer() -> None:
                    async for up in sub.aupdates(timeout=0.2):
                        got.append(up.version)
                        if up.version != 1:
                            continue
                        await hold.wait()  # still busy with it when the other takes one
                        try:
                            with sub.read(up):
                                pass
                        except VersionUnavailableError:
                            lapped.append(up.version)

                tasks = [asyncio.create_task(consumer()) for _ in range(2)]
                await asyncio.sleep(0.05)  # both iterators wait
                seg.write(np.full(2, 1, "i8"))
                seg.write(np.full(2, 2, "i8"))
                for _ in range(500):
                    if len(got) == 2:
                        break
                    await asyncio.sleep(0.01)
                for i in range(3, 13):  # version 1 leaves the ring of 8
                    seg.write(np.full(2, i, "i8"))
                hold.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
                return got, lapped

            got, lapped = asyncio.run(run())
        st = sub.stats["two"]
        assert sorted(got)[:2] == [1, 2]
        assert lapped == [1]
        assert st.overrun == 1, st
        assert st.updates == len(got) - 1, st
        assert st.accounted == 12, st
    finally:
        seg.unlink()
        seg.close()


def test_aupdates_of_two_threads_handing_out_at_once_lose_and_double_nothing(
    namespace: str,
) -> None:
    """Two threads' event loops iterate ``aupdates()`` of one subscriber; one has
    ``a``'s version 1 out when the two hand out ``a``'s 2 and ``b``'s 1 at once.
    The hand-off (the update out kept as held, the new one made the update out) ran
    outside any lock: the second thread, between the first's two steps, held
    version 1 too and made ``b``'s 1 the update out, which the first then replaced:
    ``a`` 3 delivered of 2, ``b`` 0 of 1. A list that pauses the first thread in
    its hand-off forces that order (for at most half a second)."""
    segs = [Segment.create(n, "i8", (2,), slots=8, namespace=namespace) for n in ("a", "b")]
    try:
        with Subscriber(["a", "b"], namespace=namespace, wait="futex") as sub:
            for seg, versions in zip(segs, (2, 1), strict=True):
                for v in range(1, versions + 1):
                    seg.write(np.full(2, v, "i8"))
            first = asyncio.new_event_loop()
            it = sub.aupdates(timeout=5)
            try:
                out = first.run_until_complete(anext(it))  # a's 1, the others queued
                assert (out.segment, out.version) == ("a", 1)
                paused, second_done, finish = (threading.Event() for _ in range(3))
                got: dict[str, tuple[str, int]] = {}

                class _PausingList(list[Update]):
                    def append(self, up: Update) -> None:
                        if threading.current_thread().name == "one" and not paused.is_set():
                            paused.set()
                            second_done.wait(0.5)  # the other's hand-off, unless it waits
                        super().append(up)

                sub._held = _PausingList()

                def take(name: str, done: threading.Event | None) -> None:
                    async def one() -> None:
                        updates = sub.aupdates(timeout=5)
                        up = await anext(updates)
                        got[name] = (up.segment, up.version)
                        if done is not None:
                            done.set()
                        await asyncio.to_thread(finish.wait, 10)
                        await updates.aclose()

                    asyncio.run(one())

                threads = [threading.Thread(target=take, args=("one", None), name="one")]
                threads[0].start()
                assert paused.wait(10)
                threads.append(threading.Thread(target=take, args=("two", second_done)))
                threads[1].start()
                for _ in range(1000):
                    if len(got) == 2:
                        break
                    time.sleep(0.01)
                finish.set()
                for t in threads:
                    t.join(10)
                    assert not t.is_alive()
                first.run_until_complete(it.aclose())
            finally:
                first.close()
        assert sorted(got.values()) == [("a", 2), ("b", 1)]
        a, b = sub.stats["a"], sub.stats["b"]
        assert (a.updates, a.accounted, b.updates, b.accounted) == (2, 2, 1, 1), (a, b)
    finally:
        for seg in segs:
            seg.unlink()
            seg.close()


def test_aupdates_of_two_threads_taking_the_last_queued_update_at_once(namespace: str) -> None:
    """Two threads' event loops iterate ``aupdates()`` of one subscriber, one update
    queued: both saw it queued, the other took it, and this one's ``popleft()``
    ended its iterator with ``IndexError``. A queue that pauses the first thread
    after its look forces that order (for at most half a second)."""
    seg = Segment.create("q1", "i8", (2,), slots=4, namespace=namespace)
    try:
        with Subscriber("q1", namespace=namespace, wait="futex") as sub:
            seg.write(np.full(2, 1, "i8"))
            paused, second_done = threading.Event(), threading.Event()

            class _PausingDeque(collections.deque[Update]):
                def __len__(self) -> int:
                    n = super().__len__()
                    if threading.current_thread().name == "one" and not paused.is_set():
                        paused.set()
                        second_done.wait(0.5)  # the other's take, unless it waits
                    return n

            sub._pending = _PausingDeque()
            with sub._io:
                sub._collect()  # version 1 queued
            got: dict[str, list[int] | BaseException] = {}

            def take(name: str) -> None:
                async def one() -> None:
                    try:
                        got[name] = [up.version async for up in sub.aupdates(timeout=0.2)]
                    except Exception as exc:
                        got[name] = exc
                    if name == "two":
                        second_done.set()

                asyncio.run(one())

            one = threading.Thread(target=take, args=("one",), name="one")
            one.start()
            assert paused.wait(10)
            two = threading.Thread(target=take, args=("two",))
            two.start()
            for t in (one, two):
                t.join(10)
                assert not t.is_alive()
        assert got == {"one": [], "two": [1]}
    finally:
        seg.unlink()
        seg.close()


def test_an_old_incarnation_stays_mapped_while_another_thread_hands_its_update_out(
    namespace: str,
) -> None:
    """A segment made again: its old incarnation's handle is let go once no update
    of it is queued or out. That look ran outside the hand-off lock: another
    thread's loop that had taken the old incarnation's last update off the queue,
    and not yet made it the update out, saw it let go under it, and its read of
    it failed (``VersionUnavailableError``, counted overrun, the data still there).
    A queue that pauses that thread right after its take forces the order (for
    at most half a second)."""
    seg = Segment.create("r", "i8", (2,), slots=4, namespace=namespace)
    new = None
    try:
        with Subscriber("r", namespace=namespace, wait="futex") as sub:
            taken, looked = threading.Event(), threading.Event()

            class _PausingDeque(collections.deque[Update]):
                def popleft(self) -> Update:
                    up = super().popleft()
                    if threading.current_thread().name == "one" and not taken.is_set():
                        taken.set()
                        looked.wait(0.5)  # the other's look, unless it waits
                    return up

            sub._pending = _PausingDeque()
            seg.write(np.full(2, 7, "i8"))
            with sub._io:
                sub._collect()  # version 1 of the first incarnation queued
            seg.unlink()
            new = Segment.create("r", "i8", (2,), slots=4, namespace=namespace)
            with sub._io:
                sub._check_paths()  # the first retired, its update still queued
            assert len(sub._retired) == 1
            got: list[object] = []

            def take() -> None:
                async def one() -> None:
                    updates = sub.aupdates(timeout=5)
                    up = await anext(updates)
                    try:
                        with sub.read(up) as snap:
                            got.append(int(snap.array[0]))
                    except VersionUnavailableError as exc:
                        got.append(exc)
                    await updates.aclose()

                asyncio.run(one())

            one = threading.Thread(target=take, name="one")
            one.start()
            try:
                assert taken.wait(10)
                with sub._io:
                    sub._release_retired()  # another loop's look, at its housekeeping
                looked.set()
            finally:
                looked.set()
                one.join(10)
            assert not one.is_alive()
            assert got == [7]
            st = sub.stats["r"]
            assert (st.updates, st.overrun) == (1, 0)
    finally:
        seg.close()
        if new is not None:
            new.unlink()
            new.close()


def _abandon_in_a_closed_loop(sub: Subscriber, write: Callable[[], object]) -> list[object]:
    """Take one update from an aupdates() iterator on a loop then closed with
    ``loop.close()`` and no ``shutdown_asyncgens()``: the iterator stays open (kept in
    the list returned), its update out."""
    kept: list[object] = []

    async def one() -> None:
        updates = sub.aupdates(timeout=5)
        write()
        await anext(updates)
        kept.append(updates)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(one())
    finally:
        loop.close()
    return kept


def test_an_update_out_in_a_closed_loop_keeps_no_old_incarnation_mapped(namespace: str) -> None:
    """Before, the update stayed out until close(), and with it the handle of every
    incarnation retired meanwhile stayed mapped (a deleted segment's memory kept
    taken): 1 retired handle after the housekeeping's look. Now the look settles it
    (delivered, as close() would) and lets the handle go."""
    seg = Segment.create("c", "i8", (2,), slots=4, namespace=namespace)
    new = None
    try:
        with Subscriber("c", namespace=namespace, wait="futex") as sub:
            kept = _abandon_in_a_closed_loop(sub, lambda: seg.write(np.full(2, 7, "i8")))
            seg.unlink()
            new = Segment.create("c", "i8", (2,), slots=4, namespace=namespace)
            with sub._io:
                sub._check_paths()  # the first incarnation retired, its update out
            assert len(sub._retired) == 1
            with sub._io:
                sub._release_retired()  # the housekeeping's look
            assert sub._retired == []
            assert sub.stats["c"].updates == 1
            del kept
    finally:
        seg.close()
        if new is not None:
            new.unlink()
            new.close()


def test_events_iterators_of_closed_loops_leave_no_waker_behind(
    namespace: str, thread_broker: Broker
) -> None:
    """Before, each loop closed under its iterator left that iterator's waker (and the
    loop) in the subscriber's list until close(): 3 after 3 such loops."""
    with (
        Publisher("w", dtype="i8", shape=1, namespace=namespace) as pub,
        Subscriber("w", namespace=namespace, wait="events") as sub,
    ):
        kept = [
            _abandon_in_a_closed_loop(sub, lambda: pub.publish(np.ones(1, "i8"))) for _ in range(3)
        ]

        async def another() -> int:
            updates = sub.aupdates(timeout=5)
            await anext(updates)
            try:
                return len(sub._fd_wakers)
            finally:
                await updates.aclose()

        pub.publish(np.ones(1, "i8"))
        assert asyncio.run(another()) == 1  # its own
        del kept


@pytest.mark.parametrize("asked", ["FD", "EVENTS"])
def test_aupdates_closed_from_another_thread_as_it_asks_its_socket_says_closed(
    namespace: str, thread_broker: Broker, monkeypatch: pytest.MonkeyPatch, asked: str
) -> None:
    """``events``: an ``aupdates()`` iterator asking its SUB socket for its file
    descriptor as it starts (``ZMQ_FD``), or whether something is queued as it waits
    (``ZMQ_EVENTS``), when another thread closes the subscriber. Both were asked
    outside the lock close() takes: of the closed socket, and the iterator ended with
    ``zmq.ZMQError`` ("Socket operation on non-socket"), not ``ClosedError``. A
    stand-in for the zmq module closes it from another thread right then (waiting at
    most 0.3 s for the close)."""
    seg = Segment.create("ev", "i8", (2,), slots=4, namespace=namespace)
    try:
        sub = Subscriber("ev", namespace=namespace, wait="events")
        closer = threading.Thread(target=sub.close)

        class _ClosingZmq:
            def __getattr__(self, name: str) -> object:
                if name == asked and not closer.is_alive() and not sub.closed:
                    closer.start()
                    closer.join(0.3)  # unless close() waits for the iterator's lock
                return getattr(zmq, name)

        async def run() -> None:
            monkeypatch.setattr(subscriber_module, "zmq", _ClosingZmq())
            async for _ in sub.aupdates(timeout=5):
                pass

        try:
            with pytest.raises(ClosedError):
                asyncio.run(run())
        finally:
            monkeypatch.undo()
            closer.join(10)
            sub.close()
    finally:
        seg.unlink()
        seg.close()


def test_an_aupdates_that_only_takes_queued_updates_starts_no_thread(namespace: str) -> None:
    """An iterator that takes one queued update and is left (``break``), again and
    again without the loop running anything else: each started a helper thread that
    slept on until the iterator's close, which the loop had no turn to run (2000
    such iterators made hundreds of threads and slowed the loop to a crawl)."""
    seg = Segment.create("q", "i8", (2,), slots=16, namespace=namespace)
    try:
        with Subscriber("q", namespace=namespace, wait="futex") as sub:
            for i in range(10):
                seg.write(np.full(2, i, "i8"))

            async def run() -> tuple[list[int], int]:
                got = []
                before = set(threading.enumerate())  # other tests' may still be ending
                for _ in range(10):
                    async for up in sub.aupdates(timeout=5):
                        got.append(up.version)
                        break
                new = set(threading.enumerate()) - before
                return got, sum(t.name == "shmcast-aupdates" for t in new)

            got, helpers = asyncio.run(run())
        assert got == list(range(1, 11))
        assert helpers == 0
    finally:
        seg.unlink()
        seg.close()


def test_short_aupdates_iterators_share_one_helper_thread(namespace: str) -> None:
    """Iterators made one after another with a 2 ms timeout, each waiting once:
    each started a helper thread of its own, which slept on for up to 0.1 s after
    its iterator ended (42 alive at once). The iterators of one subscriber and loop
    share one thread now; the updates still all arrive."""
    seg = Segment.create("h", "i8", (2,), slots=16, namespace=namespace)
    try:
        with Subscriber("h", namespace=namespace, wait="futex") as sub:

            async def run() -> tuple[list[int], int]:
                got: list[int] = []
                peak = 0
                before = set(threading.enumerate())  # other tests' may still be ending
                for i in range(60):
                    if i % 10 == 0:
                        seg.write(np.full(2, i, "i8"))
                    async for up in sub.aupdates(timeout=0.002):
                        got.append(up.version)
                    new = set(threading.enumerate()) - before
                    peak = max(peak, sum(t.name == "shmcast-aupdates" for t in new))
                return got, peak

            got, peak = asyncio.run(run())
        assert got == [1, 2, 3, 4, 5, 6]
        # One thread; for a moment two, one that just found itself unneeded.
        assert peak <= 2
    finally:
        seg.unlink()
        seg.close()


def test_a_signal_handlers_close_while_its_thread_settles_a_read_does_not_hang(
    namespace: str,
) -> None:
    """A signal handler calls ``close()`` while it interrupts its own thread settling
    a read (holding the hand-off lock, which is not reentrant): close() waited for
    ever on the lock its own thread held (the review's loop of reads, each with a
    timed SIGALRM, hung). A stand-in for the lock raises the signal right there,
    and fails, instead of hanging, when a wait for it lasts 2 s. Now the rest of
    the close runs in a thread of its own; the counts still add up."""
    seg = Segment.create("sig", "i8", (2,), slots=4, namespace=namespace)
    old = signal.getsignal(signal.SIGUSR1)
    try:
        sub = Subscriber("sig", namespace=namespace, wait="futex")
        for v in (1, 2):
            seg.write(np.full(2, v, "i8"))
        real = sub._hand
        armed: list[bool] = []

        class _SignallingLock:
            def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
                return real.acquire(blocking, timeout)

            def release(self) -> None:
                real.release()

            def __enter__(self) -> None:
                if not real.acquire(timeout=2):
                    raise AssertionError("close() waits for the lock its own thread holds")
                if armed:
                    armed.clear()
                    signal.raise_signal(signal.SIGUSR1)  # its handler runs right here

            def __exit__(self, *exc: object) -> None:
                real.release()

        signal.signal(signal.SIGUSR1, lambda signum, frame: sub.close())
        sub._hand = _SignallingLock()  # type: ignore[assignment]
        got: list[int] = []

        def consume() -> None:
            for up in sub.updates(timeout=2):
                with sub.read(up) as snap:
                    got.append(int(snap.array[0]))
                    armed.append(True)  # the read's settling is interrupted

        with pytest.raises(ClosedError):
            consume()
        assert sub.closed
        assert got == [1]
        for _ in range(500):  # the rest of the close, in its own thread
            if not sub._handles:
                break
            time.sleep(0.01)
        assert not sub._handles
        st = sub.stats["sig"]
        assert (st.updates, st.missed, st.overrun, st.torn) == (1, 1, 0, 0)
    finally:
        signal.signal(signal.SIGUSR1, old)
        seg.unlink()
        seg.close()


def test_versions_learnt_but_never_handed_out_are_counted_at_close(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A consumer that stops early (``break``, ``shmcast subscribe --count 1``) leaves
    versions the subscriber learnt of in its queue, never handed out. Before, they
    were in no counter: 20 published, ``last_version`` 20, the four counters 13."""
    seg = Segment.create("p", "i8", (2,), slots=8, namespace=namespace)
    try:
        with Subscriber("p", namespace=namespace, wait="futex") as sub:
            for i in range(20):
                seg.write(np.full(2, i, "i8"))
            for _ in sub.updates(timeout=5):
                break
        st = sub.stats["p"]
        assert (st.last_version, st.updates) == (20, 1)
        assert st.accounted == 20

        # The CLI's summary line is taken after the close that counts them. The
        # burst is written whole before the subscriber's thread gets the GIL back.
        def burst() -> None:
            for i in range(20):
                seg.write(np.full(2, i, "i8"))

        timer = threading.Timer(0.3, burst)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1.0)
        try:
            timer.start()
            argv = ["subscribe", "p", "-n", namespace, "--wait", "futex", "--count", "1"]
            assert main([*argv, "-q", "--timeout", "10"]) == 0
        finally:
            sys.setswitchinterval(interval)
            timer.join(10)
        done = capsys.readouterr().err.split("shmcast subscribe done: ")[1]
        counts = json.loads(done.splitlines()[0])["p"]
        assert sum(counts[k] for k in ("updates", "missed", "overrun", "torn")) == 20
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize("mode", MODES)
def test_versions_committed_that_a_closing_subscriber_never_learnt_are_counted(
    namespace: str, thread_broker: Broker, mode: str
) -> None:
    """Versions committed after the subscriber's last look (or, in ``events``, whose
    announcements were still queued) were in no counter once it closed: 8 published
    while it was open, one update taken, the four counters 5 (1 in ``events`` in a
    reproducer). At close the header's latest is the bound: each version published
    while it was open ends in one counter."""
    with Publisher("p", dtype="i8", shape=(2,), slots=8, namespace=namespace) as pub:
        with Subscriber("p", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
            for i in range(5):
                pub.publish(np.full(2, i, "i8"))
            for _ in sub.updates(timeout=5):
                break
            for i in range(3):
                pub.publish(np.full(2, i, "i8"))
        st = sub.stats["p"]
        assert st.updates == 1, st
        assert st.accounted == 8, st


def test_a_header_that_never_completes_is_waited_for_once(
    namespace: str, thread_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object of zeros under a subscribed name (a creator that died before its
    header): each look at the paths (twice a second) waited 0.5 s for the header,
    and the other segments' versions went by meanwhile (a reviewer: 12 of 295
    versions of a 100 Hz segment delivered, 283 missed). The wait is once per object."""
    waits: list[float] = []
    attach = Segment.attach.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Segment], name: str, **kw: object) -> Segment:
        if name == "bad":
            waits.append(float(kw.get("wait", 1.0)))  # type: ignore[arg-type]
        return attach(cls, name, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(Segment, "attach", classmethod(spy))
    monkeypatch.setattr(subscriber_module, "PATH_CHECK", 0.1)  # looks sooner: a faster test
    path = shm_path(namespace, "bad")
    with open(path, "xb") as f:
        f.write(bytes(8192))
    try:
        with (
            Publisher("good", dtype="i8", shape=4, namespace=namespace) as pub,
            Subscriber(["good", "bad"], namespace=namespace) as sub,
        ):
            deadline = time.monotonic() + 10
            while len(waits) < 4:  # the first attach, then three looks at the paths
                assert time.monotonic() < deadline, waits
                pub.publish(np.zeros(4, "i8"))
                for _ in sub.updates(timeout=0.05):
                    pass
            assert sub.absent() == ["bad"]
            assert [w for w in waits if w > 0] == [0.5], waits
    finally:
        os.unlink(path)


@pytest.mark.parametrize("mode", ["shm", "futex"])
def test_aupdates_waits_for_no_header_and_populates_no_mapping_in_its_loop(
    namespace: str, thread_broker: Broker, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A followed segment deleted and an object whose header is still being written
    put in its place (here one that never completes: a creator that died). A look of
    ``aupdates()`` waited 0.5 s for the header inside the event loop, and attached a
    new incarnation with ``MAP_POPULATE``: every other task of the loop stood still
    (505 ms in a reproducer; 1.5-2.5 s while a broker made a segment of 2 x 512 MiB).
    It waits for neither, looks again every 10 ms while the wait would have lasted,
    and follows the segment made there next."""
    calls: list[tuple[float, bool]] = []
    attach = Segment.attach.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Segment], name: str, **kw: object) -> Segment:
        calls.append((float(kw.get("wait", 1.0)), bool(kw.get("prefault", True))))  # type: ignore[arg-type]
        return attach(cls, name, **kw)  # type: ignore[no-any-return]

    path = shm_path(namespace, "x")
    seg = Segment.create("x", "i8", (2,), namespace=namespace)
    try:
        with Subscriber("x", namespace=namespace, wait=mode) as sub:  # type: ignore[arg-type]
            monkeypatch.setattr(Segment, "attach", classmethod(spy))
            seg.unlink()
            seg.close()
            with open(path, "xb") as f:
                f.write(bytes(8192))

            async def run() -> tuple[float, list[Update]]:
                gap = 0.0
                done = False

                async def ticker() -> None:
                    nonlocal gap
                    while not done:
                        t = time.monotonic()
                        await asyncio.sleep(0.001)
                        gap = max(gap, time.monotonic() - t)

                got: list[Update] = []

                async def consume() -> None:
                    async for up in sub.aupdates(timeout=5):
                        got.append(up)
                        return

                tasks = [asyncio.create_task(ticker()), asyncio.create_task(consume())]
                deadline = time.monotonic() + 5
                while len(calls) < 3:  # the first look at the object, then two more soon
                    assert time.monotonic() < deadline, calls
                    await asyncio.sleep(0.005)
                os.unlink(path)
                with Segment.create("x", "i8", (2,), namespace=namespace) as again:
                    again.write(np.full(2, 7, "i8"))
                    await asyncio.wait_for(tasks[1], 5)
                    again.unlink()
                done = True
                await tasks[0]
                return gap, got

            gap, got = asyncio.run(run())
            assert got[0].version == 1
            assert sub.stats["x"].incarnations == 2
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        seg.close()
    assert all(wait == 0.0 and not prefault for wait, prefault in calls), calls
    assert gap < 0.4, f"the loop stood still {gap:.3f} s"


def test_reads_of_the_latest_wait_for_a_header_that_never_completes_once(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object of zeros (a creator that died before its header) under a name read
    only for its latest, or under a followed name whose segment was deleted: every
    ``sub.latest(name)`` waited a second for the header before its NotASegmentError
    (a dashboard polling at 10 Hz polled at 1 Hz). The wait is once per object."""
    waits: list[float] = []
    attach = Segment.attach.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Segment], name: str, **kw: object) -> Segment:
        waits.append(float(kw.get("wait", 1.0)))  # type: ignore[arg-type]
        kw["wait"] = min(waits[-1], 0.05)  # the same answer, sooner: a faster test
        return attach(cls, name, **kw)  # type: ignore[no-any-return]

    seg = Segment.create("d", "i8", (2,), namespace=namespace)
    seg.write(np.zeros(2, "i8"))
    with open(shm_path(namespace, "x"), "xb") as f:
        f.write(bytes(8192))
    try:
        with Subscriber("d", namespace=namespace, wait="futex") as sub:
            monkeypatch.setattr(Segment, "attach", classmethod(spy))
            for _ in range(3):
                with pytest.raises(NotASegmentError, match="never completed"):
                    sub.latest("x")
            assert [w for w in waits if w > 0] == [1.0], waits
            seg.unlink()  # the followed name: deleted, then a creator dies there
            with open(shm_path(namespace, "d"), "xb") as f:
                f.write(bytes(8192))
            waits.clear()
            for _ in range(3):
                with pytest.raises(NotASegmentError, match="never completed"):
                    sub.latest("d")
            assert [w for w in waits if w > 0] == [1.0], waits
    finally:
        for name in ("x", "d"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm_path(namespace, name))
        seg.close()


def test_an_events_subscriber_of_more_segments_than_the_broker_holds_topics_is_refused(
    namespace: str,
) -> None:
    """One topic per segment: past the broker's ``max_subscriptions`` its events
    endpoint resets, the subscriber resubscribes, and so on (a reviewer: 21 resets in
    3 s for 100 segments over 16; every events subscriber of the namespace lost
    announcements, and this one took the broker for down)."""
    from shmcast.broker import BrokerConfig, ConfigError

    broker = Broker(BrokerConfig(namespace=namespace, max_subscriptions=16)).start()
    try:
        with pytest.raises(ConfigError, match=r"wait='shm'.*max_subscriptions"):
            Subscriber([f"s{i}" for i in range(16)], wait="events")
        with Subscriber([f"s{i}" for i in range(15)], wait="events") as sub:  # and its own
            list(sub.updates(timeout=0.2))
            assert sub.broker_up
        assert broker._events is not None
        assert broker._events.resets == 0
    finally:
        broker.close()


def test_events_subscribers_that_together_exceed_the_brokers_topics_are_refused(
    namespace: str,
) -> None:
    """Each under ``max_subscriptions``, together over it: the endpoint reset, they
    all subscribed again, it reset again (a reviewer: 23 resets in 3 s for three
    subscribers of 8 segments over 16, each missing 160-320 of 2312 versions).
    The one that would take it over is refused before it subscribes; one of
    topics already held still fits."""
    from shmcast.broker import BrokerConfig, ConfigError
    from shmcast.cli.testing import wait_for

    broker = Broker(BrokerConfig(namespace=namespace, max_subscriptions=16)).start()
    try:
        assert broker._events is not None
        events = broker._events
        with Subscriber([f"a{i}" for i in range(8)], wait="events") as first:
            wait_for(lambda: broker.stats().subscriptions >= 9, 5, what="its 8 and @broker")
            assert broker.stats().subscriptions == 9
            with pytest.raises(ConfigError, match=r"add 8 topics to the 9 .*wait='shm'"):
                Subscriber([f"b{i}" for i in range(8)], wait="events")
            with Subscriber([f"a{i}" for i in range(8)], wait="events") as same:
                list(same.updates(timeout=0.2))
            list(first.updates(timeout=0.2))
            assert first.broker_up
        assert events.resets == 0
    finally:
        broker.close()


def test_events_subscribers_starting_at_one_instant_do_not_take_the_endpoint_over(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two subscribers of 8 segments over ``max_subscriptions = 16``, the second
    started whole between the first one's check and its subscriptions. Before, each
    was told (or its hello said) there was room, both subscribed, and the endpoint
    reset over and over (3 raced in separate processes: 21-22 resets in 3 s, all
    three taken, in 2 rounds of 3). Now the room the first is told of is promised to
    it until it subscribes: the second is refused."""
    from shmcast.broker import BrokerConfig, ConfigError

    broker = Broker(BrokerConfig(namespace=namespace, max_subscriptions=16)).start()
    held: list[int] = []
    refused: list[BaseException] = []
    started: list[Subscriber] = []
    real = subscriber_module.open_socket

    def held_open(ctx: zmq.Context[Any], kind: int, what: str) -> zmq.Socket[Any]:
        # The first subscriber's SUB socket: the second starts as it subscribes.
        if kind == zmq.SUB and not held:
            held.append(kind)
            try:
                started.append(Subscriber([f"b{i}" for i in range(8)], wait="events"))
            except ConfigError as exc:
                refused.append(exc)
        return real(ctx, kind, what)

    try:
        assert broker._events is not None
        with monkeypatch.context() as m:
            m.setattr(subscriber_module, "open_socket", held_open)
            first = Subscriber([f"a{i}" for i in range(8)], wait="events")
        assert held, "the first subscriber's SUB socket was not made where this test holds it"
        with first:
            for sub in started:
                sub.close()
            assert started == [], "both were taken"
            assert len(refused) == 1
            # The 9 are promised, none held yet: the message says which it counts.
            assert (
                "add 8 topics to the 9 the broker's events endpoint holds or has promised"
                in str(refused[0])
            )
            list(first.updates(timeout=0.3))
            assert first.broker_up
        assert broker._events.resets == 0
    finally:
        broker.close()


def test_an_events_subscriber_refused_after_some_of_its_names_were_promised_lets_them_go(
    namespace: str,
) -> None:
    """Names too long for one ``topics`` request (a broker of ``max_message_bytes``
    1024) are asked in chunks, each promised as it fits: a subscriber refused at its
    second chunk will not subscribe. Before, its first chunk's 4 topics stayed
    promised for 5 s, and the next subscriber, 5 topics beside the 9 held (of 16),
    was refused "add 5 topics to the 13". Now the refused asker's promises go."""
    from shmcast.broker import BrokerConfig, ConfigError
    from shmcast.cli.testing import wait_for

    cfg = BrokerConfig(namespace=namespace, max_subscriptions=16, max_message_bytes=1024)
    broker = Broker(cfg).start()
    try:
        with Subscriber([f"a{i}" for i in range(8)], wait="events"):
            wait_for(lambda: broker.stats().subscriptions >= 9, 5, what="its 8 and @broker")
            long = [f"n{i:02d}" + "x" * 100 for i in range(12)]  # 3 chunks of 4
            with pytest.raises(ConfigError, match="add 12 topics to the 9 "):
                Subscriber(long, wait="events")
            with Subscriber([f"b{i}" for i in range(5)], wait="events") as fits:
                list(fits.updates(timeout=0.1))
    finally:
        broker.close()


def test_topics_promised_to_two_subscribers_stay_promised_when_one_lets_go(
    namespace: str,
) -> None:
    """A and B ask for the same 8 topics (of 16) before subscribing; A fails and
    lets go. The topics were promised to A alone (B's ask found them promised):
    B's were then counted nowhere until its subscriptions came, and C, 9 other
    topics, was told they fit (17 topics). They are promised to each asker now."""
    from shmcast.broker import BrokerConfig
    from shmcast.broker.client import ControlClient, resolve_endpoint

    names = [f"a{i}" for i in range(8)]
    with (
        Broker(BrokerConfig(namespace=namespace, max_subscriptions=16)).start(),
        ControlClient(resolve_endpoint(None, namespace)) as a,
        ControlClient(resolve_endpoint(None, namespace)) as b,
        ControlClient(resolve_endpoint(None, namespace)) as c,
    ):
        assert a.request("topics", names=names, reserve=True)["fits"]
        assert b.request("topics", names=names, reserve=True)["new"] == 0
        a.request("topics", names=[], release=True)  # A failed to start
        others = [f"c{i}" for i in range(9)]
        answer = c.request("topics", names=others, reserve=True)
        assert (answer["held"], answer["fits"]) == (8, False)  # was (0, True)
        b.request("topics", names=[], release=True)  # B failed too: C fits
        assert c.request("topics", names=others, reserve=True)["fits"]


def test_an_events_subscriber_failing_after_its_topics_were_promised_lets_them_go(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber promised its topics that then fails to start (here out of
    descriptors opening its SUB socket) will not subscribe. Before, its 9 topics
    stayed promised for 5 s, and the next subscriber, 8 other topics of 16, was
    refused "add 8 topics to the 9" of an endpoint that held none. The failing one
    now lets its promises go (``topics`` with ``release``) as it tears down."""
    import errno

    from shmcast.broker import BrokerConfig, OutOfDescriptorsError

    broker = Broker(BrokerConfig(namespace=namespace, max_subscriptions=16)).start()
    real = subscriber_module.open_socket

    def no_sub(ctx: zmq.Context[Any], kind: int, what: str) -> zmq.Socket[Any]:
        if kind == zmq.SUB:
            raise OutOfDescriptorsError.from_os(errno.EMFILE, what)
        return real(ctx, kind, what)

    try:
        with monkeypatch.context() as m:
            m.setattr(subscriber_module, "open_socket", no_sub)
            with pytest.raises(OutOfDescriptorsError):
                Subscriber([f"a{i}" for i in range(8)], wait="events")
        with Subscriber([f"b{i}" for i in range(8)], wait="events") as second:
            list(second.updates(timeout=0.1))
    finally:
        broker.close()
