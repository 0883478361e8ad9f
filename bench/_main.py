"""The suite's command line: run the selected benchmarks, print tables, write JSON."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import Run, print_table, run_resources

# name -> (module, function); imported lazily so that a missing optional peer
# never stops the other benchmarks.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "write": ("bench._write", "bench_write"),
    "read": ("bench._write", "bench_read"),
    "handoff": ("bench._handoff", "bench_handoff"),
    "latency": ("bench._latency", "bench_latency"),
    "stream": ("bench._stream", "bench_stream"),
    "fanout": ("bench._fanout", "bench_fanout"),
    "relay": ("bench._relay", "bench_relay"),
    "bridge": ("bench._bridge", "bench_bridge"),
    "record": ("bench._record", "bench_record"),
}

DEFAULT_JSON = Path(__file__).resolve().parent / "out" / "results.json"


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become null, tuples lists, numpy scalars Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy
    import zmq

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized run: small sizes, short durations"
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help="run only these"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument(
        "--spread",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: print every target's measured value in each of these earlier "
        "runs' JSON files, side by side, with how many runs met it",
    )
    args = parser.parse_args(argv)
    if args.spread:
        return spread(args.spread)

    names = args.only or list(BENCHMARKS)
    run = Run(quick=args.quick)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": run.quick,
        "machine": _machine(),
        "argv": list(sys.argv if argv is None else argv),
    }
    print(f"shmcast benchmark suite — {', '.join(names)}")
    print(
        f"  {meta['machine']['cpus']} CPUs ({meta['machine']['cpu']}), Python "
        f"{meta['machine']['python']}, numpy {meta['machine']['numpy']}, "
        f"libzmq {meta['machine']['libzmq']}"
    )
    if run.quick:
        print(
            "  QUICK MODE: CI-sized — 100 MB becomes 8 MB, short runs, fewer rounds; "
            "the numbers only show that the suite works"
        )
    out: dict[str, Any] = {"meta": meta, "benchmarks": {}}
    failed = []
    t_all = time.monotonic()
    with run_resources(run):
        for name in names:
            mod, fn = BENCHMARKS[name]
            t0 = time.monotonic()
            try:
                res = getattr(importlib.import_module(mod), fn)(run)
            except Exception:
                tb = traceback.format_exc()
                print(f"\n{name}: FAILED\n{tb}", file=sys.stderr)
                res = {"error": tb, "targets": []}
                failed.append(name)
            res["elapsed_s"] = round(time.monotonic() - t0, 2)
            out["benchmarks"][name] = res
            sys.stdout.flush()
    out["meta"]["elapsed_s"] = round(time.monotonic() - t_all, 2)

    rows = []
    for name, res in out["benchmarks"].items():
        for t in res.get("targets", []):
            v = t.get("value")
            rows.append(
                [
                    t["target"],
                    "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)),
                    {True: "MET", False: "MISSED", None: "n/a"}[t.get("met")],
                ]
            )
        for label, reason in res.get("skipped", {}).items():
            rows.append([f"{name}: {label}", "skipped", reason])
    if rows:
        print_table(
            "targets (ratios measured in this run)", ["target", "measured", "verdict"], rows
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(_clean(out), f, indent=1, allow_nan=False)
    print(f"\nwrote {args.json} in {out['meta']['elapsed_s']:.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def spread(paths: Sequence[Path]) -> int:
    """The targets of several runs side by side: each run's value, and in how many
    of the runs that measured it the target was met."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f)["benchmarks"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{path}: not a results file of this suite ({exc})", file=sys.stderr)
            return 2
    order: dict[str, None] = {}
    values: list[dict[str, tuple[Any, Any]]] = []
    for benchmarks in runs:
        got: dict[str, tuple[Any, Any]] = {}
        for res in benchmarks.values():
            for t in res.get("targets", []):
                order.setdefault(t["target"], None)
                got[t["target"]] = (t.get("value"), t.get("met"))
        values.append(got)
    rows = []
    for target in order:
        cells = []
        met = judged = 0
        for got in values:
            v, ok = got.get(target, (None, None))
            cells.append("-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
            if ok is not None:
                judged += 1
                met += bool(ok)
        rows.append([target, *cells, f"{met}/{judged}" if judged else "n/a"])
    print_table(
        f"targets over {len(runs)} runs (value per run; runs that met it)",
        ["target", *(f"run {i + 1}" for i in range(len(runs))), "met"],
        rows,
    )
    return 0
