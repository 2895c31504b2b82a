"""The Runner's lifecycle (issue 17): ready means ready, crashes are seen, no
orphans, one line for a Ctrl-C, and where the dead letters go."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time

import pytest

import shmbus
from shmbus import MessageType
from shmbus.core.paths import remove_bus_shm, state_dir


def bus_entries(bus: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f".{bus}." in n]


def echo(agent: shmbus.Agent) -> None:
    for msg in agent:
        if msg.type == MessageType.REQUEST:
            agent.reply(msg, {"echo": msg.payload, "pid": os.getpid()})


def crash(agent: shmbus.Agent) -> None:
    raise RuntimeError("the crash of issue 17")


def idle(agent: shmbus.Agent) -> None:
    for _ in agent:
        pass


def exit_with(agent: shmbus.Agent, code: int) -> None:
    sys.exit(code)


ECHO_COMMAND = """
import shmbus
with shmbus.connect() as agent:
    for msg in agent:
        agent.reply(msg, {"tool": agent.name})
"""


def gone_within(pids: list[int], timeout: float) -> list[int]:
    """The pids of ``pids`` still alive after up to ``timeout`` seconds."""
    from shmbus.coordinator.takeover import process_gone

    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if not process_gone(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# ------------------------------------------------------- ready means ready


def test_spawn_and_spawn_command_return_once_the_agent_joined(names, runtime, tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(ECHO_COMMAND)
    with shmbus.Runner(bus=names("bus")) as runner:
        driver = runner.connect("driver")
        proc = runner.spawn("echo", echo)
        assert "echo" in driver.peers()  # no waiting: it is there
        assert driver.request("echo", 1, timeout=20).payload == {"echo": 1, "pid": proc.pid}
        runner.spawn_command("tool", [sys.executable, str(script)])
        assert "tool" in driver.peers()
        assert driver.request("tool", 2, timeout=20).payload == {"tool": "tool"}
        # restart() waits for it again
        proc.restart()
        assert "echo" in driver.peers()
        assert driver.request("echo", 3, timeout=20).payload["pid"] == proc.pid


def test_wait_ready_when_spawn_does_not_wait(names, runtime):
    with shmbus.Runner(bus=names("bus"), ready_timeout=None) as runner:
        driver = runner.connect("driver")
        procs = [runner.spawn(f"echo{i}", echo) for i in range(2)]  # started together
        for proc in procs:
            proc.wait_ready(20)
        assert {"echo0", "echo1"} <= set(driver.peers())
        procs[0].wait_ready()  # ready once, ready for good


def test_a_target_that_cannot_join_raises_agent_exited_with_why(names, runtime):
    with shmbus.Runner(bus=names("bus")) as runner:
        runner.connect("taken")
        with pytest.raises(shmbus.AgentExited) as info:
            runner.spawn("taken", echo, ready_timeout=20)
        e = info.value
        assert e.name == "taken" and e.exitcode == 1
        assert "NameTaken" in e.reason and "NameTaken" in str(e)
        assert "exited with code 1 before it joined bus" in str(e)


def test_a_command_that_fails_before_joining_raises_with_the_end_of_its_stderr(
    names, runtime, capfd
):
    bad = "import sys; print('line one', file=sys.stderr); print('why not', file=sys.stderr); "
    with shmbus.Runner(bus=names("bus")) as runner:
        with pytest.raises(shmbus.AgentExited) as info:
            runner.spawn_command("bad", [sys.executable, "-c", bad + "sys.exit(3)"])
        e = info.value
        assert (e.name, e.exitcode, e.stderr) == ("bad", 3, ["line one", "why not"])
        assert "'bad'" in str(e) and "exited with code 3" in str(e) and "why not" in str(e)
        assert isinstance(e, shmbus.ShmbusError)
        # A program that did its work and exited 0 before it was seen: no error.
        done = runner.spawn_command("done", [sys.executable, "-c", "pass"])
        assert done.wait(20) == 0
        # stderr given by the caller: left alone, nothing quoted
        with pytest.raises(shmbus.AgentExited) as info:
            runner.spawn_command(
                "quiet", [sys.executable, "-c", bad + "sys.exit(4)"], stderr=subprocess.DEVNULL
            )
        assert info.value.exitcode == 4 and info.value.stderr == []
    # The captured stderr was passed on as it came.
    assert "why not" in capfd.readouterr().err


def test_an_agent_slower_than_ready_timeout_raises_ready_timeout_and_is_stopped(names, runtime):
    never = [sys.executable, "-c", "import time; time.sleep(60)"]  # never joins
    with shmbus.Runner(bus=names("bus")) as runner:
        with pytest.raises(shmbus.ReadyTimeout, match="has not joined bus .* within 0.3s") as info:
            runner.spawn_command("never", never, ready_timeout=0.3)
        assert info.value.name == "never"
        proc = runner.agents()["never"]
        assert not proc.alive and proc.exitcode == -signal.SIGTERM
        assert runner.failures() == []  # stopped by the runner: not a failure
        late = runner.spawn_command("never2", never, ready_timeout=None)
        with pytest.raises(shmbus.ReadyTimeout):
            late.wait_ready(0.2)
        assert late.alive  # wait_ready alone stops nothing


def test_request_and_send_can_wait_for_a_recipient_that_is_starting(names, runtime):
    with shmbus.Runner(bus=names("bus"), ready_timeout=None, dlq="memory") as runner:
        driver = runner.connect("driver")
        with pytest.raises(shmbus.UnknownRecipient):  # the default: at once
            driver.request("nobody", 1, timeout=20)
        with pytest.raises(shmbus.UnknownRecipient, match="after waiting .* to join"):
            driver.request("nobody", 1, timeout=0.2, wait_for_recipient=True)
        with pytest.raises(shmbus.UnknownRecipient, match="after waiting"):
            driver.send("nobody", 1, timeout=0.2, wait_for_recipient=True)
        before = len(driver.dlq())  # those three: "no recipient"
        runner.spawn("late", echo)  # returns at once: not on the bus yet
        reply = driver.request("late", "hi", timeout=30, wait_for_recipient=True)
        assert reply.payload["echo"] == "hi"
        runner.spawn("later", echo)
        driver.send("later", "x", timeout=30, wait_for_recipient=True)
        runner.spawn("latest", echo)
        driver.send("latest", "y", timeout=30, backpressure="error", wait_for_recipient=True)
        assert len(driver.dlq()) == before  # the waits left no dead letter behind


# ------------------------------------------------------- crashes are seen


def test_a_crash_is_printed_once_with_the_agents_name_and_reported(names, runtime, capfd):
    exits: queue.Queue[tuple[str, int]] = queue.Queue()
    with shmbus.Runner(bus=names("bus"), on_exit=lambda *a: exits.put(a)) as runner:
        proc = runner.spawn("crasher", crash)
        assert proc.wait(30) == 1 and proc.exitcode == 1
        assert exits.get(timeout=30) == ("crasher", 1)
        three = runner.spawn("three", exit_with, args=(3,))
        assert three.wait(30) == 3
        assert exits.get(timeout=30) == ("three", 3)
        fine = runner.spawn("fine", exit_with, args=(0,))
        assert fine.wait(30) == 0
        assert exits.get(timeout=30) == ("fine", 0)
        stopped = runner.spawn("stopped", idle)
        assert stopped.wait(0.1) is None  # still running
        stopped.stop()
        killed = runner.spawn("killed", idle)
        killed.kill()
        runner.spawn("left", idle)  # stopped by the runner's close
        assert sorted(runner.failures()) == [("crasher", 1), ("three", 3)]
    assert exits.empty(), "on_exit was called for an agent the runner stopped"
    err = capfd.readouterr().err
    assert err.count("RuntimeError: the crash of issue 17") == 1
    lines = [line for line in err.splitlines() if "crash" in line]
    assert lines and all(line.startswith("[crasher] ") for line in lines), err
    assert "[crasher] Traceback (most recent call last):" in err


def test_a_killed_agent_is_a_failure(names, runtime):
    exits: queue.Queue[tuple[str, int]] = queue.Queue()
    with shmbus.Runner(bus=names("bus"), on_exit=lambda *a: exits.put(a)) as runner:
        proc = runner.spawn("victim", idle)
        os.kill(proc.pid, signal.SIGKILL)  # not through the handle: on its own, for the runner
        assert proc.wait(30) == -signal.SIGKILL
        assert exits.get(timeout=30) == ("victim", -signal.SIGKILL)
        assert runner.failures() == [("victim", -signal.SIGKILL)]


def test_arguments_are_checked(names, runtime):
    with pytest.raises(ValueError, match="dlq"):
        shmbus.Runner(bus=names("bus"), dlq="disk")
    with pytest.raises(ValueError, match="ready_timeout"):
        shmbus.Runner(bus=names("bus"), ready_timeout=-1)


# ------------------------------------------------------------- no orphans

RUNNER_SCRIPT = """
import sys, time, shmbus
sys.path.insert(0, {tests!r})
from test_runner_lifecycle import idle
if __name__ == "__main__":
    with shmbus.Runner(bus={bus!r}) as runner:
        a = runner.spawn("target", idle)
        b = runner.spawn_command("command", [sys.executable, {command!r}])
        print("ready", a.pid, b.pid, runner.coordinator.pid, flush=True)
        time.sleep(120)
"""

IDLE_COMMAND = """
import shmbus
with shmbus.connect() as agent:
    for _ in agent:
        pass
"""


def runner_script(tmp_path, bus: str) -> str:
    (tmp_path / "idle.py").write_text(IDLE_COMMAND)
    script = tmp_path / "run.py"
    script.write_text(
        RUNNER_SCRIPT.format(
            tests=os.path.dirname(os.path.abspath(__file__)),
            bus=bus,
            command=str(tmp_path / "idle.py"),
        )
    )
    return str(script)


def test_agents_die_with_a_runner_killed_by_sigkill(names, runtime, children, tmp_path):
    """Both kinds, spawn and spawn_command: the kernel's PR_SET_PDEATHSIG."""
    bus = names("bus")
    proc = children.popen([sys.executable, runner_script(tmp_path, bus)], stdout=subprocess.PIPE)
    pids: list[int] = []
    try:
        ready, *rest = proc.stdout.readline().split()
        assert ready == b"ready"
        pids = [int(p) for p in rest]
        proc.kill()
        proc.wait(10)
        left = gone_within(pids, timeout=20)
        assert left == [], f"outlived their runner: {left} of {pids}"
        deadline = time.monotonic() + 20
        while bus_entries(bus):  # the coordinator removes the bus as it goes
            assert time.monotonic() < deadline, bus_entries(bus)
            time.sleep(0.05)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_bus_shm(bus)


def test_ctrl_c_in_a_runner_script_prints_one_line_and_no_traceback(
    names, runtime, children, tmp_path
):
    bus = names("bus")
    proc = children.popen(
        [sys.executable, runner_script(tmp_path, bus)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ready = proc.stdout.readline().split()
    assert ready and ready[0] == "ready", proc.stderr.read() if proc.poll() is not None else ""
    pids = [int(p) for p in ready[1:]]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the whole process group
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert err.strip().splitlines() == [
        "KeyboardInterrupt (the runner stopped its agents and removed the bus)"
    ], err
    assert proc.returncode != 0  # still an interrupt to its caller
    assert gone_within(pids, timeout=20) == []
    assert bus_entries(bus) == []


# ------------------------------------------------------------------- DLQ


def test_dlq_memory_leaves_nothing_in_the_state_dir(names, runtime):
    bus = names("bus")
    with shmbus.Runner(bus=bus, dlq="memory") as runner:
        driver = runner.connect("driver")
        with pytest.raises(shmbus.UnknownRecipient):
            driver.send("nobody", 1)
        assert [d.reason for d in driver.dlq()] == [
            f"no recipient: no agent named 'nobody' on bus {bus!r}"
        ]
    assert not state_dir(bus).exists() or not any(state_dir(bus).iterdir())


def test_the_default_dlq_is_kept_in_the_state_dir_for_the_next_run(names, runtime):
    bus = names("bus")
    with shmbus.Runner(bus=bus) as runner:
        with pytest.raises(shmbus.UnknownRecipient):
            runner.connect("driver").send("nobody", 1)
    assert state_dir(bus).exists() and any(state_dir(bus).iterdir())
    with shmbus.Runner(bus=bus) as runner:
        assert len(runner.connect("driver").dlq()) == 1  # the last run's
    with shmbus.Runner(bus=bus, dlq="memory") as runner:
        assert runner.connect("driver").dlq() == []  # not read either
