"""Acks: resent until acknowledged, handed over once, dead-lettered when retries run out."""

from __future__ import annotations

import time

import pytest

import shmbus
from shmbus import RoutingRule

pytestmark = pytest.mark.usefixtures("transport")  # shm, uds and mixed


def _late_reader(bus: str, delay: float, count: int) -> None:
    """Reads nothing for ``delay`` seconds (so the sender resends), then ``count`` messages."""
    with shmbus.connect(bus=bus, name="reader") as agent:
        agent.send("sender", "ready")
        time.sleep(delay)
        got = [agent.recv(timeout=20).payload for _ in range(count)]
        agent.send("sender", got)
        time.sleep(0.5)  # copies still arriving are acked again, not handed over
        extra = agent.recv_many(1000, timeout=0.3)
        agent.send("sender", len(extra))
        time.sleep(1)


def test_resent_until_acked_and_handed_over_once(bus, children):
    with shmbus.connect(bus=bus, name="sender", ack_timeout=0.1, max_attempts=50) as sender:
        children.start(_late_reader, bus, 0.5, 20)
        assert sender.recv(timeout=20).payload == "ready"
        ids = [sender.send("reader", i, requires_ack=True) for i in range(20)]
        assert sender.wait_acked(timeout=20)  # resends while the reader sleeps, then ACKs
        assert sender.recv(timeout=20).payload == list(range(20))  # each once, in order
        assert sender.recv(timeout=20).payload == 0  # no copy left over for recv
        mine = sender.stats().agents["sender"]
        assert mine.retried > 0 and mine.dead_lettered == 0
        assert len(set(ids)) == 20 and sender.dlq() == []


def test_retries_exhausted_go_to_the_dlq(bus):
    with (
        shmbus.connect(bus=bus, name="sender", ack_timeout=0.05, max_attempts=3) as sender,
        shmbus.connect(bus=bus, name="deaf") as deaf,
    ):
        msg_id = sender.send("deaf", {"job": 1}, requires_ack=True)
        assert sender.wait_acked(timeout=10)  # done: dead-lettered, nothing left to wait for
        (dead,) = sender.dlq()
        assert dead.message.id == msg_id and dead.message.payload == {"job": 1}
        assert dead.reason.startswith("retries exhausted: 3 sends to 'deaf'")
        copies = deaf.recv_many(100, timeout=1)  # it never acked: three copies, one handed over
        assert [(m.id, m.payload) for m in copies] == [(msg_id, {"job": 1})]
        assert sender.stats().agents["sender"].retried == 2


def test_an_agent_that_only_sends_still_resends_and_takes_in_its_acks(bus, children):
    """It never calls recv, wait_acked or serve: its heartbeat thread does the work."""
    with shmbus.connect(bus=bus, name="sender", ack_timeout=0.2, max_attempts=50) as sender:
        children.start(_late_reader, bus, 1.5, 5)
        deadline = time.monotonic() + 20
        while "reader" not in sender.peers():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for i in range(5):
            sender.send("reader", i, requires_ack=True)
        while not sender.wait_acked(timeout=0):  # only looks: reads and resends nothing
            assert time.monotonic() < deadline, "the ACKs were never taken in"
            time.sleep(0.05)
        assert sender.stats().agents["sender"].retried > 0  # resent while the reader slept
        assert sender.dlq() == []
        got = [m.payload for m in sender.recv_many(10, timeout=20)]
        while len(got) < 3:
            got += [m.payload for m in sender.recv_many(10, timeout=20)]
        assert got == ["ready", [0, 1, 2, 3, 4], 0]  # each handed over once


def test_an_agent_that_only_sends_dead_letters_when_retries_run_out(bus):
    with (
        shmbus.connect(bus=bus, name="sender", ack_timeout=0.1, max_attempts=3) as sender,
        shmbus.connect(bus=bus, name="deaf") as deaf,
    ):
        msg_id = sender.send("deaf", "hello?", requires_ack=True)
        deadline = time.monotonic() + 20
        while not sender.dlq():
            assert time.monotonic() < deadline, "never dead-lettered"
            time.sleep(0.05)
        (dead,) = sender.dlq()
        assert dead.message.id == msg_id and dead.reason.startswith("retries exhausted: 3 sends")
        assert len(deaf.recv_many(100, timeout=1)) == 1  # three copies, handed over once


def _server(bus: str) -> None:
    with shmbus.connect(bus=bus, name="server") as agent:
        agent.route(RoutingRule(), lambda msg: agent.send("sender", ["handled", msg.payload]))
        agent.send("sender", "ready")
        agent.serve(timeout=5)


def test_serve_acks_after_the_handler_and_an_unacked_send_is_not_waited_for(bus, children):
    with shmbus.connect(bus=bus, name="sender", ack_timeout=5) as sender:
        children.start(_server, bus)
        assert sender.recv(timeout=20).payload == "ready"
        sender.send("server", "plain")  # no ack asked: nothing to wait for
        sender.send("server", "acked", requires_ack=True)
        assert sender.wait_acked(timeout=20)
        got = [sender.recv(timeout=20).payload for _ in range(2)]
        assert got == [["handled", "plain"], ["handled", "acked"]]
        assert sender.stats().agents["sender"].retried == 0
