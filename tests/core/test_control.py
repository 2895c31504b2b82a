"""The control client (shmbus/core/control.py) and the coordinator it calls."""

from __future__ import annotations

import os
import signal

import pytest

import shmbus
from shmbus.errors import CoordinatorUnavailable
from tests.conftest import start_coordinator


def test_a_call_that_times_out_on_a_paused_coordinator_leaves_the_agent_on_the_bus(
    names, children, runtime
) -> None:
    """Found in review of the control client: a slow coordinator is not a dead one."""
    # A coordinator busy (or paused) past an agent's timeout is alive: the
    # agent must not close its connection, which tells the coordinator it died
    # (its inbox sealed and drained, and its rejoin refused for good).
    bus = names("bus")
    proc = start_coordinator(children, bus)
    a = shmbus.connect(bus, "a", timeout=0.5)
    b = shmbus.connect(bus, "b")
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(CoordinatorUnavailable):
                a.subscribe("x.y")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        a.subscribe("x.z")  # the late reply to x.y is not taken for this one's
        b.publish("x.z", "published")
        b.send("a", "direct")
        got = {a.recv(timeout=10).payload, a.recv(timeout=10).payload}
        assert got == {"published", "direct"}
        assert "a" in b.peers()
    finally:
        a.close()
        b.close()
        proc.terminate()
        proc.wait(10)
