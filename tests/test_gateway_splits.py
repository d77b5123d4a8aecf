"""Traffic splits (``spec.splits``, ``adapters[].splits``): a weighted share of the requests for a
name served by another name, over real HTTP (the official SDK for what a client sees; plain
aiohttp for the 10,000-request count)."""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import pytest

from lb.model import Model, ModelValidationError
from tests.gateway_harness import model_manifest

MESSAGES = [{"role": "user", "content": "hi"}]


def add_split_model(gw, name: str, splits: list[dict], adapters: tuple[str, ...] = (),
                    adapter_splits: dict[str, list[dict]] | None = None) -> Model:
    manifest = model_manifest(name, adapters=adapters)
    manifest["spec"]["splits"] = splits
    for adapter in manifest["spec"]["adapters"]:
        adapter["splits"] = (adapter_splits or {}).get(adapter["name"], [])
    model = Model.from_dict(manifest)
    gw.on_loop(gw.registry.set_model, model)
    return model


async def _count_served(gw, model: str, n: int, concurrency: int = 32,
                        session: str | None = None) -> collections.Counter[str]:
    """Send ``n`` chat requests for ``model``; which backend (system_fingerprint) answered."""
    served: collections.Counter[str] = collections.Counter()
    todo = iter(range(n))
    headers = {"X-Session-ID": session} if session else {}

    async def worker(http: aiohttp.ClientSession) -> None:
        for _ in todo:
            async with http.post(gw.url + "/v1/chat/completions", headers=headers,
                                 json={"model": model, "messages": MESSAGES}) as response:
                body = await response.json()
                assert response.status == 200, body
                assert body["model"] == model  # the answer keeps the name asked for
                served[body["system_fingerprint"]] += 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return served


async def test_a_90_10_split_lands_within_a_percent_over_10000_requests(gw):
    stable, canary = gw.backend("stable"), gw.backend("canary")
    add_split_model(gw, "m", [{"to": "m2", "weight": 10}])
    gw.set_endpoints("m", [stable])
    gw.model_with("m2", [canary])
    served = await _count_served(gw, "m", 10_000)
    assert sum(served.values()) == 10_000
    assert abs(served["canary"] / 10_000 - 0.10) <= 0.015, served
    assert canary.last.json["model"] == "m2"  # the canary's server is asked for its own name
    assert stable.last.json["model"] == "m"
    assert gw.metric("kvgate_split_requests_total", requested="m", target="m2") == served["canary"]
    await gw.asettle()


async def test_a_session_stays_on_one_side(gw):
    add_split_model(gw, "m", [{"to": "m2", "weight": 50}])
    gw.set_endpoints("m", [gw.backend("stable")])
    gw.model_with("m2", [gw.backend("canary")])
    sides = set()
    for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
        served = await _count_served(gw, "m", 20, concurrency=4, session=session)
        assert len(served) == 1, (session, served)
        sides |= set(served)
    assert sides == {"stable", "canary"}  # six sessions at 50/50 do not all land on one side


def test_an_adapter_splits_to_another_adapter_with_the_sdk(gw):
    backend = gw.backend("b")
    add_split_model(gw, "m", [], adapters=("sql", "sql-v2"),
                    adapter_splits={"sql": [{"to": "m_sql-v2", "weight": 100}]})
    gw.set_endpoints("m", [backend.endpoint("sql", "sql-v2")])
    client = gw.client()
    answer = client.chat.completions.create(model="m_sql", messages=MESSAGES)
    assert answer.model == "m_sql"
    assert backend.last.json["model"] == "sql-v2"
    stream = client.chat.completions.create(model="m_sql", messages=MESSAGES, stream=True)
    assert {chunk.model for chunk in stream} == {"m_sql"}
    listed = {m.id: m for m in client.models.list()}
    assert listed["m_sql"].model_extra["splits"] == [{"to": "m_sql-v2", "weight": 100}]
    assert "splits" not in listed["m_sql-v2"].model_extra


def test_a_target_that_cannot_serve_leaves_the_request_on_its_name(gw):
    backend = gw.backend("stable")
    add_split_model(gw, "m", [{"to": "gone", "weight": 100}])
    gw.set_endpoints("m", [backend])
    answer = gw.client().chat.completions.create(model="m", messages=MESSAGES)
    assert answer.system_fingerprint == "stable" and backend.last.json["model"] == "m"
    listed = {m.id: m for m in gw.client().models.list()}
    assert listed["m"].model_extra["splits"] == [{"to": "gone", "weight": 100}]


@pytest.mark.parametrize("splits, message", [
    ([{"to": "a", "weight": 60}, {"to": "b", "weight": 41}], "add up to at most 100"),
    ([{"to": "a", "weight": 0}], "weight"),
    ([{"to": "Not A Name", "weight": 5}], "to"),
])
def test_bad_splits_are_refused(splits, message):
    manifest = model_manifest("m")
    manifest["spec"]["splits"] = splits
    with pytest.raises(ModelValidationError, match=message):
        Model.from_dict(manifest)
