"""Basic usage: a few agents in separate processes talking over one bus.

What it shows, in order:

* direct messages: ``send`` to an agent by name; the ``greeter`` answers
  with a ``send`` back to the message's sender;
* pub/sub with patterns: ``monitor`` subscribes to ``sensors.*`` (one
  word), ``archiver`` to ``sensors.>`` (one word or more); each ``publish``
  reaches every agent whose pattern matches the topic;
* request/response: ``request`` waits, with a timeout, for the ``reply``
  of the ``calculator``;
* a high-priority alert: ``send(..., priority=90)``; the priority travels in
  the message header to the receiver;
* the bus's counters at the end: ``agent.stats()``.

The agents are module-level functions started by ``shmbus.Runner.spawn``;
each runs in a new process that imports this file again, hence the
``if __name__ == "__main__":`` guard at the bottom.

Run it from the repository root (with shmbus installed, or PYTHONPATH=.)::

    python examples/basic_usage.py [--bus NAME]

It exits 0 when every step did what it should and 1 otherwise, and leaves
nothing in /dev/shm.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import shmbus
from shmbus import MessageType

DRIVER = "main"  # the agent in this process; the others report to it
TIMEOUT = 10.0  # seconds; generous, since agent processes take a moment to start


# ------------------------------------------------ agents (one process each)


def greeter(agent: shmbus.Agent) -> None:
    """Answers every direct message with a direct message to its sender."""
    agent.send(DRIVER, "ready")
    for msg in agent:  # ends when the runner stops this process
        if msg.type == MessageType.DIRECT:
            agent.send(msg.sender, f"hello, {msg.payload['name']}")


def calculator(agent: shmbus.Agent) -> None:
    """A request/response service: {"op": "add" | "mul", "args": [...]} -> {"result": ...}."""
    ops = {"add": sum, "mul": lambda xs: xs[0] * xs[1]}
    agent.send(DRIVER, "ready")
    for msg in agent:
        if msg.type != MessageType.REQUEST:
            continue
        op = ops.get(msg.payload.get("op"))
        if op is None:
            agent.reply(msg, {"error": f"unknown op {msg.payload.get('op')!r}"})
        else:
            agent.reply(msg, {"result": op(msg.payload["args"])})


def recorder(agent: shmbus.Agent, pattern: str) -> None:
    """Subscribes to ``pattern`` and keeps what arrives; a request gets the record."""
    agent.subscribe(pattern)
    agent.send(DRIVER, "ready")  # only now: a publish before subscribe would miss it
    seen: list[list[Any]] = []
    for msg in agent:
        if msg.type == MessageType.REQUEST:
            agent.reply(msg, seen)
        else:
            seen.append([msg.type.name, msg.topic, msg.payload, msg.priority])


# ------------------------------------------------------------------ driver


class Failed(Exception):
    """Something the example expected did not happen."""


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def await_ready(agent: shmbus.Agent, names: set[str]) -> None:
    waiting = set(names)
    deadline = time.monotonic() + TIMEOUT
    while waiting:
        msg = agent.recv(timeout=max(deadline - time.monotonic(), 0.0))  # RecvTimeout if late
        expect(msg.payload == "ready", f"expected 'ready', got {msg.payload!r}")
        waiting.discard(msg.sender)


def show_stats(stats: shmbus.BusStats) -> None:
    t = stats.totals
    print(
        f"stats: bus {stats.bus!r}: {t.sent} sent, {t.received} received, "
        f"{t.bytes_sent} bytes sent, {t.dead_lettered} dead-lettered, {stats.dlq} in the DLQ"
    )
    print(f"  {'agent':12s} {'sent':>6s} {'recv':>6s} {'pending':>8s} {'inbox used':>12s}")
    for name, a in sorted(stats.agents.items()):
        print(
            f"  {name:12s} {a.sent:6d} {a.received:6d} {a.pending:8d} "
            f"{a.inbox_used:>5d}/{a.inbox_capacity}"
        )
    print(f"  {'topic':18s} {'published':>10s} {'delivered':>10s} {'bytes':>8s}")
    for topic, s in sorted(stats.topics.items()):
        print(f"  {topic:18s} {s.published:10d} {s.delivered:10d} {s.bytes:8d}")


def run(bus: str) -> None:
    with shmbus.Runner(bus=bus, dlq="memory") as runner:  # an example leaves no DLQ file
        main = runner.connect(DRIVER)  # first, so the agents can report to it
        procs = [
            runner.spawn("greeter", greeter),
            runner.spawn("calculator", calculator),
            runner.spawn("monitor", recorder, args=("sensors.*",)),
            runner.spawn("archiver", recorder, args=("sensors.>",)),
        ]
        await_ready(main, {p.name for p in procs})
        print(f"bus {bus!r}: agents {', '.join(p.name for p in procs)} are up")

        # Direct messages, both ways.
        main.send("greeter", {"name": "Ada"})
        answer = main.recv(timeout=TIMEOUT)
        expect(answer.sender == "greeter" and answer.payload == "hello, Ada", repr(answer))
        print(f"direct: greeter answered {answer.payload!r}")

        # Request/response.
        reply = main.request("calculator", {"op": "add", "args": [2, 3, 4]}, timeout=TIMEOUT)
        expect(reply.type == MessageType.RESPONSE and reply.payload == {"result": 9}, repr(reply))
        reply = main.request("calculator", {"op": "pow", "args": [2, 8]}, timeout=TIMEOUT)
        expect("error" in reply.payload, repr(reply))
        print(f"request: calculator says 2 + 3 + 4 = 9; for 'pow': {reply.payload['error']}")

        # Pub/sub: sensors.* takes one more word, sensors.> any number.
        main.publish("sensors.temp", {"celsius": 21.5})
        main.publish("sensors.humidity", {"percent": 40})
        main.publish("sensors.temp.raw", {"adc": 2048})

        # A high-priority alert, straight to the monitor.
        main.send("monitor", {"alert": "disk almost full"}, priority=90)

        # Each recorder got everything above before this request (one sender: in order).
        got, topics = {}, {}
        for name in ("monitor", "archiver"):
            got[name] = main.request(name, "record?", timeout=TIMEOUT).payload
            topics[name] = [topic for kind, topic, _, _ in got[name] if kind == "PUBLISH"]
        print(f"pub/sub: monitor (sensors.*) got {topics['monitor']}")
        print(f"pub/sub: archiver (sensors.>) got {topics['archiver']}")
        expect(topics["monitor"] == ["sensors.temp", "sensors.humidity"], repr(got["monitor"]))
        expect(
            topics["archiver"] == ["sensors.temp", "sensors.humidity", "sensors.temp.raw"],
            repr(got["archiver"]),
        )
        alerts = [(p, prio) for kind, _, p, prio in got["monitor"] if kind == "DIRECT"]
        expect(alerts == [({"alert": "disk almost full"}, 90)], repr(got["monitor"]))
        print(f"alert: monitor got {alerts[0][0]['alert']!r} at priority {alerts[0][1]}")

        stats = main.stats()
        show_stats(stats)
        expect({DRIVER, *(p.name for p in procs)} <= set(stats.agents), repr(stats.agents))
        # main sent 1 direct, 1 alert and 4 requests (and 3 publishes, if they count as
        # sends); it received 4 'ready', 1 answer and 4 replies.
        expect(stats.agents[DRIVER].sent >= 6, f"main sent {stats.agents[DRIVER].sent}")
        expect(stats.agents[DRIVER].received >= 9, f"main got {stats.agents[DRIVER].received}")
        expect(stats.totals.sent >= stats.agents[DRIVER].sent, repr(stats.totals))
        temp, raw = stats.topics.get("sensors.temp"), stats.topics.get("sensors.temp.raw")
        expect(temp is not None and (temp.published, temp.delivered) == (1, 2), repr(temp))
        expect(raw is not None and (raw.published, raw.delivered) == (1, 1), repr(raw))
        expect(stats.dlq == 0, f"{stats.dlq} dead letters")
    # Leaving the block stopped the agents (SIGTERM: each left the bus properly),
    # then the coordinator, and removed the bus's shared memory.
    for p in procs:
        expect(p.exitcode == 0, f"agent {p.name} exited with {p.exitcode}")


def leftovers(bus: str) -> list[str]:
    prefixes = (f"shmbus.{bus}.", f"sem.shmbus.{bus}.")
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bus", default="example-basic", help="bus name (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        run(args.bus)
    except (Failed, shmbus.ShmbusError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    left = leftovers(args.bus)
    if left:
        print(f"FAILED: left in /dev/shm: {left}", file=sys.stderr)
        return 1
    print("basic_usage: every step worked; nothing left in /dev/shm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
