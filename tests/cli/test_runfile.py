"""`shmbus run FILE`: agents from a TOML file, checked before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from shmbus.cli.run import AgentSpec, load
from shmbus.errors import InvalidRunFile

ROOT = Path(__file__).resolve().parents[2]
PY = json.dumps(sys.executable)  # a TOML string: JSON's quoting is TOML's


def cli_env() -> dict[str, str]:
    # The run and its agents must import this checkout's shmbus.
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def shmbus_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbus", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
    )


def bus_entries(bus: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f".{bus}." in n]


def assert_nothing_left(bus: str, runtime: str) -> None:
    assert bus_entries(bus) == []
    assert not os.path.exists(os.path.join(runtime, "shmbus", bus))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def wait_for_files(paths: list[Path], proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    # Written, not just there: write_text creates the file before it writes it.
    while not all(p.exists() and p.stat().st_size for p in paths):
        assert proc.poll() is None, f"shmbus run exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"agents did not start: {paths}"
        time.sleep(0.05)


# Target agents, imported from the run file's directory (so: written next to it).
AGENTS = """
    import json, os, time
    from pathlib import Path
    import shmbus

    def ask(agent, service, n):
        # The service may not be registered yet: ask until it answers.
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = agent.request(service, {"from": agent.name, "n": n}, timeout=2)
                break
            except (shmbus.UnknownRecipient, shmbus.RequestTimeout):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # A relative path: agents start in the file's directory.
        Path(agent.name + ".out").write_text(json.dumps([os.environ["GREETING"], reply.payload]))

    def idle(agent):
        Path(agent.name + ".up").write_text(agent.bus)
        try:
            for _ in agent:
                pass
        except KeyboardInterrupt:  # the runner, not the Ctrl-C, should stop it
            Path(agent.name + ".interrupted").write_text("")
            raise

    def done(agent):
        pass
"""

# A command agent: serves N requests, then exits.
SERVICE = """
    import os, sys, shmbus
    with shmbus.connect() as agent:  # SHMBUS_BUS and SHMBUS_AGENT, set by the runner
        for _ in range(int(sys.argv[1])):
            msg = agent.recv(timeout=30)
            agent.reply(msg, {"tool": agent.name, "bus": agent.bus, "got": msg.payload,
                              "env": os.environ["GREETING"]})
"""

IDLE_COMMAND = """
    import pathlib, shmbus
    with shmbus.connect() as agent:
        pathlib.Path(agent.name + ".up").write_text(agent.bus)
        for _ in agent:
            pass
"""


def test_target_replicas_and_a_command_talk_on_the_bus_and_leave_nothing(names, runtime, tmp_path):
    bus = names("bus")
    write(tmp_path / "agents.py", AGENTS)
    write(tmp_path / "tools" / "service.py", SERVICE)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"

        [[agents]]
        name = "ask"
        target = "agents:ask"
        args = ["tool", 7]
        replicas = 3
        env = {{ GREETING = "hello" }}

        [[agents]]
        name = "tool"
        command = [{PY}, "tools/service.py", "3"]
        env = {{ GREETING = "hi" }}
        """,
    )
    result = shmbus_run(str(toml))
    assert result.returncode == 0, result.stdout + result.stderr
    for n in (1, 2, 3):
        greeting, reply = json.loads((tmp_path / f"ask-{n}.out").read_text())
        assert greeting == "hello"
        got = {"from": f"ask-{n}", "n": 7}
        assert reply == {"tool": "tool", "bus": bus, "got": got, "env": "hi"}
        assert f"ask-{n} exited with code 0" in result.stdout
    assert "tool exited with code 0" in result.stdout
    assert_nothing_left(bus, runtime)


def test_a_failing_agent_makes_the_run_exit_1_once_all_have_exited(names, runtime, tmp_path):
    bus = names("bus")
    write(tmp_path / "agents.py", AGENTS)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "ok"
        target = "agents:done"
        [[agents]]
        name = "bad"
        command = [{PY}, "-c", "raise SystemExit(3)"]
        """,
    )
    result = shmbus_run(str(toml))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "bad exited with code 3" in result.stdout
    assert "ok exited with code 0" in result.stdout
    assert_nothing_left(bus, runtime)


@pytest.mark.parametrize("how", ["SIGTERM to the run", "Ctrl-C: SIGINT to its process group"])
def test_a_signal_stops_the_run_cleanly_on_the_bus_given_by_option(
    names, runtime, tmp_path, children, how
):
    bus = names("bus")
    write(tmp_path / "agents.py", AGENTS)
    write(tmp_path / "idle.py", IDLE_COMMAND)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "not-this-one"
        [[agents]]
        name = "idle"
        target = "agents:idle"
        replicas = 2
        [[agents]]
        name = "cmd"
        command = [{PY}, "idle.py"]
        """,
    )
    proc = children.popen(
        [sys.executable, "-m", "shmbus", "run", str(toml), "--bus", bus],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        start_new_session=True,  # a process group of its own, as a terminal gives
        # and SIGINT's default action: a shell runs background jobs with it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ups = [tmp_path / f"{n}.up" for n in ("idle-1", "idle-2", "cmd")]
    wait_for_files(ups, proc)
    assert {p.read_text() for p in ups} == {bus}  # --bus overrides the file's bus
    assert bus_entries(bus)
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err  # stopped on purpose
    assert "stopped by SIG" in out and "idle-1 stopped" in out and "cmd stopped" in out
    assert not list(tmp_path.glob("*.interrupted")), err  # the runner stopped them, in order
    assert_nothing_left(bus, runtime)


def test_for_stops_the_run_after_that_long(names, runtime, tmp_path):
    bus = names("bus")
    write(tmp_path / "agents.py", AGENTS)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "idle"
        target = "agents:idle"
        """,
    )
    result = shmbus_run(str(toml), "--for", "0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopping after 0.5s (--for)" in result.stdout and "idle stopped" in result.stdout
    assert_nothing_left(bus, runtime)


def test_a_run_on_a_live_bus_is_refused(bus, runtime, tmp_path):
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "x"
        command = [{PY}, "-c", "open('started', 'w')"]
        """,
    )
    result = shmbus_run(str(toml))
    assert result.returncode == 1 and bus in result.stderr
    assert not (tmp_path / "started").exists()


# A command agent that asks the service listed before it, once, with no retry
# and no wait_for_recipient: it is on the bus, since the run waited for it.
ASK_ONCE = """
    import json, pathlib, shmbus
    with shmbus.connect() as agent:
        reply = agent.request("tool", "once", timeout=30)
        pathlib.Path(agent.name + ".out").write_text(json.dumps(reply.payload))
"""

# Fails (after joining) the first time it runs, succeeds the second.
FAIL_ONCE = """
    import pathlib, sys, shmbus
    with shmbus.connect() as agent:
        runs = pathlib.Path(agent.name + ".runs")
        runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
        if len(runs.read_text()) == 1:
            sys.exit(2)
"""

PID_COMMAND = """
    import os, pathlib, shmbus
    with shmbus.connect() as agent:
        pathlib.Path(agent.name + ".pid").write_text(str(os.getpid()))
        for _ in agent:
            pass
"""


def test_agents_start_in_the_files_order_each_once_those_before_joined(names, runtime, tmp_path):
    bus = names("bus")
    write(tmp_path / "service.py", SERVICE)
    write(tmp_path / "ask.py", ASK_ONCE)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "tool"
        command = [{PY}, "service.py", "2"]
        env = {{ GREETING = "hi" }}
        [[agents]]
        name = "asker"
        command = [{PY}, "ask.py"]
        replicas = 2
        """,
    )
    for _ in range(2):  # the race of issue 17 lost every time: try it twice
        result = shmbus_run(str(toml))
        assert result.returncode == 0, result.stdout + result.stderr
        for n in (1, 2):
            assert json.loads((tmp_path / f"asker-{n}.out").read_text())["got"] == "once"
    assert_nothing_left(bus, runtime)


def test_an_agent_marked_restart_is_started_again_when_it_fails(names, runtime, tmp_path):
    bus = names("bus")
    write(tmp_path / "fail_once.py", FAIL_ONCE)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "flaky"
        command = [{PY}, "fail_once.py"]
        restart = true
        """,
    )
    result = shmbus_run(str(toml))
    assert result.returncode == 0, result.stdout + result.stderr  # it failed, and recovered
    assert (tmp_path / "flaky.runs").read_text() == "xx"
    assert "flaky exited with code 2" in result.stdout
    assert "flaky restarts in" in result.stdout
    assert "flaky exited with code 0" in result.stdout
    assert_nothing_left(bus, runtime)


def test_a_failure_before_joining_is_told_with_the_end_of_its_stderr(names, runtime, tmp_path):
    bus = names("bus")
    write(tmp_path / "agents.py", AGENTS)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "bad"
        command = [{PY}, "-c", "import sys; print('no config file', file=sys.stderr); sys.exit(3)"]
        [[agents]]
        name = "ok"
        target = "agents:done"
        """,
    )
    result = shmbus_run(str(toml))
    assert result.returncode == 1, result.stdout + result.stderr  # bad does not restart
    assert "bad exited with code 3 before it joined the bus" in result.stdout
    assert "    no config file" in result.stdout  # quoted
    assert "no config file" in result.stderr  # and passed on as it came
    assert "ok exited with code 0" in result.stdout
    assert_nothing_left(bus, runtime)


def test_a_killed_run_leaves_no_agent_behind(names, runtime, tmp_path, children):
    from shmbus.coordinator.takeover import process_gone
    from shmbus.core.paths import remove_bus_shm

    bus = names("bus")
    write(tmp_path / "agents.py", AGENTS)
    write(tmp_path / "pid.py", PID_COMMAND)
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "idle"
        target = "agents:idle"
        [[agents]]
        name = "cmd"
        command = [{PY}, "pid.py"]
        """,
    )
    proc = children.popen(
        [sys.executable, "-m", "shmbus", "run", str(toml)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    pids: list[int] = []
    try:
        wait_for_files([tmp_path / "idle.up", tmp_path / "cmd.pid"], proc)
        pids = [int((tmp_path / "cmd.pid").read_text())]
        proc.kill()  # kill -9: no chance to stop anything
        proc.wait(10)
        deadline = time.monotonic() + 20
        while not all(map(process_gone, pids)) or bus_entries(bus):
            assert time.monotonic() < deadline, f"outlived shmbus run: {pids}, {bus_entries(bus)}"
            time.sleep(0.05)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_bus_shm(bus)


# ------------------------------------------------------------ checking


def test_an_invalid_file_starts_nothing_and_exits_2(names, runtime, tmp_path):
    bus = names("bus")
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "{bus}"
        [[agents]]
        name = "fine"
        command = [{PY}, "-c", "open('started', 'w')"]
        [[agents]]
        name = "broken"
        target = "no_such_module_anywhere:f"
        """,
    )
    result = shmbus_run(str(toml))
    assert result.returncode == 2
    assert f"{toml}: agent 'broken': cannot import target" in result.stderr
    assert "No module named 'no_such_module_anywhere'" in result.stderr
    assert "nothing was started" in result.stderr
    assert not (tmp_path / "started").exists()
    assert_nothing_left(bus, runtime)
    not_toml = write(tmp_path / "x.toml", "bus = ")
    for path, text in [(tmp_path / "missing.toml", "cannot read it"), (not_toml, "not valid TOML")]:
        result = shmbus_run(str(path))
        assert result.returncode == 2 and text in result.stderr, result.stderr


def test_load_gives_one_spec_per_replica_with_paths_from_the_file(tmp_path):
    module = f"mod_{uuid.uuid4().hex}"  # imported in this process: a name of its own
    write(tmp_path / f"{module}.py", "def work(agent, *args):\n    pass\n")
    (tmp_path / "sub").mkdir()
    toml = write(
        tmp_path / "agents.toml",
        f"""
        bus = "from-file"
        [[agents]]
        name = "w"
        target = "{module}:work"
        args = [1, "x", {{ k = [2] }}]
        replicas = 2
        env = {{ LEVEL = "debug" }}
        [[agents]]
        name = "tool"
        command = ["sh", "-c", "true"]
        cwd = "sub"
        [history]
        "events.*" = 5
        """,
    )
    plan = load(toml, bus="override")
    assert plan.bus == "override" and plan.base == str(tmp_path)
    assert plan.history == {"events.*": 5}
    assert plan.agents == [
        AgentSpec(
            "w-1",
            str(tmp_path),
            target=f"{module}:work",
            args=(1, "x", {"k": [2]}),
            env={"LEVEL": "debug"},
        ),
        AgentSpec(
            "w-2",
            str(tmp_path),
            target=f"{module}:work",
            args=(1, "x", {"k": [2]}),
            env={"LEVEL": "debug"},
        ),
        AgentSpec("tool", str(tmp_path / "sub"), command=("sh", "-c", "true")),
    ]
    assert load(toml).bus == "from-file"


TARGET = 'target = "json:dumps"'  # importable anywhere
CASES = {
    "unknown top-level key": (
        'bus = "b"\nbusses = 1\n[[agents]]\nname = "a"\n' + TARGET,
        "unknown key 'busses'",
    ),
    "unknown agent key": (
        'bus = "b"\n[[agents]]\nname = "a"\nreplica = 2\n' + TARGET,
        "agent 'a': unknown key 'replica'",
    ),
    "bad agent name": (
        'bus = "b"\n[[agents]]\nname = "a.b"\n' + TARGET,
        "agent 'a.b': invalid agent name",
    ),
    "no name": ('bus = "b"\n[[agents]]\n' + TARGET, "agent #1: no name"),
    "bad bus name": ('bus = "b c"\n[[agents]]\nname = "a"\n' + TARGET, "invalid bus name 'b c'"),
    "no bus": ('[[agents]]\nname = "a"\n' + TARGET, "no bus"),
    "no agents": ('bus = "b"\n', "no agents"),
    "duplicate names": (
        'bus = "b"\n[[agents]]\nname = "a"\n' + TARGET + '\n[[agents]]\nname = "a"\n' + TARGET,
        "agent 'a': name 'a' is taken by agent 'a'",
    ),
    "a replica's name taken": (
        'bus = "b"\n[[agents]]\nname = "a"\nreplicas = 2\n'
        + TARGET
        + '\n[[agents]]\nname = "a-2"\n'
        + TARGET,
        "agent 'a-2': name 'a-2' is taken by agent 'a'",
    ),
    "replicas 0": (
        'bus = "b"\n[[agents]]\nname = "a"\nreplicas = 0\n' + TARGET,
        "agent 'a': replicas must be a whole number >= 1, got 0",
    ),
    "replicas a string": (
        'bus = "b"\n[[agents]]\nname = "a"\nreplicas = "3"\n' + TARGET,
        "replicas must be a whole number >= 1, got '3'",
    ),
    "replicas true": (
        'bus = "b"\n[[agents]]\nname = "a"\nreplicas = true\n' + TARGET,
        "replicas must be a whole number >= 1, got True",
    ),
    "replica names too long": (
        f'bus = "b"\n[[agents]]\nname = "{"a" * 63}"\nreplicas = 2\n' + TARGET,
        "over 64 characters",
    ),
    "target and command": (
        'bus = "b"\n[[agents]]\nname = "a"\ncommand = ["true"]\n' + TARGET,
        "agent 'a': give exactly one of target",
    ),
    "neither target nor command": (
        'bus = "b"\n[[agents]]\nname = "a"\n',
        "agent 'a': give exactly one of target",
    ),
    "unimportable target": (
        'bus = "b"\n[[agents]]\nname = "a"\ntarget = "no_such_mod_x:f"\n',
        "agent 'a': cannot import target 'no_such_mod_x:f': ModuleNotFoundError",
    ),
    "missing function": (
        'bus = "b"\n[[agents]]\nname = "a"\ntarget = "json:nope"\n',
        "has no attribute 'nope'",
    ),
    "target not module:function": (
        'bus = "b"\n[[agents]]\nname = "a"\ntarget = "json"\n',
        "not of the form 'module:function'",
    ),
    "target not callable": (
        'bus = "b"\n[[agents]]\nname = "a"\ntarget = "json:__name__"\n',
        "is a str, not a function",
    ),
    "args not an array": (
        'bus = "b"\n[[agents]]\nname = "a"\nargs = 3\n' + TARGET,
        "args must be an array",
    ),
    "args for a command": (
        'bus = "b"\n[[agents]]\nname = "a"\ncommand = ["true"]\nargs = [1]\n',
        "args is for target agents",
    ),
    "empty command": (
        'bus = "b"\n[[agents]]\nname = "a"\ncommand = []\n',
        "command must be a non-empty array of strings",
    ),
    "command a string": (
        'bus = "b"\n[[agents]]\nname = "a"\ncommand = "true"\n',
        "command must be a non-empty array of strings",
    ),
    "program not found": (
        'bus = "b"\n[[agents]]\nname = "a"\ncommand = ["no-such-prog-x"]\n',
        "command 'no-such-prog-x' not found (looked in PATH)",
    ),
    "relative program not found": (
        'bus = "b"\n[[agents]]\nname = "a"\ncommand = ["./nope"]\n',
        "command './nope' not found",
    ),
    "env not strings": (
        'bus = "b"\n[[agents]]\nname = "a"\nenv = { N = 1 }\n' + TARGET,
        "env must be a table of strings",
    ),
    "cwd missing": (
        'bus = "b"\n[[agents]]\nname = "a"\ncwd = "nowhere"\n' + TARGET,
        "cwd 'nowhere' is not a directory",
    ),
    "restart not a boolean": (
        'bus = "b"\n[[agents]]\nname = "a"\nrestart = "yes"\n' + TARGET,
        "agent 'a': restart must be true or false, got 'yes'",
    ),
    "ready_timeout negative": (
        'bus = "b"\n[[agents]]\nname = "a"\nready_timeout = -1\n' + TARGET,
        "agent 'a': ready_timeout must be seconds >= 0 (0: do not wait), got -1",
    ),
    "history not a table": (
        'bus = "b"\nhistory = 3\n[[agents]]\nname = "a"\n' + TARGET,
        "history must be a table",
    ),
    "history bad pattern": (
        'bus = "b"\n[history]\n"a..b" = 3\n[[agents]]\nname = "a"\n' + TARGET,
        "history: invalid pattern 'a..b'",
    ),
    "history bad count": (
        'bus = "b"\n[history]\n"a.*" = 0\n[[agents]]\nname = "a"\n' + TARGET,
        "history: history of 'a.*': keep 1 to 100000",
    ),
}


@pytest.mark.parametrize("body, problem", CASES.values(), ids=CASES.keys())
def test_each_problem_is_named_with_the_file_and_the_agent(tmp_path, body, problem):
    toml = write(tmp_path / "agents.toml", body)
    with pytest.raises(InvalidRunFile) as info:
        load(toml)
    assert any(problem in p for p in info.value.problems), info.value.problems
    assert str(info.value).startswith(f"{toml}: ")


def test_every_problem_is_reported_at_once(tmp_path):
    toml = write(
        tmp_path / "agents.toml",
        """
        bus = "b"
        [[agents]]
        name = "a"
        replicas = 0
        target = "json:dumps"
        [[agents]]
        name = "c"
        command = []
        """,
    )
    with pytest.raises(InvalidRunFile) as info:
        load(toml)
    assert len(info.value.problems) == 2
    assert "agent 'a': replicas" in info.value.problems[0]
    assert "agent 'c': command" in info.value.problems[1]
