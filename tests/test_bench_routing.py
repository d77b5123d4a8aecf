"""The routing study's strategy variants and its system-prompt comparison: every variant is a
gateway config the real gateway accepts, presets expand, and the report shows TTFT mean/p99,
throughput and hit rate per strategy, judging the conversation key against the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import report
from bench.procs import gateway_config
from bench.studies.routing import (GATEWAY_SETTINGS, STRATEGIES, VARIANTS, build_parser,
                                   expand_strategies, settings_from_args)
from lb.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def _balancing(variant: str):
    strategy, extra = VARIANTS[variant]
    text = gateway_config({"m": ["127.0.0.1:9001"]}, 8123, strategy=strategy,
                          load_balancing=extra, settings=GATEWAY_SETTINGS)
    config = config_from_dict(yaml.safe_load(text))
    assert config.engine_metrics.interval_seconds == 0.5
    return config.models[0].spec.load_balancing


def test_each_variant_is_a_valid_gateway_config() -> None:
    lb = _balancing("PrefixHash+Conversation")
    assert (lb.strategy, lb.prefix_hash.prefix_from, lb.prefix_hash.prefix_char_length) == (
        "PrefixHash", "Conversation", 2000)
    assert lb.prefix_hash.mean_load_factor == 125
    lb = _balancing("PrefixHash+Tokens")
    assert (lb.strategy, lb.load_unit, lb.prefix_hash.prefix_from) == (
        "PrefixHash", "Tokens", "FirstUserMessage")
    assert _balancing("LeastQueue").strategy == "LeastQueue"
    lb = _balancing("PrefixHash")  # KubeAI's key, unchanged
    assert (lb.prefix_hash.prefix_from, lb.prefix_hash.prefix_char_length, lb.load_unit) == (
        "FirstUserMessage", 100, "Requests")


def test_conversation_key_length_is_a_setting_of_the_run() -> None:
    s = settings_from_args(build_parser().parse_args(["--conversation-chars", "100"]))
    strategy, extra = s.load_balancing("PrefixHash+Conversation")
    assert strategy == "PrefixHash" and extra["prefixHash"] == {
        "prefixFrom": "Conversation", "prefixCharLength": 100}
    assert VARIANTS["PrefixHash+Conversation"][1]["prefixHash"]["prefixCharLength"] == 2000
    assert s.load_balancing("PrefixHash+Tokens") == ("PrefixHash", {"loadUnit": "Tokens"})


def test_strategies_default_presets_and_unknown_names() -> None:
    s = settings_from_args(build_parser().parse_args([]))
    assert s.strategies == list(STRATEGIES) == ["Random", "LeastLoad", "PrefixHash"]
    assert expand_strategies(["all"]) == list(VARIANTS)
    assert expand_strategies(["kubeai", "LeastQueue", "Random"]) == [*STRATEGIES, "LeastQueue"]
    with pytest.raises(SystemExit):
        expand_strategies(["PrefixHash+Nope"])
    s = settings_from_args(build_parser().parse_args(
        ["--workload", "system-prompt", "--system-prompts", "1"]))
    assert s.concurrency == [20, 40] and (s.warmup_s, s.duration_s) == (15.0, 30.0)
    assert s.workload_params == {"prompts": 1}
    with pytest.raises(SystemExit):
        settings_from_args(build_parser().parse_args(["--system-prompts", "2"]))


def _run(strategy: str, conc: int, ttft: float, p99: float, hit: float,
         tokens_per_s: float = 1000.0) -> dict:
    return {"strategy": strategy, "concurrency": conc,
            "client": {"ttft_mean_ms": ttft, "ttft_p99_ms": p99, "total_tokens_per_s": tokens_per_s},
            "replicas": {"hit_rate": hit}}


def test_summary_table_and_conversation_checks() -> None:
    runs = [_run("PrefixHash+Conversation", 20, 150, 400, 0.93), _run("Random", 20, 3000, 9000, 0.3),
            _run("LeastQueue", 20, 2000, 5000, 0.31)]
    lines = report.summary_table(runs).splitlines()
    assert lines[0] == ("| strategy | threads | TTFT mean ms | TTFT p99 ms | total tokens/s | "
                        "prefix-cache hit rate |")
    assert lines[2] == "| Random (K8s Service) | 20 | 3,000 | 9,000 | 1,000 | 30% |"
    assert lines[-1] == "| PrefixHash+Conversation | 20 | 150 | 400 | 1,000 | 93% |"
    checks = report.acceptance(runs, control=False, workload="system-prompt")
    assert [c["met"] for c in checks] == [True, True]
    assert checks[0]["measured"] == pytest.approx(150 / 2000)
    runs[0]["replicas"]["hit_rate"] = 0.2
    assert [c["met"] for c in report.acceptance(runs, False, "system-prompt")] == [True, False]


def test_oracle_ratios_and_medians_of_rounds() -> None:
    runs = [_run("PrefixHash", 40, 900, 4000, 0.9), _run("CacheAware", 40, 400, 2000, 0.96),
            _run("Oracle", 40, 320, 2500, 0.96)]
    lines = report.summary_table(runs).splitlines()
    assert lines[0].endswith("| mean ÷ oracle | p99 ÷ oracle |")
    assert lines[2] == "| PrefixHash | 40 | 900 | 4,000 | 1,000 | 90% | 2.81 | 1.60 |"
    assert lines[4] == "| Oracle | 40 | 320 | 2,500 | 1,000 | 96% | 1.00 | 1.00 |"
    checks = report.acceptance(runs, control=False, workload="documents")
    oracle = [c for c in checks if "oracle" in c["target"]]
    assert len(oracle) == 1 and oracle[0]["measured"] == pytest.approx(400 / 320)
    assert not oracle[0]["met"]  # 1.25 > 1.15
    # three rounds: each figure is the median over them; the middle run's rows are kept
    rounds = [[_run("CacheAware", 40, ttft, p99, hit)]
              for ttft, p99, hit in ((500, 900, 0.9), (300, 3000, 0.8), (400, 1000, 0.95))]
    rounds[2][0]["replicas"]["per_replica"] = ["middle"]
    merged = report.median_runs(rounds)
    assert len(merged) == 1 and merged[0]["rounds"] == 3
    assert merged[0]["client"]["ttft_mean_ms"] == 400 and merged[0]["client"]["ttft_p99_ms"] == 1000
    assert merged[0]["replicas"] == {"hit_rate": 0.9, "per_replica": ["middle"]}
    assert merged[0]["ttft_mean_ms_rounds"] == [300, 400, 500]


def test_cache_aware_is_judged_at_the_knee_of_prefix_hashs_load_curve() -> None:
    """The knee is the first point where PrefixHash's throughput stops growing (< 10% over the
    previous point); CacheAware is judged there only, not below it (where nothing queues and no
    routing can gain 20%) nor past it."""
    curve = {80: (82, 250, 42_000), 160: (120, 470, 54_000), 200: (252, 900, 51_800),
             240: (906, 7000, 43_400)}
    runs = [_run("PrefixHash", c, ttft, p99, 0.9, tput) for c, (ttft, p99, tput) in curve.items()]
    runs += [_run("CacheAware", 80, 77, 240, 0.9, 42_000), _run("CacheAware", 160, 114, 210, 0.9, 54_000),
             _run("CacheAware", 200, 133, 400, 0.9, 56_500), _run("CacheAware", 240, 494, 5000, 0.9, 47_500)]
    assert report.knee(runs) == 200
    checks = report.acceptance(runs, control=False, workload="multi-turn")
    assert {c["target"].split(":")[0] for c in checks} == {"200 threads (the knee)"}
    assert [c["met"] for c in checks] == [True, True, True]
    assert checks[0]["measured"] == pytest.approx(133 / 252)
    # a sweep that never saturates PrefixHash is judged at its top
    assert report.knee([r for r in runs if r["concurrency"] <= 160]) == 160
    assert report.knee([r for r in runs if r["strategy"] == "CacheAware"]) is None


def test_the_oracle_needs_the_simulator() -> None:
    s = settings_from_args(build_parser().parse_args(["--strategies", "cache-aware",
                                                      "--rounds", "3"]))
    assert s.strategies[-1] == "Oracle" and s.rounds == 3
    with pytest.raises(SystemExit):
        settings_from_args(build_parser().parse_args(
            ["--strategies", "PrefixHash,Oracle", "--endpoints", "127.0.0.1:8000"]))


def test_system_prompt_study_end_to_end_with_every_variant(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "routing", "--profile", "fast", "--replicas", "2",
           "--workload", "system-prompt", "--system-prompts", "4", "--strategies", "all",
           "--concurrency", "4", "--warmup", "0.5", "--duration", "1.5", "--drain", "5",
           "--no-charts", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "system-prompt.json").read_text())
    assert [r["strategy"] for r in doc["runs"]] == list(VARIANTS)
    for run in doc["runs"]:
        assert run["client"]["failed"] == 0 and run["client"]["unfinished"] == 0, run
        assert run["client"]["ok"] > 0 and run["replicas"]["hit_rate"] > 0
    md = (tmp_path / "system-prompt.md").read_text()
    assert "| PrefixHash+Conversation | 4 |" in md and "prefix-cache hit rate" in md


def test_sigterm_stops_the_study_and_its_replicas_and_gateway(tmp_path: Path) -> None:
    import os
    import time

    from bench.procs import tree

    cmd = [sys.executable, "-m", "bench", "routing", "--profile", "fast", "--replicas", "2",
           "--concurrency", "2", "--warmup", "30", "--duration", "5", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        children: list[int] = []
        deadline = time.monotonic() + 30
        while len(children) < 2 and time.monotonic() < deadline:  # simulator and gateway up
            time.sleep(0.2)
            children = tree(proc.pid)[1:]
        assert len(children) >= 2
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
