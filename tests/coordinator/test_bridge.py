"""The bridge's C data path (csrc/shmbus_bridge.c) between two uds agents.

A run of frames to a uds recipient whose inbox is empty goes straight to its
socket; otherwise through its inbox, as for any recipient. These tests make
both happen in one stream and check that the recipient sees every message
once, in order within each priority lane. Then what the bridge counts for a
uds agent that left, and a record whose frames go to several recipients.
"""

from __future__ import annotations

import hashlib
import time

import msgpack
import pytest

import shmbus
from shmbus.core.message import MessageType, encode_frame
from shmbus.transport import wire
from tests.transport.test_uds import raw_uds_agent

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
    with shmbus.connect(bus=bus, name="rx", transport=rx_transport, inbox_capacity=1 << 15) as rx:
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


def test_what_a_uds_agent_took_before_it_left_is_counted_received(bus):
    """Its counts of the records it took ride lazily on its next record: one
    that leaves before it wrote again still has them counted.

    Found in review of the uds bridge's C data path and its client (it failed
    before its fix)."""
    import shmbus

    with shmbus.connect(bus=bus, name="obs") as obs:
        with shmbus.connect(bus=bus, name="rx", transport="uds") as rx:
            for i in range(3):
                obs.send("rx", i)
                assert rx.recv(timeout=10).payload == i
        deadline = time.monotonic() + 10
        while "rx" in obs.stats().agents:
            assert time.monotonic() < deadline, "rx never left"
            time.sleep(0.02)
        stats = obs.stats()
        assert stats.dlq == 0
        assert stats.departed.received == 3


def _direct(sender: str, sender_id: int, recipient: str, text: str) -> bytes:
    return encode_frame(
        int(MessageType.DIRECT),
        sender=sender.encode(),
        sender_id=sender_id,
        recipient=recipient.encode(),
        payload=msgpack.packb(text),
    )


def test_a_record_whose_first_and_last_frames_share_a_recipient_reaches_every_recipient(bus):
    """The hub sent a record whose first and last frames go to one uds agent
    straight to that agent, whole: the frames between them, to another agent,
    went to it too. A client sends one destination per record; a hostile or
    other-language one need not.

    Found in review of the uds bridge's hub (csrc/shmbus_bridge.c,
    shmbus_hub_run): it failed before its fix."""
    with (
        shmbus.connect(bus=bus, name="a", transport="uds") as a,
        shmbus.connect(bus=bus, name="b", transport="uds") as b,
    ):
        ctl, data, my_id = raw_uds_agent(bus, "mix")
        with ctl, data:
            # Routes to both, through the up thread (a route is Python's to make).
            data.sendall(bytes(wire.record([_direct("mix", my_id, "a", "warm a")])))
            data.sendall(bytes(wire.record([_direct("mix", my_id, "b", "warm b")])))
            assert a.recv(timeout=10).payload == "warm a"
            assert b.recv(timeout=10).payload == "warm b"
            # A reader that waits tells the bridge it took all: the next run may go straight.
            assert a.recv_many(1, timeout=0.2) == [] and b.recv_many(1, timeout=0.2) == []
            frames = [_direct("mix", my_id, to, f"{to}{i}") for i, to in enumerate("aba")]
            data.sendall(bytes(wire.record(frames)))
            assert [a.recv(timeout=10).payload for _ in range(2)] == ["a0", "a2"]
            assert b.recv(timeout=10).payload == "b1"
