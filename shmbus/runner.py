"""Launch and supervise a bus: its coordinator and its agent processes.

``with shmbus.Runner(bus="demo") as runner:`` starts a coordinator; inside,
``spawn`` runs ``fn(agent, *args)`` in a new process with a connected agent,
``spawn_command`` runs a program with SHMBUS_BUS and SHMBUS_AGENT set, and
``connect`` gives an agent in this process. Leaving the block, normally, by
an exception, or on SIGINT/SIGTERM, stops the agents gracefully (SIGTERM,
then SIGKILL after a grace period), then the coordinator, and removes every
segment, semaphore and socket of the bus.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .agent.agent import Agent, connect
from .core.paths import lock_path, remove_bus_shm, socket_path, validate_bus_or_agent
from .core.routes import check_keep
from .errors import CoordinatorUnavailable, ShmbusError

__all__ = ["AgentProcess", "Runner"]


def _on_sigterm(signum: int, frame: Any) -> None:
    # SIGTERM is how the runner asks an agent to stop: unwind, so the agent
    # leaves the bus properly instead of vanishing. Only the first counts: a
    # second one would cut that unwinding short, or, arriving while the
    # interpreter finalizes (handlers reset), kill the agent outright.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def _exit_with(runner: int) -> None:
    """Stop this process (SIGTERM: it leaves the bus properly) once the
    runner's process is gone, killed however it was: nothing else would."""

    def watch() -> None:
        while os.getppid() == runner:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="shmbus-runner-watch", daemon=True).start()


def _run_agent(
    bus: str, name: str, target: Callable[..., Any], args: tuple[Any, ...], runner: int = 0
) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    if runner:
        _exit_with(runner)
    with connect(bus=bus, name=name) as agent:
        target(agent, *args)


class AgentProcess:
    """A handle on one process of the bus: an agent, or the coordinator."""

    def __init__(self, name: str, start: Callable[[], Any]) -> None:
        self.name = name
        self._start = start
        self._proc = start()

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    @property
    def alive(self) -> bool:
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.poll() is None
        return bool(self._proc.is_alive())

    @property
    def exitcode(self) -> int | None:
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.poll()
        return self._proc.exitcode  # type: ignore[no-any-return]

    def _wait(self, timeout: float) -> bool:
        if isinstance(self._proc, subprocess.Popen):
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        self._proc.join(timeout)
        return not self._proc.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask it to stop (SIGTERM); kill it if it has not within ``timeout``."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if not self._wait(timeout):
                self.kill()

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._wait(10)

    def restart(self, timeout: float = 5.0) -> None:
        """Stop it, then start it again under the same name."""
        self.stop(timeout)
        self._proc = self._start()

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.exitcode}"
        return f"<AgentProcess {self.name!r} pid {self.pid} {state}>"


class _CoordinatorProcess(AgentProcess):
    """The coordinator's handle: ``restart`` returns once the new one listens.
    After ``kill()``, the new one takes the bus over (shmbus/coordinator/takeover.py):
    the agents stay, and rejoin it on their own."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        super().__init__("coordinator", runner._start_coordinator)

    def restart(self, timeout: float = 5.0) -> None:
        """Hand the bus over (SIGHUP: the coordinator leaves every segment and
        inbox as it is), start a new coordinator and return once it listens;
        the agents rejoin it on their own, as after a kill."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGHUP)
            if not self._wait(timeout):
                self.kill()
        self._proc = self._start()
        self._runner._await_coordinator()


class Runner:
    """Starts a bus's coordinator and agents, and cleans all of it up on exit."""

    def __init__(
        self,
        bus: str = "default",
        *,
        start_timeout: float = 10.0,
        history: dict[str, int] | None = None,
    ) -> None:
        """``history``: patterns whose last N messages the coordinator keeps
        (``{"events.*": 100}``; see Agent.history)."""
        self.bus = validate_bus_or_agent(bus, "bus")
        self.start_timeout = start_timeout
        self.history = dict(check_keep(p, n, stop=False) for p, n in (history or {}).items())
        self._ctx = mp.get_context("spawn")
        self._agents: dict[str, AgentProcess] = {}
        self._local: list[Agent] = []
        self._old_handlers: dict[int, Any] = {}
        self.coordinator: AgentProcess | None = None

    # ------------------------------------------------------------- life

    def __enter__(self) -> Runner:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self.coordinator = _CoordinatorProcess(self)
        try:
            self._await_coordinator()
        except BaseException:
            # Ours did not take the bus (another runs it, or it failed): stop
            # ours, but never clean up a bus we do not own.
            self.coordinator.kill()
            self._restore_handlers()
            raise

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Turn the signal into an exception so the with-block unwinds and
        # cleans up; SIGINT keeps its usual meaning.
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _start_coordinator(self) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "shmbus",
            "coordinator",
            "--bus",
            self.bus,
            "--exit-with-parent",
            str(os.getpid()),
        ]
        argv += [f"--history={p}={n}" for p, n in self.history.items()]
        return subprocess.Popen(
            argv,
            start_new_session=True,  # a Ctrl-C reaches it through us, in order
        )

    def _await_coordinator(self) -> None:
        assert self.coordinator is not None
        deadline = time.monotonic() + self.start_timeout
        path = socket_path(self.bus)
        # Ready when *our* coordinator holds the lock (it writes its pid
        # there) and listens: a socket alone may be another coordinator's.
        while not (path.exists() and self._lock_pid() == self.coordinator.pid):
            if not self.coordinator.alive:
                raise CoordinatorUnavailable(
                    f"the coordinator of bus {self.bus!r} exited with code "
                    f"{self.coordinator.exitcode} (is another one running?)"
                )
            if time.monotonic() > deadline:
                raise CoordinatorUnavailable(f"the coordinator of bus {self.bus!r} did not start")
            time.sleep(0.01)

    def _lock_pid(self) -> int | None:
        try:
            return int(lock_path(self.bus).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the agents, then the coordinator, and remove what the bus left."""
        for agent in self._local:
            with contextlib.suppress(ShmbusError):
                agent.close()
        self._local.clear()
        # All at once, so they stop in parallel; then one grace period each
        # (stop() would signal them a second time).
        for proc in self._agents.values():
            with contextlib.suppress(ProcessLookupError):
                if proc.alive:
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self._agents.values():
            # Wait, never signal again: a second SIGTERM that lands after the
            # agent's Python has restored the default handler on its way out
            # kills it (exit -15) instead of letting it finish cleanly.
            if not proc._wait(timeout):
                proc.kill()
        if self.coordinator is not None:
            self.coordinator.stop(timeout)
        self.cleanup()
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def cleanup(self) -> list[str]:
        """Remove the bus's shared memory left by processes that were killed."""
        return remove_bus_shm(self.bus)

    # ----------------------------------------------------------- agents

    def _add(self, name: str, start: Callable[[], Any]) -> AgentProcess:
        validate_bus_or_agent(name, "agent")
        if name in self._agents and self._agents[name].alive:
            raise ValueError(f"this runner already runs an agent named {name!r}")
        proc = AgentProcess(name, start)
        self._agents[name] = proc
        return proc

    def spawn(
        self, name: str, target: Callable[..., Any], args: tuple[Any, ...] = ()
    ) -> AgentProcess:
        """Run ``target(agent, *args)`` in a new process, with ``agent`` on this bus.

        ``target`` must be importable by name (a module-level function), and
        a script that spawns must guard its top level with
        ``if __name__ == "__main__":``, as with multiprocessing: each agent
        process imports the script's module again.
        """

        def start() -> Any:
            proc = self._ctx.Process(
                target=_run_agent,
                args=(self.bus, name, target, args, os.getpid()),
                name=f"shmbus:{name}",
            )
            proc.start()
            return proc

        return self._add(name, start)

    def spawn_command(self, name: str, argv: list[str], **popen: Any) -> AgentProcess:
        """Run a program with SHMBUS_BUS and SHMBUS_AGENT set (``shmbus.connect()`` reads them)."""
        env = dict(popen.pop("env", None) or os.environ)
        env.update(SHMBUS_BUS=self.bus, SHMBUS_AGENT=name)
        return self._add(name, lambda: subprocess.Popen(argv, env=env, **popen))

    def connect(self, name: str, **kw: Any) -> Agent:
        """An agent in this process; closed when the runner closes."""
        agent = connect(bus=self.bus, name=name, **kw)
        self._local.append(agent)
        return agent

    def agents(self) -> dict[str, AgentProcess]:
        return dict(self._agents)
