"""The simulator's load gauges move as a real vLLM's do, over real HTTP: the waiting queue fills
when a burst exceeds `max_num_seqs` and empties after; KV usage counts the blocks live sequences
hold, not the cached-but-free ones; and a replica slowed by the `slowdown` fault queues under a
load an unslowed one absorbs. A queue-aware router and outlier ejection read exactly these."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from kvgate_sim import Replica, get_profile
from kvgate_sim.metrics import parse_metrics, sample_value

MODEL = "sim-llama"
# Slow enough steps that a burst is still in flight when the test looks (10 ms per step).
STEPPED = {"step_fixed_s": 0.01, "max_num_seqs": 4}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def start():
    """Factory: a `fast` replica with profile overrides, stopped after the test."""
    replicas: list[Replica] = []

    async def _start(**overrides: object) -> Replica:
        r = Replica(get_profile("fast", **overrides), MODEL)
        await r.start()
        replicas.append(r)
        return r

    yield _start
    for r in replicas:
        await r.stop()


async def gauges(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The three scheduler gauges a load-aware router reads, from /metrics."""
    async with http.get(url + "/metrics") as resp:
        m = parse_metrics(await resp.text())
    return {"waiting": sample_value(m, "vllm:num_requests_waiting"),
            "running": sample_value(m, "vllm:num_requests_running"),
            "kv": sample_value(m, "vllm:kv_cache_usage_perc")}


async def chat(http: aiohttp.ClientSession, url: str, content: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "ignore_eos": True}
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        return await resp.json()


async def sample_while(http: aiohttp.ClientSession, url: str, tasks: list[asyncio.Task]
                       ) -> dict[str, float]:
    """The highest value of each gauge, read every 20 ms until `tasks` are done."""
    peak = {"waiting": 0.0, "running": 0.0, "kv": 0.0}
    while not all(t.done() for t in tasks):
        for key, value in (await gauges(http, url)).items():
            peak[key] = max(peak[key], value)
        await asyncio.sleep(0.02)
    return peak


async def test_burst_beyond_max_num_seqs_queues_then_drains(start, http):
    r = await start(**STEPPED)
    burst = [asyncio.create_task(chat(http, r.url, f"question {i}", 30)) for i in range(12)]
    peak = await sample_while(http, r.url, burst)
    assert peak["running"] == 4  # max_num_seqs
    assert peak["waiting"] >= 6  # the rest of the burst waits its turn
    await asyncio.gather(*burst)
    after = await gauges(http, r.url)
    assert after == {"waiting": 0, "running": 0, "kv": 0}


async def test_kv_usage_counts_live_blocks_not_cached_free_ones(start, http):
    # 512 blocks; three ~1,600-token prompts hold ~100 blocks each while they run.
    r = await start(num_kv_blocks=512, **STEPPED)
    prompts = [f"document {i}: " + "the cache keeps what it computed. " * 190 for i in range(3)]
    running = [asyncio.create_task(chat(http, r.url, p, 40)) for p in prompts]
    peak = await sample_while(http, r.url, running)
    assert 0.5 < peak["kv"] < 0.7
    await asyncio.gather(*running)
    after = await gauges(http, r.url)
    async with http.get(r.url + "/sim/stats") as resp:
        engine = (await resp.json())["engine"]
    # vLLM's usage is 1 - free/total, and a cached block nobody references is free: the prefix
    # cache still holds the prompts, but usage is back to zero.
    assert after["kv"] == 0 and engine["kv_blocks_free"] == 512
    assert engine["kv_blocks_cached"] >= 290
    again = await chat(http, r.url, prompts[0], 2)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 1500


async def _open_loop(http: aiohttp.ClientSession, url: str, rate: float, seconds: float
                     ) -> tuple[float, float]:
    """Send requests at `rate`/s for `seconds` regardless of answers (users do not wait for one
    another); returns (largest waiting queue seen, engine's mean TTFT in seconds)."""
    tasks, peak = [], 0.0
    t_end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < t_end:
        tasks.append(asyncio.create_task(chat(http, url, f"user {i} asks", 10)))
        i += 1
        await asyncio.sleep(1.0 / rate)
        if i % 4 == 0:
            peak = max(peak, (await gauges(http, url))["waiting"])
    await asyncio.gather(*tasks)
    async with http.get(url + "/sim/stats") as resp:
        return peak, (await resp.json())["engine"]["ttft_mean_s"]


async def test_slowdown_fault_makes_the_queue_grow_under_load_others_absorb(start, http):
    # 4 sequences x ~11 steps of 10 ms: ~36 requests/s of capacity; offered 20/s.
    fast, slow = await start(**STEPPED), await start(**STEPPED)
    async with http.post(slow.url + "/sim/faults", json={"slowdown": 4}) as resp:
        assert (await resp.json())["slowdown"] == 4.0
    (fast_peak, fast_ttft), (slow_peak, slow_ttft) = await asyncio.gather(
        _open_loop(http, fast.url, 20, 1.5), _open_loop(http, slow.url, 20, 1.5))
    assert fast_peak <= 2  # the healthy replica keeps up
    assert slow_peak >= 8  # ~9 requests/s of capacity: the backlog grows all run long
    assert slow_ttft > 4 * fast_ttft
    assert (await gauges(http, slow.url))["waiting"] == 0  # and drains once the load stops


async def test_slowdown_is_validated_and_only_slows_the_engine(start, http):
    r = await start(**STEPPED)
    for bad in (0.5, 0, "x"):
        async with http.post(r.url + "/sim/faults", json={"slowdown": bad}) as resp:
            assert resp.status == 400
    t0 = time.perf_counter()
    await chat(http, r.url, "baseline", 10)
    base = time.perf_counter() - t0
    async with http.post(r.url + "/sim/faults", json={"slowdown": 3}) as resp:
        assert resp.status == 200
    t0 = time.perf_counter()
    await chat(http, r.url, "slowed", 10)
    assert time.perf_counter() - t0 > 2.5 * base
    async with http.get(r.url + "/health") as resp:
        assert resp.status == 200  # slow, not failing: health checks still pass
