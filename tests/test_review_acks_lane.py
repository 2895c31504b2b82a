"""Review: a resend of an acked message keeps its priority lane."""

from __future__ import annotations

import time

import shmbus


def test_a_resend_goes_to_the_lane_of_its_priority(bus) -> None:
    with (
        shmbus.connect(bus=bus, name="a", ack_timeout=0.1, max_attempts=3) as a,
        shmbus.connect(bus=bus, name="b") as b,
    ):
        a.send("b", "urgent", priority=90, requires_ack=True)
        lanes = b.inbox.lanes
        first = lanes[2].used
        assert first > 0 and lanes[0].used == 0
        deadline = time.monotonic() + 20
        while a.stats().agents["a"].retried < 1:  # b reads nothing: no ACK, a resends
            assert time.monotonic() < deadline, "no resend"
            a.recv_many(16, timeout=0.05)
        assert lanes[0].used == 0, "the resend went to lane 0"
        assert lanes[2].used > first
