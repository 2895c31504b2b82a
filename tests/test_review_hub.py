"""Review of the uds bridge's hub (csrc/shmbus_bridge.c, shmbus_hub_run): each
test shows a bug found in review (it failed before its fix)."""

from __future__ import annotations

import msgpack
from test_uds import raw_uds_agent

import shmbus
from shmbus.message import MessageType, encode_frame
from shmbus.transport import wire


def _direct(sender: str, sender_id: int, recipient: str, text: str) -> bytes:
    return encode_frame(int(MessageType.DIRECT), sender=sender.encode(), sender_id=sender_id,
                        recipient=recipient.encode(), payload=msgpack.packb(text))  # fmt: skip


def test_a_record_whose_first_and_last_frames_share_a_recipient_reaches_every_recipient(bus):
    """The hub sent a record whose first and last frames go to one uds agent
    straight to that agent, whole: the frames between them, to another agent,
    went to it too. A client sends one destination per record; a hostile or
    other-language one need not."""
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
