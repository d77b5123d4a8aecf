"""OpenTelemetry traces: one trace per request with its parse, pick, queue and upstream spans, a
retried attempt as a span of its own, the W3C traceparent passed to the model server (the
simulator shows what it received on /sim/traceparents) and honoured from the client; and with
tracing off, no OpenTelemetry module loaded in the serving process.

The in-process gateway exports to the SDK's in-memory exporter; the OTLP test runs
`kvgate gateway --workers 2` for real and receives its spans over OTLP/HTTP (bench.otlp_sink).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections import defaultdict
from typing import Any, Iterator

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.gateway_harness import GatewayHarness, LoopThread

ROOT = "POST /v1/chat/completions"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def traced(loop_thread: LoopThread) -> Iterator[tuple[GatewayHarness, InMemorySpanExporter]]:
    """A gateway with tracing on, exporting to memory."""
    exporter = InMemorySpanExporter()
    harness = GatewayHarness(loop_thread, {"queue": {"timeoutSeconds": 30}},
                             span_exporter=exporter)
    try:
        yield harness, exporter
    finally:
        harness.close()


def chat(gw: GatewayHarness, content: str, request_id: str, **headers: str) -> Any:
    return gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}], max_tokens=4,
        extra_headers={"x-request-id": request_id, **headers})


def traces(exporter: InMemorySpanExporter, count: int) -> dict[int, list[ReadableSpan]]:
    """The finished spans by trace id, once ``count`` requests' server spans have ended (a
    server span ends just after the answer's last byte went out)."""
    deadline = time.monotonic() + 30
    while True:
        spans = exporter.get_finished_spans()
        if sum(1 for s in spans if s.name == ROOT) >= count:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} traces, got {[s.name for s in spans]}")
        time.sleep(0.02)
    by_trace: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        by_trace[span.context.trace_id].append(span)
    return dict(by_trace)


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time)


def root_of(spans: list[ReadableSpan]) -> ReadableSpan:
    [root] = named(spans, ROOT)
    return root


def received(gw: GatewayHarness, sim: int = 0) -> dict[str, str]:
    """What the simulator was sent: X-Request-Id -> traceparent."""
    with urllib.request.urlopen(gw.sims[sim].url + "/sim/traceparents", timeout=10) as response:
        return json.loads(response.read())


def parent_of(traceparent: str) -> tuple[int, int]:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    return int(trace_id, 16), int(span_id, 16)


def test_each_request_is_one_trace_with_its_spans(traced):
    gw, exporter = traced
    gw.model_with("m", [gw.sim("m", "r0"), gw.sim("m", "r1")], strategy="PrefixHash")
    chat(gw, "first question", "a")
    chat(gw, "second question", "b")
    found = traces(exporter, 2)
    assert len(found) == 2  # one trace per request, nothing outside them
    sent = {**received(gw, 0), **received(gw, 1)}
    assert sorted(sent) == ["a", "b"]
    upstreams = dict(parent_of(traceparent) for traceparent in sent.values())
    for spans in found.values():
        root = root_of(spans)
        assert root.kind == SpanKind.SERVER and root.parent is None
        assert root.attributes["http.response.status_code"] == 200
        assert root.attributes["kvgate.model"] == "m"
        assert [e.name for e in root.events] == ["first_byte"]
        assert root.start_time <= root.events[0].timestamp <= root.end_time
        assert sorted(s.name for s in spans) == sorted([ROOT, "parse", "pick", "upstream"])
        for child in spans:
            if child is not root:
                assert child.parent.span_id == root.context.span_id
                assert root.start_time <= child.start_time <= child.end_time <= root.end_time
        [pick] = named(spans, "pick")
        assert pick.attributes["kvgate.pick.strategy"] == "PrefixHash"
        assert pick.attributes["kvgate.pick.candidate"] in ("r0", "r1")
        assert pick.attributes["kvgate.pick.load"] == 0
        # CHWBL's bound with this request counted: 125% of 1 request over 2 replicas
        assert pick.attributes["kvgate.pick.bound"] == pytest.approx(1.25 * 1 / 2)
        assert len(pick.attributes["kvgate.pick.key_hash"]) == 16
        [upstream] = named(spans, "upstream")
        assert upstream.kind == SpanKind.CLIENT
        assert upstream.attributes["kvgate.replica"] == pick.attributes["kvgate.pick.candidate"]
        assert upstream.attributes["http.response.status_code"] == 200
        # The model server got the attempt's own context: same trace, the attempt as parent.
        assert upstreams[root.context.trace_id] == upstream.context.span_id
    assert set(upstreams) == set(found)
    gw.settle()


def test_a_stream_is_traced_to_its_last_byte(traced):
    gw, exporter = traced
    gw.model_with("m", [gw.sim("m", "r0")], strategy="LeastLoad")
    stream = gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count"}], max_tokens=8, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    [spans] = traces(exporter, 1).values()
    root = root_of(spans)
    [upstream] = named(spans, "upstream")
    assert root.attributes["kvgate.stream"] is True
    assert named(spans, "pick")[0].attributes["kvgate.pick.strategy"] == "LeastLoad"
    assert "kvgate.pick.key_hash" not in named(spans, "pick")[0].attributes  # no routing key
    assert upstream.end_time <= root.end_time
    assert root.events[0].timestamp <= upstream.end_time  # the first byte came before the end


@pytest.mark.parametrize("failure", ["refused", "503"])
def test_a_retried_attempt_is_a_span_of_its_own(traced, failure):
    gw, exporter = traced
    bad = (gw.refusing_endpoint("bad") if failure == "refused"
           else gw.backend("bad", status=503).endpoint(key="bad"))
    gw.model_with("m", [bad, gw.sim("m", "good")], strategy="PrefixHash")
    chat(gw, gw.prefix_for("m", "bad"), "retried")
    [spans] = traces(exporter, 1).values()
    root = root_of(spans)
    first, second = named(spans, "upstream")
    assert first.attributes["kvgate.replica"] == "bad"
    assert first.attributes["kvgate.attempt.retried"] is True
    assert first.status.status_code == StatusCode.ERROR
    if failure == "refused":
        assert first.attributes["error.type"] == "connect_error"
        assert "http.response.status_code" not in first.attributes
    else:
        assert first.attributes["http.response.status_code"] == 503
    assert second.attributes["kvgate.replica"] == "good"
    assert second.attributes["http.response.status_code"] == 200
    assert "kvgate.attempt.retried" not in second.attributes
    assert first.end_time <= second.start_time
    picks = named(spans, "pick")
    assert [p.attributes["kvgate.pick.candidate"] for p in picks] == ["bad", "good"]
    assert root.attributes["http.response.status_code"] == 200
    assert root.status.status_code != StatusCode.ERROR
    # Only the second attempt reached the simulator, with its own span as parent.
    assert parent_of(received(gw)["retried"]) == (root.context.trace_id,
                                                  second.context.span_id)
    gw.settle()


def test_the_clients_traceparent_is_honoured(traced):
    gw, exporter = traced
    gw.model_with("m", [gw.sim("m", "r0")], strategy="PrefixHash")
    chat(gw, "hello", "joined", traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
         tracestate="vendor=1")
    [(trace_id, spans)] = traces(exporter, 1).items()
    root = root_of(spans)
    assert f"{trace_id:032x}" == CLIENT_TRACE
    assert root.parent.span_id == int(CLIENT_SPAN, 16) and root.parent.is_remote
    [upstream] = named(spans, "upstream")
    assert parent_of(received(gw)["joined"]) == (int(CLIENT_TRACE, 16),
                                                 upstream.context.span_id)


def test_waiting_for_a_replica_is_a_queue_span(traced):
    gw, exporter = traced
    gw.add_model("m", strategy="PrefixHash")
    answer: list[Any] = []
    client = threading.Thread(target=lambda: answer.append(chat(gw, "wait for me", "q")))
    client.start()
    gw.wait_for(lambda: gw.balancer.waiting("m") == 1, what="the request to wait")
    time.sleep(0.05)
    gw.set_endpoints("m", [gw.sim("m", "late")])
    client.join(30)
    assert answer and answer[0].choices[0].message.content
    [spans] = traces(exporter, 1).values()
    [pick] = named(spans, "pick")
    [queue] = named(spans, "queue")
    assert pick.attributes["kvgate.pick.queued"] is True
    assert queue.attributes["kvgate.pick.candidate"] == "late"
    assert pick.end_time == queue.start_time
    assert queue.end_time - queue.start_time >= 50_000_000  # it waited at least the 50 ms
    assert queue.end_time <= named(spans, "upstream")[0].start_time
    gw.settle()


def test_a_request_that_times_out_in_the_queue_ends_its_trace(make_gateway, loop_thread):
    exporter = InMemorySpanExporter()
    gw = GatewayHarness(loop_thread, {"queue": {"timeoutSeconds": 0.2}},
                        span_exporter=exporter)
    try:
        gw.add_model("m")
        status, _, body = gw.post_json("/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert status == 503 and json.loads(body)["error"]["code"] == "no_replica_ready"
        [spans] = traces(exporter, 1).values()
        root = root_of(spans)
        assert root.status.status_code == StatusCode.ERROR
        assert root.attributes["http.response.status_code"] == 503
        [queue] = named(spans, "queue")
        assert queue.attributes["error.type"] == "503"
        assert not named(spans, "upstream")
    finally:
        gw.close()


def test_a_gateway_with_tracing_off_makes_no_spans_and_passes_the_traceparent_on(gw):
    gw.model_with("m", [gw.sim("m", "r0")])
    sent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    chat(gw, "hello", "untouched", traceparent=sent)
    assert gw.gateway.proxy.tracing is None
    assert received(gw)["untouched"] == sent  # a plain proxy: the client's header as it was


# -- the serving process, for real --------------------------------------------------------------

SERVE_ONE = textwrap.dedent("""
    import asyncio, json, sys
    import openai
    from kvgate_sim.cluster import Replica
    from lb.app import Gateway
    from lb.config import config_from_dict
    from lb.model import Model
    from lb.registry import Endpoint
    from lb.server import bind, serve
    from tests.gateway_harness import model_manifest

    async def main():
        replica = await Replica("fast", "m").start()
        gateway = Gateway(config_from_dict({"server": {"logLevel": "warning"},
                                            "tracing": {"enabled": sys.argv[1] == "on"}}))
        gateway.registry.set_model(Model.from_dict(model_manifest("m")))
        gateway.registry.set_endpoints("m", [Endpoint("r0", replica.address)])
        sock, started = bind("127.0.0.1", 0), asyncio.Event()
        task = asyncio.create_task(serve(gateway, sock, None, started))
        await started.wait()
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                                    api_key="x", max_retries=0)
        answer = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert answer.choices[0].message.content
        await client.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await replica.stop()
        print("LOADED " + json.dumps(loaded), flush=True)

    asyncio.run(main())
""")


@pytest.mark.parametrize("switch", ["off", "on"])
def test_with_tracing_off_the_serving_process_loads_no_opentelemetry(switch):
    """A real serving process (its own interpreter) answers a request through the gateway; with
    tracing off not one ``opentelemetry`` module is loaded (with it on, the SDK is: the check
    can see it)."""
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console"}
    done = subprocess.run([sys.executable, "-c", SERVE_ONE, switch], capture_output=True,
                          text=True, timeout=120, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("LOADED ")]
    loaded = json.loads(line[len("LOADED "):])
    if switch == "off":
        assert loaded == []
    else:
        assert "opentelemetry.sdk.trace" in loaded


def test_every_worker_exports_its_spans_over_otlp(loop_thread, tmp_path):
    """`kvgate gateway --workers 2` with tracing on and the standard OTEL_* variables: each
    worker sets the SDK up after the fork and its spans reach an OTLP/HTTP receiver."""
    from bench.procs import free_port, spawn, stop, wait_for_port
    from kvgate_sim.cluster import Replica

    replica = loop_thread.run(Replica("fast", "m").start())
    sink_port, port = free_port(), free_port()
    sink = spawn([sys.executable, "-m", "bench.otlp_sink", "--port", str(sink_port)])
    config = tmp_path / "kvgate.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, metricsPort: 0, logLevel: warning}}\n"
        "tracing: {enabled: true}\nmodels:\n- apiVersion: kvgate.dev/v1\n  kind: Model\n"
        "  metadata: {name: m}\n  spec: {url: hf://t/m, engine: VLLM, "
        "features: [TextGeneration]}\n"
        f"endpoints:\n  m: [{{address: \"{replica.address}\"}}]\n")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_TRACES_EXPORTER": "otlp"}
    env.pop("OTEL_SDK_DISABLED", None)
    gateway = spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config),
                     "--workers", "2"], env=env)
    try:
        wait_for_port(sink_port)
        wait_for_port(port, timeout=60)
        requests = 24
        for i in range(requests):  # a connection each: SO_REUSEPORT spreads them over workers
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=30) as client:
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=2)
        deadline = time.monotonic() + 60
        while True:
            spans = int(_get(sink_port, "/count"))
            instances = json.loads(_get(sink_port, "/instances"))
            if spans >= 4 * requests and len(instances) == 2:
                break
            assert time.monotonic() < deadline, (spans, instances)
            time.sleep(0.1)
        assert spans == 4 * requests  # request, parse, pick, upstream: each exported once
    finally:
        stop(gateway)
        stop(sink)
        loop_thread.run(replica.stop())


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()
