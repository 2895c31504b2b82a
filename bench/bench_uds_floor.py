"""What a round trip through a relay costs at least: the floor under the uds transport's.

Run it from the repository root::

    python bench/bench_uds_floor.py            # median of 3 runs of 20000 round trips
    python bench/bench_uds_floor.py --runs 5 --count 5000

A uds agent's request goes through the coordinator's bridge both ways, and
both agents are Python. This measures the same shape with as little as
possible on top, in the same run, so the uds row of bench_uds.py can be read
against what the machine allows:

``pipe``          a duplex ``mp.Pipe`` to an echo process, a small dict (pickle):
                  issue 5's peer;
``socketpair``    100 bytes over a Unix socketpair to an echo process
                  (``os.write`` / ``os.read``, no codec);
``relay``         the same through a relay process in C (epoll, blocking), as
                  the bridge's hub is: two more hops, and two more wake-ups;
``relay-spin``    the same, with the relay polling epoll without sleeping, as
                  the hub does for a while after each record.

The relay is compiled with ``cc`` into a temporary directory. Each row's p50
(microseconds) is the median over the runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RELAY_C = r"""
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int spin = atoi(argv[1]), a = atoi(argv[2]), b = atoi(argv[3]);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN};
    e.data.fd = a; epoll_ctl(ep, EPOLL_CTL_ADD, a, &e);
    e.data.fd = b; epoll_ctl(ep, EPOLL_CTL_ADD, b, &e);
    static char buf[1 << 16];
    struct epoll_event ev[2];
    for (;;) {
        int n = epoll_wait(ep, ev, 2, spin ? 0 : -1);
        for (int i = 0; i < n; i++) {
            int from = ev[i].data.fd, to = from == a ? b : a;
            ssize_t k = read(from, buf, sizeof buf);
            if (k <= 0) return 0;
            for (ssize_t off = 0; off < k;) {
                ssize_t w = write(to, buf + off, k - off);
                if (w <= 0) return 1;
                off += w;
            }
        }
    }
}
"""
MESSAGE = b"x" * 100
WARMUP = 1000


def _echo_fd(fd: int) -> None:
    while data := os.read(fd, 1 << 16):
        os.write(fd, data)


def _echo_pipe(conn: object) -> None:
    try:
        while True:
            conn.send(conn.recv())  # type: ignore[attr-defined]
    except EOFError:
        pass


def _rounds(round_trip: Callable[[], object], count: int) -> float:
    """The p50 of ``count`` round trips after the warm-up, in microseconds."""
    times = []
    for _ in range(count + WARMUP):
        t = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - t)
    return statistics.median(times[WARMUP:]) * 1e6


def _stop(proc: mp.process.BaseProcess) -> None:
    # Killed, not joined first: a forked echo holds our end too, so it never sees EOF.
    proc.kill()
    proc.join(5)


def pipe(ctx: mp.context.BaseContext, count: int) -> float:
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_echo_pipe, args=(there,), daemon=True)
    proc.start()
    there.close()
    payload = {"id": 1, "body": "x" * 16}

    def round_trip() -> object:
        here.send(payload)
        return here.recv()

    try:
        return _rounds(round_trip, count)
    finally:
        here.close()
        _stop(proc)


def _through(ctx: mp.context.BaseContext, count: int, relay: Path | None, spin: int) -> float:
    near, far = socket.socketpair()
    relay_proc = None
    if relay is not None:  # near <-> [relay] <-> far
        into = far
        far, out = socket.socketpair()
        relay_proc = subprocess.Popen(
            [str(relay), str(spin), str(into.fileno()), str(out.fileno())],
            pass_fds=(into.fileno(), out.fileno()),
        )
        into.close()
        out.close()
    proc = ctx.Process(target=_echo_fd, args=(far.fileno(),), daemon=True)
    proc.start()
    far.close()
    fd = near.fileno()

    def round_trip() -> bytes:
        os.write(fd, MESSAGE)
        return os.read(fd, 1 << 16)

    try:
        return _rounds(round_trip, count)
    finally:
        near.close()
        _stop(proc)
        if relay_proc:
            relay_proc.kill()
            relay_proc.wait(5)


# name -> (ctx, count, relay binary) -> p50 in microseconds
ROWS: dict[str, Callable[[mp.context.BaseContext, int, Path], float]] = {
    "pipe": lambda ctx, count, relay: pipe(ctx, count),
    "socketpair": lambda ctx, count, relay: _through(ctx, count, None, 0),
    "relay": lambda ctx, count, relay: _through(ctx, count, relay, 0),
    "relay-spin": lambda ctx, count, relay: _through(ctx, count, relay, 1),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=20_000, help="round trips per row and run")
    args = ap.parse_args(argv)
    ctx = mp.get_context("fork")  # the echo needs the inherited socket
    with tempfile.TemporaryDirectory(prefix="benchfloor") as tmp:
        relay = Path(tmp, "relay")
        Path(tmp, "relay.c").write_text(RELAY_C)
        subprocess.run(["cc", "-O2", "-o", str(relay), str(Path(tmp, "relay.c"))], check=True)
        results: dict[str, list[float]] = {name: [] for name in ROWS}
        for run in range(1, args.runs + 1):
            for name, row in ROWS.items():
                results[name].append(row(ctx, args.count, relay))
            shown = "  ".join(f"{n} {v[-1]:.1f}" for n, v in results.items())
            print(f"  run {run}/{args.runs}: {shown} (p50, us)", file=sys.stderr)
    print(f"round trip p50, median of {args.runs} runs of {args.count} ({os.cpu_count()} CPUs)")
    for name, values in results.items():
        print(
            f"  {name:12} {statistics.median(values):6.1f} us  (runs: "
            + ", ".join(f"{v:.1f}" for v in values)
            + ")"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
