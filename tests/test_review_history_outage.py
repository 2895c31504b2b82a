"""Review: publishers keep publishing on kept topics while no coordinator runs."""

from __future__ import annotations

import signal

from conftest import start_coordinator

import shmbus
from shmbus.control import remove_bus_shm


def test_publishes_on_a_kept_topic_go_on_while_the_coordinator_is_dead(
    names, children, runtime
) -> None:
    # The history inbox (32 MiB) has no reader once the coordinator is
    # killed; publishers must not wait for it, nor dead-letter its copies.
    bus = names("bus")
    coord = start_coordinator(children, bus, "--history", "t.*=10")
    try:
        _publish_while_dead(bus, coord)
    finally:
        remove_bus_shm(bus)  # what the killed coordinator left


def _publish_while_dead(bus, coord) -> None:
    with (
        shmbus.connect(bus=bus, name="pub", send_timeout=0.2) as pub,
        shmbus.connect(bus=bus, name="sub") as sub,
    ):
        sub.subscribe("t.x")
        coord.send_signal(signal.SIGKILL)
        coord.wait(10)
        payload = b"x" * (256 << 10)
        for _ in range(200):  # 50 MiB: more than the history inbox holds
            pub.publish("t.x", payload)
            assert sub.recv(timeout=10).payload == payload
        assert not pub._dlq_kept, f"{len(pub._dlq_kept)} dead letters for the history"
