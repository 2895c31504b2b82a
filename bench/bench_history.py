"""Does topic history slow publishers? The same publisher, with and without it.

    python bench/bench_history.py            # median of 3 runs, about 30 s
    python bench/bench_history.py --quick    # a smoke run

One agent publishes ``--messages`` small messages on ``events.x``, one
``publish()`` at a time, with ``backpressure="error"``: an inbox it found
full would raise or dead-letter, so ``full`` counts every time a subscriber
(or the history) held it up. Cases, each on a fresh bus:

``subscriber``
    an agent process subscribed to ``events.*``, reading with ``recv_many``.
``history``
    no subscriber; the coordinator keeps the last 1000 of ``events.*``.
``both``
    the subscriber and the history.

``burst`` then publishes ``--messages`` with ``publish_many`` (1000 a call),
faster than any Python reader, with the history only: ``full`` says how
much of it did not fit the history's 32 MiB inbox. Rates are medians over
``--runs`` runs. JSON with every run goes to ``--json`` (default
bench/results/history.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import shmbus


def _subscriber(agent: shmbus.Agent) -> None:
    agent.subscribe("events.*")
    agent.send("pub", "ready")
    while True:
        agent.recv_many(4096, timeout=1.0)


def one_run(bus: str, case: str, count: int) -> dict[str, float]:
    history = {"events.*": 1000} if case != "subscriber" else {}
    with shmbus.Runner(bus=bus, history=history) as runner:
        pub = runner.connect("pub", backpressure="error")
        if case in ("subscriber", "both"):
            runner.spawn("sub", _subscriber)
            pub.recv(timeout=60)
        full = 0
        t0 = time.perf_counter()
        if case == "burst":
            batch = list(range(1000))
            for _ in range(count // 1000):
                try:
                    pub.publish_many("events.x", batch)
                except shmbus.ShmbusError:
                    full += 1
        else:
            for i in range(count):
                pub.publish("events.x", i)
        elapsed = time.perf_counter() - t0
        t1 = time.perf_counter()
        kept = pub.history("events.*", n=1) if history else []
        caught_up = time.perf_counter() - t1
        stats = pub.stats().totals
        return {
            "rate": count / elapsed,
            "full": full + sum("full" in d.reason for d in pub.dlq(limit=100_000)),
            "failed": stats.failed,
            "history_ms": caught_up * 1e3,
            "kept_last": kept[-1].payload if kept else None,
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=300_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one run of 20,000 messages")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "history.json")
    args = p.parse_args()
    if args.quick:
        args.messages, args.runs = min(args.messages, 20_000), 1
    os.environ.setdefault("SHMBUS_STATE_DIR", tempfile.mkdtemp(prefix="benchhist"))
    results: dict[str, list[dict[str, float]]] = {}
    for case in ("subscriber", "history", "both", "burst"):
        runs = results[case] = []
        for i in range(args.runs):
            runs.append(one_run(f"benchhist{os.getpid()}{case}{i}", case, args.messages))
        rate = statistics.median(r["rate"] for r in runs)
        full = max(r["full"] for r in runs)
        print(
            f"{case:10s} {rate:12,.0f} msg/s   full {full:6d}   "
            f"history() after it {statistics.median(r['history_ms'] for r in runs):6.1f} ms",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"messages": args.messages, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
