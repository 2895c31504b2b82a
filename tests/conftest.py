"""Fixtures every test leans on: unique names, leftover checks, child reaping.

A test that leaves a shmbus entry in /dev/shm fails (the entry is removed);
every child process a test starts is killed when the test ends, pass or fail.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
_seq = itertools.count()

# Every name a test makes starts with this session's token, so the checks
# below see only this session's entries, never those of another pytest run
# on the same machine. The controller sets it; xdist workers inherit it.
SESSION = os.environ.setdefault("SHMBUS_TEST_SESSION", str(os.getpid()))
# Tests without the runtime fixture must not write DLQ files to ~/.local/state.
_STATE = tempfile.TemporaryDirectory(prefix="sbstate")
os.environ.setdefault("SHMBUS_STATE_DIR", _STATE.name)
TOKEN = f"t{SESSION}w"


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir() if "shmbus" in p.name and TOKEN in p.name}


# --------------------------------------------------------------- names


@pytest.fixture
def names() -> Iterator[Callable[[str], str]]:
    """A factory of ring names unique to this test; fails it if any is left in /dev/shm."""
    prefix = f"{TOKEN}{os.getpid()}x{next(_seq)}"

    def make(label: str = "r") -> str:
        return f"{prefix}-{label}"

    yield make
    left = sorted(n for n in shm_entries() if prefix + "-" in n)
    for n in left:
        (SHM / n).unlink(missing_ok=True)
    if left:
        pytest.fail(f"test left shared-memory entries behind: {left}")


@pytest.fixture
def ring_name(names: Callable[[str], str]) -> str:
    return names("ring")


# ------------------------------------------------------------- children


class Children:
    """Starts child processes and guarantees they are gone when the test ends."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []
        self.popens: list[subprocess.Popen[bytes]] = []

    def start(self, target: Callable[..., object], *args: object) -> mp.process.BaseProcess:
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        self.popens.append(p)
        return p

    def join_all(self, timeout: float) -> None:
        """Wait for every child, at most ``timeout`` seconds in all; fail on a hang."""
        import time

        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(deadline - time.monotonic(), 0.01))
            if p.is_alive():
                pytest.fail(f"child {p.pid} still running after {timeout}s")

    def reap(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        for q in self.popens:
            if q.poll() is None:
                q.kill()
            q.wait(5)


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.reap()


# ------------------------------------------------------------------ bus


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private XDG_RUNTIME_DIR, removed afterwards; short, since a Unix
    socket path holds 107 bytes at most."""
    path = tempfile.mkdtemp(prefix="sb", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_coordinator(children: Children, bus: str, *args: str) -> subprocess.Popen[bytes]:
    """A coordinator process for ``bus`` (with more ``args``), once it listens."""
    from shmbus.core.paths import socket_path

    proc = children.popen([sys.executable, "-m", "shmbus", "coordinator", "--bus", bus, *args])
    deadline = time.monotonic() + 20
    while not socket_path(bus).exists():
        assert proc.poll() is None, "the coordinator exited"
        assert time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.02)
    return proc


@pytest.fixture
def bus(names: Callable[[str], str], children: Children, runtime: str) -> Iterator[str]:
    """A running coordinator process for a bus of this test's own."""
    name = names("bus")
    proc = start_coordinator(children, name)
    try:
        yield name
    finally:
        proc.terminate()  # SIGTERM: it removes its socket, table and lock
        proc.wait(10)


@pytest.fixture(params=["shm", "uds", "mixed"])
def transport(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, children: Children
) -> str:
    """Run a test on shm, on uds, and mixed: this process's agents on shm and the
    children's on uds (so each pair talks both ways across the two). Opt in with
    ``pytestmark = pytest.mark.usefixtures("transport")``."""
    here, there = {"shm": ("shm", "shm"), "uds": ("uds", "uds"), "mixed": ("shm", "uds")}[
        request.param
    ]
    monkeypatch.setenv("SHMBUS_TRANSPORT", here)
    start = children.start

    def start_there(*args: object) -> mp.process.BaseProcess:
        os.environ["SHMBUS_TRANSPORT"] = there  # a spawned child takes the environment as is
        try:
            return start(*args)  # type: ignore[arg-type]
        finally:
            os.environ["SHMBUS_TRANSPORT"] = here

    monkeypatch.setattr(children, "start", start_there)
    return str(request.param)


# ------------------------------------------------- session-level leftovers


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller, or a plain run
        session.config._shmbus_before = shm_entries()  # type: ignore[attr-defined]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = getattr(session.config, "_shmbus_before", None)
    if before is None:
        return
    left = sorted(shm_entries() - before)
    if left:
        for n in left:
            (SHM / n).unlink(missing_ok=True)
        session.config._shmbus_left = left  # type: ignore[attr-defined]
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    left = getattr(config, "_shmbus_left", None)
    if left:
        terminalreporter.write_line(
            f"FAILED: the test session left {len(left)} shared-memory entries in /dev/shm "
            f"(now removed): {left}",
            red=True,
        )
