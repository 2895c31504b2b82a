"""Benchmark the bus (agents on a running bus) against pyzmq and multiprocessing.

Run it from the repository root (``pip install -e '.[bench]'`` first), or as
``shmbus bench``::

    python bench/bench_bus.py                  # everything, median of 3 runs
    python bench/bench_bus.py --quick          # smoke test: fewer messages, 1 run
    python bench/bench_bus.py --only bytes,request --runs 5
    python bench/bench_bus.py --peers zmq      # shmbus and pyzmq only (--peers none: shmbus)
    python bench/bench_bus.py --profile dict   # where the shmbus sender and receiver spend time

Every measurement starts fresh processes (``spawn``): for shmbus a new bus
(``shmbus.Runner``: a coordinator process) with the sender and the receiver
as agents in two processes of their own, for a peer the same two roles as
plain processes. Peers are pyzmq over ``ipc://`` and multiprocessing.Queue
(and Pipe for round trips); a peer whose library is missing is skipped with a
note. The cases (select them with ``--only``):

``bytes``
    64-byte ``bytes`` payloads one at a time: ``agent.send``/``agent.recv``,
    zmq PUSH/PULL ``send``/``recv``, ``Queue.put``/``get``.
``dict``
    A small dict (``{"id": 7, "name": "sensor-7", "value": 3.25, "ok": True}``)
    one at a time. zmq carries bytes, so its sender msgpack-packs each dict
    and its receiver unpacks it, as the bus does; the Queue pickles.
``batch-bytes``, ``batch-dict``
    The same payloads with ``send_many`` and ``recv_many(256)``, 256 per
    call. The peers have no such call: zmq batches internally, so its rows
    are one at a time again (as are the Queue's), for reference.
``request``
    Request round trip with the dict, p50 and p99 in microseconds:
    ``agent.request``/``agent.reply`` (the server replies with the payload
    it got), zmq REQ/REP with msgpack both ways, a duplex ``mp.Pipe`` and a
    pair of ``mp.Queue``s.
``publish``
    64-byte payloads published to 4 subscribers, each in its own process:
    ``agent.publish`` against zmq PUB/SUB (high-water marks above the message
    count, so PUB has no reason to drop; each subscriber counts what it got
    and drops are reported). The figure is the mean of the subscribers' rates.

Throughput is measured in the receiver: messages after the first, divided by
the time from the first measured message to the last (after a warm-up, once
both sides are ready). Every payload reaches Python in the receiver (a dict
decoded, a Message built) and is checked.

Each figure is the median of ``--runs`` runs (transports interleaved within a
run). The tables show every run, each row's ratio to the best peer (above 1
beats every peer) and, per case, the target of issue 3 with "met" or "NOT
MET". A missed target is explained by ``--profile CASE``: it runs the shmbus
rows of that case once, the measured part of each process under cProfile,
and prints the top functions by own time for each side (no JSON).

Results, machine details and every raw run go to ``--json`` (default
bench/results/bus.json). Buses are named ``benchbus-<pid>-<n>``; the runner
removes each one's shared memory when its measurement ends, and buses left by
an earlier run that was killed outright are removed at start.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _bus_peers
from _bus_peers import Spec, roles
from bench_ring import (
    BenchError,
    CpuMeter,
    _alive,
    _collect,
    _fmt,
    _sigint_ignored,
    headline,
    machine_info,
    missing_module,
)

from shmbus import AgentProcess, Runner, ShmbusError
from shmbus.core.paths import (
    bus_is_live,
    data_socket_path,
    lock_path,
    remove_bus_shm,
    runtime_dir,
    socket_path,
)

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "bus.json"
SHM = Path("/dev/shm")
BATCH = 256

#: The peers, the Python module each one needs, and its column in the summary.
PEERS = {"zmq": "zmq", "queue": None, "pipe": None}
PEER_LABELS = {"zmq": "pyzmq", "queue": "mp.Queue", "pipe": "mp.Pipe"}


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # shmbus, or a peer of PEERS
    batch: int = 1
    scale: float = 1.0  # share of the case's message count: slow peers get fewer


@dataclass(frozen=True)
class Target:
    """A target of issue 3: an absolute bound, or a multiple of a peer's median."""

    text: str
    metric: str
    bound: float | None = None
    peer: str | None = None
    factor: float = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    mode: str  # tput, request, publish
    payload: str  # bytes, dict
    count: int
    warmup: int
    quick_count: int
    quick_warmup: int
    rows: tuple[Row, ...]
    target: Target | None = None
    size: int = 64
    subscribers: int = 0

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("p50_us", "p99_us") if self.mode == "request" else ("mmsg_per_s",)

    @property
    def lower_is_better(self) -> bool:
        return self.mode == "request"


def _tput_rows(shmbus: str, zmq: str, queue: str, batch: int = 1) -> tuple[Row, ...]:
    return (Row(shmbus, "shmbus", batch=batch), Row(zmq, "zmq"), Row(queue, "queue", scale=0.25))


CASES = (
    Case(
        "bytes",
        "64 B bytes payload, one at a time",
        "tput",
        "bytes",
        count=400_000,
        warmup=20_000,
        quick_count=50_000,
        quick_warmup=5_000,
        rows=_tput_rows("shmbus send/recv", "zmq PUSH/PULL send/recv", "mp.Queue put/get"),
        target=Target(">= pyzmq", "mmsg_per_s", peer="zmq"),
    ),
    Case(
        "dict",
        "small dict payload, one at a time",
        "tput",
        "dict",
        count=300_000,
        warmup=20_000,
        quick_count=40_000,
        quick_warmup=4_000,
        rows=_tput_rows("shmbus send/recv", "zmq PUSH/PULL + msgpack", "mp.Queue put/get (pickle)"),
        target=Target(">= 0.5 M/s", "mmsg_per_s", bound=0.5),
    ),
    Case(
        "batch-bytes",
        f"64 B bytes payload, batches of {BATCH}",
        "tput",
        "bytes",
        count=1_000_000,
        warmup=BATCH * 100,
        quick_count=BATCH * 400,
        quick_warmup=BATCH * 20,
        rows=_tput_rows(
            f"shmbus send_many/recv_many({BATCH})",
            "zmq PUSH/PULL (1 by 1)",
            "mp.Queue put/get (1 by 1)",
            batch=BATCH,
        ),
    ),
    Case(
        "batch-dict",
        f"small dict payload, batches of {BATCH}",
        "tput",
        "dict",
        count=600_000,
        warmup=BATCH * 100,
        quick_count=BATCH * 300,
        quick_warmup=BATCH * 20,
        rows=_tput_rows(
            f"shmbus send_many/recv_many({BATCH})",
            "zmq PUSH/PULL + msgpack (1 by 1)",
            "mp.Queue put/get (1 by 1)",
            batch=BATCH,
        ),
        target=Target(">= 1.5 M/s", "mmsg_per_s", bound=1.5),
    ),
    Case(
        "request",
        "request round trip, small dict payload",
        "request",
        "dict",
        count=10_000,
        warmup=1_000,
        quick_count=2_000,
        quick_warmup=200,
        rows=(
            Row("shmbus request/reply", "shmbus"),
            Row("zmq REQ/REP + msgpack", "zmq"),
            Row("mp.Pipe send/recv (pickle)", "pipe"),
            Row("mp.Queue pair put/get (pickle)", "queue", scale=0.5),
        ),
        target=Target("p50 <= 15 us", "p50_us", bound=15.0),
    ),
    Case(
        "publish",
        "publish 64 B to 4 subscribers, per subscriber",
        "publish",
        "bytes",
        count=200_000,
        warmup=10_000,
        quick_count=25_000,
        quick_warmup=2_000,
        subscribers=4,
        rows=(Row("shmbus publish", "shmbus"), Row("zmq PUB/SUB", "zmq")),
        target=Target(">= 1.5 x pyzmq", "mmsg_per_s", peer="zmq", factor=1.5),
    ),
)
CASE_NAMES = tuple(c.name for c in CASES)


# ------------------------------------------------------------ one measurement


def make_ends(
    kind: str, spec: Spec, ctx: Any, tmpdir: str, tag: str
) -> tuple[dict[str, Any], Callable[[], None]]:
    """Each role's end of a peer's channel, and a cleanup the caller must run."""
    if kind == "zmq":
        path = os.path.join(tmpdir, tag)

        def remove_socket() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        return {role: f"ipc://{path}" for role in roles(spec)}, remove_socket
    if kind == "queue":
        if spec.mode == "request":
            there, back = ctx.Queue(), ctx.Queue()
            ends = {"client": (there, back), "server": (back, there)}
            queues = [there, back]
        elif spec.mode == "tput":
            q = ctx.Queue()
            ends, queues = {"sender": q, "receiver": q}, [q]
        else:
            raise ValueError("no mp.Queue row for publish")
        return ends, lambda: [q.close() for q in queues] and None
    if kind == "pipe" and spec.mode == "request":
        a, b = ctx.Pipe()
        return {"client": a, "server": b}, lambda: (a.close(), b.close()) and None
    raise ValueError(f"no {kind!r} transport for {spec.mode}")


def measure(kind: str, spec: Spec, ctx: Any, tmpdir: str, tag: str) -> list[dict[str, Any]]:
    """One measurement in fresh processes; the results of roles(spec), in order."""
    deadline = time.monotonic() + spec.timeout
    barrier = ctx.Barrier(len(roles(spec)))
    ready = ctx.Value("i", 0)
    if kind == "shmbus":
        with Runner(bus=tag) as runner:

            def spawn(role: str, tx: Any) -> AgentProcess:
                args = (role, spec, barrier, ready, tx)
                return runner.spawn(role, _bus_peers.shmbus_child, args=args)

            return _run_children(spawn, spec, ctx, deadline)
    ends, cleanup = make_ends(kind, spec, ctx, tmpdir, tag)
    try:

        def start(role: str, tx: Any) -> AgentProcess:
            def process() -> Any:
                p = ctx.Process(
                    target=_bus_peers.peer_child,
                    args=(kind, role, spec, ends[role], barrier, ready, tx),
                    name=f"bench-{kind}-{role}",
                    daemon=True,
                )
                p.start()
                return p

            return AgentProcess(f"{kind} {role}", process)

        return _run_children(start, spec, ctx, deadline)
    finally:
        cleanup()


def _run_children(
    start: Callable[[str, Any], AgentProcess], spec: Spec, ctx: Any, deadline: float
) -> list[dict[str, Any]]:
    """Start a child per role, collect their results, and see them all gone."""
    procs: list[tuple[AgentProcess, Any]] = []
    try:
        for role in roles(spec):
            rx, tx = ctx.Pipe(duplex=False)
            with _sigint_ignored():
                proc = start(role, tx)
            tx.close()  # the child's copy is the only one left: EOF when it dies
            procs.append((proc, rx))
        results = _collect(procs, deadline)
        for proc, _ in procs:  # they reported: give them a moment to leave on their own
            until = time.monotonic() + 10
            while proc.alive and time.monotonic() < until:
                time.sleep(0.01)
        return results
    finally:
        for proc, rx in procs:
            proc.kill()
            rx.close()


def summarize(spec: Spec, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures from the children's results (in roles(spec) order)."""
    if spec.mode == "request":
        return {k: v for k, v in results[1].items() if k != "profile"}
    if spec.mode == "tput":
        rx, tx = results
        seconds = rx["t_last"] - rx["t_first"]
        return {
            "mmsg_per_s": (rx["received"] - 1) / seconds / 1e6,
            "received": rx["received"],
            "seconds": seconds,
            "sender_seconds": tx["t_sent"] - tx["t0"],
        }
    subs = results[1:]
    rates = [(r["received"] - 1) / max(r["t_last"] - r["t_first"], 1e-9) / 1e6 for r in subs]
    return {
        "mmsg_per_s": statistics.fmean(rates),
        "per_subscriber": rates,
        "received": [r["received"] for r in subs],
        "drops": sum(spec.count - r["received"] for r in subs),
        "publisher_seconds": results[0]["t_sent"] - results[0]["t0"],
    }


# ------------------------------------------------------------------ a whole run


def _missing(kind: str) -> str | None:
    """Why a peer cannot be used here, or None if it can."""
    return missing_module(PEERS.get(kind))


@dataclass
class RowResult:
    row: Row
    spec: Spec
    status: str = "ok"  # ok, failed, skipped
    note: str = ""
    runs: list[dict[str, Any]] | None = None
    median: dict[str, float] | None = None
    vs_best_peer: dict[str, float] | None = None


def case_spec(case: Case, row: Row, args: argparse.Namespace) -> Spec:
    if args.messages:
        count, warmup = args.messages, min(case.quick_warmup, max(args.messages // 10, 1))
    elif args.quick:
        count, warmup = case.quick_count, case.quick_warmup
    else:
        count, warmup = case.count, case.warmup
    if not args.messages and row.scale != 1.0:
        count, warmup = max(int(count * row.scale), 2), max(int(warmup * row.scale), 1)
    return Spec(
        mode=case.mode,
        payload=case.payload,
        size=case.size,
        count=max(count, 2),
        warmup=warmup,
        batch=row.batch,
        subscribers=case.subscribers,
        timeout=args.timeout,
        profile=args.profile is not None,
    )


def run_case(
    case: Case, args: argparse.Namespace, ctx: Any, tmpdir: str, seq: Iterator[int]
) -> list[RowResult]:
    results = []
    for row in case.rows:
        if row.kind != "shmbus" and row.kind not in args.peers:
            continue
        res = RowResult(row, case_spec(case, row, args), runs=[])
        missing = _missing(row.kind)
        if missing:
            res.status, res.note = "skipped", missing
        results.append(res)
    for run in range(1, args.runs + 1):
        for res in results:
            if res.status != "ok":
                continue
            row = res.row
            tag = f"benchbus-{os.getpid()}-{next(seq)}"
            try:
                raw = measure(row.kind, res.spec, ctx, tmpdir, tag)
            except (BenchError, ShmbusError) as e:  # ShmbusError: the bus did not start
                res.status, res.note = "failed", str(e).strip()
                print(f"  {case.name} run {run}: {row.label}: FAILED\n{res.note}", file=sys.stderr)
                continue
            figures = summarize(res.spec, raw)
            assert res.runs is not None
            res.runs.append(figures)
            shown = ", ".join(f"{m} {figures[m]:.3g}" for m in case.metrics)
            print(f"  {case.name} run {run}/{args.runs}: {row.label}: {shown}", file=sys.stderr)
            if args.profile:
                print_profiles(case, res, raw)
    _rank(case, results)
    return results


def _rank(case: Case, results: list[RowResult]) -> None:
    """Medians, and each row against the best peer (above 1: better than every peer)."""
    for res in results:
        if res.status == "ok" and res.runs:
            res.median = {m: statistics.median(r[m] for r in res.runs) for m in case.metrics}
            if case.mode == "publish":
                res.median["drops"] = statistics.median(r["drops"] for r in res.runs)
    for m in case.metrics:
        peers = [r.median[m] for r in results if r.median and r.row.kind != "shmbus"]
        if not peers:
            continue
        best = min(peers) if case.lower_is_better else max(peers)
        for res in results:
            if res.median:
                value = res.median[m]
                ratio = best / value if case.lower_is_better else value / best
                res.vs_best_peer = {**(res.vs_best_peer or {}), m: ratio}


def judge(case: Case, results: list[RowResult]) -> dict[str, Any] | None:
    """The case's target against the shmbus median: met (True/False), or None if unknown."""
    t = case.target
    if t is None:
        return None
    verdict: dict[str, Any] = {"target": t.text, "metric": t.metric, "met": None}
    by_kind = {r.row.kind: r for r in results}
    shm = by_kind.get("shmbus")
    if shm is None or shm.median is None:
        verdict["note"] = "no shmbus figure"
        return verdict
    if t.peer is not None:
        peer = by_kind.get(t.peer)
        if peer is None or peer.median is None:
            verdict["note"] = f"no {PEER_LABELS[t.peer]} figure in this run"
            return verdict
        threshold = t.factor * peer.median[t.metric]
    else:
        assert t.bound is not None
        threshold = t.bound
    value = shm.median[t.metric]
    met = value <= threshold if case.lower_is_better else value >= threshold
    verdict.update(threshold=threshold, value=value, met=met)
    return verdict


def print_profiles(case: Case, res: RowResult, raw: list[dict[str, Any]]) -> None:
    for role, result in zip(roles(res.spec), raw, strict=True):
        text = result.get("profile")
        if not text or role.startswith("subscriber-") and role != "subscriber-1":
            continue  # the subscribers all do the same: one is enough
        print(f"\n--- {case.name}, {res.row.label}: {role}, measured part, by own time ---")
        print(_trim_profile(text), flush=True)


def _trim_profile(text: str) -> str:
    """pstats output without its preamble of blank lines and the sort-order line."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("Ordered")]
    return "\n".join(lines)


# ----------------------------------------------------------------------- report

UNITS = {"p50_us": "p50 us", "p99_us": "p99 us", "mmsg_per_s": "M msg/s"}


def table(case: Case, results: list[RowResult], runs: int) -> str:
    spec = results[0].spec  # the shmbus row's
    what = "round trips" if case.mode == "request" else "messages"
    lines = [
        f"{case.name}: {case.title}; {spec.count:,} {what} after {spec.warmup:,} warm-up "
        f"(shmbus), median of {runs} run{'s' * (runs != 1)}"
    ]
    width = max(len(r.row.label) for r in results)
    head = [f"{'transport':<{width}}"]
    head += [f"{UNITS[m]:>9}" for m in case.metrics]
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
        if res.median.get("drops"):
            cells.append(f"  (dropped {res.median['drops']:.0f} of {res.spec.count:,} x 4)")
        if res.spec.count != spec.count:
            cells.append(f"  ({res.spec.count:,} {what})")
        lines.append(" ".join(cells))
    verdict = judge(case, results)
    if verdict is not None:
        lines.append(f"target: {_verdict_text(verdict, case)}")
    return "\n".join(lines)


def _verdict_text(v: dict[str, Any], case: Case) -> str:
    if v["met"] is None:
        return f"{v['target']}: unknown ({v['note']})"
    unit = UNITS[v["metric"]]
    word = "met" if v["met"] else "NOT MET"
    return f"{v['target']} ({_fmt(v['threshold'])} {unit}): {word}, shmbus {_fmt(v['value'])}"


def summary(done: list[tuple[Case, list[RowResult]]], peers: list[str]) -> str:
    """One line per case and metric: shmbus, each peer, ratio to the best, the target."""
    present = {r.row.kind for _, results in done for r in results}
    cols = ["shmbus", *(p for p in peers if p in present)]
    labels = {"shmbus": "shmbus", **PEER_LABELS}
    head = f"{'case':<13} {'metric':<8}" + "".join(f"{labels[c]:>10}" for c in cols)
    head += f"{'vs best peer':>14}  {'target':<28} verdict"
    lines = ["summary (medians)", head, "-" * (len(head) + 4)]
    for case, results in done:
        by_kind = {r.row.kind: r for r in results}
        verdict = judge(case, results)
        for m in case.metrics:
            cells = [f"{case.name:<13} {UNITS[m]:<8}"]
            for c in cols:
                r = by_kind.get(c)
                cells.append(f"{_fmt(r.median[m]) if r and r.median else '-':>10}")
            shm = by_kind.get("shmbus")
            ratio = (shm.vs_best_peer or {}).get(m) if shm else None
            cells.append(f"{(f'{ratio:.2f}x' if ratio else '-'):>14}")
            if verdict is not None and verdict["metric"] == m:
                word = {True: "met", False: "NOT MET", None: "unknown"}[verdict["met"]]
                bound = f" ({_fmt(verdict['threshold'])})" if "threshold" in verdict else ""
                cells.append(f"  {verdict['target'] + bound:<28} {word}")
            lines.append("".join(cells).rstrip())
    missed = [c.name for c, r in done if (judge(c, r) or {}).get("met") is False]
    if missed:
        lines.append(
            f"\nNOT MET: {', '.join(missed)}. `python bench/bench_bus.py --profile CASE` shows "
            "where the shmbus sender and receiver of a case spend their time."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ leftovers

_OURS = re.compile(r"(?:sem\.)?shmbus\.(benchbus-(\d+)-\d+)\..*")


def sweep_buses(only_pid: int | None = None) -> list[str]:
    """Remove the buses of dead runs (or of ``only_pid``) that nobody runs; their names."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for entry in SHM.iterdir():
            m = _OURS.fullmatch(entry.name)
            if m:
                found[m.group(1)] = int(m.group(2))
    with contextlib.suppress(OSError):
        for d in runtime_dir("x").parent.iterdir():
            m = re.fullmatch(r"benchbus-(\d+)-\d+", d.name)
            if m:
                found[d.name] = int(m.group(1))
    removed = []
    for bus, pid in sorted(found.items()):
        if (pid != only_pid if only_pid is not None else _alive(pid)) or bus_is_live(bus):
            continue
        remove_bus_shm(bus)
        for path in (socket_path(bus), data_socket_path(bus), lock_path(bus)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            runtime_dir(bus).rmdir()
        removed.append(bus)
    return removed


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="The bus (agents in separate processes) against pyzmq and multiprocessing.",
        epilog=f"cases: {', '.join(CASE_NAMES)}; peers: {', '.join(PEERS)}",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: fewer messages, 1 run")
    ap.add_argument("--runs", type=int, help="runs per measurement (default 3, --quick 1)")
    ap.add_argument("--only", action="append", metavar="CASE[,CASE]", help="run only these cases")
    ap.add_argument(
        "--peers",
        default=",".join(PEERS),
        metavar="PEER[,PEER]",
        help=f"peers to compare with (default {','.join(PEERS)}; 'none': shmbus alone)",
    )
    ap.add_argument(
        "--messages", type=int, metavar="N", help="messages (or round trips) per measurement"
    )
    ap.add_argument(
        "--profile",
        metavar="CASE",
        choices=CASE_NAMES,
        help="run CASE's shmbus row once under cProfile; print each side's top 15 functions",
    )
    ap.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})"
    )
    ap.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one measurement may take (120)"
    )
    args = ap.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick or args.profile else 3
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.messages is not None and args.messages < 2:
        ap.error("--messages must be at least 2")
    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)} or none")
    args.peers = [] if args.profile else peers
    wanted = [n.strip() for item in args.only or [] for n in item.split(",") if n.strip()]
    if args.profile:
        wanted = [args.profile]
    unknown = [n for n in wanted if n not in CASE_NAMES]
    if unknown:
        ap.error(f"unknown case {', '.join(unknown)}; choose from {', '.join(CASE_NAMES)}")
    args.cases = [c for c in CASES if not wanted or c.name in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through every finally block.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    stale = sweep_buses()
    if stale:
        print(f"removed buses left by earlier killed runs: {', '.join(stale)}", file=sys.stderr)
    ctx = mp.get_context("spawn")
    info = machine_info("spawn")
    load = info["loadavg_at_start"][0]
    if load > 0.5 * (info["nproc"] or 1):
        print(
            f"warning: load average {load:.2f} on {info['nproc']} CPUs; figures will be noisy",
            file=sys.stderr,
        )
    started = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="shmbus-benchbus-")
    seq = iter(range(1, 1 << 30))
    report: dict[str, Any] = {
        "benchmark": "bench/bench_bus.py",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "runs": args.runs,
            "quick": args.quick,
            "messages": args.messages,
            "peers": args.peers,
            "timeout_s": args.timeout,
            "cases": [c.name for c in args.cases],
        },
        "machine": info,
        "cases": [],
    }
    print(headline(info), flush=True)
    failed = False
    done: list[tuple[Case, list[RowResult]]] = []
    try:
        for case in args.cases:
            print(f"{case.name}: {case.title}", file=sys.stderr)
            meter = CpuMeter()
            results = run_case(case, args, ctx, tmpdir, seq)
            noise = meter.read()
            failed |= any(r.status == "failed" for r in results)
            done.append((case, results))
            print("\n" + table(case, results, args.runs), flush=True)
            if noise["other_cpu_s"] > 0.05 * noise["wall_s"]:
                print(
                    f"(noisy: other processes used {noise['other_cpu_s']:.1f} CPU-seconds "
                    f"during these {noise['wall_s']:.0f} s)",
                    flush=True,
                )
            report["cases"].append(
                {
                    "name": case.name,
                    "title": case.title,
                    "mode": case.mode,
                    "payload": case.payload,
                    "size": case.size,
                    "metrics": list(case.metrics),
                    "target": judge(case, results),
                    "noise": noise,
                    "rows": [
                        {
                            **asdict(r.row),
                            "spec": asdict(r.spec),
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
        if not args.profile:
            print("\n" + summary(done, args.peers), flush=True)
    except KeyboardInterrupt:
        print("interrupted; children killed, buses removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        left = sweep_buses(only_pid=os.getpid())
        if left:
            print(f"removed buses still there at exit: {', '.join(left)}", file=sys.stderr)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["duration_s"] = round(time.monotonic() - started, 1)
    if not args.profile:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"took {report['duration_s']} s; results in {args.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
