"""bench/bench_history.py runs end to end on tiny counts and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_case(tmp_path, runtime):
    out = tmp_path / "history.json"
    before = set(os.listdir("/dev/shm"))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_history.py"),
            "--quick",
            "--messages",
            "3000",
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
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"subscriber", "history", "both", "burst"}
    for case, runs in data["results"].items():
        assert runs[0]["full"] == 0 and runs[0]["failed"] == 0, case
        last = {"subscriber": None, "burst": 999}.get(case, 2999)  # burst: range(1000) a call
        assert runs[0]["kept_last"] == last, case
    assert {n for n in os.listdir("/dev/shm") if "benchhist" in n} - before == set()
