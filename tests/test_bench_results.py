"""The one results writer: every study's tables and targets come out of it alike."""

from __future__ import annotations

import json
from pathlib import Path

from bench.results import check, save, table, targets_table


def test_table_aligns_text_left_and_figures_right() -> None:
    assert table(("path", "req/s"), [("kvgate", "1,000"), ("a|b", 2)]).splitlines() == [
        "| path | req/s |", "|---|---:|", "| kvgate | 1,000 |", "| a\\|b | 2 |"]
    assert table(("n", "ns"), [(8, 51)], "r").splitlines()[1] == "|---:|---:|"


def test_check_knows_which_way_is_better() -> None:
    assert check("added p50 (ms)", 0.4, 0.5)["met"]
    assert not check("added p50 (ms)", 0.6, 0.5)["met"]
    assert check("2 ÷ 1 workers", 1.7, 1.6, higher_is_better=True)["met"]
    assert not check("not measured", None, 1.0)["met"]


def test_targets_table_and_saved_files(tmp_path: Path) -> None:
    checks = [check("RSS (GiB)", 0.25, 1.0), check("ratio", 1.2, 1.6, higher_is_better=True)]
    text = targets_table(checks, digits=3)
    assert text.splitlines() == ["| target | measured | limit | met |", "|---|---:|---:|---|",
                                 "| RSS (GiB) | 0.250 | ≤ 1 | yes |",
                                 "| ratio | 1.200 | ≥ 1.6 | NO |"]
    assert targets_table([]) == ""
    written = save(tmp_path / "out", "scale", {"targets": checks}, text)
    assert json.loads(written[0].read_text())["targets"][1]["met"] is False
    assert written[1].read_text() == text
