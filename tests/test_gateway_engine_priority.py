"""Priority scheduling in the engine (``loadBalancing.priorityScheduling``): the gateway puts
each request's class on the body as vLLM's ``priority`` (minus the class's priority, so higher
classes are admitted first by an engine run with ``--scheduling-policy priority``), in place of
any the client sent; a Model without it forwards the client's body as it came."""

from __future__ import annotations

import openai
import pytest

from kvgate_sim import get_profile
from tests.test_gateway_api_keys import write_keys

HEADER = "X-Kvgate-Priority"
HI = [{"role": "user", "content": "hi"}]


def test_each_class_reaches_the_engine_as_vllm_priority(gw):
    backend = gw.backend("b")
    gw.model_with("m", [backend], priority_scheduling=True)
    client = gw.client()
    for header, expected in ((None, -100), ("critical", -200), ("batch", 0)):
        client.chat.completions.create(
            model="m", messages=HI, max_tokens=2,
            extra_headers={HEADER: header} if header else None,
            extra_body={"priority": -1000})  # the client's own value never reaches the engine
        assert backend.last.json["priority"] == expected, header
        assert backend.last.json["model"] == "m"
    gw.settle()


def test_a_keys_class_is_what_the_engine_sees(make_gateway, tmp_path):
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, low={"models": ["*"], "priority": "batch"},
                         top={"models": ["*"], "priority": "critical"})
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)}})
    backend = gw.backend("b")
    gw.model_with("m", [backend], priority_scheduling=True)
    for name, expected in (("low", 0), ("top", -200)):
        gw.client(api_key=secrets[name]).chat.completions.create(
            model="m", messages=HI, max_tokens=2)
        assert backend.last.json["priority"] == expected, name
    gw.settle()


def test_without_it_the_clients_body_is_forwarded_as_sent(gw):
    backend = gw.backend("b")
    gw.model_with("m", [backend])
    raw = b'{"model": "m", "priority": 3, "messages": [{"role": "user", "content": "hi"}]}'
    status, _, _ = gw.http("POST", "/v1/chat/completions", raw,
                           headers={"content-type": "application/json"})
    assert status == 200 and backend.last.body == raw
    gw.settle()


def test_a_simulated_vllm_with_the_priority_policy_serves_every_class(gw):
    """End to end on the simulator: its priority policy takes what the gateway sends; without
    the Model setting a client's non-zero priority reaches an FCFS engine, which refuses it as
    vLLM does (a 400 the client sees, OpenAI-shaped)."""
    policy = get_profile("fast", scheduling_policy="priority")
    gw.model_with("m", [gw.sim("m", "a", profile=policy)], priority_scheduling=True)
    gw.model_with("plain", [gw.sim("plain", "b")])
    client = gw.client()
    for header in (None, "critical", "batch"):
        answer = client.chat.completions.create(
            model="m", messages=HI, max_tokens=3,
            extra_headers={HEADER: header} if header else None)
        assert answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="Priority scheduling is not enabled"):
        client.chat.completions.create(model="plain", messages=HI, max_tokens=3,
                                       extra_body={"priority": -5})
    gw.settle()
