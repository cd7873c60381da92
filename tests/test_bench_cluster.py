"""Smoke test of bench/cluster.py's machinery: not the benchmark, which is never a test.

It starts one signald, a redis-server and two nodes, runs scenario A for a fraction of a
second on each set-up, and must report all three with a figure (a broken relay path would
leave a set-up with no relays at all, and the run would fail).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_benchmark_reports_every_set_up() -> None:
    quick = ["--pairs", "2", "--window", "2", "--warmup", "0.3", "--duration", "0.5", "--runs", "1"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/cluster.py"), *quick], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert [row[0].strip() for row in rows] == ["one process", "kept", "split"]
    for row in rows:
        assert float(row[2].replace(",", "")) > 0  # CPU ms per 1,000 relays: relays were counted
