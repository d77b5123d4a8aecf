"""Metrics after known traffic (scraped from the metrics port and parsed with
prometheus_client's parser), what each port serves, and what is never forwarded."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest



def test_metrics_reflect_known_traffic(gw):
    good, bad = gw.backend("good"), gw.backend("bad", status=500)
    gw.model_with("m", [good, bad], strategy="PrefixHash", features=["TextGeneration",
                                                                     "TextEmbedding"])
    to_good, to_bad = gw.prefix_for("m", "good"), gw.prefix_for("m", "bad")
    # Embeddings route on an empty prefix: where that lands decides one more retry.
    ring = gw.on_loop(lambda: gw.registry.group("m").ring)
    empty_retried = int(gw.on_loop(ring.pick, "") == "bad")
    before = gw.scrape()
    client = gw.client()
    for _ in range(3):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": to_good}])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": to_bad}])
    list(client.completions.create(model="m", prompt=to_good, stream=True))
    client.embeddings.create(model="m", input="e", encoding_format="float")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    gw.settle()
    after = gw.scrape()

    def count(name, **labels):
        return gw.metric(name, after, **labels) - gw.metric(name, before, **labels)

    assert count("kvgate_requests_total", model="m", kind="chat", code="200") == 4
    assert count("kvgate_requests_total", model="m", kind="completions", code="200") == 1
    assert count("kvgate_requests_total", model="m", kind="embeddings", code="200") == 1
    # Requests rejected before a model was resolved carry no model name.
    assert count("kvgate_requests_total", kind="chat", code="400") == 1
    assert count("kvgate_requests_total", kind="chat", code="404") == 1
    assert count("kvgate_requests_total") == 8
    assert count("kvgate_upstream_retries_total", model="m", reason="500") == 1 + empty_retried
    assert count("kvgate_upstream_retries_total") == 1 + empty_retried
    assert count("kvgate_request_duration_seconds_count", model="m", kind="chat") == 4
    assert count("kvgate_time_to_first_byte_seconds_count", model="m") == 6
    # One ring lookup per attempt: 6 requests, one (or two) of them retried once.
    assert count("kvgate_hash_lookups_total", model="m") == 7 + empty_retried
    assert count("kvgate_hash_lookup_iterations_total", model="m") >= 7 + empty_retried
    assert count("kvgate_hash_lookup_fallbacks_total", model="m") == 0
    assert gw.metric("kvgate_endpoints", after, model="m") == 2
    assert gw.metric("kvgate_endpoint_in_flight", after, model="m") == 0
    assert gw.metric("kubeai_inference_requests_active", after, request_model="m",
                     request_type="http") == 0
    assert good.total_calls == 6 and bad.total_calls == 1 + empty_retried


async def test_active_gauge_counts_adapter_traffic_for_the_base_model(gw):
    backend = gw.backend("b")
    gw.add_model("m", adapters=["lora"])
    gw.set_endpoints("m", [backend.endpoint("lora")])
    await gw.loop.acall(backend.hold)
    async with gw.async_client() as client:
        tasks = [asyncio.ensure_future(client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "x"}]))
            for name in ("m_lora", "m_lora", "m")]
        await gw.await_for(lambda: backend.in_flight == 3, what="three requests in flight")
        scraped = await asyncio.to_thread(gw.scrape)
        assert gw.metric("kubeai_inference_requests_active", scraped, request_model="m") == 3
        assert gw.metric("kvgate_endpoint_in_flight", scraped, model="m", endpoint="b") == 3
        assert not [labels for labels, _ in scraped["kubeai_inference_requests_active"]
                    if labels["request_model"] != "m"]
        await gw.loop.acall(backend.release)
        await asyncio.gather(*tasks)
    await gw.asettle()


def test_metrics_port_serves_only_metrics(gw):
    status, headers, body = gw.http("GET", "/metrics", port=gw.metrics_port)
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"kubeai_inference_requests_active" in body
    for method, path in [("GET", "/"), ("GET", "/v1/models"), ("GET", "/healthz"),
                         ("POST", "/v1/chat/completions"), ("GET", "/metrics/x")]:
        status, headers, body = gw.http(method, path, port=gw.metrics_port,
                                        body=b"{}" if method == "POST" else None)
        assert status == 404, path
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_main_port_does_not_serve_metrics_and_never_forwards_admin_paths(gw):
    backend = gw.backend("b")
    gw.add_model("m", adapters=["lora"])
    gw.set_endpoints("m", [backend])
    admin = {"lora_name": "lora", "lora_path": "/tmp/evil"}
    for method, path in [
        ("GET", "/metrics"), ("POST", "/metrics"),
        ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/openai/v1/load_lora_adapter"), ("POST", "/load_lora_adapter"),
        ("GET", "/health"), ("GET", "/version"), ("POST", "/v1/tokenize"),
        ("POST", "/v1/detokenize"), ("POST", "/pooling"), ("POST", "/score"),
        ("POST", "/reset_prefix_cache"), ("POST", "/sleep"),
    ]:
        status, headers, body = gw.http(method, path,
                                        body=json.dumps(admin).encode()
                                        if method == "POST" else None,
                                        headers={"content-type": "application/json"})
        assert status == 404, path
        assert headers["content-type"] == "application/json"
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    # Inference routes of vLLM's that the gateway serves read the body as a request: this
    # one names no model, so it is refused, not forwarded.
    for path in ("/tokenize", "/detokenize", "/v1/responses", "/v1/messages", "/v1/score"):
        status, _, _ = gw.post_json(path, admin)
        assert status == 400, path
    assert backend.total_calls == 0
    status, _, _ = gw.post_json("/v1/chat/completions",
                                {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and backend.total_calls == 1


def test_health_endpoints(gw):
    assert gw.http("GET", "/healthz")[:1] == (200,)
    status, _, body = gw.http("GET", "/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready"}
