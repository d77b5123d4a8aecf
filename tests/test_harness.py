"""The routing study end to end (real simulator, real gateway, real load generator), plus
the small pure pieces it is built from."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

from bench import report
from bench.studies.routing import build_parser, settings_from_args
from bench.procs import gateway_config
from bench.loadgen import LoadResult, RequestRecord, ThreadPool, join_mid_thread
from lb.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_harness_end_to_end_writes_sane_results(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "routing", "--profile", "fast", "--replicas", "2",
           "--concurrency", "2,4", "--warmup", "0.5", "--duration", "2", "--drain", "5",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " c=" in line]
    assert len(lines) == 6, proc.stdout  # one progress line per run

    doc = json.loads((tmp_path / "multi-turn.json").read_text())
    assert doc["meta"]["replicas"] == 2 and doc["meta"]["profile"]["name"] == "fast"
    assert {(r["strategy"], r["concurrency"]) for r in doc["runs"]} == {
        (s, c) for s in ("Random", "LeastLoad", "PrefixHash") for c in (2, 4)}
    for run in doc["runs"]:
        client, replicas = run["client"], run["replicas"]
        assert client["failed"] == 0 and client["unfinished"] == 0, run
        assert client["ok"] > 0 and client["ttft_mean_ms"] > 0
        assert client["ttft_p50_ms"] <= client["ttft_p99_ms"]
        assert client["output_tokens_per_s"] > 0
        assert client["total_tokens_per_s"] > client["output_tokens_per_s"]
        assert client["mean_prompt_tokens"] > 0 and client["mean_output_tokens"] > 0
        assert len(replicas["per_replica"]) == 2
        assert all(0.0 <= p["hit_rate"] <= 1.0 for p in replicas["per_replica"])
        assert sum(p["requests"] for p in replicas["per_replica"]) > 0
        assert set(run["cpu"]) >= {"gateway", "loadgen", "simulator", "machine"}
    # Multi-turn threads resend their history, so some prompt tokens come from the cache.
    assert max(r["replicas"]["hit_rate"] for r in doc["runs"]) > 0.3

    md = (tmp_path / "multi-turn.md").read_text()
    assert "| concurrent threads |" in md and "PrefixHash" in md
    for name in ("multi-turn-ttft.png", "multi-turn-throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in md


def test_generated_gateway_config_is_valid() -> None:
    text = gateway_config({"m": ["127.0.0.1:9001", "127.0.0.1:9002"]}, 8123, load_factor=150)
    config = config_from_dict(yaml.safe_load(text))
    model = config.models[0]
    assert model.spec.load_balancing.strategy == "PrefixHash"
    assert [e.address for e in config.static_endpoints("m")] == ["127.0.0.1:9001",
                                                                 "127.0.0.1:9002"]


def test_settings_defaults_and_overrides() -> None:
    s = settings_from_args(build_parser().parse_args(["--quick", "--workload", "unique"]))
    assert s.workload == "unique-prompts" and s.control and len(s.concurrency) == 1
    s = settings_from_args(build_parser().parse_args(["--kv-blocks", "99", "--time-scale", "3"]))
    assert s.sim_overrides["num_kv_blocks"] == 99 and s.sim_overrides["time_scale"] == 3
    s = settings_from_args(build_parser().parse_args(["--endpoints", "a:1,b:2"]))
    assert s.endpoints == ["a:1", "b:2"] and s.replicas == 2


def test_join_mid_thread_is_deterministic_and_keeps_history() -> None:
    pool = ThreadPool("multi-turn", seed=3)
    pool.ensure(4)
    thread = pool.get(2)
    a = join_mid_thread(thread, random.Random("x"))
    b = join_mid_thread(thread, random.Random("x"))
    assert a.turn == b.turn and a.history == b.history
    assert len(a.history) == 2 * a.turn  # user + filler reply per skipped turn
    assert pool.get(9).thread_id != thread.thread_id  # grows on demand


def _record(start: float, ttft: float, n: int, prompt: int) -> RequestRecord:
    r = RequestRecord(0, "t", 0, start, first_token=start + ttft,
                      last_token=start + ttft + 0.01 * (n - 1), end=start + ttft + 0.01 * n,
                      output_tokens=n, window_tokens=n, prompt_tokens=prompt, status=200)
    return r


def test_client_stats_counts_only_the_window() -> None:
    records = [_record(0.5, 9.0, 10, 100),  # warm-up: excluded from latency
               _record(1.0, 0.1, 10, 100), _record(2.0, 0.3, 10, 100)]
    records.append(RequestRecord(0, "t", 1, 3.0, end=3.1, status=502, error="HTTP 502"))
    stats = report.client_stats(LoadResult(records, (1.0, 11.0), 0.0, 10.0, 3))
    assert stats["requests"] == 3 and stats["ok"] == 2 and stats["failed"] == 1
    assert stats["ttft_mean_ms"] == 200.0
    assert stats["itl_mean_ms"] == 10.0
    assert report.percentile([1, 2, 3, 4], 50) == 2.5


def test_acceptance_checks() -> None:
    def run(strategy: str, ttft: float, tput: float) -> dict:
        return {"strategy": strategy, "concurrency": 160,
                "client": {"ttft_mean_ms": ttft, "total_tokens_per_s": tput}}
    runs = [run("Random", 3000, 1000), run("LeastLoad", 500, 2000), run("PrefixHash", 200, 2500)]
    assert all(c["met"] for c in report.acceptance(runs, control=False))
    assert not all(c["met"] for c in report.acceptance(runs, control=True))
    runs[1]["client"]["ttft_mean_ms"] = 100  # LeastLoad faster than PrefixHash: not between
    assert [c["met"] for c in report.acceptance(runs, control=False)] == [
        True, True, True, True, False, True]
