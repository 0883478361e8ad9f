"""write and read: the cost of Segment.write against a plain numpy copy of the same bytes,
and the cost of a validated zero-copy view against the array size.

Both run in this one process. Contenders alternate batch by batch (the order rotates
every batch), each batch timed with ``perf_counter_ns`` around ``n`` calls, so a slow
spell of the machine lands on every contender alike.

The write benchmark also times a 64-byte ``publish()`` that nobody waits on (the
compiled core skips the wake syscall then; a broker process in a namespace of its
own backs the Publisher rows) and the largest write while a second Python thread
spins (the compiled core copies without the GIL), each beside the pure-Python
fallback (segments opened with ``SHMCAST_CORE=python``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from shmcast.broker import Segment, engine_core

from ._common import KiB, MiB, Run, fmt_ratio, fmt_size, fmt_time, print_table, ratio, spread, stats

WRITE_TARGET = 1.2  # Segment.write / numpy copy at 1 MiB and above
BIG_WRITE_TARGET = 1.05  # Segment.write / numpy copy at the largest size (100 MB)
PUBLISH_TARGET_NS = 2000  # a 64-byte publish() nobody waits on
FLAT_TARGET = 1.25  # largest / smallest view cost
SMALL = 64


def _sizes(run: Run) -> list[int]:
    return run.q([KiB, MiB, 16 * MiB, 100_000_000], [KiB, MiB, 8_000_000])


def _batch_len(fn: Callable[[], Any], budget_ns: float) -> int:
    t = time.perf_counter_ns()
    fn()
    one = max(time.perf_counter_ns() - t, 50)
    return int(min(max(budget_ns // one, 1), 5000))


def _alternate(
    contenders: dict[str, Callable[[], Any]], batches: int, budget_ns: float
) -> dict[str, list[float]]:
    """Time every contender ``batches`` times, rotating the order; ns per call."""
    for fn in contenders.values():  # warm caches, code paths and pages
        for _ in range(3):
            fn()
    lens = {k: _batch_len(fn, budget_ns) for k, fn in contenders.items()}
    out: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    pc = time.perf_counter_ns
    for b in range(batches):
        for k in names[b % len(names) :] + names[: b % len(names)]:
            fn, n = contenders[k], lens[k]
            t0 = pc()
            for _ in range(n):
                fn()
            out[k].append((pc() - t0) / n)
    return out


def _time_write(run: Run, size: int, batches: int) -> dict[str, list[float]]:
    src = np.random.default_rng(1).random(size // 8)
    name = f"w{size}"
    seg = Segment.create(name, np.float64, src.shape, namespace=run.namespace)
    # The baselines write into memory that is already touched, rotating over two
    # buffers like the segment's two slots: the same footprint and cache behaviour.
    heap = [np.ones_like(src), np.ones_like(src)]
    maps = [mmap.mmap(-1, size) for _ in range(2)]  # MAP_SHARED|MAP_ANONYMOUS: shmem
    shm = [np.frombuffer(m, dtype=np.float64) for m in maps]
    for j in range(2):
        shm[j][:] = 1.0
    k = [0, 0]

    def copy_heap() -> None:
        k[0] ^= 1
        np.copyto(heap[k[0]], src)

    def copy_shm() -> None:
        k[1] ^= 1
        np.copyto(shm[k[1]], src)

    def loan_empty() -> None:
        with seg.loan():
            pass

    try:
        t = _alternate(
            {
                "segment.write": lambda: seg.write(src),
                "numpy copy (heap)": copy_heap,
                "numpy copy (shmem)": copy_shm,
                "loan, empty block": loan_empty,
            },
            batches,
            budget_ns=run.q(3e6, 1e6),
        )
    finally:
        shm.clear()
        seg.close()
        seg.unlink()
        for m in maps:
            m.close()
    return t


def bench_write(run: Run) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    batches = run.q(25, 8)
    for size in _sizes(run):
        t = _time_write(run, size, batches)
        s = {k2: stats(v) for k2, v in t.items()}
        w, c = s["segment.write"]["median"], s["numpy copy (heap)"]["median"]
        results.append(
            {
                "size": size,
                "ns": s,
                "ratio_write_vs_copy": ratio(w, c),
                "ratio_write_vs_shmem_copy": ratio(w, s["numpy copy (shmem)"]["median"]),
                "overhead_ns": w - c,
                "copy_gbps": size / c if c else None,
                "target_applies": size >= MiB,
                "met": (ratio(w, c) or 1e9) <= WRITE_TARGET if size >= MiB else None,
            }
        )
    rows = []
    for r in results:
        s = r["ns"]
        rows.append(
            [
                fmt_size(r["size"]),
                fmt_time(s["segment.write"]["median"]),
                spread(s["segment.write"]),
                fmt_time(s["numpy copy (heap)"]["median"]),
                spread(s["numpy copy (heap)"]),
                fmt_time(s["numpy copy (shmem)"]["median"]),
                fmt_time(s["loan, empty block"]["median"]),
                fmt_ratio(r["ratio_write_vs_copy"]),
                fmt_ratio(r["ratio_write_vs_shmem_copy"]),
                {True: "MET", False: "MISSED", None: "(n/a <1 MiB)"}[r["met"]],
            ]
        )
    print_table(
        f"write: Segment.write vs numpy copy into touched memory (median, p10-p90; "
        f"target write/copy <= {WRITE_TARGET}x at >= 1 MiB)",
        [
            "size",
            "write",
            "write p10-p90",
            "copy heap",
            "copy p10-p90",
            "copy shmem",
            "loan (empty)",
            "write/heap",
            "write/shmem",
            "target",
        ],
        rows,
    )
    targets = [
        {
            "target": f"write {fmt_size(r['size'])}: write/numpy copy <= {WRITE_TARGET}x",
            "value": r["ratio_write_vs_copy"],
            "met": r["met"],
        }
        for r in results
        if r["target_applies"]
    ]
    publish = _bench_publish(run, batches)
    gil = _bench_gil(run, max(_sizes(run)), run.q(9, 4))
    targets += publish["targets"] + gil["targets"]
    return {
        "baseline": "numpy copy (heap)",
        "core": engine_core(),
        "sizes": results,
        "publish": publish,
        "gil": gil,
        "targets": targets,
    }


@contextlib.contextmanager
def _core(name: str) -> Iterator[None]:
    """Segments created inside use this core (``SHMCAST_CORE`` is read at creation)."""
    old = os.environ.get("SHMCAST_CORE")
    os.environ["SHMCAST_CORE"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["SHMCAST_CORE"]
        else:
            os.environ["SHMCAST_CORE"] = old


def _fallback_available() -> bool:
    try:
        with _core("python"):
            return engine_core() == "python"
    except Exception:  # the fallback refuses this CPU
        return False


def _bench_publish(run: Run, batches: int) -> dict[str, Any]:
    """A 64-byte version that nobody waits for: engine calls and Publisher.publish."""
    from shmcast.cli.testing import BROKER_READY, start
    from shmcast.publisher import Publisher

    src = np.arange(SMALL // 8, dtype=np.float64)
    contenders: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    heap = np.empty_like(src)
    with contextlib.ExitStack() as stack:
        seg = Segment.create("p64", np.float64, src.shape, namespace=run.namespace)
        stack.callback(seg.unlink)
        stack.callback(seg.close)
        contenders[f"Segment.write ({seg.core} core)"] = lambda: seg.write(src)
        if _fallback_available() and seg.core != "python":
            with _core("python"):
                slow = Segment.create("p64py", np.float64, src.shape, namespace=run.namespace)
            stack.callback(slow.unlink)
            stack.callback(slow.close)
            contenders["Segment.write (python core)"] = lambda: slow.write(src)
        else:
            skipped["Segment.write (python core)"] = "the fallback is not available here"
        ns = run.namespace + "pub"
        broker = start(["broker", "-n", ns], ready=BROKER_READY)
        stack.callback(broker.stop)
        quiet = Publisher("p64", dtype=np.float64, shape=src.shape, namespace=ns, announce=False)
        stack.callback(quiet.close)
        loud = Publisher("p64a", dtype=np.float64, shape=src.shape, namespace=ns)
        stack.callback(loud.close)
        contenders["Publisher(announce=False).publish"] = lambda: quiet.publish(src)
        contenders["Publisher().publish (commit message)"] = lambda: loud.publish(src)
        contenders["numpy copy 64 B"] = lambda: np.copyto(heap, src)
        t = _alternate(contenders, batches, budget_ns=run.q(2e6, 5e5))
    s = {k: stats(v) for k, v in t.items()}
    rows = [[k, fmt_time(v["median"]), spread(v)] for k, v in s.items()]
    print_table(
        f"publish: one 64-byte version nobody waits for (median, p10-p90; target "
        f"Publisher(announce=False).publish <= {PUBLISH_TARGET_NS / 1000:g} µs)",
        ["call", "per call", "p10-p90"],
        rows,
    )
    quiet_ns = s["Publisher(announce=False).publish"]["median"]
    return {
        "ns": s,
        "skipped": skipped,
        "targets": [
            {
                "target": f"publish 64 B nobody waits on: Publisher(announce=False).publish "
                f"<= {PUBLISH_TARGET_NS / 1000:g} µs (value in µs)",
                "value": quiet_ns / 1000,
                "met": quiet_ns <= PUBLISH_TARGET_NS,
            }
        ],
    }


class _Spinner:
    """A second Python thread that counts as fast as it can: its count over a window,
    against its rate while the main thread sleeps, is the share of the window it ran."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stop = self._stop
        n = 0
        while not stop.is_set():
            n += 1
            self.count = n

    def __enter__(self) -> _Spinner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def rate(self, seconds: float) -> float:
        """Counts per second while this (main) thread sleeps."""
        c0, t0 = self.count, time.perf_counter()
        self._stop.wait(seconds)
        return (self.count - c0) / (time.perf_counter() - t0)


def _bench_gil(run: Run, size: int, rounds: int) -> dict[str, Any]:
    """The largest write alone and with a second thread spinning: does it run meanwhile?"""
    src = np.random.default_rng(2).random(size // 8)
    heap = [np.ones_like(src), np.ones_like(src)]
    segs: dict[str, Segment] = {}
    try:
        segs[engine_core()] = Segment.create("g", np.float64, src.shape, namespace=run.namespace)
        if _fallback_available() and "python" not in segs:
            with _core("python"):
                segs["python"] = Segment.create(
                    "gpy", np.float64, src.shape, namespace=run.namespace
                )
        k = [0]

        def copy_heap() -> None:
            k[0] ^= 1
            np.copyto(heap[k[0]], src)

        ops: dict[str, Callable[[], Any]] = {"numpy copy (heap)": copy_heap}
        for core, seg in segs.items():
            ops[f"Segment.write ({core} core)"] = lambda seg=seg: seg.write(src)
        for op in ops.values():  # touch every page once
            op()
        alone: dict[str, list[float]] = {name: [] for name in ops}
        beside: dict[str, list[float]] = {name: [] for name in ops}
        share: dict[str, list[float]] = {name: [] for name in ops}
        names = list(ops)
        pc = time.perf_counter_ns
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = pc()
                ops[name]()
                alone[name].append(pc() - t0)
        with _Spinner() as spinner:
            free = spinner.rate(0.05)
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    c0, t0 = spinner.count, pc()
                    ops[name]()
                    t1, c1 = pc(), spinner.count
                    beside[name].append(t1 - t0)
                    share[name].append((c1 - c0) / (free * (t1 - t0) / 1e9))
    finally:
        for seg in segs.values():
            seg.unlink()
            seg.close()
    s_alone = {k2: stats(v) for k2, v in alone.items()}
    s_beside = {k2: stats(v) for k2, v in beside.items()}
    s_share = {k2: stats(v) for k2, v in share.items()}
    base = s_alone["numpy copy (heap)"]["median"]
    rows = [
        [
            name,
            fmt_time(s_alone[name]["median"]),
            fmt_ratio(ratio(s_alone[name]["median"], base)),
            fmt_time(s_beside[name]["median"]),
            f"{s_share[name]['median']:.0%}",
        ]
        for name in names
    ]
    print_table(
        f"write {fmt_size(size)} with a second Python thread spinning (median; target "
        f"write/numpy copy <= {BIG_WRITE_TARGET}x alone, and the other thread runs)",
        ["call", "alone", "vs numpy", "beside the thread", "the thread ran"],
        rows,
    )
    main = f"Segment.write ({engine_core()} core)"
    value = ratio(s_alone[main]["median"], base)
    return {
        "size": size,
        "alone_ns": s_alone,
        "beside_thread_ns": s_beside,
        "thread_share": s_share,
        "targets": [
            {
                "target": f"write {fmt_size(size)}: write/numpy copy <= {BIG_WRITE_TARGET}x",
                "value": value,
                "met": None if value is None else value <= BIG_WRITE_TARGET,
            },
            {
                "target": f"write {fmt_size(size)}: share of the write a second Python "
                "thread ran >= 50% (GIL released; numpy copy's share in the table)",
                "value": s_share[main]["median"],
                "met": s_share[main]["median"] >= 0.5,
            },
        ],
    }


def _readers(r: Segment) -> dict[str, Callable[[], object]]:
    def acquire_view_validate() -> None:
        _v, i, s, _ts = r.acquire()
        r.view(i)
        if not r.validate(i, s):
            raise RuntimeError("torn")

    def ctx_read() -> None:
        with r.read() as snap:
            snap.array  # noqa: B018

    return {
        "acquire+view+validate": acquire_view_validate,
        "with seg.read()": ctx_read,
        "seg.version": lambda: r.version,
    }


def _time_reads(run: Run, sizes: list[int], batches: int) -> dict[int, dict[str, list[float]]]:
    """Every (size, read method) pair alternating in the same rounds, so a slow
    spell of the machine lands on all sizes alike and "flat" compares like with like."""
    segs: list[Segment] = []
    try:
        contenders: dict[str, Callable[[], object]] = {}
        for size in sizes:
            seg = Segment.create(f"r{size}", np.float64, (size // 8,), namespace=run.namespace)
            segs.append(seg)
            seg.write(np.ones(size // 8))
            reader = Segment.attach(f"r{size}", namespace=run.namespace)
            segs.append(reader)
            for kind, fn in _readers(reader).items():
                contenders[f"{kind}@{size}"] = fn
        t = _alternate(contenders, batches, budget_ns=run.q(2e6, 5e5))
    finally:
        for seg in segs:
            if seg.writable:
                seg.unlink()
            seg.close()
    out: dict[int, dict[str, list[float]]] = {size: {} for size in sizes}
    for key, values in t.items():
        kind, size = key.rsplit("@", 1)
        out[int(size)][kind] = values
    return out


def bench_read(run: Run) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    batches = run.q(15, 5)
    sizes = list(_sizes(run))
    for size, t in _time_reads(run, sizes, batches).items():
        results.append({"size": size, "ns": {k: stats(v) for k, v in t.items()}})
    flat = {}
    for k in ("acquire+view+validate", "with seg.read()"):
        meds = [r["ns"][k]["median"] for r in results]
        flat[k] = {"max_over_min": max(meds) / min(meds)}
    met = all(f["max_over_min"] <= FLAT_TARGET for f in flat.values())
    rows = [
        [
            fmt_size(r["size"]),
            fmt_time(r["ns"]["acquire+view+validate"]["median"]),
            spread(r["ns"]["acquire+view+validate"]),
            fmt_time(r["ns"]["with seg.read()"]["median"]),
            spread(r["ns"]["with seg.read()"]),
            fmt_time(r["ns"]["seg.version"]["median"]),
        ]
        for r in results
    ]
    rows.append(
        [
            "largest/smallest",
            fmt_ratio(flat["acquire+view+validate"]["max_over_min"]),
            "",
            fmt_ratio(flat["with seg.read()"]["max_over_min"]),
            "",
            "",
        ]
    )
    print_table(
        f"read: validated zero-copy view vs size (median, p10-p90; target flat: "
        f"largest/smallest <= {FLAT_TARGET}x) — {'MET' if met else 'MISSED'}",
        ["size", "acquire+view+validate", "p10-p90", "with read()", "p10-p90", "seg.version"],
        rows,
    )
    targets = [
        {
            "target": f"read {k}: largest/smallest size <= {FLAT_TARGET}x (flat)",
            "value": f["max_over_min"],
            "met": f["max_over_min"] <= FLAT_TARGET,
        }
        for k, f in flat.items()
    ]
    return {"sizes": results, "flat": flat, "targets": targets}
