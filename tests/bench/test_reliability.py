"""bench/bench_reliability.py runs end to end on tiny counts and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_both_cases(tmp_path, runtime):
    out = tmp_path / "rel.json"
    before = set(os.listdir("/dev/shm"))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_reliability.py"),
            "--quick",
            "--messages",
            "300",
            "--unread",
            "50",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "requires_ack costs" in result.stdout and "peer told" in result.stdout
    data = json.loads(out.read_text())
    assert len(data["ack"]["plain"]) == len(data["ack"]["acked"]) == 1
    assert data["death"][0]["told_ms"] > 0 and data["death"][0]["drained_ms"] > 0
    assert {n for n in os.listdir("/dev/shm") if "benchrel" in n} - before == set()
