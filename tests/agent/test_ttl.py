"""TTL: a message past its TTL is never handed to a receiver; it goes to the DLQ."""

from __future__ import annotations

import time

import pytest

import shmbus

pytestmark = pytest.mark.usefixtures("transport")  # shm, uds and mixed


def _send_with_ttls(bus: str) -> None:
    with shmbus.connect(bus=bus, name="sender") as agent:
        agent.send("receiver", "short-1", ttl=0.05)
        agent.send("receiver", "long", ttl=60)
        agent.send("receiver", "short-2", ttl=0.05)
        agent.send("receiver", "none")
        agent.publish("news.x", "short-pub", ttl=0.05)
        agent.publish("news.x", "long-pub", ttl=60)
        agent.send("receiver", "sent")


def test_expired_messages_go_to_the_dlq_and_the_rest_arrive_in_order(bus, children):
    with shmbus.connect(bus=bus, name="receiver") as receiver:
        receiver.subscribe("news.*")
        children.start(_send_with_ttls, bus)
        children.join_all(20)
        time.sleep(0.2)  # the short TTLs run out while the messages wait in the inbox
        got = [receiver.recv(timeout=10).payload for _ in range(4)]
        assert got == ["long", "none", "long-pub", "sent"]
        with pytest.raises(shmbus.RecvTimeout):
            receiver.recv(timeout=0.1)
        dead = {d.message.payload: d.reason for d in receiver.dlq()}
        assert set(dead) == {"short-1", "short-2", "short-pub"}
        assert all(reason.startswith("expired: ttl 0.05s") for reason in dead.values())
        assert receiver.stats().agents["receiver"].dead_lettered == 3


def _responder(bus: str) -> None:
    with shmbus.connect(bus=bus, name="responder") as agent:
        agent.send("b", "ready")
        msg = agent.recv(timeout=20)
        agent.reply(msg, "answer")


def test_recv_many_and_request_skip_expired_messages(bus, children):
    with (
        shmbus.connect(bus=bus, name="a") as a,
        shmbus.connect(bus=bus, name="b") as b,
    ):
        a.send("b", 1, ttl=0.01)
        a.send("b", 2)
        time.sleep(0.05)
        assert [m.payload for m in b.recv_many(10, timeout=1)] == [2]
        children.start(_responder, bus)
        assert b.recv(timeout=20).payload == "ready"
        a.send("b", 3, ttl=0.01)  # waits in b's inbox, expires before b's request looks
        a.send("b", 4)
        time.sleep(0.05)
        assert b.request("responder", "question", timeout=20).payload == "answer"
        assert b.recv(timeout=5).payload == 4  # kept for recv by the request; 3 is gone
        with pytest.raises(shmbus.RecvTimeout):
            b.recv(timeout=0.1)
        assert [d.message.payload for d in b.dlq()] == [1, 3]
