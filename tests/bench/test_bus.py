"""bench/bench_bus.py and `shmbus bench` run end to end; no figure is checked, only that
every case runs, reports and cleans up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_bus.py"
CASES = ("bytes", "dict", "batch-bytes", "batch-dict", "request", "publish")


def run_bench(
    children, *args: str, path: tuple[str, ...] = (), timeout: float = 90, script: Path = BENCH
) -> tuple[int, str, str, int]:
    """Run the benchmark with this checkout's shmbus; (exit code, stdout, stderr, pid)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*path, str(ROOT), env.get("PYTHONPATH")]))
    proc = children.popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, proc.pid


def leftovers(pid: int, runtime: str) -> list[str]:
    """What the run with this pid left in /dev/shm and in the runtime directory."""
    tag = f"benchbus-{pid}-"
    left = [n for n in os.listdir("/dev/shm") if tag in n]
    root = Path(runtime) / "shmbus"
    if root.exists():
        left += [str(p) for p in root.iterdir() if p.name.startswith(tag)]
    return left


def test_quick_run_prints_every_case_writes_json_and_leaves_nothing(children, runtime, tmp_path):
    results = tmp_path / "bus.json"
    code, out, err, pid = run_bench(
        children, "--quick", "--runs", "1", "--messages", "1000", "--json", str(results)
    )
    assert code == 0, err
    for case in CASES:
        assert f"\n{case}: " in out, f"no table for {case}:\n{out}"
    assert "summary (medians)" in out
    assert out.count("target: ") == 5  # every case but batch-bytes has one
    report = json.loads(results.read_text())
    assert [c["name"] for c in report["cases"]] == list(CASES)
    for case in report["cases"]:
        rows = {r["kind"]: r for r in case["rows"]}
        assert rows["shmbus"]["status"] == "ok", rows["shmbus"]["note"]
        assert all(m in rows["shmbus"]["median"] for m in case["metrics"])
        for row in case["rows"]:  # a peer may be missing here, never broken
            assert row["status"] in ("ok", "skipped"), row["note"]
    publish = report["cases"][-1]["rows"][0]["runs"][0]
    assert publish["received"] == [1000] * 4 and publish["drops"] == 0
    assert leftovers(pid, runtime) == []


def test_profile_shows_both_sides_of_a_case(children, runtime):
    code, out, err, pid = run_bench(children, "--profile", "dict", "--messages", "1000")
    assert code == 0, err
    assert "dict, shmbus send/recv: receiver" in out and "dict, shmbus send/recv: sender" in out
    assert out.count("tottime") == 2  # one pstats table per side
    assert leftovers(pid, runtime) == []


def test_a_missing_peer_is_skipped_with_a_note(children, runtime, tmp_path):
    (tmp_path / "zmq.py").write_text("raise ImportError('no zmq in this test')\n")
    args = ["--only", "publish", "--runs", "1", "--messages", "500"]
    code, out, err, pid = run_bench(
        children, *args, "--json", str(tmp_path / "b.json"), path=(str(tmp_path),)
    )
    assert code == 0, err
    assert "zmq PUB/SUB" in out and "skipped: zmq not importable" in out
    assert "unknown (no pyzmq figure in this run)" in out
    assert leftovers(pid, runtime) == []


def test_shmbus_bench_help_shows_the_benchmark_options():
    result = subprocess.run(
        [sys.executable, "-m", "shmbus", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: shmbus bench [--ring]" in result.stdout
    assert "--quick" in result.stdout and "--profile" in result.stdout
