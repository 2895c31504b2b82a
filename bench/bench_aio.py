"""Benchmark the asyncio agent's request round trip against the sync agent's and mp.Pipe.

Run it from the repository root::

    python bench/bench_aio.py                 # 5 runs of 20000 round trips each
    python bench/bench_aio.py --runs 3 --count 5000 --json bench/results/aio.json

Each run starts a fresh bus (``shmbus.Runner``: a coordinator process) with a
sync echo agent in a process of its own, which answers every REQUEST with the
payload it got (a small dict, as in bench_bus.py's request case). In this
process, one after the other:

``aio``   ``await agent.request(...)`` from an asyncio agent, one at a time;
``sync``  ``agent.request(...)`` from a sync agent, the same echo;
``pipe``  a duplex ``mp.Pipe`` to an echo process (pickle both ways).

Each row's p50 and p99 (microseconds) is the median over the runs. The
target (issue 5): asyncio request round trip p50 <= 60 us on this machine.
Buses are named ``benchaio-<pid>-<n>``; the runner removes each one's shared
memory when its run ends, and a start removes what killed runs left (a run
whose coordinator was SIGKILLed cannot, and its name never comes back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import shmbus
import shmbus.aio
from shmbus import MessageType
from shmbus.core.paths import remove_killed_buses

PAYLOAD = {"id": 7, "name": "sensor-7", "value": 3.25, "ok": True}
TARGET_P50_US = 60.0
ROWS = (
    ("aio", "shmbus.aio request (asyncio)"),
    ("sync", "shmbus request (sync agent)"),
    ("pipe", "mp.Pipe send/recv (pickle)"),
)


def echo_agent(agent: shmbus.Agent) -> None:
    """The server: answers every REQUEST with its payload, until stopped."""
    for msg in agent:
        if msg.type == MessageType.REQUEST:
            agent.reply(msg, msg.payload)


def pipe_echo(conn: Any) -> None:
    while True:
        obj = conn.recv()
        if obj is None:
            return
        conn.send(obj)


def percentiles(ns: list[int]) -> dict[str, float]:
    ns = sorted(ns)
    return {
        "p50_us": ns[len(ns) // 2] / 1e3,
        "p99_us": ns[min(len(ns) - 1, len(ns) * 99 // 100)] / 1e3,
    }


async def _aio_round_trips(bus: str, count: int, warmup: int) -> list[int]:
    async with await shmbus.aio.connect(bus=bus, name="aio-client") as agent:
        request = agent.request
        for _ in range(warmup):
            await request("echo", PAYLOAD, timeout=10)
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            await request("echo", PAYLOAD, timeout=10)
            out.append(clock() - t0)
        return out


def _sync_round_trips(runner: shmbus.Runner, count: int, warmup: int) -> list[int]:
    agent = runner.connect("sync-client")
    request = agent.request
    for _ in range(warmup):
        request("echo", PAYLOAD, timeout=10)
    out = []
    clock = time.perf_counter_ns
    for _ in range(count):
        t0 = clock()
        request("echo", PAYLOAD, timeout=10)
        out.append(clock() - t0)
    agent.close()
    return out


def _pipe_round_trips(count: int, warmup: int) -> list[int]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=pipe_echo, args=(b,), daemon=True)
    proc.start()
    try:
        for _ in range(warmup):
            a.send(PAYLOAD)
            a.recv()
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            a.send(PAYLOAD)
            a.recv()
            out.append(clock() - t0)
        a.send(None)
        proc.join(10)
        return out
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def one_run(n: int, count: int, warmup: int) -> dict[str, dict[str, float]]:
    """Every row once, on a fresh bus; each row's percentiles."""
    bus = f"benchaio-{os.getpid()}-{n}"
    with shmbus.Runner(bus=bus) as runner:
        runner.spawn("echo", echo_agent)
        with shmbus.connect(bus=bus, name="probe") as probe:  # until the echo answers
            deadline = time.monotonic() + 30
            while True:
                try:
                    probe.request("echo", 0, timeout=0.5)
                    break
                except (shmbus.RequestTimeout, shmbus.UnknownRecipient):
                    if time.monotonic() > deadline:
                        raise
        aio = asyncio.run(_aio_round_trips(bus, count, warmup))
        sync = _sync_round_trips(runner, count, warmup)
    pipe = _pipe_round_trips(count, warmup)
    return {"aio": percentiles(aio), "sync": percentiles(sync), "pipe": percentiles(pipe)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs; figures are their median")
    ap.add_argument("--count", type=int, default=20_000, help="measured round trips per row")
    ap.add_argument("--warmup", type=int, default=2_000, help="round trips before the clock")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    remove_killed_buses("benchaio-")
    if args.runs < 1 or args.count < 1 or args.warmup < 0:
        ap.error("--runs and --count must be at least 1, --warmup at least 0")
    runs = []
    for n in range(args.runs):
        runs.append(one_run(n, args.count, args.warmup))
        print(
            f"run {n + 1}/{args.runs}: "
            + ", ".join(f"{k} p50 {r['p50_us']:.1f}" for k, r in runs[-1].items()),
            flush=True,
        )
    median = {
        kind: {m: statistics.median(r[kind][m] for r in runs) for m in ("p50_us", "p99_us")}
        for kind, _ in ROWS
    }
    print(
        f"\nrequest round trip, small dict payload ({args.runs} runs of {args.count}; "
        "medians, microseconds)"
    )
    print(f"{'':34} {'p50':>8} {'p99':>8}")
    for kind, label in ROWS:
        print(f"{label:34} {median[kind]['p50_us']:8.1f} {median[kind]['p99_us']:8.1f}")
    p50 = median["aio"]["p50_us"]
    verdict = "met" if p50 <= TARGET_P50_US else "NOT MET"
    print(f"target: asyncio request p50 <= {TARGET_P50_US:.0f} us: {p50:.1f} us, {verdict}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
            },
            "count": args.count,
            "median": median,
            "runs": runs,
            "target": {"aio_p50_us": TARGET_P50_US, "met": p50 <= TARGET_P50_US},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
