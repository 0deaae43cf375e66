"""The benchmark runs end to end in its quick mode and fills every row (numbers unchecked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.__main__ import ROWS
from tests.support import ROOT


def test_quick_benchmark_produces_every_row(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(output.read_text())
    assert [row["measurement"] for row in report["table"]] == [name.strip() for name, *_ in ROWS]
    assert all("after" in row for row in report["table"]), report["table"]
    # --combine: the medians of several runs' reports; of two copies of one run, that run.
    combined = tmp_path / "combined.json"
    again = tmp_path / "again.json"
    again.write_text(output.read_text())
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--combine", str(output), str(again)]
        + ["--output", str(combined)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(combined.read_text())["table"]
    for row, single in zip(rows, report["table"], strict=True):
        if "after" in single:
            assert row["after"]["value"] == single["after"]["value"]
            assert row["after"]["runs"] == [single["after"]["value"]] * 2
