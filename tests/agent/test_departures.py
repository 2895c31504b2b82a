"""Nothing vanishes when an agent goes: what it did not read ends in the DLQ."""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time

import pytest

import shmbus
from shmbus._native import lib


def _holder(bus: str) -> None:
    """Joins, says so, and then reads nothing until it is killed."""
    with shmbus.connect(bus=bus, name="holder") as agent:
        agent.send("driver", "ready")
        time.sleep(60)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.usefixtures("transport")  # uds: over direct links
def test_a_closing_agent_leaves_its_unread_messages_in_the_dlq(bus):
    with shmbus.connect(bus=bus, name="driver") as driver:
        peer = shmbus.connect(bus=bus, name="peer")
        for i in range(10):
            driver.send("peer", i)
        assert peer.recv(timeout=5).payload == 0  # reads ahead the other nine
        driver.send("peer", 10)  # still in the inbox when it closes
        peer.close()
        dead = {d.message.payload: d.reason for d in driver.dlq()}
        assert set(dead) == set(range(1, 11))
        assert all(dead[i].startswith("unread: its recipient closed") for i in range(1, 10))
        assert dead[10].startswith("recipient left: 'peer'")


@pytest.mark.usefixtures("transport")  # uds: over direct links
def test_a_killed_agent_leaves_its_inbox_in_the_dlq(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        proc = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        ids = driver.send_many("holder", list(range(50)))
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: "holder" not in driver.peers())
        dead = [d for d in driver.dlq() if d.message.recipient == "holder"]
        assert [d.message.id for d in dead] == ids
        assert all(d.reason.startswith("recipient died: 'holder'") for d in dead)
        assert not [n for n in os.listdir("/dev/shm") if f"{bus}.inbox.holder" in n]


def _dies_mid_record(bus: str, victim_inbox: str) -> None:
    """An agent that reserves room in another's inbox and dies before writing it."""
    with shmbus.connect(bus=bus, name="writer") as agent:
        with shmbus.Ring.attach(victim_inbox) as ring:
            ring._test_reserve(200)  # what a writer killed between its CAS and its stores leaves
            agent.send("other", "reserved")
            time.sleep(60)  # killed here


def test_a_reader_blocked_by_a_dead_writers_record_moves_on(bus, children):
    with (
        shmbus.connect(bus=bus, name="victim") as victim,
        shmbus.connect(bus=bus, name="other") as other,
    ):
        proc = children.start(_dies_mid_record, bus, victim.inbox.name)
        assert other.recv(timeout=20).payload == "reserved"
        other.send("victim", "before")  # behind the reservation: stuck while its writer lives
        with pytest.raises(shmbus.RecvTimeout):
            victim.recv(timeout=0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        other.send("victim", "after")
        assert [victim.recv(timeout=10).payload for _ in range(2)] == ["before", "after"]
        assert victim.stats().agents["victim"].pending == 0


def test_peers_are_told_of_a_death_and_not_through_recv(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        deaths: list[str] = []
        driver.on_peer_death(deaths.append)
        driver.on_peer_death(lambda name: 1 / 0)  # a failing callback harms nobody
        proc = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        with shmbus.connect(bus=bus, name="leaver"):
            pass  # leaving properly is not a death
        os.kill(proc.pid, signal.SIGKILL)
        driver.send("driver", "after")  # to itself: recv returns it, the notice is handled
        wait_for(lambda: "holder" not in driver.peers())
        assert driver.recv(timeout=10).payload == "after"
        with pytest.raises(shmbus.RecvTimeout):
            driver.recv(timeout=0.3)  # the CONTROL notice never comes out of recv
        assert deaths == ["holder"]


def _idle(bus: str) -> None:
    with shmbus.connect(bus=bus, name="idle") as agent:
        agent.send("driver", "ready")
        time.sleep(60)  # no receiving at all: its beat thread alone says it lives


def test_a_stopped_agent_is_reported_hung_and_then_resumed(names, runtime, children):
    from tests.conftest import start_coordinator

    bus = names("bus")
    coordinator = start_coordinator(children, bus, "--heartbeat-timeout", "1")
    try:
        with shmbus.connect(bus=bus, name="driver") as driver:
            events: list[tuple[str, bool]] = []
            driver.on_peer_hung(lambda name, hung: events.append((name, hung)))
            proc = children.start(_idle, bus)
            assert driver.recv(timeout=20).payload == "ready"
            time.sleep(1.5)  # longer than the timeout: a live idle agent is not hung
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                while not events and time.monotonic() < deadline:
                    with pytest.raises(shmbus.RecvTimeout):
                        driver.recv(timeout=0.1)  # takes the coordinator's notice in
                assert events == [("idle", True)]
                assert driver.stats().agents["idle"].heartbeat_age > 1
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 20
            while len(events) < 2 and time.monotonic() < deadline:
                with pytest.raises(shmbus.RecvTimeout):
                    driver.recv(timeout=0.1)
            assert events == [("idle", True), ("idle", False)]
            assert "idle" in driver.peers()  # hung is reported, not removed
    finally:
        coordinator.terminate()
        coordinator.wait(10)


def _acked_holder(bus: str, name: str) -> None:
    with shmbus.connect(bus=bus, name=name) as agent:
        agent.send("driver", "ready", requires_ack=True)
        time.sleep(60)  # killed here: what comes to its inbox stays unread


@pytest.mark.usefixtures("transport")  # uds: over direct links
def test_a_dead_agents_acks_and_notices_are_not_dead_letters(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        holder = children.start(_acked_holder, bus, "holder")
        assert driver.recv(timeout=20).payload == "ready"  # its ACK goes to the holder
        first = children.start(_acked_holder, bus, "first")
        assert driver.recv(timeout=20).payload == "ready"
        with pytest.raises(shmbus.RecvTimeout):
            driver.recv(timeout=0.2)  # the ACKs go out before a wait
        os.kill(first.pid, signal.SIGKILL)  # the holder is told: a CONTROL notice
        wait_for(lambda: "first" not in driver.peers())
        ids = driver.send_many("holder", [1, 2, 3])
        os.kill(holder.pid, signal.SIGKILL)
        wait_for(lambda: "holder" not in driver.peers())
        wait_for(lambda: len(driver.dlq()) >= 3)
        time.sleep(0.2)
        got = driver.dlq()  # no ACK, no notice (a uds holder's held by the bridge, too)
        assert [d.message.id for d in got] == ids, [(d.message, d.reason) for d in got]
        assert driver.stats().agents["driver"].sent == 5  # two ACKs, three messages


def test_an_acked_message_a_dead_agent_held_says_its_sender_resends_it(bus, children):
    with shmbus.connect(bus=bus, name="driver", ack_timeout=30) as driver:
        proc = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        plain = driver.send("holder", "plain")
        acked = driver.send("holder", "acked", requires_ack=True)
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: len(driver.dlq()) >= 2)
        reasons = {d.message.id: d.reason for d in driver.dlq()}
        assert reasons[plain].startswith("recipient died") and "resends" not in reasons[plain]
        assert reasons[acked].endswith("; its sender resends it")


def test_the_coordinator_survives_draining_an_inbox_with_a_corrupt_record(bus) -> None:
    """Found in review: a corrupt inbox of a departing agent does not bring the coordinator down."""
    victim = shmbus.connect(bus=bus, name="victim")
    with shmbus.Ring.attach(victim.inbox.name) as ring:
        ring._test_reserve(64)  # room reserved: the drain waits for its record
    # ... whose length a broken (or hostile) writer then made nonsense.
    with open(f"/dev/shm/shmbus.{victim.inbox.name}", "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            struct.pack_into("<i", m, lib.SHMBUS_RING_HEADER_SIZE, -4)
    victim.close()  # the coordinator drains the inbox; it cannot unblock that record
    with shmbus.connect(bus=bus, name="after") as after:  # it still runs
        assert after.peers() == ["after"]
