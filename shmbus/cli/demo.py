"""``shmbus demo``: agents in separate processes on a bus of their own (a
request/response service, a publisher, a subscriber) and a driver that prints
round-trip latency; everything is removed at the end."""

from __future__ import annotations

import statistics
import time

from ..core.message import MessageType
from ..core.paths import bus_entries
from ..core.stats import format_stats
from ..runner import Runner


def demo_echo(agent) -> None:  # type: ignore[no-untyped-def]
    """A service: answers requests."""
    for msg in agent:
        if msg.type == MessageType.REQUEST:
            agent.reply(msg, {"echo": msg.payload})


def demo_sensor(agent) -> None:  # type: ignore[no-untyped-def]
    """Publishes readings on sensors.temp and sensors.load."""
    n = 0
    while True:
        n += 1
        agent.publish("sensors.temp", {"n": n, "celsius": 20 + n % 7})
        agent.publish("sensors.load", {"n": n, "load": (n % 10) / 10})
        time.sleep(0.002)


def demo_monitor(agent) -> None:  # type: ignore[no-untyped-def]
    """Subscribes to sensors.*; answers 'count?' with how many readings it saw."""
    agent.subscribe("sensors.*")
    seen = 0
    for msg in agent:
        if msg.type == MessageType.PUBLISH:
            seen += 1
        elif msg.type == MessageType.REQUEST:
            agent.reply(msg, seen)


def _await_agent(driver, name: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Until ``name`` answers (the monitor: subscribed, since it answers after)."""
    driver.request(name, "count?" if name == "monitor" else 0, timeout=timeout)


def run_demo(bus: str, seconds: float) -> int:
    print(f"shmbus demo: bus {bus!r}, agents echo, sensor, monitor and this driver")
    # dlq="memory": the demo's dead letters (if any) go with it, not to the
    # bus's state directory, where a later run of the same bus would find them.
    with Runner(bus=bus, dlq="memory", ready_timeout=30) as runner:
        driver = runner.connect("driver")
        runner.spawn("echo", demo_echo)  # returns once it joined the bus
        runner.spawn("monitor", demo_monitor)
        # The monitor must be subscribed before the sensor publishes.
        for name in ("echo", "monitor"):
            _await_agent(driver, name, timeout=30)
        runner.spawn("sensor", demo_sensor)
        latencies: list[float] = []
        start = last = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            t0 = time.perf_counter()
            reply = driver.request("echo", sent, timeout=5)
            latencies.append(time.perf_counter() - t0)
            assert reply.payload == {"echo": sent}
            sent += 1
            now = time.monotonic()
            if now - last >= 0.5:
                recent = sorted(latencies[-2000:])
                totals = driver.stats().totals  # shared-memory counters: no one is asked
                print(
                    f"  {now - start:4.1f}s  requests {sent:7d}  "
                    f"p50 {recent[len(recent) // 2] * 1e6:6.1f} us  "
                    f"p99 {recent[int(len(recent) * 0.99)] * 1e6:7.1f} us  "
                    f"bus: {totals.sent} sent, {totals.received} received",
                    flush=True,
                )
                last = now
        readings = driver.request("monitor", "count?", timeout=5).payload
        print(format_stats(driver.stats()))
        elapsed = time.monotonic() - start
        p50 = statistics.median(latencies) * 1e6
        print(
            f"done: {sent} request/response round trips in {elapsed:.1f}s "
            f"({sent / elapsed:,.0f}/s, p50 {p50:.1f} us); "
            f"the monitor saw {readings} published readings"
        )
    left = bus_entries(bus)
    print("shut down cleanly; nothing left in /dev/shm" if not left else f"LEFT: {left}")
    return 0 if not left else 1
