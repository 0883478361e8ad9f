"""``shmcast top``: a live terminal view of a namespace.

Segments (version, rate, age, bytes, writer), the subscribers that report to the
broker (their lag behind each segment and their latency percentiles) and the use
of ``/dev/shm``, refreshed in place with ANSI escapes. ``q`` or Ctrl-C quits and
restores the terminal. Without a terminal (a pipe) or with ``--once`` it prints
plain frames instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from shmcast.broker.client import (
    ControlClient,
    check_broker_namespace,
    reporter_stopped,
    resolve_namespace,
)
from shmcast.broker.errors import BrokerUnavailableError, ShmcastError

from ._options import (
    add_broker_option,
    add_curve_option,
    broker_endpoint,
    curve_keys,
    positive_seconds,
)
from ._text import printable

HELP = "live view: segments, rates, subscribers' lag and latency, /dev/shm use (q quits)"
EXAMPLES = """\
examples:
  shmcast top                               the namespace's broker, refreshed every second
  shmcast top --broker tcp://127.0.0.1:5555 a broker over TCP (docker/compose.yaml's)
  shmcast top --once                        one plain frame (scripts, logs)

--broker defaults to $SHMCAST_BROKER (set in the containers of docker/compose.yaml),
else the namespace's ipc endpoint.

Subscribers appear when they run in shm (the default) or events mode (they report
to the broker about once a second, on their first 64 segments); LAG is how many
versions the segment is past VERSION, the last one the subscriber reported: up to a
second's worth of versions for one that keeps up (about 200 at 200 Hz), growing
beyond for one that falls behind; per segment UPDATES + MISSED + OVERRUN + TORN
add up to the versions published while it ran. A subscriber that stops reporting
leaves the table after 5 s, unless its process is stopped (SIGSTOP, Ctrl-Z, a
debugger) in top's pid namespace and it reported over an ipc control socket:
its last report then stays, marked "stopped".
"""

# Alternate screen, hidden cursor; and their undo.
_ENTER = "\x1b[?1049h\x1b[?25l"
_LEAVE = "\x1b[?25h\x1b[?1049l"
_HOME = "\x1b[H"
_EOL = "\x1b[K"
_EOS = "\x1b[J"


def configure(p: argparse.ArgumentParser) -> None:
    add_broker_option(p)
    add_curve_option(p)
    p.add_argument(
        "--interval", type=positive_seconds, default=1.0, help="seconds between refreshes"
    )
    p.add_argument("--once", action="store_true", help="print one frame and exit")


@dataclass
class Sample:
    """What one refresh learnt from the broker."""

    t: float
    segments: list[dict[str, Any]] = field(default_factory=list)
    subscribers: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def sample(client: ControlClient) -> Sample:
    """Ask the broker for the catalog, the subscribers' reports and its stats."""
    now = time.monotonic()
    try:
        return Sample(
            t=now,
            segments=list(client.request("list")["segments"]),
            subscribers=_live_or_stopped(client.request("subscribers", stale=True)),
            stats=client.request("stats"),
        )
    except ShmcastError as exc:
        return Sample(t=now, error=str(exc))


def _live_or_stopped(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """The recent reports, and the older ones (``stale``) of a process that is
    alive and stopped, as seen from here (:func:`reporter_stopped`), marked
    ``stopped``. Before, a SIGSTOPped subscriber left the table after 5 s, as a
    dead one did. A broker that keeps no stale reports sends none."""
    rows = []
    for r in reply["subscribers"]:
        if not isinstance(r, dict):
            continue
        if r.get("stale") is True:
            if not reporter_stopped(r):
                continue
            r = {**r, "stopped": True}
        rows.append(r)
    return rows


def sampler(client: ControlClient, namespace: str) -> Callable[[], Sample]:
    """:func:`sample`, once a ``hello`` named ``namespace`` (asked until the broker
    answers): a broker of another namespace ($SHMCAST_BROKER) raises, not shown.

    Raises:
        NamespaceMismatchError: from the returned function.
    """
    checked = False

    def take() -> Sample:
        nonlocal checked
        if not checked:
            try:
                check_broker_namespace(client, namespace)
            except BrokerUnavailableError as exc:
                return Sample(t=time.monotonic(), error=str(exc))
            checked = True
        return sample(client)

    return take


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _count(x: object) -> int | None:
    """A reported count as an int (None: not a finite number; shown as '-')."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return int(x) if math.isfinite(x) else None


def _secs(x: object) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f}us"
    if x < 1:
        return f"{x * 1e3:.1f}ms"
    return f"{x:.1f}s"


#: The longest names shown, as the broker keeps them: a subscriber's, a segment's.
SUBSCRIBER_NAME, SEGMENT_NAME = 64, 128


def _width(names: Iterable[str], most: int) -> int:
    """A name column as wide as its longest name, 16 at least. Names are never cut:
    two that share their first 16 characters (``strategy-momentum-eu`` and ``-us``)
    printed the same, and a longer segment name pushed its row's columns out. A
    name longer than ``most`` as printed (one of control characters, written
    escaped, up to 10 characters each) widens its own row only: one report so
    named made every row of the table over 1,600 characters wide."""
    return max([16, *(len(n) for n in names if len(n) <= most)])


def _segments(sub: dict[str, Any]) -> dict[Any, Any]:
    segs = sub.get("segments")
    return segs if isinstance(segs, dict) else {}


def render(ns: str, endpoint: str, cur: Sample, prev: Sample | None) -> list[str]:
    """The screen's lines for one refresh (pure: tested without a terminal)."""
    head = f"shmcast top  namespace={ns}  broker={endpoint}  {time.strftime('%H:%M:%S')}"
    lines = [head + "  (q: quit)"]
    if cur.error is not None:
        return [*lines, "", f"broker not answering: {cur.error}", "retrying..."]
    st = cur.stats
    total, free, used = st.get("shm_total", 0), st.get("shm_free", 0), st.get("shm_used", 0)
    pct = 100.0 * (total - free) / total if total else 0.0
    lines.append(
        f"/dev/shm: {_bytes(total - free)} of {_bytes(total)} in use ({pct:.0f}%), "
        f"{_bytes(free)} free; this namespace's segments: {_bytes(used)}"
    )
    lines.append("")
    # A segment deleted and created again since the last refresh (another incarnation)
    # has no rate yet: its versions started over.
    before = (
        {s["name"]: (s["version"], s.get("incarnation")) for s in prev.segments} if prev else {}
    )
    dt = cur.t - prev.t if prev else 0.0
    versions: dict[str, int] = {}
    w = _width((str(s["name"]) for s in cur.segments), SEGMENT_NAME)
    lines.append(
        f"{'SEGMENT':{w}} {'VERSION':>10} {'RATE/s':>9} {'AGE':>8} {'SIZE':>10} {'SLOTS':>5} WRITER"
    )
    for s in cur.segments:
        name = str(s["name"])
        versions[name] = int(s["version"])
        rate = "-"
        was, incarnation = before.get(name, (None, None))
        if was is not None and incarnation == s.get("incarnation") and dt > 0:
            rate = f"{(s['version'] - was) / dt:.1f}"
        age = s.get("age")  # measured by the broker on its monotonic clock
        lines.append(
            f"{name:{w}} {s['version']:>10} {rate:>9} {_secs(age):>8} "
            f"{_bytes(s.get('size', 0)):>10} {s.get('slots', '?'):>5} "
            f"{'up' if s.get('writer_alive') else '-'}"
        )
    if not cur.segments:
        lines.append("(no segments)")
    lines.append("")
    # Reports come from any client, read-only ones included: each value is shown
    # only as what it claims to be ('-' otherwise), never trusted to format. Names
    # with control characters (an escape sequence) are shown escaped.
    rows = [
        (sub, printable(str(sub.get("name"))), seg, printable(str(seg)), c)
        for sub in cur.subscribers
        for seg, c in sorted(_segments(sub).items())
        if isinstance(c, dict)
    ]
    w1 = _width((who for _, who, _, _, _ in rows), SUBSCRIBER_NAME)
    w2 = _width((what for _, _, _, what, _ in rows), SEGMENT_NAME)
    lines.append(
        f"{'SUBSCRIBER':{w1}} {'PID':>7} {'SEGMENT':{w2}} {'VERSION':>10} {'LAG':>6} "
        f"{'UPDATES':>9} {'MISSED':>7} {'OVERRUN':>7} {'TORN':>5} {'P50':>8} {'P99':>8}"
    )
    for sub, who, seg, what, c in rows:

        def n(key: str, c: dict[str, Any] = c) -> str:
            v = _count(c.get(key, 0))
            return "-" if v is None else str(v)

        last = _count(c.get("last_version", 0))
        lag = versions[seg] - last if seg in versions and last is not None else None
        lines.append(
            f"{who:{w1}} {printable(str(sub.get('pid'))):>7} {what:{w2}} "
            f"{n('last_version'):>10} "
            f"{'-' if lag is None else max(lag, 0):>6} {n('updates'):>9} "
            f"{n('missed'):>7} {n('overrun'):>7} {n('torn'):>5} "
            f"{_secs(c.get('p50')):>8} {_secs(c.get('p99')):>8}"
            + ("  stopped" if sub.get("stopped") is True else "")
        )
    if not cur.subscribers:
        lines.append("(no subscriber has reported in the last 5 s)")
    return lines


@contextlib.contextmanager
def _terminal(out: TextIO) -> Iterator[int | None]:
    """Cbreak mode and the alternate screen; yields stdin's fd (None: no terminal)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        out.write(_ENTER)
        out.flush()
        yield fd
    finally:
        out.write(_LEAVE)
        out.flush()
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_key(fd: int | None, timeout: float) -> str:
    """A key pressed within ``timeout`` seconds ('' if none)."""
    if fd is None:
        time.sleep(timeout)
        return ""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return ""
    data = os.read(fd, 32)
    return data.decode(errors="replace") if data else "q"  # EOF: quit


def run(args: argparse.Namespace) -> int:
    ns = resolve_namespace(args.namespace)
    endpoint = broker_endpoint(args, reader=True)
    interval = max(0.1, args.interval)
    out = sys.stdout
    curve = curve_keys(args)  # ConfigError: exit 2
    with ControlClient(endpoint, timeout=min(2.0, interval * 2), curve=curve) as client:
        take = sampler(client, ns)
        if args.once or not out.isatty():
            first = take()
            while True:
                time.sleep(interval)
                cur = take()
                out.write("\n".join(render(ns, endpoint, cur, first)) + "\n\n")
                out.flush()
                if args.once:
                    return 0 if cur.error is None else 1
                first = cur

        # SIGTERM ends the view as cleanly as 'q' (the terminal is restored).
        def on_term(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, on_term)
        try:
            with _terminal(out) as fd:
                prev: Sample | None = None
                while True:
                    cur = take()
                    width = shutil.get_terminal_size().columns
                    lines = render(ns, endpoint, cur, prev)
                    out.write(_HOME + "".join(ln[:width] + _EOL + "\r\n" for ln in lines) + _EOS)
                    out.flush()
                    prev = cur
                    deadline = time.monotonic() + interval
                    while (left := deadline - time.monotonic()) > 0:
                        if "q" in _wait_key(fd, left).lower():
                            return 0
        except KeyboardInterrupt:
            return 0
