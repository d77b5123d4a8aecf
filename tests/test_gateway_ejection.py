"""Outlier ejection: replicas that fail in a row are skipped for a growing, capped time.

The state machine is checked on a fake clock; its effect through real HTTP (the openai SDK
against the gateway, a refused port or a failing test server as the bad replica).
"""

from __future__ import annotations

import time

import pytest

from lb.ejection import EjectionConfig, Outliers
from tests.gateway_harness import GatewayHarness


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outliers(**config: float) -> tuple[Outliers, Clock]:
    clock = Clock()
    return Outliers(EjectionConfig(**config), clock), clock


def fail(out: Outliers, key: str, times: int, n: int = 4) -> list[bool]:
    return [out.failed(key, n) for _ in range(times)]


def test_ejected_after_n_consecutive_failures_and_back_when_time_is_up() -> None:
    out, clock = outliers(consecutive_failures=3, base_seconds=5, max_seconds=60)
    assert fail(out, "a", 3) == [False, False, True]
    assert set(out.current()) == {"a"}
    clock.now += 4.9
    assert set(out.current()) == {"a"}
    clock.now += 0.2
    assert out.current() == {}


def test_a_success_resets_the_count() -> None:
    out, _ = outliers(consecutive_failures=3)
    fail(out, "a", 2)
    out.succeeded("a")
    assert fail(out, "a", 2) == [False, False]
    assert out.current() == {}


def test_the_period_doubles_per_ejection_in_a_row_up_to_the_cap() -> None:
    out, clock = outliers(consecutive_failures=1, base_seconds=5, max_seconds=30)
    periods = []
    for _ in range(5):
        assert out.failed("a", 4)
        periods.append(out.current()["a"] - clock.now)
        clock.now = out.current()["a"]  # let back in, and at once it fails again
    assert periods == [5, 10, 20, 30, 30]
    assert out.ejections_total == 5


def test_a_replica_that_stayed_in_starts_the_doubling_afresh() -> None:
    out, clock = outliers(consecutive_failures=1, base_seconds=5, max_seconds=30)
    out.failed("a", 4)
    clock.now += 5  # back in
    out.failed("a", 4)
    assert out.current()["a"] - clock.now == 10
    clock.now += 10 + 31  # back in, and healthy for longer than maxSeconds
    out.failed("a", 4)
    assert out.current()["a"] - clock.now == 5


@pytest.mark.parametrize(("n", "percent", "allowed"), [(1, 50, 0), (2, 10, 1), (4, 50, 2),
                                                       (10, 30, 3), (4, 0, 1)])
def test_never_more_than_the_allowed_share_is_out(n, percent, allowed) -> None:
    out, _ = outliers(consecutive_failures=1, max_ejected_percent=percent)
    for i in range(n):
        out.failed(f"r{i}", n)
    assert len(out.current()) == allowed


def test_forgetting_a_replica_clears_its_record() -> None:
    out, _ = outliers(consecutive_failures=2)
    fail(out, "a", 2)
    fail(out, "b", 1)
    out.forget(["a", "b"])
    assert out.current() == {}
    assert fail(out, "b", 1) == [False]  # b's earlier failure is gone too


def test_zero_failures_turns_ejection_off() -> None:
    out, _ = outliers(consecutive_failures=0)
    assert not any(fail(out, "a", 50))


# -- through the gateway ---------------------------------------------------------------------


def chat(gw: GatewayHarness, content: str) -> str:
    response = gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}])
    return response.system_fingerprint


def connect_retries(gw: GatewayHarness) -> float:
    return gw.metric("kvgate_upstream_retries_total", model="m", reason="connect")


def test_a_dead_replica_costs_at_most_n_failed_attempts_per_ejection(make_gateway) -> None:
    gw = make_gateway({"ejection": {"consecutiveFailures": 3, "baseSeconds": 60}})
    good = [gw.backend(f"good{i}") for i in range(3)]
    gw.model_with("m", [gw.refusing_endpoint("dead"), *good], strategy="PrefixHash")
    prompt = gw.prefix_for("m", "dead")
    served = [chat(gw, f"{prompt}") for _ in range(40)]
    served += [chat(gw, f"other prompt {i}") for i in range(40)]
    assert set(served) <= {"good0", "good1", "good2"}  # every request answered
    assert connect_retries(gw) == 3
    assert gw.metric("kvgate_endpoint_ejected", model="m", endpoint="dead") == 1
    assert gw.metric("kvgate_endpoint_ejected", model="m", endpoint="good0") == 0
    assert gw.metric("kvgate_endpoint_ejections_total", model="m") == 1
    gw.settle()


def test_a_replica_is_readmitted_once_its_time_is_up(make_gateway) -> None:
    gw = make_gateway({"ejection": {"consecutiveFailures": 2, "baseSeconds": 0.5}})
    flaky, other = gw.backend("flaky"), gw.backend("other")
    gw.model_with("m", [flaky, other], strategy="PrefixHash")
    gw.loop.call(flaky.fail_next, 2, 503)
    prompt = gw.prefix_for("m", "flaky")
    assert [chat(gw, prompt) for _ in range(2)] == ["other", "other"]  # 503, retried
    assert gw.metric("kvgate_endpoint_ejected", model="m", endpoint="flaky") == 1
    assert chat(gw, prompt) == "other"  # ejected: not even tried
    assert flaky.total_calls == 2
    time.sleep(0.6)
    assert chat(gw, prompt) == "flaky"  # recovered, and its prefix comes home
    assert gw.metric("kvgate_endpoint_ejected", model="m", endpoint="flaky") == 0
    gw.settle()


def test_an_ejected_replica_still_serves_what_only_it_can(make_gateway) -> None:
    gw = make_gateway({"ejection": {"consecutiveFailures": 1, "baseSeconds": 60}})
    lora, plain = gw.backend("lora"), gw.backend("plain")
    gw.add_model("m", strategy="PrefixHash", adapters=["sql"])
    gw.set_endpoints("m", [lora.endpoint("sql"), plain.endpoint()])
    gw.loop.call(lora.fail_next, 1, 500)
    prompt = gw.prefix_for("m", "lora")
    assert chat(gw, prompt) == "plain"
    assert gw.metric("kvgate_endpoint_ejected", model="m", endpoint="lora") == 1
    response = gw.client().chat.completions.create(
        model="m_sql", messages=[{"role": "user", "content": "hello"}])
    assert response.system_fingerprint == "lora"
    gw.settle()


def test_half_the_replicas_at_most_are_ejected_when_all_fail(make_gateway) -> None:
    gw = make_gateway({"ejection": {"consecutiveFailures": 1, "baseSeconds": 60,
                                    "maxEjectedPercent": 50},
                       "retries": {"maxRetries": 0}})
    backends = [gw.backend(f"b{i}", status=503) for i in range(4)]
    gw.model_with("m", backends, strategy="LeastLoad")
    for i in range(12):
        status, _, _ = gw.post_json("/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": f"q{i}"}]})
        assert status == 503
    ejected = [gw.metric("kvgate_endpoint_ejected", model="m", endpoint=b.name) for b in backends]
    assert sum(ejected) == 2
    gw.settle()
