"""Launch and supervise a bus: its coordinator and its agent processes.

``with shmbus.Runner(bus="demo") as runner:`` starts a coordinator; inside,
``spawn`` runs ``fn(agent, *args)`` in a new process with a connected agent,
``spawn_command`` runs a program with SHMBUS_BUS and SHMBUS_AGENT set, and
``connect`` gives an agent in this process. Leaving the block, normally, by
an exception, or on SIGINT/SIGTERM, stops the agents gracefully (SIGTERM,
then SIGKILL after a grace period), then the coordinator, and removes every
segment, semaphore and socket of the bus.

Ready means ready: ``spawn`` and ``spawn_command`` return once the agent has
joined the bus (``ready_timeout``), and raise :class:`~shmbus.errors.AgentExited`
for a child that exited first, with its exit code and why (a target's error,
the end of a command's stderr).

Crashes are seen: a target that raises prints its traceback once, each line
prefixed with the agent's name; ``AgentProcess.wait()`` gives an exit code,
``runner.failures()`` the agents that failed, and ``Runner(on_exit=fn)`` is
called as each agent ends on its own.

No orphans: the agents die with the runner's process, however it ends,
SIGKILL included. On Linux the kernel sees to it (``prctl(PR_SET_PDEATHSIG,
SIGTERM)``, set in the child); elsewhere, and for a target spawned from a
thread other than the main one (the kernel sends the signal when the
*thread* that started the child ends), a watch thread in each target agent
does, and command agents have no such guard. The coordinator watches the
runner itself (``--exit-with-parent``).

Ctrl-C: the agents ignore SIGINT (a terminal sends it to the whole process
group): the runner alone takes it and stops them in order; an uncaught
KeyboardInterrupt then prints one line, not a traceback.

Dead letters: the coordinator keeps the bus's DLQ in a file of the bus's
state directory (``$SHMBUS_STATE_DIR/BUS``, ``$XDG_STATE_HOME/shmbus/BUS`` or
``~/.local/state/shmbus/BUS``), so they outlive the run and a later run of
the same bus name finds them; ``Runner(dlq="memory")`` keeps them for this
run only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from .agent.agent import Agent, connect
from .core.paths import (
    find_segments,
    lock_path,
    remove_bus_shm,
    socket_path,
    validate_bus_or_agent,
)
from .core.process import process_gone
from .core.routes import Table, check_keep
from .errors import (
    AgentExited,
    CoordinatorUnavailable,
    ReadyTimeout,
    ShmbusError,
)

__all__ = ["AgentProcess", "Runner"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0  # seconds a spawn waits for its agent to join, by default
WATCH = 0.05  # seconds between the on_exit watcher's looks at the agents
_SAY_MAX = 4096  # bytes of why a child could not join, through its ready pipe
STDERR_LINES = 10  # lines of a command's stderr an AgentExited quotes
_KEEP = 8192  # bytes of a command's stderr kept for that
_DLQ_MODES = ("file", "memory")


class _Default:
    def __repr__(self) -> str:
        return "<the runner's ready_timeout>"


_DEFAULT: Any = _Default()


# --------------------------------------------------- in the child process

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


# Resolved here, in the parent: the preexec_fn of spawn_command calls it in
# a forked child, where nothing may be imported or looked up.
_prctl = _load_prctl()


def _die_with_parent(parent: int) -> bool:
    """In a child: have the kernel send us SIGTERM when our parent ends,
    however it ends. False where prctl is not available. A parent that
    died before the call is caught by the getppid check after it."""
    if _prctl is None or _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _on_sigterm(signum: int, frame: Any) -> None:
    # SIGTERM is how the runner asks an agent to stop: unwind, so the agent
    # leaves the bus properly instead of vanishing. Only the first counts: a
    # second one would cut that unwinding short, or, arriving while the
    # interpreter finalizes (handlers reset), kill the agent outright.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def _exit_with(runner: int) -> None:
    """Stop this process (SIGTERM: it leaves the bus properly) once the
    runner's process is gone, killed however it was: the fallback where
    the kernel cannot be asked to (see _die_with_parent)."""

    def watch() -> None:
        while os.getppid() == runner:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="shmbus-runner-watch", daemon=True).start()


def _say(name: str, text: str) -> None:
    """Lines on stderr, each prefixed with the agent's name, in one write."""
    lines = text.rstrip("\n").split("\n")
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write("".join(f"[{name}] {line}\n" for line in lines))
        sys.stderr.flush()


def _run_agent(
    bus: str,
    name: str,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    runner: int = 0,
    pdeathsig: bool = False,
    ready: Any = None,
) -> None:
    """An agent process: join the bus, tell the runner (``ready``, a pipe),
    run ``target(agent, *args)``; its exception is printed once, prefixed."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The runner started us with SIGINT blocked (see _sigint_held): a Ctrl-C
    # is the runner's to handle, which stops us with SIGTERM, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if runner and not (pdeathsig and _die_with_parent(runner)):
        _exit_with(runner)
    try:
        agent = connect(bus=bus, name=name)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        _say(name, f"agent {name!r} cannot join bus {bus!r}: {reason}")
        if ready is not None:
            with contextlib.suppress(OSError):
                ready.send_bytes(b"failed\0" + reason.encode(errors="replace")[:_SAY_MAX])
        sys.exit(1)
    code = 0
    with agent:
        if ready is not None:
            with contextlib.suppress(OSError):
                ready.send_bytes(b"ready\0")
                ready.close()
        try:
            target(agent, *args)
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT  # raised by the target itself: quietly
        except Exception:
            _say(name, f"agent {name!r} (pid {os.getpid()}) failed:\n{traceback.format_exc()}")
            code = 1
    sys.exit(code)


def _command_setup(parent: int, pdeathsig: bool, then: Callable[[], Any] | None) -> Any:
    """spawn_command's preexec_fn: runs in the forked child, before exec.

    Python warns that a preexec_fn may deadlock when the parent has threads
    (only the forking thread lives on in the child, and a lock another
    thread held stays locked). This one takes no such lock: it imports
    nothing, logs nothing, and makes three plain calls, signal(),
    sigprocmask() and the prctl resolved at import, then getppid(); the
    GIL and the import lock are reinitialized by the fork itself.
    """

    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the program
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if pdeathsig and _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # it died before the prctl
                os._exit(1)
        if then is not None:
            then()

    return setup


# --------------------------------------------------- in the runner process


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT back in this thread while a child starts and is noted:
    the child inherits the mask, so a Ctrl-C cannot interrupt its start-up
    with a traceback, and ours comes once the child is on our books (then
    close() stops it). Not lost: it stays pending until the mask returns."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _quiet_interrupts() -> None:
    """An uncaught KeyboardInterrupt prints one line, not a traceback."""
    prev = sys.excepthook
    if getattr(prev, "_shmbus_quiet", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(
                "KeyboardInterrupt (the runner stopped its agents and removed the bus)",
                file=sys.stderr,
            )
        else:
            prev(kind, value, tb)

    hook._shmbus_quiet = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def describe(code: int | None) -> str:
    """``exited with code 3``, ``killed by SIGKILL``, ``still running``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _Tail:
    """A command's stderr, passed on to ours as it comes (the program writes
    to a pipe, a thread copies it to our fd 2), its last bytes kept."""

    def __init__(self, pipe: Any, name: str) -> None:
        self._pipe = pipe
        self._kept = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._copy, name=f"shmbus-stderr-{name}", daemon=True
        )
        self._thread.start()

    def _copy(self) -> None:
        fd = self._pipe.fileno()
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self._kept += data
                    del self._kept[:-_KEEP]
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(2, view) :]
                    except InterruptedError:
                        continue
                    except OSError:  # our stderr is gone: keep draining the pipe
                        break
        finally:
            with contextlib.suppress(OSError):
                self._pipe.close()

    def lines(self, n: int = STDERR_LINES, wait: float = 1.0) -> list[str]:
        """Its last ``n`` lines, once it ended (up to ``wait`` seconds for that)."""
        self._thread.join(wait)
        with self._lock:
            text = bytes(self._kept).decode(errors="replace")
        return text.rstrip("\n").split("\n")[-n:] if text.strip() else []


class _Launch:
    """What a start function gives back besides the process."""

    def __init__(self, proc: Any, ready: Any = None, tail: _Tail | None = None) -> None:
        self.proc = proc
        self.ready = ready  # the read end of a spawned target's ready pipe
        self.tail = tail


class AgentProcess:
    """A handle on one process of the bus: an agent, or the coordinator."""

    def __init__(self, name: str, start: Callable[[], Any], bus: str | None = None) -> None:
        self.name = name
        self.bus = bus  # set for agents: what wait_ready looks at
        self.ready_timeout: float | None = READY_TIMEOUT  # what restart waits, by default
        self._start = start
        # Every look at the process (waitpid) goes through this lock: the
        # on_exit watcher looks from its own thread.
        self._lock = threading.Lock()
        self._launch()

    def _launch(self) -> None:
        launched = self._start()
        if not isinstance(launched, _Launch):
            launched = _Launch(launched)
        with self._lock:
            old = getattr(self, "_ready_pipe", None)
            if old is not None:
                old.close()
            self._proc = launched.proc
            self._ready_pipe = launched.ready
            self._tail = launched.tail
            self._ready = False
            self._stopping = False  # the runner (or the user) stops it: no failure
            self._reported = False  # on_exit was called for this process

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    def _poll(self) -> int | None:
        with self._lock:
            if isinstance(self._proc, subprocess.Popen):
                return self._proc.poll()
            return self._proc.exitcode  # type: ignore[no-any-return]

    @property
    def alive(self) -> bool:
        return self._poll() is None

    @property
    def exitcode(self) -> int | None:
        """The exit code once it ended (negative: killed by that signal), else None."""
        return self._poll()

    def _wait(self, timeout: float | None) -> bool:
        proc = self._proc
        if isinstance(proc, subprocess.Popen):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        # The sentinel, not join(): waiting on it reaps nothing, so every
        # waitpid is made under the lock. It is ready a moment before the
        # process can be reaped (an ending process closes its files first):
        # join() then waits for that moment (a blocking waitpid).
        if mp.connection.wait([proc.sentinel], timeout):
            with self._lock:
                proc.join(5)
        return self._poll() is not None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to end (None: as long as it takes); its exit
        code (negative: killed by that signal), or None if it still runs."""
        self._wait(timeout)
        return self._poll()

    def wait_ready(self, timeout: float | None = READY_TIMEOUT) -> None:
        """Return once this agent has joined the bus (None: wait as long as it takes).

        Raises :class:`AgentExited` if the process ended first (with its
        exit code and why), :class:`ReadyTimeout` if ``timeout`` passed (it
        still runs). A command that exited with 0 before it was seen on the
        bus did its work: no error.
        """
        if self._ready or self.bus is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._ready_pipe is not None:
            self._await_pipe(deadline, timeout)
        else:
            self._await_listed(deadline, timeout)

    def _left(self, deadline: float | None, cap: float) -> float:
        return cap if deadline is None else max(0.0, min(cap, deadline - time.monotonic()))

    def _await_pipe(self, deadline: float | None, timeout: float | None) -> None:
        pipe, proc = self._ready_pipe, self._proc
        while True:
            got = mp.connection.wait([pipe, proc.sentinel], self._left(deadline, 1.0))
            if pipe in got:
                try:  # bytes, never pickles: "ready" or "failed", NUL, why
                    raw = pipe.recv_bytes(_SAY_MAX + 16)
                    what, _, said = raw.partition(b"\0")
                    what, reason = what.decode("ascii", "replace"), said.decode(errors="replace")
                except (EOFError, OSError):
                    what, reason = "gone", ""
                if what == "ready":
                    self._ready = True
                    pipe.close()
                    return
                self._wait(5)  # it exits right after saying why
                raise self._exited(reason)
            if proc.sentinel in got:
                self._wait(5)
                raise self._exited("")
            if deadline is not None and time.monotonic() >= deadline:
                raise self._too_slow(timeout)

    def _await_listed(self, deadline: float | None, timeout: float | None) -> None:
        """A command: until the routes table lists its name, for a live process
        (a namesake that just left may linger there a moment)."""
        assert self.bus is not None
        table: Table | None = None
        seen = -1
        try:
            while True:
                if table is None:
                    with contextlib.suppress(ShmbusError):
                        table = Table.attach(find_segments(self.bus)[0])
                if table is not None and table.version != seen:
                    seen, routes = table.read()
                    entry = (routes or {}).get("agents", {}).get(self.name)
                    if entry is not None and not process_gone(int(entry[2])):
                        self._ready = True
                        return
                code = self._poll()
                if code == 0:
                    return  # done before we looked: not a failure
                if code is not None:
                    raise self._exited("")
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._too_slow(timeout)
                time.sleep(0.01)
        finally:
            if table is not None:
                table.close()

    def _exited(self, reason: str) -> AgentExited:
        code = self._poll()
        lines = self._tail.lines() if self._tail is not None else []
        text = (
            f"agent {self.name!r} (pid {self.pid}) {describe(code)} "
            f"before it joined bus {self.bus!r}"
        )
        if reason:
            text += f": {reason}"
        if lines:
            text += "; the end of its stderr:\n" + "\n".join(f"    {line}" for line in lines)
        elif not reason:
            text += " (its output, above, says why)"
        return AgentExited(text, self.name, code, lines, reason)

    def _too_slow(self, timeout: float | None) -> ReadyTimeout:
        return ReadyTimeout(
            f"agent {self.name!r} (pid {self.pid}) has not joined bus {self.bus!r} "
            f"within {timeout}s; is it slow to start (give a larger ready_timeout), or does it "
            "never call shmbus.connect() (give ready_timeout=None and do not wait for it)?",
            self.name,
        )

    def _ended_on_its_own(self) -> int | None:
        """The exit code, once, if this process ended and nobody stopped it."""
        with self._lock:
            if self._reported or self._stopping:
                return None
            proc = self._proc
            code = proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode
            if code is None:
                return None
            self._reported = True
            return code  # type: ignore[no-any-return]

    def _signal(self, sig: int) -> None:
        """Send ``sig`` if it runs, noting that it was stopped on purpose."""
        if self.alive:
            self._stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask it to stop (SIGTERM); kill it if it has not within ``timeout``."""
        if self.alive:
            self._signal(signal.SIGTERM)
            if not self._wait(timeout):
                self.kill()

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        self._signal(signal.SIGKILL)
        self._wait(10)

    def restart(self, timeout: float = 5.0, ready_timeout: float | None = _DEFAULT) -> None:
        """Stop it, then start it again under the same name; an agent's
        returns once it joined the bus again, as spawn does (``ready_timeout``:
        the runner's by default; None or 0: do not wait)."""
        self.stop(timeout)
        with _sigint_held():
            self._launch()
        if ready_timeout is _DEFAULT:
            ready_timeout = self.ready_timeout
        if ready_timeout:
            self.wait_ready(ready_timeout)

    def __repr__(self) -> str:
        state = "alive" if self.alive else describe(self.exitcode)
        return f"<AgentProcess {self.name!r} pid {self.pid} {state}>"


class _CoordinatorProcess(AgentProcess):
    """The coordinator's handle: ``restart`` returns once the new one listens.
    After ``kill()``, the new one takes the bus over (shmbus/coordinator/takeover.py):
    the agents stay, and rejoin it on their own."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        super().__init__("coordinator", runner._start_coordinator)

    def restart(self, timeout: float = 5.0, ready_timeout: float | None = _DEFAULT) -> None:
        """Hand the bus over (SIGHUP: the coordinator leaves every segment and
        inbox as it is), start a new coordinator and return once it listens;
        the agents rejoin it on their own, as after a kill."""
        if self.alive:
            self._signal(signal.SIGHUP)
            if not self._wait(timeout):
                self.kill()
        self._launch()
        self._runner._await_coordinator()  # (its own wait: start_timeout)


class Runner:
    """Starts a bus's coordinator and agents, and cleans all of it up on exit.

    Where dead letters go: the coordinator keeps the DLQ in a file of the
    bus's state directory (``shmbus.core.paths.state_dir(bus)``:
    ``$SHMBUS_STATE_DIR/BUS``, else ``$XDG_STATE_HOME/shmbus/BUS``, else
    ``~/.local/state/shmbus/BUS``), so they outlive the run, and the next
    coordinator of the same bus name reloads them (``shmbus dlq list``).
    ``dlq="memory"`` keeps them in the coordinator's memory: gone with it.
    """

    def __init__(
        self,
        bus: str = "default",
        *,
        start_timeout: float = 10.0,
        history: dict[str, int] | None = None,
        ready_timeout: float | None = READY_TIMEOUT,
        on_exit: Callable[[str, int], Any] | None = None,
        dlq: str = "file",
    ) -> None:
        """``history``: patterns whose last N messages the coordinator keeps
        (``{"events.*": 100}``; see Agent.history).

        ``ready_timeout``: how long ``spawn`` and ``spawn_command`` wait for
        the agent to join the bus before they return (None or 0: they do
        not wait; ``AgentProcess.wait_ready`` does, when asked).

        ``on_exit(name, exitcode)``: called from a watch thread of the
        runner when an agent process ends on its own (not when the runner,
        or ``stop``/``kill``, ended it); exitcode negative: killed by that
        signal. See also :meth:`failures`.

        ``dlq``: "file" (the default: dead letters are kept in the bus's
        state directory and outlive the run) or "memory" (for this run
        only: the coordinator runs with ``--dlq memory``).
        """
        self.bus = validate_bus_or_agent(bus, "bus")
        self.start_timeout = start_timeout
        self.history = dict(check_keep(p, n, stop=False) for p, n in (history or {}).items())
        if ready_timeout is not None and not ready_timeout >= 0:
            raise ValueError(f"ready_timeout is seconds (or None), got {ready_timeout}")
        self.ready_timeout = ready_timeout
        self.on_exit = on_exit
        if dlq not in _DLQ_MODES:
            raise ValueError(f"dlq is one of {', '.join(map(repr, _DLQ_MODES))}, got {dlq!r}")
        self.dlq = dlq
        self._ctx = mp.get_context("spawn")
        self._agents: dict[str, AgentProcess] = {}
        self._local: list[Agent] = []
        self._old_handlers: dict[int, Any] = {}
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
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
        self._closing.clear()
        self.coordinator = _CoordinatorProcess(self)
        try:
            self._await_coordinator()
        except BaseException:
            # Ours did not take the bus (another runs it, or it failed): stop
            # ours, but never clean up a bus we do not own.
            self.coordinator.kill()
            self._restore_handlers()
            raise
        if self.on_exit is not None:
            self._watcher = threading.Thread(
                target=self._watch, name=f"shmbus-runner-{self.bus}", daemon=True
            )
            self._watcher.start()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Turn the signal into an exception so the with-block unwinds and
        # cleans up; SIGINT keeps its usual meaning.
        if signum == signal.SIGINT:
            _quiet_interrupts()
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
        if self.dlq != "file":
            argv += ["--dlq", self.dlq]
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

    def _watch(self) -> None:
        """on_exit's thread: each agent that ended on its own, once."""
        assert self.on_exit is not None
        while True:
            closing = self._closing.wait(WATCH)
            # One last look once close() began, before it stops anyone: an
            # agent that ended on its own just before is still reported.
            for proc in list(self._agents.values()):
                code = proc._ended_on_its_own()
                if code is None:
                    continue
                try:
                    self.on_exit(proc.name, code)
                except Exception:
                    log.exception("Runner(on_exit=%r) failed for agent %r", self.on_exit, proc.name)
            if closing:
                return

    def close(self, timeout: float = 5.0) -> None:
        """Stop the agents, then the coordinator, and remove what the bus left."""
        self._closing.set()
        if self._watcher is not None:
            if self._watcher is not threading.current_thread():
                self._watcher.join(5)  # its last look: see _watch
            self._watcher = None
        for agent in self._local:
            with contextlib.suppress(ShmbusError):
                agent.close()
        self._local.clear()
        # All at once, so they stop in parallel; then one grace period each
        # (stop() would signal them a second time).
        for proc in self._agents.values():
            proc._signal(signal.SIGTERM)
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

    def _add(
        self, name: str, start: Callable[[], Any], ready_timeout: float | None
    ) -> AgentProcess:
        validate_bus_or_agent(name, "agent")
        if name in self._agents and self._agents[name].alive:
            raise ValueError(f"this runner already runs an agent named {name!r}")
        if ready_timeout is _DEFAULT:
            ready_timeout = self.ready_timeout
        elif ready_timeout is not None and not ready_timeout >= 0:
            raise ValueError(f"ready_timeout is seconds (or None), got {ready_timeout}")
        with _sigint_held():  # see there: on our books before a Ctrl-C lands
            proc = AgentProcess(name, start, bus=self.bus)
            proc.ready_timeout = ready_timeout
            self._agents[name] = proc
        if ready_timeout:
            try:
                proc.wait_ready(ready_timeout)
            except ReadyTimeout as e:
                proc.stop(1.0)
                raise ReadyTimeout(f"{e} It was stopped.", name) from None
        return proc

    def _own_thread(self) -> bool:
        """Does a child started from this thread get PR_SET_PDEATHSIG? The
        kernel sends it when the *thread* that started the child ends: the
        main thread (the process), or our watcher (which ends at close)."""
        here = threading.current_thread()
        return here is threading.main_thread() or here is self._watcher

    def failures(self) -> list[tuple[str, int]]:
        """The agents whose process ended on its own with an error: (name,
        exit code) each, the code negative for a signal. An agent stopped by
        the runner or by ``stop``/``kill`` is not one; a restarted one
        counts its new process only."""
        out = []
        for name, proc in self._agents.items():
            code = proc.exitcode
            if code is not None and code != 0 and not proc._stopping:
                out.append((name, code))
        return out

    def spawn(
        self,
        name: str,
        target: Callable[..., Any],
        args: tuple[Any, ...] = (),
        *,
        ready_timeout: float | None = _DEFAULT,
    ) -> AgentProcess:
        """Run ``target(agent, *args)`` in a new process, with ``agent`` on this bus.

        Returns once the agent has joined the bus (up to ``ready_timeout``,
        the runner's by default; None or 0: at once); raises
        :class:`AgentExited` when it could not (with its exit code and the
        reason) and :class:`ReadyTimeout` (the process stopped) when it took
        longer. An exception ``target`` raises is printed once on stderr,
        each line prefixed ``[name]``, and the process exits with 1.

        ``target`` must be importable by name (a module-level function), and
        a script that spawns must guard its top level with
        ``if __name__ == "__main__":``, as with multiprocessing: each agent
        process imports the script's module again.
        """

        def start() -> _Launch:
            reader, writer = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(
                target=_run_agent,
                args=(self.bus, name, target, args, os.getpid(), self._own_thread(), writer),
                name=f"shmbus:{name}",
            )
            try:
                proc.start()
            except BaseException:
                reader.close()
                raise
            finally:
                writer.close()  # the child's copy is its own: EOF when it ends
            return _Launch(proc, ready=reader)

        return self._add(name, start, ready_timeout)

    def spawn_command(
        self,
        name: str,
        argv: list[str],
        *,
        ready_timeout: float | None = _DEFAULT,
        **popen: Any,
    ) -> AgentProcess:
        """Run a program with SHMBUS_BUS and SHMBUS_AGENT set (``shmbus.connect()`` reads them).

        Returns once the routes table lists the agent (``ready_timeout`` as
        for :meth:`spawn`; give None for a program that never joins the
        bus); raises :class:`AgentExited` for a program that exited with an
        error before that, quoting the end of its stderr, and returns for
        one that exited with 0. Unless ``stderr`` is given, the program's
        stderr goes through a pipe the runner copies to its own stderr as
        it comes (so it is seen, and its end can be quoted). ``popen`` goes
        to :class:`subprocess.Popen`; the program ignores SIGINT and, on
        Linux, gets SIGTERM when the runner's process ends.
        """
        env = dict(popen.pop("env", None) or os.environ)
        env.update(SHMBUS_BUS=self.bus, SHMBUS_AGENT=name)
        capture = "stderr" not in popen
        then = popen.pop("preexec_fn", None)

        def start() -> _Launch:
            setup = _command_setup(os.getpid(), self._own_thread(), then)
            kw = dict(popen, stderr=subprocess.PIPE) if capture else popen
            proc = subprocess.Popen(argv, env=env, preexec_fn=setup, **kw)
            tail = _Tail(proc.stderr, name) if capture else None
            return _Launch(proc, tail=tail)

        return self._add(name, start, ready_timeout)

    def connect(self, name: str, **kw: Any) -> Agent:
        """An agent in this process; closed when the runner closes."""
        agent = connect(bus=self.bus, name=name, **kw)
        self._local.append(agent)
        return agent

    def agents(self) -> dict[str, AgentProcess]:
        return dict(self._agents)
