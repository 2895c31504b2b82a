"""A dead writer's record still blocking an inbox, or a death not yet certain,
when the coordinator goes: handed over (SIGHUP) or killed (SIGKILL), the next
one finishes the job (the coordinator's pending file)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import start_coordinator

import shmbus
from shmbus.control import socket_path


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def _dies_mid_record(bus: str, victim_inbox: str) -> None:
    """Sends one message to the victim, then reserves room after it and dies there."""
    with shmbus.connect(bus=bus, name="writer") as agent:
        agent.send("victim", "before")
        with shmbus.Ring.attach(victim_inbox) as ring:
            ring._test_reserve(200)  # a writer killed between its CAS and its stores
            agent.send("other", "reserved")
            time.sleep(60)  # killed here


GOES = pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])


def stop(old, sig: int) -> None:  # noqa: ANN001 - a Popen
    old.send_signal(sig)
    code = old.wait(10)
    assert code == 0 or sig == signal.SIGKILL


@GOES
def test_a_dead_writers_record_is_unblocked_after_a_hand_over(names, children, runtime,
                                                             sig) -> None:  # fmt: skip
    bus = names("bus")
    old = start_coordinator(children, bus)
    with (
        shmbus.connect(bus=bus, name="victim") as victim,
        shmbus.connect(bus=bus, name="other") as other,
    ):
        proc = children.start(_dies_mid_record, bus, victim.inbox.name)
        assert other.recv(timeout=20).payload == "reserved"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        wait_for(lambda: "writer" not in other.peers())
        # The coordinator watches the victim's inbox: it cannot unblock it
        # until the victim has read "before". It is handed over meanwhile.
        stop(old, sig)
        socket_path(bus).unlink(missing_ok=True)
        new = start_coordinator(children, bus)
        try:
            other.send("victim", "after")
            # Before the fix the victim read "before", then waited forever.
            got = [victim.recv(timeout=10).payload for _ in range(2)]
        finally:
            new.terminate()
            new.wait(10)
    assert got == ["before", "after"]


def _leaves_mid_record(bus: str, victim_inbox: str) -> None:
    """Reserves room in the victim's inbox, then its control connection ends
    while its process lives on (as in a slow exit), and it is killed later."""
    agent = shmbus.connect(bus=bus, name="writer")
    with shmbus.Ring.attach(victim_inbox) as ring:
        ring._test_reserve(200)
        agent.send("other", "reserved")
        agent._ctl.close()
        time.sleep(60)  # killed here


@GOES
def test_a_death_not_yet_certain_at_a_hand_over_is_finished_by_the_next(
    names, children, runtime, sig
) -> None:
    bus = names("bus")
    old = start_coordinator(children, bus)
    with (
        shmbus.connect(bus=bus, name="victim") as victim,
        shmbus.connect(bus=bus, name="other") as other,
    ):
        proc = children.start(_leaves_mid_record, bus, victim.inbox.name)
        assert other.recv(timeout=20).payload == "reserved"
        wait_for(lambda: "writer" not in other.peers())  # its connection ended; it lives
        stop(old, sig)
        socket_path(bus).unlink(missing_ok=True)
        new = start_coordinator(children, bus)
        try:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            other.send("victim", "after")
            assert victim.recv(timeout=10).payload == "after"
        finally:
            new.terminate()
            new.wait(10)
