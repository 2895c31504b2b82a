"""The in-process transport: agents of one process on a bus with no coordinator."""

from __future__ import annotations

import threading

import pytest

import shmbus
from shmbus import MessageType


@pytest.fixture
def bus(names):
    return names("inproc")  # nothing of it reaches /dev/shm; the fixture checks that


def test_messages_pubsub_and_requests_flow_without_a_coordinator(bus):
    with (
        shmbus.connect(bus=bus, name="a", transport="inproc") as a,
        shmbus.connect(bus=bus, name="b", transport="inproc") as b,
    ):
        assert a._link.kind == "inproc" and a.peers() == ["a", "b"]
        a.send("b", {"x": 1})
        a.send_many("b", list(range(20)))
        assert b.recv(timeout=5).payload == {"x": 1}
        assert [m.payload for m in b.recv_many(100, timeout=5)] == list(range(20))
        b.subscribe("t.*")
        a.publish_many("t.x", [1, 2])
        assert [m.type for m in b.recv_many(10, timeout=5)] == [MessageType.PUBLISH] * 2

        def serve():
            msg = b.recv(timeout=5)
            b.reply(msg, msg.payload * 2)

        t = threading.Thread(target=serve)
        t.start()
        assert a.request("b", 21, timeout=5).payload == 42
        t.join(5)


def test_unknown_names_acks_and_the_dlq(bus):
    with (
        shmbus.connect(bus=bus, name="a", transport="inproc", ack_timeout=0.05) as a,
        shmbus.connect(bus=bus, name="b", transport="inproc") as b,
    ):
        with pytest.raises(shmbus.UnknownRecipient):
            a.send("nobody", 1)
        a.send("b", "ack me", requires_ack=True)
        assert b.recv(timeout=5).payload == "ack me"
        assert a.wait_acked(timeout=5)
        with pytest.raises(shmbus.NameTaken):
            shmbus.connect(bus=bus, name="b", transport="inproc")
        a.send("b", "left unread")
    with shmbus.connect(bus=bus, name="c", transport="inproc") as c:
        reasons = [d.reason for d in c.dlq()]
    assert any(r.startswith("no recipient") for r in reasons)
    assert any(r.startswith(("recipient left", "unread")) for r in reasons)
