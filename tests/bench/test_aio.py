"""bench/bench_aio.py runs end to end with tiny counts; no figure is checked, only that
every row runs, reports and cleans up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_aio.py"


def test_a_tiny_run_prints_every_row_writes_json_and_leaves_nothing(children, runtime, tmp_path):
    results = tmp_path / "aio.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = children.popen(
        [
            sys.executable,
            str(BENCH),
            "--runs",
            "2",
            "--count",
            "200",
            "--warmup",
            "20",
            "--json",
            str(results),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for label in ("shmbus.aio request (asyncio)", "shmbus request (sync agent)", "mp.Pipe"):
        assert label in out, out
    assert "target: asyncio request p50 <= 60 us" in out
    report = json.loads(results.read_text())
    assert len(report["runs"]) == 2
    assert set(report["median"]) == {"aio", "sync", "pipe"}
    assert all(report["median"][k]["p50_us"] > 0 for k in report["median"])
    tag = f"benchaio-{proc.pid}-"
    assert [n for n in os.listdir("/dev/shm") if tag in n] == []
    root = Path(runtime) / "shmbus"
    assert not root.exists() or [p for p in root.iterdir() if p.name.startswith(tag)] == []
