"""The Runner: a coordinator and agent processes, and nothing left when it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import shmbus
from shmbus import MessageType


def bus_entries(bus: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f".{bus}." in n]


def echo_agent(agent: shmbus.Agent, greeting: str) -> None:
    agent.send("driver", greeting)
    for msg in agent:
        if msg.type == MessageType.REQUEST:
            agent.reply(msg, {"echo": msg.payload, "pid": os.getpid()})


def test_spawned_agents_serve_and_everything_is_removed_on_exit(names, runtime):
    bus = names("bus")
    with shmbus.Runner(bus=bus) as runner:
        driver = runner.connect("driver")
        proc = runner.spawn("echo", echo_agent, args=("hello",))
        assert driver.recv(timeout=20).payload == "hello"
        reply = driver.request("echo", [1, 2], timeout=20)
        assert reply.payload == {"echo": [1, 2], "pid": proc.pid}
        assert proc.alive and runner.coordinator.alive
        assert bus_entries(bus)  # inboxes and routes exist while it runs
    assert not proc.alive and not runner.coordinator.alive
    assert proc.exitcode == 0  # asked to stop, it left the bus properly
    assert bus_entries(bus) == []
    assert not os.path.exists(os.path.join(runtime, "shmbus", bus))


def test_every_agent_asked_to_stop_exits_cleanly(names, runtime):
    # Several agents, so that some are still unwinding when the runner gets
    # to them: each must be signalled once, and then waited for.
    bus = names("bus")
    with shmbus.Runner(bus=bus) as runner:
        driver = runner.connect("driver")
        procs = [runner.spawn(f"echo{i}", echo_agent, args=("up",)) for i in range(4)]
        for _ in procs:
            assert driver.recv(timeout=20).payload == "up"
    assert {p.name: p.exitcode for p in procs} == {p.name: 0 for p in procs}


def test_kill_and_restart_an_agent(names, runtime):
    bus = names("bus")
    with shmbus.Runner(bus=bus) as runner:
        driver = runner.connect("driver")
        proc = runner.spawn("echo", echo_agent, args=("first",))
        assert driver.recv(timeout=20).payload == "first"
        first_pid = proc.pid
        proc.kill()
        assert not proc.alive and proc.exitcode == -signal.SIGKILL
        proc.restart()
        assert driver.recv(timeout=20).payload == "first"  # the same target, again
        assert proc.pid != first_pid
        assert driver.request("echo", "again", timeout=20).payload["pid"] == proc.pid
    assert bus_entries(bus) == []


def test_spawn_command_sets_the_environment(names, runtime, tmp_path):
    bus = names("bus")
    script = tmp_path / "tool.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, shmbus
            with shmbus.connect() as agent:   # SHMBUS_BUS and SHMBUS_AGENT
                agent.send("driver", [os.environ["SHMBUS_BUS"], agent.name])
            """
        )
    )
    with shmbus.Runner(bus=bus) as runner:
        driver = runner.connect("driver")
        runner.spawn_command("tool", [sys.executable, str(script)])
        assert driver.recv(timeout=20).payload == [bus, "tool"]
    assert bus_entries(bus) == []


RUNNER_SCRIPT = """
import sys, time, shmbus
sys.path.insert(0, {tests!r})
from test_runner import echo_agent
if __name__ == "__main__":  # spawned agents import this module again
    with shmbus.Runner(bus={bus!r}) as runner:
        driver = runner.connect("driver")
        runner.spawn("echo", echo_agent, args=("hi",))
        driver.recv(timeout=20)
        print("ready", runner.coordinator.pid, runner.agents()["echo"].pid, flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_runner_stopped_by_a_signal_leaves_nothing(names, runtime, children, tmp_path, sig):
    bus = names("bus")
    script = tmp_path / "run.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(RUNNER_SCRIPT.format(tests=tests, bus=bus))
    proc = children.popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().split()[0] == b"ready"
    assert bus_entries(bus)
    proc.send_signal(sig)
    proc.wait(30)
    deadline = time.monotonic() + 10
    while bus_entries(bus) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bus_entries(bus) == []


def test_a_killed_runners_coordinator_and_agents_stop_and_leave_nothing(
    names, runtime, children, tmp_path
):
    """SIGKILL gives the runner no chance to clean up: its coordinator and
    agents see it gone and stop on their own, the bus removed as on a stop."""
    from shmbus.coordinator.takeover import process_gone

    bus = names("bus")
    script = tmp_path / "run.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(RUNNER_SCRIPT.format(tests=tests, bus=bus))
    proc = children.popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    ready, coordinator, agent = proc.stdout.readline().split()
    assert ready == b"ready"
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 20
    pids = [int(coordinator), int(agent)]
    while not all(map(process_gone, pids)) or bus_entries(bus):
        assert time.monotonic() < deadline, "the runner's coordinator or agent outlived it"
        time.sleep(0.05)


def test_a_second_runner_on_a_live_bus_is_refused(names, runtime):
    bus = names("bus")
    with shmbus.Runner(bus=bus):
        with pytest.raises(shmbus.CoordinatorUnavailable, match="exited"):
            with shmbus.Runner(bus=bus):
                pass
        assert bus_entries(bus)  # the refused runner did not clean the live bus
