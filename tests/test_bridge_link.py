"""The bridge's C data path (csrc/shmbus_bridge.c) between two uds agents.

A run of frames to a uds recipient whose inbox is empty goes straight to its
socket; otherwise through its inbox, as for any recipient. These tests make
both happen in one stream and check that the recipient sees every message
once, in order within each priority lane.
"""

from __future__ import annotations

import hashlib
import time

import pytest

import shmbus

LANES = (0, 50, 90)  # one priority in each lane


def _stream(bus: str, n: int) -> None:
    """Sends n messages per lane to 'rx': singles and batches, lanes interleaved."""
    with shmbus.connect(bus=bus, name="tx", transport="uds", send_timeout=60) as agent:
        i = 0
        while i < n:
            for p in LANES:
                if i % 3:
                    agent.send("rx", [p, i], priority=p)
                else:
                    agent.send_many("rx", [[p, j] for j in range(i, min(i + 50, n))], priority=p)
            i += 1 if i % 3 else 50
        agent.send("rx", "done")


@pytest.mark.parametrize("rx_transport", ["uds", "shm"])
def test_a_uds_stream_keeps_every_message_once_and_each_lane_in_order(bus, children, rx_transport):
    """Single frames go through the hub while the inbox has room; batches, and
    what must wait for room, through the sender's up thread: in one order."""
    n = 3000
    with shmbus.connect(bus=bus, name="rx", transport=rx_transport,
                        inbox_capacity=1 << 15) as rx:  # fmt: skip
        children.start(_stream, bus, n)
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + 120
        slow = True
        while True:
            assert time.monotonic() < deadline, f"only {len(got)} arrived"
            if slow and len(got) > 500:
                slow = False  # a backlog first (through the inbox), then straight through
            elif slow:
                time.sleep(0.05)
            msgs = rx.recv_many(64 if slow else 1000, timeout=10)
            payloads = [m.payload for m in msgs]
            got += [tuple(p) for p in payloads if p != "done"]
            if "done" in payloads:
                break
        for p in LANES:
            assert [i for q, i in got if q == p] == list(range(n)), f"lane of priority {p}"
        deadline = time.monotonic() + 20  # counted once it tells the bridge what it took
        while rx.stats().agents["rx"].received < len(got):
            assert time.monotonic() < deadline, "received never caught up"
            time.sleep(0.05)


def _big(bus: str, count: int, size: int) -> None:
    with shmbus.connect(bus=bus, name="big-tx", transport="uds", send_timeout=60) as agent:
        for i in range(count):
            agent.send("big-rx", bytes([i % 251]) * size)
        agent.send("big-rx", "done")


def test_frames_larger_than_the_socket_buffer_arrive_whole(bus, children):
    """A direct send the socket takes only part of is finished by the down thread."""
    count, size = 24, 3 << 20
    with shmbus.connect(bus=bus, name="big-rx", transport="uds", inbox_capacity=1 << 25) as rx:
        children.start(_big, bus, count, size)
        got = []
        while True:
            msg = rx.recv(timeout=60)
            if msg.payload == "done":
                break
            got.append(hashlib.sha1(msg.payload).hexdigest())
        want = [hashlib.sha1(bytes([i % 251]) * size).hexdigest() for i in range(count)]
        assert got == want
