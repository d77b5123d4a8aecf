"""`python -m bench flow --quick` end to end: the real gateway (2 workers, keys on) in front of
simulated replicas, saturated. The study's own PASS/FAIL lines judge its timing figures (a
loaded machine would make them flaky here); this test checks that it runs, that its results
have every figure, and that after the chaos every queue gauge, in-flight count and active
request count read exactly zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]


def test_flow_study_quick_writes_its_figures_and_ends_with_zero_counters(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "bench", "flow", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = orjson.loads((tmp_path / "flow.json").read_bytes())
    assert len(result["rounds"]) == 1
    median = result["median"]
    assert median["capacity"]["rps"] > 0
    priority = median["priority"]
    for phase in ("unloaded", "loaded"):
        assert priority[phase]["n"] > 0 and priority[phase]["p50_ms"] > 0, priority
    assert priority["ratio_p50"] > 0 and priority["ratio_p99"] > 0
    flood = priority["flood"]
    assert flood["sent"] > flood["completed"] > 0, flood  # the flood is more than served
    assert set(flood) >= {"shed_429", "timed_out_503", "left", "peak_queued"}
    tenants = median["fairness"]["tenants"]
    assert set(tenants) == {"tenant-a", "tenant-b"}
    assert tenants["tenant-a"]["sent"] > tenants["tenant-b"]["sent"] > 0
    assert abs(sum(t["share"] for t in tenants.values()) - 1) < 1e-9
    chaos = result["rounds"][0]["chaos"]
    assert sum(chaos["hung_up"].values()) > 0 and chaos["settle_s"] is not None, chaos
    assert set(chaos["final"]) == {"kvgate_queued_requests", "kvgate_waiting_requests",
                                   "kvgate_endpoint_in_flight",
                                   "kubeai_inference_requests_active",
                                   "vllm:num_requests_running", "vllm:num_requests_waiting"}
    assert all(value == 0 for value in chaos["final"].values()), chaos["final"]
    checks = {c["target"]: c for c in result["checks"]}
    assert len(checks) == 4 and all("met" in c for c in checks.values())
    text = (tmp_path / "flow.md").read_text()
    assert text.count("PASS: ") + text.count("FAIL: ") == 4
    assert "PASS: queue, in-flight and active gauges after chaos" in text
