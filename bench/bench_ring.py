"""Benchmark shmbus.Ring against the usual ways to move bytes between two Python processes.

Run it from the repository root (``pip install -e '.[bench]'`` first)::

    python bench/bench_ring.py                 # everything, median of 3 runs (~2 min)
    python bench/bench_ring.py --quick         # smoke test: fewer messages, 1 run (~15 s)
    python bench/bench_ring.py --only pingpong,tput1m --runs 5
    python bench/bench_ring.py --json /tmp/ring.json

Every measurement starts two fresh processes (``spawn`` by default), a writer
and a reader (or a client and a server), and compares in the same run
shmbus.Ring with ``multiprocessing.Pipe``, ``multiprocessing.Queue``,
``faster_fifo.Queue`` and pyzmq over ``ipc://``. A peer library that is not
installed is skipped with a note. The cases (select them with ``--only``):

``pingpong``
    Round-trip latency of a 64-byte message, p50 and p99 in microseconds, over
    20,000 round trips after a warm-up. shmbus uses two rings (one each way),
    once with the readers' default wait (spin ``Ring.spin_ns``, then sleep on
    the doorbell) and once sleeping at once (``spin_ns = 0``). Pipe is one
    duplex pipe, the queues are two queues, zmq is a PAIR socket.
``tput64``
    64-byte messages one at a time, millions of messages per second:
    ``ring.write``/``ring.read``, ``send_bytes``/``recv_bytes``, ``put``/``get``,
    zmq PUSH/PULL ``send``/``recv``.
``tput64-batch``
    The same in batches of 256: ``ring.write_many``/``ring.read_many(256)``,
    faster_fifo ``put_many``/``get_many``; zmq one at a time again, for
    reference, since it batches internally.
``tput1m``
    1 MiB frames, GB/s (1e9 bytes per second): ``ring.read`` copies each frame
    out to bytes, ``ring.read_view`` reads it in place (a separate row); the
    ring has 32 MiB of capacity and faster_fifo as much buffer; zmq sends and
    receives with ``copy=False`` (the frame is handed over as a memoryview) and
    a high-water mark of 32 messages per side.

Throughput is frames received divided by the time from the writer's first
send (after the warm-up, once both sides are ready) to the reader's last
receive; the clocks are both CLOCK_MONOTONIC. Every frame reaches Python in
the reader as bytes or a memoryview and has its first byte read, and the
reader checks the count and total size. faster_fifo is set to raw bytes
(``loads=bytes, dumps=bytes``) so that it does not pickle; ``multiprocessing.Queue``
always pickles.

Each figure is the median of ``--runs`` runs (transports interleaved within a
run); the table also shows every run and each row's ratio to the best peer,
oriented so that above 1 is better than every peer. A case during which other
processes used more than 5% of a CPU is flagged "noisy" (two cores leave no
room for a neighbour). Everything, with machine details, the noise and every
raw run, goes to ``--json`` (default bench/results/ring.json).

Rings are created by this process, named ``bench-<pid>-...``, and unlinked in
``finally`` blocks; entries left by an earlier run that was killed outright are
removed at start. Each child has a deadline (``--timeout``) and is killed on
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import _peers
from _peers import ROLES, Spec

from shmbus.core.ring import DEFAULT_SPIN_NS

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "ring.json"
SHM = Path("/dev/shm")
MiB = 1 << 20

#: Python module each transport needs, to skip rows whose library is missing.
MODULES = {"shmbus": "shmbus", "ffifo": "faster_fifo", "zmq": "zmq"}


class BenchError(RuntimeError):
    """A measurement failed: a child raised, died or ran out of time."""


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # a transport of _peers: shmbus, pipe, queue, ffifo, zmq
    batch: int = 1
    view: bool = False
    spin_ns: int | None = None


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    mode: str  # "pingpong" or "tput"
    size: int
    count: int
    warmup: int
    quick_count: int
    quick_warmup: int
    rows: tuple[Row, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.mode == "pingpong":
            return ("p50_us", "p99_us")
        return ("gb_per_s",) if self.size >= MiB else ("mmsg_per_s",)


def _peer_rows(label_pipe: str, label_queue: str, label_ffifo: str, label_zmq: str) -> tuple:
    return (
        Row(label_pipe, "pipe"),
        Row(label_queue, "queue"),
        Row(label_ffifo, "ffifo"),
        Row(label_zmq, "zmq"),
    )


CASES = (
    Case(
        "pingpong",
        "ping-pong round trip, 64 B",
        "pingpong",
        64,
        count=20_000,
        warmup=2_000,
        quick_count=5_000,
        quick_warmup=500,
        rows=(
            Row("shmbus Ring, spin then sleep (default)", "shmbus"),
            Row("shmbus Ring, sleep only", "shmbus", spin_ns=0),
            *_peer_rows("mp.Pipe", "mp.Queue", "faster_fifo.Queue", "zmq PAIR ipc://"),
        ),
    ),
    Case(
        "tput64",
        "throughput, 64 B, one at a time",
        "tput",
        64,
        count=1_000_000,
        warmup=50_000,
        quick_count=100_000,
        quick_warmup=10_000,
        rows=(
            Row("shmbus write/read", "shmbus"),
            *_peer_rows(
                "mp.Pipe send_bytes/recv_bytes",
                "mp.Queue put/get",
                "faster_fifo put/get",
                "zmq PUSH/PULL send/recv",
            ),
        ),
    ),
    Case(
        "tput64-batch",
        "throughput, 64 B, batches of 256",
        "tput",
        64,
        count=256 * 16_000,
        warmup=256 * 200,
        quick_count=256 * 2_000,
        quick_warmup=256 * 40,
        rows=(
            Row("shmbus write_many/read_many", "shmbus", batch=256),
            Row("faster_fifo put_many/get_many", "ffifo", batch=256),
            Row("zmq PUSH/PULL send/recv (1 by 1)", "zmq"),
        ),
    ),
    Case(
        "tput1m",
        "throughput, 1 MiB frames",
        "tput",
        MiB,
        count=2_000,
        warmup=100,
        quick_count=300,
        quick_warmup=40,
        rows=(
            Row("shmbus write + read (copy)", "shmbus"),
            Row("shmbus write + read_view (0-copy)", "shmbus", view=True),
            Row("mp.Pipe send_bytes/recv_bytes", "pipe"),
            Row("mp.Queue put/get", "queue"),
            Row("faster_fifo put/get", "ffifo"),
            Row("zmq PUSH/PULL copy=False", "zmq", view=True),
        ),
    ),
)
CASE_NAMES = tuple(c.name for c in CASES)


# ------------------------------------------------------------ one measurement


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Start children with SIGINT ignored: spawn's exec keeps it, so Ctrl-C reaches us only."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def measure(kind: str, spec: Spec, ctx: Any, tmpdir: str, tag: str) -> tuple[dict, dict]:
    """Run one measurement in two fresh children; returns their two results."""
    deadline = time.monotonic() + spec.timeout
    first, second = ROLES[spec.mode]
    ends = _peers.make_ends(kind, spec, ctx, tmpdir, tag)
    procs: list[tuple[Any, Any]] = []
    done = False
    try:
        barrier = ctx.Barrier(2)
        for role, end in ((first, ends[0]), (second, ends[1])):
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_peers.child_main,
                args=(role, kind, spec, end, barrier, tx),
                name=f"bench-{role}-{kind}",
                daemon=True,
            )
            with _sigint_ignored():
                p.start()
            tx.close()  # the child's copy is the only one left: EOF when it dies
            procs.append((p, rx))
        a, b = _collect(procs, deadline)
        done = True
        return a, b
    finally:
        for p, _ in procs:
            if done:  # both reported: give them a moment to exit on their own
                p.join(10)
            if p.is_alive():
                p.kill()
            p.join(5)
        for _, rx in procs:
            rx.close()
        ends[2]()


def _collect(procs: list[tuple[Any, Any]], deadline: float) -> list[dict[str, Any]]:
    """Each child's result, in order, or BenchError on the first failure, death
    or the deadline. ``procs`` are (process, the read end of its result pipe):
    a multiprocessing Process or a shmbus AgentProcess."""
    results: dict[int, dict[str, Any]] = {}
    pending = {rx: i for i, (_, rx) in enumerate(procs)}
    while pending:
        left = deadline - time.monotonic()
        ready = mp.connection.wait(list(pending), timeout=max(left, 0))
        if not ready:
            names = ", ".join(procs[i][0].name for i in pending.values())
            raise BenchError(f"no result from {names} in the time allowed (--timeout); killed")
        for rx in ready:
            i = pending.pop(rx)
            p = procs[i][0]
            try:
                status, data = rx.recv()
            except EOFError:
                until = time.monotonic() + 1  # its exit code, once it is gone
                while p.exitcode is None and time.monotonic() < until:
                    time.sleep(0.01)
                raise BenchError(f"{p.name} died with exit code {p.exitcode}") from None
            if status != "ok":
                raise BenchError(data)
            results[i] = data
    return [results[i] for i in range(len(procs))]


def summarize(mode: str, spec: Spec, a: dict, b: dict) -> dict[str, Any]:
    """One run's figures from the two children's results."""
    if mode == "pingpong":
        return a
    seconds = b["t1"] - a["t0"]
    return {
        "seconds": seconds,
        "frames": b["frames"],
        "bytes": b["bytes"],
        "mmsg_per_s": b["frames"] / seconds / 1e6,
        "gb_per_s": b["bytes"] / seconds / 1e9,
        "writer_seconds": a["t_sent"] - a["t0"],
    }


# ------------------------------------------------------------------ a whole run


def _missing(kind: str) -> str | None:
    """Why a transport's library cannot be used here, or None if it can."""
    return missing_module(MODULES.get(kind))


@functools.cache
def missing_module(module: str | None) -> str | None:
    """Why a peer's library cannot be imported here, or None if it can (or needs none)."""
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module} not importable ({e}); install it with pip install -e '.[bench]'"
    return None


@dataclass
class RowResult:
    row: Row
    status: str = "ok"  # ok, failed, skipped
    note: str = ""
    runs: list[dict[str, Any]] | None = None
    median: dict[str, float] | None = None
    vs_best_peer: dict[str, float] | None = None


def run_case(
    case: Case, args: argparse.Namespace, ctx: Any, tmpdir: str, seq: Iterator[int]
) -> tuple[Spec, list[RowResult]]:
    if args.quick:
        count, warmup = case.quick_count, case.quick_warmup
    else:
        count, warmup = case.count, case.warmup
    base = Spec(case.mode, case.size, count, warmup, timeout=args.timeout)
    results = [RowResult(row, runs=[]) for row in case.rows]
    for res in results:
        missing = _missing(res.row.kind)
        if missing:
            res.status, res.note = "skipped", missing
    for run in range(1, args.runs + 1):
        for res in results:
            if res.status != "ok":
                continue
            row = res.row
            spec = replace(base, batch=row.batch, view=row.view, spin_ns=row.spin_ns)
            tag = f"bench-{os.getpid()}-{next(seq)}"
            try:
                figures = summarize(case.mode, spec, *measure(row.kind, spec, ctx, tmpdir, tag))
            except BenchError as e:
                res.status, res.note = "failed", str(e).strip()
                print(f"  {case.name} run {run}: {row.label}: FAILED\n{res.note}", file=sys.stderr)
                continue
            assert res.runs is not None
            res.runs.append(figures)
            shown = ", ".join(f"{m} {figures[m]:.3g}" for m in case.metrics)
            print(f"  {case.name} run {run}/{args.runs}: {row.label}: {shown}", file=sys.stderr)
    _rank(case, results)
    return base, results


def _rank(case: Case, results: list[RowResult]) -> None:
    """Medians, and each row against the best peer (above 1: better than every peer)."""
    for res in results:
        if res.status == "ok" and res.runs:
            res.median = {m: statistics.median(r[m] for r in res.runs) for m in case.metrics}
    lower_is_better = case.mode == "pingpong"
    for m in case.metrics:
        peers = [r.median[m] for r in results if r.median and r.row.kind != "shmbus"]
        if not peers:
            continue
        best = min(peers) if lower_is_better else max(peers)
        for res in results:
            if res.median:
                value = res.median[m]
                ratio = best / value if lower_is_better else value / best
                res.vs_best_peer = {**(res.vs_best_peer or {}), m: ratio}


# ----------------------------------------------------------------------- report

UNITS = {"p50_us": "p50 us", "p99_us": "p99 us", "mmsg_per_s": "M msg/s", "gb_per_s": "GB/s"}


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(case: Case, spec: Spec, results: list[RowResult], runs: int) -> str:
    what = "round trips" if case.mode == "pingpong" else "frames"
    lines = [
        f"{case.name}: {case.title}; {spec.count:,} {what} after {spec.warmup:,} warm-up, "
        f"median of {runs} run{'s' * (runs != 1)}"
    ]
    width = max(len(r.row.label) for r in results)
    head = [f"{'transport':<{width}}"]
    for m in case.metrics:
        head.append(f"{UNITS[m]:>9}")
    for m in case.metrics:
        label = f"{m.split('_')[0]} vs best peer" if len(case.metrics) > 1 else "vs best peer"
        head.append(f"{label:>17}")
    head.append("   runs" + (f" ({UNITS[case.metrics[0]]})" if len(case.metrics) > 1 else ""))
    lines.append(" ".join(head))
    lines.append("-" * len(lines[-1]))
    for res in results:
        cells = [f"{res.row.label:<{width}}"]
        if res.median is None:
            reason = res.note.splitlines()[-1] if res.note else ""
            lines.append(f"{cells[0]} {res.status}: {reason}")
            continue
        cells += [f"{_fmt(res.median[m]):>9}" for m in case.metrics]
        for m in case.metrics:
            ratio = (res.vs_best_peer or {}).get(m)
            cells.append(f"{(f'{ratio:.2f}x' if ratio else '-'):>17}")
        assert res.runs is not None
        cells.append("   " + " ".join(_fmt(r[case.metrics[0]]) for r in res.runs))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def headline(info: dict[str, Any]) -> str:
    v = info["versions"]
    peers = ", ".join(f"{d} {v[d]}" for d in ("pyzmq", "faster-fifo") if v.get(d))
    return (
        f"shmbus {v.get('shmbus')} ({peers}); Python {info['python']}; "
        f"{info['nproc']} CPUs ({info['cpu']}); {info['start_method']}; "
        f"load average {info['loadavg_at_start'][0]:.2f} at start"
    )


def machine_info(start_method: str) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "start_method": start_method,
        "shmbus_default_spin_ns": DEFAULT_SPIN_NS,
        "loadavg_at_start": os.getloadavg(),
        "versions": {d: version(d) for d in ("shmbus", "cffi", "pyzmq", "faster-fifo", "msgpack")},
    }
    if not _missing("zmq"):
        import zmq

        info["versions"]["libzmq"] = zmq.zmq_version()
    info["git"] = _git_state()
    return info


def _git_state() -> dict[str, Any] | None:
    """The commit benchmarked and whether the tree had local changes."""
    try:
        run = functools.partial(
            subprocess.run, cwd=HERE, capture_output=True, text=True, timeout=10, check=True
        )
        commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


# ------------------------------------------------------------------ noise


class CpuMeter:
    """CPU time that processes other than this one and its children used meanwhile.

    On a shared two-core machine that is the main source of noise; each case
    reports it, so that a disturbed figure can be told from a real one.
    """

    def __init__(self) -> None:
        self.start = (time.monotonic(), *self._sample())

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
            tick = os.sysconf("SC_CLK_TCK")
            busy, stolen = (user + nice + system + irq + softirq) / tick, steal / tick
        except (OSError, ValueError):
            busy = stolen = float("nan")
        me, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        own = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return busy, own, stolen

    def read(self) -> dict[str, float]:
        t0, busy0, own0, steal0 = self.start
        busy, own, steal = self._sample()
        return {
            "wall_s": round(time.monotonic() - t0, 2),
            "other_cpu_s": round(max(busy - busy0 - (own - own0), 0.0), 2),
            "steal_s": round(steal - steal0, 2),
        }


# ------------------------------------------------------------------ leftovers

_OURS = re.compile(r"(?:sem\.)?shmbus\.(bench-(\d+)-[A-Za-z0-9_-]+?)(?:\.bell)?")


def sweep_rings(only_pid: int | None = None) -> list[str]:
    """Unlink bench rings of dead runs (or of ``only_pid``); returns the ring names."""
    from shmbus import Ring

    removed = set()
    try:
        entries = [p.name for p in SHM.iterdir()]
    except OSError:
        return []
    for entry in entries:
        m = _OURS.fullmatch(entry)
        if not m or m.group(1) in removed:
            continue
        pid = int(m.group(2))
        if only_pid is not None:
            if pid != only_pid:
                continue
        elif _alive(pid):
            continue
        Ring.unlink_name(m.group(1))
        removed.add(m.group(1))
    return sorted(removed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="shmbus.Ring against Pipe, Queue, faster_fifo and zmq, two processes.",
        epilog=f"cases: {', '.join(CASE_NAMES)}",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: fewer messages, 1 run (~15 s)"
    )
    ap.add_argument("--runs", type=int, help="runs per measurement (default 3, --quick 1)")
    ap.add_argument("--only", action="append", metavar="CASE[,CASE]", help="run only these cases")
    ap.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})"
    )
    ap.add_argument(
        "--timeout", type=float, default=60.0, help="seconds one measurement may take (60)"
    )
    ap.add_argument(
        "--start-method",
        choices=("spawn", "fork", "forkserver"),
        default="spawn",
        help="how children start (default spawn: fresh interpreters)",
    )
    args = ap.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    wanted = [n.strip() for item in args.only or [] for n in item.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in CASE_NAMES]
    if unknown:
        ap.error(f"unknown case {', '.join(unknown)}; choose from {', '.join(CASE_NAMES)}")
    args.cases = [c for c in CASES if not wanted or c.name in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through every finally block.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    stale = sweep_rings()
    if stale:
        print(f"removed rings left by earlier killed runs: {', '.join(stale)}", file=sys.stderr)
    ctx = mp.get_context(args.start_method)
    info = machine_info(args.start_method)
    load = info["loadavg_at_start"][0]
    if load > 0.5 * (info["nproc"] or 1):
        print(
            f"warning: load average {load:.2f} on {info['nproc']} CPUs; figures will be noisy",
            file=sys.stderr,
        )
    started = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="shmbus-bench-")
    seq = iter(range(1, 1 << 30))
    report: dict[str, Any] = {
        "benchmark": "bench/bench_ring.py",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "runs": args.runs,
            "quick": args.quick,
            "timeout_s": args.timeout,
            "cases": [c.name for c in args.cases],
        },
        "machine": info,
        "cases": [],
    }
    print(headline(info), flush=True)
    failed = False
    try:
        for case in args.cases:
            print(f"{case.name}: {case.title}", file=sys.stderr)
            meter = CpuMeter()
            spec, results = run_case(case, args, ctx, tmpdir, seq)
            noise = meter.read()
            failed |= any(r.status == "failed" for r in results)
            print("\n" + table(case, spec, results, args.runs), flush=True)
            if noise["other_cpu_s"] > 0.05 * noise["wall_s"]:
                print(
                    f"(noisy: other processes used {noise['other_cpu_s']:.1f} CPU-seconds "
                    f"during these {noise['wall_s']:.0f} s)",
                    flush=True,
                )
            print(flush=True)
            report["cases"].append(
                {
                    "name": case.name,
                    "title": case.title,
                    "mode": case.mode,
                    "size": case.size,
                    "count": spec.count,
                    "warmup": spec.warmup,
                    "metrics": list(case.metrics),
                    "noise": noise,
                    "rows": [
                        {
                            **asdict(r.row),
                            "status": r.status,
                            "note": r.note,
                            "median": r.median,
                            "vs_best_peer": r.vs_best_peer,
                            "runs": r.runs,
                        }
                        for r in results
                    ],
                }
            )
    except KeyboardInterrupt:
        print("interrupted; children killed, rings unlinked", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        left = sweep_rings(only_pid=os.getpid())
        if left:
            print(f"unlinked rings still named at exit: {', '.join(left)}", file=sys.stderr)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["duration_s"] = round(time.monotonic() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"took {report['duration_s']} s; results in {args.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
