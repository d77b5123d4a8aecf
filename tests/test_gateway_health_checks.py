"""Active health checks: a replica that fails its health path is left out of picks until it
passes again, so requests whose keys hash to a dead replica stop paying a retry.

Through real HTTP: a static gateway (`kvgate gateway`'s registry) in front of simulated vLLM
replicas, killed and restarted or made to fail ``/health`` (``POST /sim/faults``), and the
harness's test backends where a check must hang or a round must be driven one at a time.
Passive ejection is turned off where the point is what health checks do on their own.
"""

from __future__ import annotations

import collections
import functools
import http.client
import json
import logging
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import pytest
from kvgate_sim.cluster import Replica
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import free_port, gateway_config, wait_for_port
from lb.config import Config, ConfigError, config_from_dict
from lb.health_checks import HealthChecker
from lb.ring import Ring
from tests.gateway_harness import Backend, GatewayHarness, LoopThread, model_manifest

# Short enough for quick tests, long enough that a loaded machine answers a check in time.
FAST = {"intervalSeconds": 0.25, "timeoutSeconds": 0.25, "unhealthyThreshold": 2,
        "healthyThreshold": 2}
NO_EJECTION = {"consecutiveFailures": 0}
CHAT = "/v1/chat/completions"


# -- config ---------------------------------------------------------------------------------------


def test_off_by_default() -> None:
    checks = Config().health_checks
    assert (checks.interval_seconds, checks.enabled) == (0, False)
    assert (checks.path, checks.timeout_seconds) == ("/health", 1.0)
    assert (checks.unhealthy_threshold, checks.healthy_threshold) == (2, 2)
    on = config_from_dict({"healthChecks": {"intervalSeconds": 5, "path": "/ready"}}).health_checks
    assert (on.enabled, on.interval_seconds, on.path) == (True, 5.0, "/ready")


@pytest.mark.parametrize(("section", "message"), [
    ({"intervalSeconds": -1}, "healthChecks.intervalSeconds: must be >= 0, got -1.0"),
    ({"intervalSeconds": "often"}, "healthChecks.intervalSeconds: expected a number, got 'often'"),
    ({"timeoutSeconds": 0}, "healthChecks.timeoutSeconds: must be > 0, got 0.0"),
    ({"path": "health"}, "healthChecks.path: must match ^/.*$, got 'health'"),
    ({"unhealthyThreshold": 0}, "healthChecks.unhealthyThreshold: must be >= 1, got 0"),
    ({"healthyThreshold": 1.5}, "healthChecks.healthyThreshold: expected an integer, got 1.5"),
    ({"healthyThreshold": 1000}, "healthChecks.healthyThreshold: must be <= 100, got 1000"),
    ({"intervalSeconds": 1, "timeoutSeconds": 2},
     "healthChecks.timeoutSeconds: must be at most healthChecks.intervalSeconds (1): a check "
     "must end before the next is due"),
    ({"interval": 1}, "healthChecks.interval: unknown key; did you mean 'intervalSeconds'?"),
    (5, "healthChecks: expected a mapping, got 5"),
])
def test_bad_settings_name_the_key(section: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"healthChecks": section})
    assert message in str(info.value)


def test_a_timeout_longer_than_the_interval_is_fine_while_checks_are_off() -> None:
    assert not config_from_dict({"healthChecks": {"timeoutSeconds": 30}}).health_checks.enabled


# -- simulated replicas behind a static gateway ------------------------------------------------


@pytest.fixture
def replicas(loop_thread: LoopThread) -> Iterator[dict[str, Replica]]:
    """Three simulated vLLM replicas serving model `m`, on the gateway's loop thread (so the
    test's own thread may block on HTTP calls without stalling them)."""
    started = {f"r{i}": loop_thread.run(Replica("fast", "m").start()) for i in range(3)}
    yield started
    for replica in started.values():
        loop_thread.run(replica.stop())


def static_gateway(make_gateway: Callable[..., GatewayHarness], replicas: dict[str, Replica],
                   checks: dict[str, Any] | None) -> GatewayHarness:
    config = {"models": [model_manifest("m", strategy="PrefixHash")],
              "endpoints": {"m": [{"key": key, "address": r.address}
                                  for key, r in replicas.items()]},
              "ejection": NO_EJECTION}
    if checks is not None:
        config["healthChecks"] = checks
    return make_gateway(config, static=True)


def ask(gw: GatewayHarness, prompt: str, n: int) -> None:
    client = gw.client()
    for _ in range(n):
        response = client.chat.completions.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": prompt}])
        assert response.choices[0].message.content is not None


def served(replica: Replica) -> int:
    """Chat requests the replica received (0 for a stopped one)."""
    if not replica.running:
        return 0
    return replica.snapshot()["http"]["by_path"].get(CHAT, 0)


def healthy(gw: GatewayHarness, endpoint: str) -> float | None:
    values = [v for labels, v in gw.scrape().get("kvgate_endpoint_healthy", [])
              if labels == {"model": "m", "endpoint": endpoint}]
    return values[0] if values else None


def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def connect_retries(gw: GatewayHarness) -> float:
    return gw.metric("kvgate_upstream_retries_total", model="m", reason="connect")


def test_a_killed_replica_is_taken_off_and_returns_when_restarted(make_gateway, replicas,
                                                                   loop_thread, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lb.health_checks")
    gw = static_gateway(make_gateway, replicas, FAST)
    dead = replicas["r1"]
    prompt = gw.prefix_for("m", "r1")
    assert all(healthy(gw, key) == 1 for key in replicas)
    ask(gw, prompt, 3)
    assert served(dead) == 3  # its keys' home

    loop_thread.run(dead.stop())
    until(lambda: healthy(gw, "r1") == 0, "the dead replica to be marked unhealthy")
    ask(gw, prompt, 30)
    assert connect_retries(gw) == 0  # nothing tried the dead replica
    assert served(replicas["r0"]) + served(replicas["r2"]) == 30
    assert [healthy(gw, "r0"), healthy(gw, "r2")] == [1, 1]

    loop_thread.run(dead.start())  # the same port, a fresh server
    until(lambda: healthy(gw, "r1") == 1, "the restarted replica to be healthy again")
    ask(gw, prompt, 5)
    assert served(dead) == 5  # its keys came home
    assert connect_retries(gw) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "lb.health_checks"]
    assert any("replica r1" in m and "unhealthy after 2 failed health checks" in m
               for m in messages), messages
    assert any("replica r1" in m and "healthy again after 2 passed" in m for m in messages)
    gw.settle()


def test_without_checks_a_dead_replica_costs_a_retry_per_request(make_gateway, replicas,
                                                                 loop_thread) -> None:
    """The same outage with checks off (and ejection off): what the checks save."""
    gw = static_gateway(make_gateway, replicas, None)
    prompt = gw.prefix_for("m", "r1")
    loop_thread.run(replicas["r1"].stop())
    ask(gw, prompt, 30)
    assert connect_retries(gw) == 30
    assert healthy(gw, "r1") is None  # no checks, no gauge
    gw.settle()


def test_a_replica_failing_its_health_path_is_avoided_while_it_still_answers(
        make_gateway, replicas) -> None:
    gw = static_gateway(make_gateway, replicas, FAST)
    sick = replicas["r2"]
    prompt = gw.prefix_for("m", "r2")
    set_faults(sick, {"unhealthy": True})
    until(lambda: healthy(gw, "r2") == 0, "the replica to fail its checks")
    ask(gw, prompt, 20)
    assert served(sick) == 0  # it would have answered: the checks alone kept it out
    assert served(replicas["r0"]) + served(replicas["r1"]) == 20

    set_faults(sick, {"unhealthy": False})
    until(lambda: healthy(gw, "r2") == 1, "the replica to pass its checks again")
    ask(gw, prompt, 4)
    assert served(sick) == 4
    gw.settle()


def set_faults(replica: Replica, faults: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{replica.url}/sim/faults", json.dumps(faults).encode(),
                                     {"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


# -- test backends ------------------------------------------------------------------------------


def chat(gw: GatewayHarness, content: str, model: str = "m") -> str:
    response = gw.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}])
    return response.system_fingerprint


def test_off_by_default_no_check_is_sent(gw: GatewayHarness) -> None:
    backends = [gw.backend("a"), gw.backend("b")]
    gw.model_with("m", backends, strategy="PrefixHash")
    for i in range(4):
        chat(gw, f"question {i}")
    time.sleep(0.5)  # a first round would have gone out at start-up
    assert [b.calls["/health"] for b in backends] == [0, 0]
    assert "kvgate_endpoint_healthy" not in gw.scrape()
    gw.settle()


def test_a_check_that_hangs_fails_like_a_refused_one(make_gateway) -> None:
    gw = make_gateway({"healthChecks": FAST, "ejection": NO_EJECTION})
    hung, refusing, good = gw.backend("hung"), gw.refusing_endpoint("refusing"), gw.backend("good")
    hung.health_delay = 30.0
    gw.model_with("m", [hung, refusing, good], strategy="PrefixHash")
    until(lambda: healthy(gw, "hung") == 0 and healthy(gw, "refusing") == 0,
          "the hung and the refusing replica to be unhealthy")
    assert healthy(gw, "good") == 1
    assert {chat(gw, gw.prefix_for("m", key)) for key in ("hung", "refusing")} == {"good"}
    assert hung.calls[CHAT] == 0
    assert connect_retries(gw) == 0
    gw.settle()


def test_when_every_replica_is_unhealthy_one_still_serves(make_gateway) -> None:
    gw = make_gateway({"healthChecks": FAST, "ejection": NO_EJECTION})
    a, b = gw.backend("a"), gw.backend("b")
    a.health_status = b.health_status = 503
    gw.model_with("m", [a, b], strategy="PrefixHash")
    until(lambda: healthy(gw, "a") == 0 and healthy(gw, "b") == 0, "both to be unhealthy")
    # Better to try one than to wait forever: each request goes to its own key's replica.
    assert chat(gw, gw.prefix_for("m", "a")) == "a"
    assert chat(gw, gw.prefix_for("m", "b")) == "b"
    gw.settle()


def test_an_unhealthy_replica_still_serves_what_only_it_can(make_gateway) -> None:
    gw = make_gateway({"healthChecks": FAST, "ejection": NO_EJECTION})
    lora, plain = gw.backend("lora"), gw.backend("plain")
    lora.health_status = 500
    gw.add_model("m", strategy="PrefixHash", adapters=["sql"])
    gw.set_endpoints("m", [lora.endpoint("sql"), plain.endpoint()])
    until(lambda: healthy(gw, "lora") == 0, "the adapter's replica to be unhealthy")
    assert chat(gw, gw.prefix_for("m", "lora")) == "plain"
    assert chat(gw, "anything", model="m_sql") == "lora"
    gw.settle()


# -- one round at a time --------------------------------------------------------------------------


def rounds(gw: GatewayHarness, n: int) -> set[str]:
    """Run ``n`` rounds of the gateway's checker (its task is off: interval 0) and return the
    unhealthy keys of model `m`."""
    checker: HealthChecker = gw.gateway.health_checker

    async def run() -> set[str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(n):
                await checker.check_once(session)
        return set(gw.registry.group("m").unhealthy)

    return gw.run(run())


def test_thresholds_count_checks_in_a_row(make_gateway) -> None:
    gw = make_gateway({"healthChecks": {"unhealthyThreshold": 3, "healthyThreshold": 2}})
    flaky, steady = gw.backend("flaky"), gw.backend("steady")
    gw.model_with("m", [flaky, steady], strategy="PrefixHash")
    flaky.health_status = 503
    assert rounds(gw, 2) == set()
    flaky.health_status = 200
    assert rounds(gw, 1) == set()  # a pass breaks the run of failures
    flaky.health_status = 503
    assert rounds(gw, 2) == set()
    assert rounds(gw, 1) == {"flaky"}  # three in a row
    flaky.health_status = 200
    assert rounds(gw, 1) == {"flaky"}
    flaky.health_status = 503
    assert rounds(gw, 1) == {"flaky"}  # a failure breaks the run of passes
    flaky.health_status = 200
    assert rounds(gw, 1) == {"flaky"}
    assert rounds(gw, 1) == set()  # two in a row
    assert flaky.calls["/health"] == steady.calls["/health"] == 10
    assert chat(gw, gw.prefix_for("m", "flaky")) == "flaky"
    gw.settle()


def test_a_replica_that_leaves_and_returns_starts_healthy(make_gateway) -> None:
    gw = make_gateway({"healthChecks": {"unhealthyThreshold": 1, "healthyThreshold": 1}})
    sick, other = gw.backend("sick"), gw.backend("other")
    sick.health_status = 503
    gw.model_with("m", [sick, other], strategy="PrefixHash")
    assert rounds(gw, 1) == {"sick"}
    gw.set_endpoints("m", [other])
    assert gw.on_loop(lambda: set(gw.registry.group("m").unhealthy)) == set()
    gw.set_endpoints("m", [sick, other])
    assert chat(gw, gw.prefix_for("m", "sick")) == "sick"  # in picks until a check says not
    assert rounds(gw, 1) == {"sick"}
    gw.settle()


# -- `kvgate gateway` as a real process -----------------------------------------------------------


def test_the_gateway_command_refuses_a_bad_section_clearly(tmp_path: Path) -> None:
    path = tmp_path / "kvgate.yaml"
    path.write_text("healthChecks:\n  intervalSeconds: 1\n  timeoutSeconds: 5\n")
    result = subprocess.run([sys.executable, "-m", "kvgate", "gateway", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert re.search(r"kvgate\.yaml(:\d+)?: healthChecks\.timeoutSeconds: must be at most "
                     r"healthChecks\.intervalSeconds \(1\)", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_with_workers_each_checks_on_its_own(loop_thread: LoopThread, tmp_path: Path) -> None:
    """`kvgate gateway --workers 2`: a replica failing its checks is left out by both workers
    (requests over many connections, which the kernel spreads over both, never reach it), then
    let back in by both; the metrics port (worker 0's) shows the gauge."""
    sick, well = (loop_thread.run(_started(Backend(name, collections.Counter())))
                  for name in ("sick", "well"))
    sick.health_status = 503
    port, metrics_port = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_config({"m": [sick.address, well.address]}, port,
                                   metrics_port=metrics_port,
                                   settings={"healthChecks": FAST, "ejection": NO_EJECTION}))
    gateway = subprocess.Popen([sys.executable, "-m", "kvgate", "gateway", "-c", str(path),
                                "--workers", "2"])
    try:
        for p in (port, metrics_port):
            wait_for_port(p)
        keys = {"sick": f"m/{sick.address}", "well": f"m/{well.address}"}
        ring = Ring()
        for key in keys.values():
            ring.add(key)
        prompt = next(p for p in (f"prompt {i}" for i in range(5000))
                      if ring.pick(p) == keys["sick"])
        gauge = functools.partial(_scraped_gauge, metrics_port)

        until(lambda: gauge(keys["sick"]) == 0, "worker 0 to mark the replica unhealthy")
        assert gauge(keys["well"]) == 1
        _more_checks(sick)  # a few rounds of both workers: each has seen its two failures
        assert _post_many(port, prompt) == {"well": 40}
        assert sick.calls[CHAT] == 0

        sick.health_status = 200
        until(lambda: gauge(keys["sick"]) == 1, "worker 0 to let the replica back in")
        _more_checks(sick)
        assert _post_many(port, prompt) == {"sick": 40}
    finally:
        gateway.terminate()
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            gateway.kill()
        for backend in (sick, well):
            loop_thread.run(backend.close())


async def _started(backend: Backend) -> Backend:
    await backend.start()
    return backend


def _scraped_gauge(metrics_port: int, endpoint: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kvgate_endpoint_healthy" and sample.labels["endpoint"] == endpoint:
                return sample.value
    return None


def _more_checks(backend: Backend, n: int = 20) -> None:
    """Wait for ``n`` more checks of ``backend`` (from any worker)."""
    target = backend.calls["/health"] + n
    until(lambda: backend.calls["/health"] >= target, f"{n} more health checks")


def _post_many(port: int, prompt: str, connections: int = 8, each: int = 5) -> dict[str, int]:
    """Chat requests over several connections, which the kernel spreads over the workers; one
    at a time, so the ring's load bound never moves one off its key's replica. How many each
    backend answered."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    answered: collections.Counter[str] = collections.Counter()
    for _ in range(connections):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(each):
            conn.request("POST", CHAT, body, {"content-type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200
            answered[json.loads(response.read())["system_fingerprint"]] += 1
        conn.close()
    return dict(answered)
