"""The programs in examples/ run as a user runs them, succeed, and leave nothing behind.

Each example checks its own results and exits non-zero when one is wrong;
these tests run it as a script (so its agents re-import it as ``__main__``,
as they do for a user), then check its exit code, the lines that say what
it showed, and that its bus left nothing in /dev/shm nor in the state
directory (issue 17: the examples' dead letters surfaced in later runs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shmbus.core.paths import lock_path, remove_bus_shm, runtime_dir, state_dir

ROOT = Path(__file__).resolve().parents[2]


def bus_entries(bus: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f".{bus}." in n]


def run_example(script: str, bus: str, runtime: str, *args: str) -> str:
    """Run examples/``script`` on ``bus``; returns its stdout once it exited 0."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=runtime)
    argv = [sys.executable, str(ROOT / "examples" / script), "--bus", bus, *args]
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its agents share its process group: one kill takes all
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _stop(proc, bus)
        out, err = proc.communicate()
        pytest.fail(f"{script} did not finish within 60 s\n{out}\n{err}")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{out}\n{err}"
    assert bus_entries(bus) == []
    assert not runtime_dir(bus).exists()
    assert not state_dir(bus).exists(), "an example keeps its dead letters for the run only"
    return out


def _stop(proc: subprocess.Popen[str], bus: str) -> None:
    # SIGTERM first: the example's Runner then stops its agents and cleans up.
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # The bus's coordinator runs in a session of its own: the lock names it.
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(lock_path(bus).read_text()), signal.SIGKILL)
    remove_bus_shm(bus)


def test_basic_usage_shows_direct_pubsub_request_alert_and_stats(names, runtime):
    out = run_example("basic_usage.py", names("bus"), runtime)
    assert "direct: greeter answered 'hello, Ada'" in out
    assert "request: calculator says 2 + 3 + 4 = 9" in out
    assert "pub/sub: monitor (sensors.*) got ['sensors.temp', 'sensors.humidity']" in out
    assert (
        "pub/sub: archiver (sensors.>) got ['sensors.temp', 'sensors.humidity', "
        "'sensors.temp.raw']" in out
    )
    assert "alert: monitor got 'disk almost full' at priority 90" in out
    assert "stats: bus " in out
    assert out.rstrip().endswith("basic_usage: every step worked; nothing left in /dev/shm")


def test_agent_coordination_reassigns_the_tasks_a_broken_worker_dead_lettered(names, runtime):
    out = run_example("agent_coordination.py", names("bus"), runtime, "--workers", "3")
    assert "round 1: 9 tasks to worker-1, worker-2, worker-3" in out
    assert "round 2: 3 tasks to worker-1, worker-2" in out
    assert out.count("dead letter: task") == 3
    assert "handler failed: RuntimeError: worker-3 is out of order" in out
    assert "error: ZeroDivisionError: division by zero" in out
    assert "summary: 9 tasks, 8 done, 1 failed, 3 reassigned after a worker failed them" in out
    assert out.rstrip().endswith(
        "agent_coordination: every task ended as expected; nothing left in /dev/shm"
    )


def test_custom_handlers_route_validate_and_dead_letter(names, runtime):
    out = run_example("custom_handlers.py", names("bus"), runtime)
    assert "quote: {'sku': 'widget', 'qty': 4, 'total': 10.0, 'in_stock': 10}" in out
    assert "handlers that took o1, in order: ['audit', 'place', 'count']" in out
    assert "stock: {'widget': 6, 'gadget': 3}" in out
    assert "-> handler failed: ValidationError: unknown sku 'unicorn'" in out
    assert "-> handler failed: ValidationError: not enough gadget: 5 asked, 1 in stock" in out
    assert out.count("dead letter: ") == 4
    assert out.rstrip().endswith(
        "custom_handlers: every rule and handler worked; nothing left in /dev/shm"
    )


def test_an_example_refuses_a_bad_option(runtime):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_coordination.py"), "--workers", "1"],
        env=dict(os.environ, PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=runtime),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "at least 2" in proc.stderr
