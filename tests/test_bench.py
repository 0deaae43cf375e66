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


def test_sends_take_turns_between_variants(tmp_path: Path) -> None:
    """Sends per second drifts with the machine's speed: the variants take turns, each
    turn's first variant swapping, and the table gives each side's rate over the first's,
    pair by pair."""
    output = tmp_path / "sends.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "sends", "--send-repeats", "3"]
        + ["--send-clients", "4", "--send-seconds", "0.5", "--output", str(output)]
        + ["--variant", "one=.:auto:auto", "--variant", "two=.:auto:auto"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    order = [
        line.split("]")[0].strip(" [") for line in run.stderr.splitlines() if "] sends" in line
    ]
    assert order == ["one", "two", "two", "one", "one", "two"]
    results = json.loads(output.read_text())["results"]
    one, two = results["one"]["sends"], results["two"]["sends"]
    assert one["paired_ratio"] == 1.0
    assert len(one["runs"]) == len(two["runs"]) == 3
    rates = [a["sends_per_s"] for a in one["runs"]], [b["sends_per_s"] for b in two["runs"]]
    expected = sorted(b / a for a, b in zip(*rates, strict=True))[1]
    assert two["paired_ratio"] == expected
    assert one["sends_per_s"] == sorted(rates[0])[1]
    assert one["errors"] == two["errors"] == 0
