"""The replicas' own metrics: read off the request path, re-exported, aged out, and used by
LeastQueue to keep requests off a replica that is busy with load this gateway did not send."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable

import aiohttp
import pytest
from kvgate_sim import get_profile
from kvgate_sim.cluster import Replica

from lb.engine_metrics import parse_reading
from lb.registry import Endpoint
from tests.gateway_harness import GatewayHarness

FAST_SCRAPES = {"engineMetrics": {"intervalSeconds": 0.05, "staleAfterSeconds": 0.5}}

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_count{model_name="m"} 9.0
"""


def test_a_vllm_page_reads_as_sums_over_engines_with_the_old_kv_name() -> None:
    first = parse_reading(VLLM_PAGE, 10.0, None)
    assert (first.running, first.waiting, first.kv_usage) == (5.0, 7.0, 0.25)
    assert (first.prefix_hits, first.prefix_queries, first.prefix_hit_rate) == (600, 1000, None)
    later = parse_reading(VLLM_PAGE.replace("1000.0", "1400.0").replace("600.0", "900.0"),
                          12.0, first)
    assert later.prefix_hit_rate == pytest.approx(300 / 400)


@pytest.mark.parametrize("page", ["", "{\"ok\": true}", "# TYPE foo gauge\nfoo 1\n"])
def test_a_page_without_vllm_gauges_is_refused(page: str) -> None:
    with pytest.raises(ValueError):
        parse_reading(page, 0.0, None)


def engine(gw: GatewayHarness, name: str, endpoint: str) -> float | None:
    scraped = gw.scrape()
    values = [v for labels, v in scraped.get(name, []) if labels.get("endpoint") == endpoint]
    return values[0] if values else None


def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll from the test's thread (a scrape is an HTTP request the gateway's loop serves)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def ask(gw: GatewayHarness, i: int) -> str:
    return gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"question {i}"}]).system_fingerprint


@pytest.mark.parametrize("strategy", ["LeastQueue", "LeastLoad"])
def test_least_queue_avoids_a_replica_busy_with_other_traffic(make_gateway, strategy) -> None:
    gw = make_gateway(FAST_SCRAPES)
    busy, idle = gw.backend("busy"), gw.backend("idle")
    busy.engine_waiting, busy.engine_kv = 12, 0.9  # queued by clients this gateway never saw
    gw.model_with("m", [busy, idle], strategy=strategy)
    until(lambda: engine(gw, "kvgate_engine_requests_waiting", "busy") == 12,
          "the busy replica's queue to be scraped")
    served = [ask(gw, i) for i in range(20)]
    if strategy == "LeastQueue":
        assert served.count("busy") == 0
    else:  # this gateway's own counts are even: it alternates
        assert served.count("busy") == 10
    assert engine(gw, "kvgate_engine_kv_cache_usage", "busy") == pytest.approx(0.9)
    gw.settle()


def test_a_replica_whose_metrics_stop_ages_out(make_gateway) -> None:
    gw = make_gateway(FAST_SCRAPES)
    busy, idle = gw.backend("busy"), gw.backend("idle")
    busy.engine_waiting = 12
    gw.model_with("m", [busy, idle], strategy="LeastQueue")
    until(lambda: engine(gw, "kvgate_engine_requests_waiting", "busy") == 12,
          "the busy replica's queue to be scraped")
    busy.engine_metrics_broken = True
    until(lambda: engine(gw, "kvgate_engine_requests_waiting", "busy") is None,
          "the stale reading to age out")
    assert gw.metric("kvgate_engine_scrape_failures_total", model="m") > 0
    served = [ask(gw, i) for i in range(10)]
    assert served.count("busy") == 5  # unknown again: in-flight counts only
    gw.settle()


def test_scraping_off_sends_no_request_to_the_replicas(make_gateway) -> None:
    gw = make_gateway({"engineMetrics": {"intervalSeconds": 0}})
    backend = gw.backend("r")
    gw.model_with("m", [backend], strategy="LeastQueue")
    assert ask(gw, 0) == "r"
    assert backend.scrapes == 0
    assert engine(gw, "kvgate_engine_requests_waiting", "r") is None
    gw.settle()


async def test_least_queue_keeps_off_a_slowed_simulated_replica_that_others_keep_busy(
        make_gateway) -> None:
    """Two simulated vLLM replicas; one is slowed (its engine steps take 20× as long) and kept
    busy by clients that call it directly, so its own queue grows where this gateway sees no
    in-flight request of its own. LeastQueue reads that queue and sends every request to the
    other replica."""
    gw = make_gateway(FAST_SCRAPES)
    profile = dataclasses.replace(get_profile("fast"), max_num_seqs=2)
    slow, quick = (await Replica(profile, "m", faults={"slowdown": 20.0}).start(),
                   await Replica(profile, "m").start())
    try:
        gw.model_with("m", [Endpoint("slow", slow.address), Endpoint("quick", quick.address)],
                      strategy="LeastQueue")
        async with aiohttp.ClientSession() as direct:
            busy = [asyncio.ensure_future(_long_stream(direct, slow.url)) for _ in range(6)]
            await _until_async(lambda: _engine(gw, "slow") >= 3, "the slowed replica's queue")
            async with gw.async_client() as client:
                for i in range(20):
                    await client.chat.completions.create(
                        model="m", max_tokens=2, messages=[{"role": "user", "content": f"q{i}"}])
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
        finished = {name: r.snapshot()["engine"]["requests_finished"] for name, r in
                    (("slow", slow), ("quick", quick))}
        assert finished["quick"]["stop"] + finished["quick"]["length"] == 20
        # The slowed replica finished nothing: the direct clients' streams were cancelled.
        assert finished["slow"]["stop"] + finished["slow"]["length"] == 0
    finally:
        await slow.stop()
        await quick.stop()
    await gw.asettle()


async def _long_stream(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(f"{url}/v1/completions", json={
            "model": "m", "prompt": "a long story", "max_tokens": 4000, "ignore_eos": True,
            "stream": True}) as resp:
        async for _ in resp.content:
            pass


def _engine(gw: GatewayHarness, endpoint: str) -> float:
    return engine(gw, "kvgate_engine_requests_waiting", endpoint) or 0.0


async def _until_async(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
