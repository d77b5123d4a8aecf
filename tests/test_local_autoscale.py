"""The autoscaler inside `kvgate up`, for real: a subprocess with simulated replicas, load sent
through the gateway with the official `openai` SDK, replica counts read from the status file.
Short cadence (modelAutoscaling in the config file, scaleDownDelaySeconds on the Model) keeps
each test to seconds. Besides the request count, the replicas' KV-cache usage, as the gateway
re-exports it, scales a model."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from tests.local_harness import UpProcess, sim_model, wait_for

# One engine step every ~20 ms (the fast profile at time scale 100) and no early end of text:
# a 120-token stream stays in flight for a couple of seconds.
SLOW = ("--time-scale", "100", "--natural-output-tokens", "100000")
CONFIG: dict[str, Any] = {
    "modelAutoscaling": {"interval": "200ms", "timeWindow": "600ms"},
    "local": {"gracePeriodSeconds": 5, "reloadIntervalSeconds": 0.2},
}


def burst_model(delay: int = 1) -> dict[str, Any]:
    return sim_model("burst", min_replicas=0, max_replicas=3, args=SLOW, targetRequests=1,
                     scaleDownDelaySeconds=delay)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    process = UpProcess(tmp_path, [burst_model()], config=CONFIG)
    try:
        process.wait_output("kvgate: ready:")
        yield process
    finally:
        process.close()


def client(up: UpProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=60)


def stream(up: UpProcess, tokens: int, errors: list[str]) -> None:
    try:
        chunks = list(client(up).chat.completions.create(
            model="burst", max_tokens=tokens, stream=True,
            messages=[{"role": "user", "content": "Tell me a long story"}]))
        assert any(c.choices and c.choices[0].delta.content for c in chunks)
    except Exception as exc:  # asserted on by the test
        errors.append(repr(exc))


def counts(up: UpProcess) -> tuple[int, int] | None:
    """(desired, ready) of the burst model."""
    model = up.model("burst")
    return None if model is None else (model["desired"], model["ready"])


def test_load_scales_from_zero_up_to_max_then_back_to_zero(up: UpProcess) -> None:
    # status.json is written beside the "ready" line, not before it
    wait_for(lambda: counts(up) == (0, 0), 10, "the model at zero in the status file")
    errors: list[str] = []
    threads = [threading.Thread(target=stream, args=(up, 120, errors)) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # 4 requests in flight at targetRequests 1: from zero, then up to maxReplicas (3).
        wait_for(lambda: counts(up) == (3, 3), 25, "3 ready replicas under load")
        assert "autoscaler: burst -> 3 replicas" in up.output
    finally:
        for thread in threads:
            thread.join(60)
    assert errors == []
    # Idle: one window for the average to fall, then scaleDownDelaySeconds (1 s) of low readings.
    wait_for(lambda: counts(up) == (0, 0), 15, "scale back to zero")
    assert "autoscaler: burst -> 0 replicas" in up.output
    state = json.loads((up.state_dir / "autoscaler.json").read_text())
    assert state["models"]["burst"]["readings"]
    assert "failed" not in up.output and "skipping this tick" not in up.output  # every scrape answered


def test_replica_counts_and_autoscaler_state_survive_a_restart(tmp_path: Path) -> None:
    # First run: a long delay, so the replica started by the first request stays.
    first = UpProcess(tmp_path, [burst_model(delay=60)], config=CONFIG)
    try:
        first.wait_output("kvgate: ready:")
        reply = client(first).chat.completions.create(
            model="burst", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        wait_for(lambda: counts(first) == (1, 1), 15, "one replica after scale from zero")
        wait_for(lambda: (tmp_path / "state" / "autoscaler.json").exists(), 5, "autoscaler state")
    finally:
        first.close()
    saved = json.loads((tmp_path / "state" / "replicas.json").read_text())
    assert saved["models"]["burst"]["replicas"] == 1

    # Second run, same state directory, a 1 s delay: the replica comes back without a request,
    # then the restored (idle) autoscaler takes it to zero. No metrics port this time: the
    # autoscaler reads the gateway's metrics in-process (were they unreadable, every tick would
    # be skipped and nothing would scale down).
    second = UpProcess(tmp_path, [burst_model(delay=1)], config=CONFIG, metrics_port=False)
    try:
        second.wait_output("kvgate: ready:")
        # (Whether it gets to ready first depends on how much idle time the restored state
        # already counts toward the delay.)
        assert "resuming 1 replicas" in second.output
        second.wait_output("replica burst-1: started")
        wait_for(lambda: counts(second) == (0, 0), 15, "scale to zero after the delay")
        second.wait_output("autoscaler: burst -> 0 replicas", timeout=5)
        assert "skipping this tick" not in second.output
    finally:
        second.close()


# 64 KV blocks of 16 tokens: a ~460-token prompt fills half the cache; one token every ~20 ms.
SMALL_KV = ("--kv-blocks", "64", *SLOW)
KV_CONFIG: dict[str, Any] = {
    "modelAutoscaling": {"interval": "200ms", "timeWindow": "600ms", "includeEngineWaiting": True,
                         "targetKVCacheUsage": 0.4},
    "engineMetrics": {"intervalSeconds": 0.5},
    "local": {"gracePeriodSeconds": 5, "reloadIntervalSeconds": 0.2},
}


def kv_usage(up: UpProcess, name: str) -> float:
    """The highest KV usage among the model's replicas, as the gateway last read it."""
    model = up.model(name) or {}
    return max([(r.get("engine") or {}).get("kvUsage", 0.0) for r in model.get("replicas", ())] or [0.0])


def test_kv_cache_usage_scales_a_local_model_up_then_back(tmp_path: Path) -> None:
    """One request (targetRequests 100: one replica by count) whose prompt fills the replica's
    KV cache: more replicas; once it ends, back to minReplicas."""
    model = sim_model("longctx", min_replicas=1, max_replicas=3, args=SMALL_KV, targetRequests=100,
                      scaleDownDelaySeconds=1)
    up = UpProcess(tmp_path, [model], config=KV_CONFIG)
    errors: list[str] = []

    def long_request() -> None:
        try:
            reply = client(up).chat.completions.create(
                model="longctx", max_tokens=500, messages=[{"role": "user", "content": "x" * 1800}])
            assert reply.choices[0].message.content
        except Exception as exc:  # asserted on by the test
            errors.append(repr(exc))

    try:
        up.wait_output("kvgate: ready:")
        wait_for(lambda: (up.model("longctx") or {}).get("ready") == 1, 10, "one ready replica")
        thread = threading.Thread(target=long_request)
        thread.start()
        try:
            wait_for(lambda: kv_usage(up, "longctx") > 0.4, 10, "the replica's KV usage read")
            up.wait_output("autoscaler: longctx -> 2 replicas", 10)
            wait_for(lambda: up.model("longctx")["desired"] >= 2, 5, "KV scale-up")
        finally:
            thread.join(60)
        assert errors == []
        # The request is done and its blocks freed: the next readings say 0, then the delay.
        up.wait_output("autoscaler: longctx -> 1 replicas", 15)
        wait_for(lambda: up.model("longctx")["desired"] == 1, 5, "back to minReplicas")
        state = json.loads((up.state_dir / "autoscaler.json").read_text())
        assert state["models"]["longctx"]["kv"] == [0.0, 0.0, 0.0]  # the KV window is kept too
    finally:
        up.close()
