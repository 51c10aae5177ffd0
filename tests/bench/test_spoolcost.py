"""A smoke run of tests/bench/spoolcost.py, so the harness cannot rot."""

from __future__ import annotations

from pathlib import Path

from tests.bench import spoolcost


def test_spoolcost_prints_a_row_per_scenario(tmp_path: Path, capsys) -> None:
    assert spoolcost.main(["--commits", "12", "--lines", "10", "--synchronous", "normal",
                           "--dir", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == len(spoolcost.SCENARIOS)
    assert all(float(row[-5]) > 0 for row in rows), rows  # CPU ns per line
    assert list(tmp_path.iterdir()) == [], "the temporary folder is removed"
