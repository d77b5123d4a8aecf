"""`python -m bench batch --quick` end to end: simulators, `kvgate gateway --workers 2`, a batch
uploaded and run through the Batch API while interactive streams are measured. The timing ratio
is the study's own PASS/FAIL line (a loaded machine decides it); this test checks that the study
ran whole: both windows measured, the batch completed with every line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_quick_batch_study_runs_whole(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "batch", "--quick", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "batch.json").read_text())
    (only,) = result["rounds"]
    assert only["batch"] == {**only["batch"], "status": "completed", "completed": 300, "failed": 0}
    for window in ("alone", "with_batch"):
        assert only[window]["requests"] > 0 and only[window]["errors"] == 0
    assert [t["target"] for t in result["targets"]] == [
        "interactive TTFT p99 with the batch ÷ alone (median of rounds)",
        "batch lines completed, every round (÷ lines)"]
    assert "| median |" in (tmp_path / "batch.md").read_text()
