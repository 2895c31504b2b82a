"""``shmbus run agents.toml``: what :class:`shmbus.Runner` does, from a file.

::

    bus = "demo"

    [[agents]]
    name = "worker"
    target = "agents:work"        # work(agent, *args) in a new process (Runner.spawn)
    args = [1, "x"]               # optional
    replicas = 3                  # optional: worker-1, worker-2, worker-3

    [[agents]]
    name = "tool"
    command = ["python3", "tool.py"]   # a program with SHMBUS_BUS / SHMBUS_AGENT set
    env = { LEVEL = "debug" }          # optional, either kind
    cwd = "tools"                      # optional, either kind
    restart = true                     # optional, either kind: start it again when it fails
    ready_timeout = 30                 # optional, either kind: seconds to wait for it to
                                       # join the bus (default 10; 0: do not wait)

    [history]                          # optional: the coordinator keeps the last N
    "events.*" = 100                   # messages of each pattern (Agent.history)

Everything is checked before anything starts -- keys, names, duplicates,
replicas, every target imported, every command found -- and every problem is
reported at once, as an :class:`~shmbus.errors.InvalidRunFile`. Relative
paths mean the file's directory: targets are imported from it, and agents
start in it unless ``cwd`` says otherwise.

Agents start in the file's order, each ``[[agents]]`` table once the ones
before it have joined the bus (its replicas together): an agent finds those
listed before it on the bus. One that exits before it joined is reported
with why (its error, the end of its stderr); one that has not joined within
``ready_timeout`` is reported, and the run goes on without waiting for it.

An agent with ``restart = true`` is started again, after a pause that grows
with each quick failure (0.1 s doubling up to 5 s), whenever it fails (exits
with a code other than 0, or is killed by a signal); one that exits with 0
is done. The run ends when every agent is done (exit status 1 if one that
does not restart failed), after ``--for SECONDS``, or on SIGINT/SIGTERM.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..core.paths import validate_bus_or_agent
from ..core.routes import check_keep
from ..errors import AgentExited, InvalidName, InvalidRunFile, ReadyTimeout, ShmbusError
from ..runner import AgentProcess, Runner, describe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["AgentSpec", "RunPlan", "load", "resolve_target", "run", "main"]

TOP_KEYS = ("bus", "agents", "history")
AGENT_KEYS = (
    "name",
    "target",
    "args",
    "command",
    "replicas",
    "env",
    "cwd",
    "restart",
    "ready_timeout",
)
READY_TIMEOUT = 10.0  # seconds an agent has to join the bus, unless its table says
RESTART_PAUSE = (0.1, 5.0)  # the pause before a restart: first, and at most (doubling)
STEADY = 10.0  # seconds an agent must have run for its next failure to count as a first
POLL = 0.05  # seconds between looks at the agents; an exit is reported this late at most


@dataclass(frozen=True)
class AgentSpec:
    """One agent process to start (a replica is one spec of its own)."""

    name: str
    cwd: str
    target: str | None = None  # "module:function"
    args: tuple[Any, ...] = ()
    command: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = False  # started again whenever it fails
    ready_timeout: float = READY_TIMEOUT  # 0: do not wait for it to join
    table: int = field(default=0, compare=False)  # which [[agents]] table (replicas share it)


@dataclass(frozen=True)
class RunPlan:
    """A checked run file: the bus, and the agents in the file's order."""

    path: str
    base: str  # the file's directory, absolute: where targets are imported from
    bus: str
    agents: list[AgentSpec]
    history: dict[str, int] = field(default_factory=dict)  # pattern -> messages kept


# ------------------------------------------------------------------ load


def resolve_target(spec: str, base: str) -> Callable[..., Any]:
    """Import ``"module:function"`` (``function`` may be dotted), with ``base`` on sys.path."""
    module, sep, attr = spec.partition(":")
    if not (sep and module and attr):
        raise ValueError(f"target {spec!r} is not of the form 'module:function'")
    if base not in sys.path:
        sys.path.insert(0, base)
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"target {spec!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def load(path: str | os.PathLike[str], bus: str | None = None) -> RunPlan:
    """Read and check a run file; ``bus`` overrides the file's bus name.

    Raises :class:`InvalidRunFile` listing every problem; imports every
    target (so an import error shows now, not in an agent process).
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise InvalidRunFile(path, [f"cannot read it: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidRunFile(path, [f"not valid TOML: {e}"]) from None
    problems: list[str] = []
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    bus = _check_bus(bus if bus is not None else doc.get("bus"), problems)
    tables = doc.get("agents")
    if not isinstance(tables, list) or not tables:
        problems.append("no agents: add at least one [[agents]] table")
        tables = []
    agents: list[AgentSpec] = []
    owner: dict[str, str] = {}  # agent name -> the label of the table that defines it
    for i, table in enumerate(tables, 1):
        label = _label(table, i)
        if not isinstance(table, dict):
            problems.append(f"{label}: must be a table ([[agents]])")
            continue
        for spec in _check_agent(table, label, base, problems, i):
            if spec.name in owner:
                problems.append(f"{label}: name {spec.name!r} is taken by {owner[spec.name]}")
            else:
                owner[spec.name] = label
                agents.append(spec)
    history = _check_history(doc.get("history", {}), problems)
    if problems:
        raise InvalidRunFile(path, problems)
    assert bus is not None
    return RunPlan(path, base, bus, agents, history)


def _check_history(table: object, problems: list[str]) -> dict[str, int]:
    if not isinstance(table, dict):
        problems.append('history must be a table of "PATTERN" = N')
        return {}
    history: dict[str, int] = {}
    for pattern, n in table.items():
        try:
            history.update([check_keep(pattern, n, stop=False)])
        except ValueError as e:  # InvalidName, InvalidArgument
            problems.append(f"history: {e}")
    return history


def _label(table: object, i: int) -> str:
    name = table.get("name") if isinstance(table, dict) else None
    return f"agent {name!r}" if isinstance(name, str) else f"agent #{i}"


def _check_bus(bus: object, problems: list[str]) -> str | None:
    if bus is None:
        problems.append('no bus: set bus = "NAME" in the file, or give --bus')
        return None
    try:
        return validate_bus_or_agent(bus, "bus")
    except InvalidName as e:
        problems.append(str(e))
        return None


def _check_agent(
    table: dict[str, Any], label: str, base: str, problems: list[str], index: int = 0
) -> list[AgentSpec]:
    """The specs one [[agents]] table stands for; [] with problems added if it is wrong."""
    before = len(problems)

    def bad(text: str) -> None:
        problems.append(f"{label}: {text}")

    for key in table:
        if key not in AGENT_KEYS:
            bad(f"unknown key {key!r} (known: {', '.join(AGENT_KEYS)})")
    name = table.get("name")
    name_ok = False
    if name is None:
        bad("no name")
    else:
        try:
            name_ok = bool(validate_bus_or_agent(name, "agent"))
        except InvalidName as e:
            bad(str(e))
    replicas = table.get("replicas")
    if replicas is not None and (
        not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1
    ):
        bad(f"replicas must be a whole number >= 1, got {replicas!r}")
        replicas = None
    names = [str(name)] if replicas is None else [f"{name}-{n}" for n in range(1, replicas + 1)]
    if replicas is not None and name_ok:
        try:
            validate_bus_or_agent(names[-1], "agent")
        except InvalidName:
            bad(f"with {replicas} replicas the names run to {names[-1]!r}: over 64 characters")
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        bad('env must be a table of strings, e.g. env = { LEVEL = "debug" }')
        env = {}
    restart = table.get("restart", False)
    if not isinstance(restart, bool):
        bad(f"restart must be true or false, got {restart!r}")
        restart = False
    ready_timeout = table.get("ready_timeout", READY_TIMEOUT)
    if (
        not isinstance(ready_timeout, (int, float))
        or isinstance(ready_timeout, bool)
        or not ready_timeout >= 0
    ):
        bad(f"ready_timeout must be seconds >= 0 (0: do not wait), got {ready_timeout!r}")
        ready_timeout = READY_TIMEOUT
    cwd = table.get("cwd", ".")
    if not isinstance(cwd, str):
        bad(f"cwd must be a string, got {cwd!r}")
        cwd = "."
    cwd = os.path.normpath(os.path.join(base, cwd))
    if not os.path.isdir(cwd):
        bad(f"cwd {table['cwd']!r} is not a directory ({cwd})")
    target, command = table.get("target"), table.get("command")
    if (target is None) == (command is None):
        bad('give exactly one of target = "module:function" or command = [...]')
    elif target is not None:
        args = table.get("args", [])
        if not isinstance(args, list):
            bad(f"args must be an array, got {args!r}")
        if not isinstance(target, str):
            bad(f"target must be a string 'module:function', got {target!r}")
        else:
            try:
                resolve_target(target, base)
            except Exception as e:  # whatever the module raises is the user's to see
                bad(f"cannot import target {target!r}: {type(e).__name__}: {e}")
    else:
        if "args" in table:
            bad("args is for target agents; put a command's arguments in command")
        if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
            bad(f"command must be a non-empty array of strings, got {command!r}")
        elif _find_program(command[0], cwd, env) is None:
            bad(f"command {command[0]!r} not found (looked in {_where(command[0], cwd)})")
    if len(problems) > before:
        return []
    return [
        AgentSpec(
            n,
            cwd,
            target=target,
            args=tuple(table.get("args", ())),
            command=None if command is None else tuple(command),
            env=dict(env),
            restart=restart,
            ready_timeout=float(ready_timeout),
            table=index,
        )
        for n in names
    ]


def _find_program(argv0: str, cwd: str, env: dict[str, str]) -> str | None:
    # As subprocess will: a path with a slash is relative to the agent's cwd,
    # a bare name is looked up on the PATH the agent will have.
    if "/" in argv0:
        path = os.path.join(cwd, argv0)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return shutil.which(argv0, path=env.get("PATH", os.environ.get("PATH", os.defpath)))


def _where(argv0: str, cwd: str) -> str:
    return cwd if "/" in argv0 else "PATH"


# ------------------------------------------------------------------- run


def _call_target(
    agent: Any, base: str, target: str, cwd: str, env: dict[str, str], *args: Any
) -> None:
    """Runs in the agent's process: import the target by name and call it.

    Runner.spawn pickles its target by reference, so the child would import
    the target's module while unpickling: before ``env`` and ``cwd`` apply,
    and only if the file's directory were on the sys.path the child inherits.
    Passing the name instead, the child imports it here, from that
    directory, once its environment is in place. (It ignores SIGINT, as
    every agent of a Runner does: the runner stops the agents in order.)
    """
    os.environ.update(env)
    os.chdir(cwd)
    resolve_target(target, base)(agent, *args)


def _start(runner: Runner, spec: AgentSpec, base: str) -> AgentProcess:
    """Start ``spec``'s process; it is waited for (wait_ready) by the caller."""
    if spec.target is not None:
        return runner.spawn(
            spec.name,
            _call_target,
            args=(base, spec.target, spec.cwd, spec.env, *spec.args),
            ready_timeout=None,
        )
    assert spec.command is not None
    return runner.spawn_command(
        spec.name,
        list(spec.command),
        ready_timeout=None,
        cwd=spec.cwd,
        env={**os.environ, **spec.env},
        start_new_session=True,  # as for targets: a Ctrl-C reaches it through the runner
    )


def _describe(code: int | None) -> str:
    return describe(code)


class _Run:
    """One run's book: who is done, who restarts when, whether one failed."""

    def __init__(self, plan: RunPlan, runner: Runner, say: Callable[[str], None]) -> None:
        self.plan = plan
        self.runner = runner
        self.say = say
        self.specs = {spec.name: spec for spec in plan.agents}
        self.done: dict[str, int | None] = {}  # name -> its last exit code: not restarted
        self.due: dict[str, float] = {}  # name -> when it is started again
        self.quick: dict[str, int] = {}  # name -> failures in a row, each soon after its start
        self.started: dict[str, float] = {}
        self.failed = False

    def start_all(self) -> None:
        """Table by table, in the file's order: a table's replicas together,
        the next table once they joined the bus (or exited)."""
        tables: dict[int, list[AgentSpec]] = {}
        for spec in self.plan.agents:
            tables.setdefault(spec.table, []).append(spec)
        for specs in tables.values():
            procs = [(spec, self.launch(spec)) for spec in specs]
            for spec, proc in procs:
                if proc is not None:
                    self.await_ready(spec, proc)

    def launch(self, spec: AgentSpec) -> AgentProcess | None:
        self.started[spec.name] = time.monotonic()
        try:
            return _start(self.runner, spec, self.plan.base)
        except OSError as e:  # the program vanished since the check, or cannot run
            self.say(f"{spec.name} could not start: {e}")
            self.ended(spec.name, 127)
            return None

    def await_ready(self, spec: AgentSpec, proc: AgentProcess) -> None:
        if not spec.ready_timeout:
            return
        try:
            proc.wait_ready(spec.ready_timeout)
        except AgentExited as e:
            text = f"{spec.name} {_describe(e.exitcode)} before it joined the bus"
            if e.reason:
                text += f": {e.reason}"
            if e.stderr:
                text += "; the end of its stderr:\n" + "\n".join(f"    {x}" for x in e.stderr)
            self.say(text)
            self.ended(spec.name, e.exitcode, said=True)
        except ReadyTimeout:
            self.say(
                f"{spec.name} has not joined the bus within {spec.ready_timeout:g}s "
                "(ready_timeout); going on without waiting for it"
            )

    def ended(self, name: str, code: int | None, said: bool = False) -> None:
        """``name``'s process ended on its own: done, or due for a restart."""
        spec = self.specs[name]
        if not said:
            self.say(f"{name} {_describe(code)}")
        if code == 0 or not spec.restart:
            self.done[name] = code
            self.failed = self.failed or code != 0
            return
        ran = time.monotonic() - self.started.get(name, 0.0)
        n = 0 if ran >= STEADY else self.quick.get(name, 0)
        self.quick[name] = n + 1
        pause = min(RESTART_PAUSE[0] * 2**n, RESTART_PAUSE[1])
        self.due[name] = time.monotonic() + pause
        self.say(f"{name} restarts in {pause:g}s (restart = true)")

    def poll(self) -> None:
        """Note the agents that ended since, restart those that are due."""
        for name, proc in self.runner.agents().items():
            if name in self.done or name in self.due:
                continue
            code = proc._ended_on_its_own()
            if code is not None:
                self.ended(name, code)
        now = time.monotonic()
        for name, when in list(self.due.items()):
            if now >= when:
                del self.due[name]
                self.say(f"{name} restarting")
                spec = self.specs[name]
                old = self.runner.agents().get(name)
                if old is None:  # it never started (launch failed)
                    new = self.launch(spec)
                else:
                    self.started[name] = now
                    try:
                        old.restart(ready_timeout=None)
                        new = old
                    except OSError as e:
                        self.say(f"{name} could not start: {e}")
                        self.ended(name, 127)
                        continue
                if new is not None:
                    self.await_ready(spec, new)

    def finished(self) -> bool:
        return len(self.done) == len(self.plan.agents)


def run(plan: RunPlan, *, seconds: float | None = None, out: TextIO | None = None) -> int:
    """Run ``plan`` until every agent is done, ``seconds`` pass, or SIGINT/SIGTERM.

    Prints a line as each agent exits (and restarts). Returns 0 when every
    agent exited 0 or the run was stopped on purpose, 1 when an agent that
    does not restart (or the coordinator) failed on its own.
    """
    out = out or sys.stdout

    def say(text: str) -> None:
        print(f"shmbus run: {text}", file=out, flush=True)

    # No waiting in spawn: _Run waits table by table, and reports what it saw.
    runner = Runner(bus=plan.bus, history=plan.history, ready_timeout=None)
    book = _Run(plan, runner, say)
    try:
        with runner:
            say(f"bus {plan.bus!r} from {plan.path}: {', '.join(a.name for a in plan.agents)}")
            deadline = None if seconds is None else time.monotonic() + seconds
            book.start_all()
            while not book.finished():
                book.poll()
                assert runner.coordinator is not None
                if not runner.coordinator.alive:
                    book.failed = True
                    say(f"the coordinator {_describe(runner.coordinator.exitcode)}; stopping")
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    say(f"stopping after {seconds:g}s (--for)")
                    break
                if not book.finished():
                    time.sleep(POLL)
    except KeyboardInterrupt:
        say("stopped by SIGINT")
    except SystemExit as e:  # the Runner turns SIGTERM into SystemExit(128 + signum)
        if e.code != 128 + signal.SIGTERM:
            raise
        say("stopped by SIGTERM")
    for name, proc in runner.agents().items():
        if name not in book.done:
            say(f"{name} stopped ({_describe(proc.exitcode)})")
    return 1 if book.failed else 0


def main(path: str, bus: str | None = None, seconds: float | None = None) -> int:
    """``shmbus run``: 2 for a file that cannot run (nothing is started), else :func:`run`."""
    try:
        plan = load(path, bus)
    except InvalidRunFile as e:
        for problem in e.problems:
            print(f"shmbus run: {e.path}: {problem}", file=sys.stderr)
        print("shmbus run: nothing was started", file=sys.stderr)
        return 2
    try:
        return run(plan, seconds=seconds)
    except (ShmbusError, OSError) as e:
        print(f"shmbus run: {e}", file=sys.stderr)
        return 1
