"""The shmbus command: demo, ls, cleanup (never of a live bus), coordinator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import shmbus
from tests.conftest import start_coordinator


def shmbus_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbus", *args], capture_output=True, text=True, timeout=timeout
    )


def entries(bus: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f".{bus}." in n]


def test_demo_runs_and_leaves_nothing(names, runtime):
    bus = names("demo")
    result = shmbus_cli("demo", "--bus", bus, "--seconds", "1")
    assert result.returncode == 0, result.stderr
    assert "round trips" in result.stdout and "nothing left in /dev/shm" in result.stdout
    assert entries(bus) == []


def test_cleanup_removes_a_killed_bus_and_never_touches_a_live_one(names, runtime, children):
    bus = names("bus")
    coordinator = start_coordinator(children, bus)
    agent = shmbus.connect(bus=bus, name="a")
    try:
        result = shmbus_cli("cleanup", bus)
        assert result.returncode == 1 and "live" in result.stdout
        assert len(entries(bus)) >= 3  # routes, stats, inbox: untouched
        listing = shmbus_cli("ls").stdout
        assert f"{bus}: live" in listing and " a " in listing
        # Kill the whole bus: coordinator first, so nobody removes the inbox.
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(10)
        assert entries(bus)
        result = shmbus_cli("cleanup", bus)
        assert result.returncode == 0 and "removed" in result.stdout
        assert entries(bus) == []
        assert not os.path.exists(os.path.join(runtime, "shmbus", bus))
    finally:
        agent._closed = True  # its bus is gone: nothing to leave
        agent._ctl.close()


def test_coordinator_command_refuses_a_second_one(names, runtime, children):
    bus = names("bus")
    first = start_coordinator(children, bus)
    result = shmbus_cli("coordinator", "--bus", bus)
    assert result.returncode == 2 and "already runs" in result.stderr
    first.terminate()  # SIGTERM: it removes its socket, table and lock
    assert first.wait(10) == 0
    assert entries(bus) == []


def test_killed_buses_of_a_prefix_are_removed_and_live_ones_kept(names, runtime, children):
    """What benchmarks call at start: a run whose coordinator was SIGKILLed
    left its segments under a name that never comes back."""
    from shmbus.core.paths import remove_killed_buses, socket_path

    killed, live = names("bench-a"), names("bench-b")
    prefix = killed.removesuffix("bench-a")
    victim = start_coordinator(children, killed)
    keeper = start_coordinator(children, live)
    try:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert entries(killed) and socket_path(killed).exists()  # what it left
        assert remove_killed_buses(prefix) == [killed]
        assert entries(killed) == [] and not socket_path(killed).exists()
        assert entries(live)  # its coordinator holds the lock: untouched
        with shmbus.connect(bus=live, name="still") as agent:
            assert agent.peers() == ["still"]
    finally:
        keeper.terminate()
        keeper.wait(10)


def test_cleanup_removes_what_an_older_shmbus_left(names, runtime):
    """Names without the owner's UID, and the semaphore doorbells of before."""
    bus = names("old")
    left = [f"shmbus.{bus}.routes", f"shmbus.{bus}.inbox.a", f"sem.shmbus.{bus}.inbox.a.bell"]
    for name in left:
        os.close(os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_WRONLY, 0o600))
    assert f"{bus}: not running" in shmbus_cli("ls").stdout
    result = shmbus_cli("cleanup", bus)
    assert result.returncode == 0 and f"{bus}: removed 3 shared-memory entries" in result.stdout
    assert entries(bus) == []
