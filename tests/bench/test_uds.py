"""bench/bench_uds.py runs end to end; no figure is checked, only that every row
runs, the targets are judged, and nothing is left behind."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.test_bus import leftovers, run_bench

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_uds.py"


def test_quick_run_measures_every_row_and_judges_both_targets(children, runtime, tmp_path):
    results = tmp_path / "uds.json"
    code, out, err, pid = run_bench(
        children, "--quick", "--messages", "1000", "--json", str(results), script=BENCH
    )
    assert code == 0, err
    assert out.count("target: ") == 2
    report = json.loads(results.read_text())
    for row in report["rows"]:  # a peer may be missing here, never broken
        assert row["median"] is not None or row["note"].startswith("skipped"), row
    uds = [r for r in report["rows"] if r["kind"] == "uds"]
    assert len(uds) == 3 and all(r["median"] for r in uds)
    assert leftovers(pid, runtime) == []
