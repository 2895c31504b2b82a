"""What reliability costs: acks against plain sends, and how fast a death is handled.

    python bench/bench_reliability.py            # median of 5 runs, about 30 s
    python bench/bench_reliability.py --quick    # a smoke run

``ack``
    64-byte ``bytes`` one at a time between two agent processes, plain and
    with ``requires_ack=True`` (the receiver acks each at ``recv``, the
    sender takes the ACKs in and ends with ``wait_acked``), in the same run.
    The rate is measured in the receiver, first message to last; the sender's
    figure includes waiting for the last ACK.
``death``
    An agent with ``--unread`` messages in its inbox is killed (SIGKILL). The
    times, from the kill, until a peer's ``on_peer_death`` callback runs and
    until the coordinator has moved the unread messages to the DLQ.

Figures are medians over ``--runs`` runs, each on a fresh bus. JSON with
every run goes to ``--json`` (default bench/results/reliability.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import shmbus
from shmbus.core.paths import remove_killed_buses

PAYLOAD = b"x" * 64


def _receiver(agent: shmbus.Agent, count: int) -> None:
    """Receives ``count`` messages and reports the time from the first to the last."""
    agent.send("sender", "ready")
    first = agent.recv(timeout=60)
    t0 = time.perf_counter()
    for _ in range(count - 1):
        agent.recv(timeout=60)
    t1 = time.perf_counter()
    assert first.payload == PAYLOAD
    agent.send("sender", t1 - t0)
    agent.recv(timeout=60)  # "stop"


def measure_ack(count: int, acked: bool, run: int) -> dict[str, float]:
    bus = f"benchrel-{os.getpid()}-{run}-{int(acked)}"
    with shmbus.Runner(bus=bus) as runner:
        sender = runner.connect("sender")
        sender.send_timeout = None
        runner.spawn("receiver", _receiver, args=(count,))
        assert sender.recv(timeout=60).payload == "ready"
        t0 = time.perf_counter()
        for _ in range(count):
            sender.send("receiver", PAYLOAD, requires_ack=acked)
        if acked:
            assert sender.wait_acked(timeout=120), "ACKs missing"
        t_sender = time.perf_counter() - t0
        elapsed = sender.recv(timeout=120).payload
        sender.send("receiver", "stop")
        retried = sender.stats().agents["sender"].retried
    return {
        "receiver_mmsg_per_s": (count - 1) / elapsed / 1e6,
        "sender_mmsg_per_s": count / t_sender / 1e6,
        "retried": retried,
    }


def _victim(agent: shmbus.Agent) -> None:
    agent.send("driver", "ready")
    time.sleep(120)  # reads nothing; killed here


def measure_death(unread: int, run: int) -> dict[str, float]:
    bus = f"benchrel-{os.getpid()}-d{run}"
    with shmbus.Runner(bus=bus) as runner:
        driver = runner.connect("driver")
        told: list[float] = []
        driver.on_peer_death(lambda name: told.append(time.perf_counter()))
        victim = runner.spawn("victim", _victim)
        assert driver.recv(timeout=60).payload == "ready"
        driver.send_many("victim", [PAYLOAD] * unread)
        base = driver.stats().dlq
        t0 = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        drained = None
        deadline = t0 + 60
        while (not told or drained is None) and time.perf_counter() < deadline:
            try:
                driver.recv(timeout=0.001)  # takes the CONTROL notice in
            except shmbus.RecvTimeout:
                pass
            if drained is None and driver.stats().dlq - base >= unread:
                drained = time.perf_counter()
        assert told and drained is not None, "the death was not handled within 60 s"
    return {"told_ms": (told[0] - t0) * 1e3, "drained_ms": (drained - t0) * 1e3}


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages, 1 run")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, --quick 1)")
    parser.add_argument("--messages", type=int, help="messages per ack run (default 100000)")
    parser.add_argument("--unread", type=int, default=1000, help="unread messages at the kill")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results/reliability.json"))
    args = parser.parse_args(argv)
    remove_killed_buses("benchrel-")  # killed runs' leftovers: their names never come back
    # The death case fills a DLQ on purpose: keep its file out of the user's state.
    state = tempfile.TemporaryDirectory(prefix="benchrel")
    os.environ["SHMBUS_STATE_DIR"] = state.name
    runs = args.runs or (1 if args.quick else 5)
    count = args.messages or (5_000 if args.quick else 100_000)
    print(f"shmbus {shmbus.__version__}; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
    ack_runs: dict[str, list[dict[str, float]]] = {"plain": [], "acked": []}
    death_runs: list[dict[str, float]] = []
    for run in range(runs):
        for kind in ("plain", "acked"):  # interleaved: a noisy moment hits both
            ack_runs[kind].append(measure_ack(count, kind == "acked", run))
        death_runs.append(measure_death(args.unread, run))
    plain = median_of(ack_runs["plain"], "receiver_mmsg_per_s")
    acked = median_of(ack_runs["acked"], "receiver_mmsg_per_s")
    print(f"\nack: 64 B one at a time, {count:,} messages, median of {runs} runs")
    print(f"{'sends':24s} {'receiver M msg/s':>17s} {'sender M msg/s':>15s} {'resent':>7s}")
    for kind, runs_ in ack_runs.items():
        print(
            f"{kind:24s} {median_of(runs_, 'receiver_mmsg_per_s'):17.3f} "
            f"{median_of(runs_, 'sender_mmsg_per_s'):15.3f} "
            f"{median_of(runs_, 'retried'):7.0f}"
        )
    print(
        f"requires_ack costs {(1 - acked / plain) * 100:.0f}% of the plain rate "
        f"({acked / plain:.2f}x)"
    )
    print(f"\ndeath: SIGKILL of an agent with {args.unread} unread messages, median of {runs} runs")
    print(f"  peer told (on_peer_death): {median_of(death_runs, 'told_ms'):8.1f} ms")
    print(f"  inbox drained to the DLQ:  {median_of(death_runs, 'drained_ms'):8.1f} ms")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ack": ack_runs, "death": death_runs, "messages": count}, indent=1))
    print(f"\nresults in {out}")
    state.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
