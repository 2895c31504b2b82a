"""Benchmark the uds transport (agents on the Unix-socket fallback) against its targets.

Run it from the repository root::

    python bench/bench_uds.py              # median of 3 runs
    python bench/bench_uds.py --quick      # smoke test: fewer messages, 1 run

It measures with bench_bus.py's machinery (fresh bus and processes for every
measurement, throughput in the receiver, medians over ``--runs``), with both
agents on the uds transport (``SHMBUS_TRANSPORT=uds`` in their processes),
in the same run as the peers of the targets of issue 5:

- throughput of 64 B payloads with the batch calls (``send_many`` /
  ``recv_many(256)``) >= pyzmq PUSH/PULL over ``ipc://`` (one at a time:
  zmq batches internally);
- request round trip p50 (small dict) <= a duplex ``multiprocessing.Pipe``.

The shm rows of the same cases are shown for reference. Results go to
``--json`` (default bench/results/uds.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_bus as bb
from bench_ring import BenchError, machine_info

from shmbus import ShmbusError

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "uds.json"
CASES = {c.name: c for c in bb.CASES}

# (label, transport or peer, case, batch)
ROWS = (
    ("uds send_many/recv_many(256), 64 B", "uds", "batch-bytes", bb.BATCH),
    ("uds send/recv, 64 B", "uds", "bytes", 1),
    ("zmq PUSH/PULL ipc://, 64 B", "zmq", "bytes", 1),
    ("shm send_many/recv_many(256), 64 B", "shm", "batch-bytes", bb.BATCH),
    ("uds request/reply, dict", "uds", "request", 1),
    ("mp.Pipe send/recv (pickle), dict", "pipe", "request", 1),
    ("shm request/reply, dict", "shm", "request", 1),
)
TARGETS = (
    ("uds batch throughput >= pyzmq ipc://", 0, 2, "mmsg_per_s", False),
    ("uds request p50 <= mp.Pipe", 4, 5, "p50_us", True),
)


def measure(kind: str, spec: Any, ctx: Any, tmpdir: str, tag: str) -> dict[str, Any]:
    if kind in ("uds", "shm"):
        # The agents' processes take the environment as it is when they start.
        before = os.environ.get("SHMBUS_TRANSPORT")
        os.environ["SHMBUS_TRANSPORT"] = kind
        try:
            raw = bb.measure("shmbus", spec, ctx, tmpdir, tag)
        finally:
            if before is None:
                del os.environ["SHMBUS_TRANSPORT"]
            else:
                os.environ["SHMBUS_TRANSPORT"] = before
    else:
        raw = bb.measure(kind, spec, ctx, tmpdir, tag)
    return bb.summarize(spec, raw)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: fewer messages, 1 run")
    ap.add_argument("--runs", type=int, help="runs per row (default 3, --quick 1)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    ap.add_argument("--messages", type=int, metavar="N", help="messages (or round trips) per row")
    args = ap.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.messages is not None and args.messages < 2:
        ap.error("--messages must be at least 2")
    args.profile = None  # what bench_bus.case_spec reads
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bb.sweep_buses()
    ctx = mp.get_context("spawn")
    info = machine_info("spawn")
    runs: list[list[dict[str, Any]]] = [[] for _ in ROWS]
    notes: list[str] = [""] * len(ROWS)
    seq = 0
    with tempfile.TemporaryDirectory(prefix="benchuds") as tmpdir:
        for run in range(1, args.runs + 1):
            for i, (label, kind, case_name, batch) in enumerate(ROWS):
                if notes[i]:
                    continue
                missing = bb._missing(kind) if kind in bb.PEERS else None
                if missing:
                    notes[i] = f"skipped: {missing}"
                    continue
                case = CASES[case_name]
                row = bb.Row(label, kind, batch=batch)
                spec = bb.case_spec(case, row, args)
                seq += 1
                try:
                    figures = measure(kind, spec, ctx, tmpdir, f"benchbus-{os.getpid()}-{seq}")
                except (BenchError, ShmbusError) as e:
                    notes[i] = f"failed: {str(e).strip()}"
                    print(f"  {label}: FAILED\n{notes[i]}", file=sys.stderr)
                    continue
                runs[i].append(figures)
                shown = ", ".join(f"{m} {figures[m]:.3g}" for m in case.metrics)
                print(f"  run {run}/{args.runs}: {label}: {shown}", file=sys.stderr)
    medians: list[dict[str, float] | None] = []
    for i, (_, _, case_name, _) in enumerate(ROWS):
        metrics = CASES[case_name].metrics
        medians.append(
            {m: statistics.median(r[m] for r in runs[i]) for m in metrics} if runs[i] else None
        )
    lines = [f"uds transport, median of {args.runs} run(s); {info['nproc']} CPUs", ""]
    for (label, _, _, _), med, note in zip(ROWS, medians, notes, strict=True):
        if med is None:
            lines.append(f"  {label:40} {note or 'no figure'}")
            continue
        unit = "M msgs/s" if "mmsg_per_s" in med else "us"
        shown = "  ".join(f"{m} {v:.3g}" for m, v in med.items())
        lines.append(f"  {label:40} {shown} ({unit})")
    lines.append("")
    verdicts = []
    for text, ours, theirs, metric, lower in TARGETS:
        a, b = medians[ours], medians[theirs]
        met = (
            None
            if a is None or b is None
            else (a[metric] <= b[metric] if lower else a[metric] >= b[metric])
        )
        verdicts.append(
            {"target": text, "met": met, "value": a and a[metric], "peer": b and b[metric]}
        )
        word = {True: "met", False: "NOT MET", None: "unknown"}[met]
        lines.append(f"  target: {text}: {word}")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": info,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": args.runs,
        "rows": [
            {
                "label": label,
                "kind": kind,
                "case": case_name,
                "median": med,
                "runs": r,
                "note": note,
            }
            for (label, kind, case_name, _), med, r, note in zip(
                ROWS, medians, runs, notes, strict=True
            )
        ],
        "targets": verdicts,
    }
    args.json.write_text(json.dumps(result, indent=2, default=str))
    return 1 if any(n.startswith("failed") for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
