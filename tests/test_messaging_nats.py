"""KubeAI's messenger on a real NATS server with JetStream: request messages from a subject,
answered through a real gateway (simulated replicas) on another subject.

The test side speaks to the server with nats-py directly, not through the gateway's adapter.
Each test starts its own server on a free port with its store under the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
import yaml

from tests.messaging_brokers import (NatsServer, Scenario, check_metrics, messaging_config, need,
                                     serve_models)

REQUESTS, RESPONSES = "kvgate.requests", "kvgate.responses"


@pytest.fixture
def server(tmp_path):
    need("nats-server")
    broker = NatsServer(tmp_path, "nats")
    broker.start()
    yield broker
    broker.stop()


class Client:
    """The test's own JetStream client: publishes requests, counts and reads responses."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server
        self.nc: Any = None

    async def __aenter__(self) -> Client:
        self.nc = await nats.connect(f"nats://127.0.0.1:{self.server.port}", connect_timeout=5,
                                     allow_reconnect=False)
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.nc.close()

    async def stream(self, subject: str, deadline: float = 30) -> str:
        """The name of the stream holding ``subject`` (the gateway creates it), once it exists."""
        end = time.monotonic() + deadline
        while True:
            try:
                return await self.js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < end, f"no stream holds {subject}"
                await asyncio.sleep(0.1)

    async def publish(self, messages: list[bytes]) -> None:
        for data in messages:
            await self.js.publish(REQUESTS, data)  # returns once the stream stored it

    async def count(self, subject: str) -> int:
        info = await self.js.stream_info(await self.stream(subject))
        return info.state.messages

    async def read_all(self, expected: int, deadline: float = 60) -> list[bytes]:
        """Every message of the responses stream (from the first), waiting until there are at
        least ``expected``."""
        stream = await self.stream(RESPONSES)
        end = time.monotonic() + deadline
        while await self.count(RESPONSES) < expected:
            assert time.monotonic() < end, f"{await self.count(RESPONSES)} of {expected} responses"
            await asyncio.sleep(0.2)
        sub = await self.js.pull_subscribe(RESPONSES, durable=f"reader{time.monotonic_ns()}",
                                           stream=stream)
        out: list[bytes] = []
        total = await self.count(RESPONSES)
        while len(out) < total:
            try:
                msgs = await sub.fetch(200, timeout=2)
            except nats.errors.TimeoutError:
                assert time.monotonic() < end, f"read {len(out)} of {total}"
                continue
            for msg in msgs:
                out.append(msg.data)
                await msg.ack()
        return out


async def test_a_thousand_requests_get_a_thousand_responses(make_gateway, server):
    """1,000 messages of every kind (valid chat, completions and embeddings; not JSON, unknown
    path, unknown model, streaming, missing model, a replica that refuses) each get exactly one
    response with their metadata; the requests are all acknowledged."""
    gw = make_gateway(messaging_config(server.url(REQUESTS), server.url(RESPONSES), handlers=32))
    serve_models(gw)
    scenario = Scenario(1000)
    async with Client(server) as client:
        await client.stream(REQUESTS)  # the gateway made both streams
        await client.publish(scenario.messages)
        responses = await client.read_all(1000)
        scenario.check(responses, duplicates_allowed=False)
        info = await client.js.consumer_info(await client.stream(REQUESTS), "kvgate")
        assert info.num_ack_pending == 0 and info.num_pending == 0, info
    check_metrics(gw, scenario)


async def test_a_server_restart_mid_run_loses_nothing_acknowledged(make_gateway, server, caplog):
    """The server is restarted once 300 responses are out, and half the requests are published
    only after it is back: the gateway's sessions fail, back off and reconnect; every request ends
    up answered (messages in flight at the restart may be answered twice: delivery is at least
    once)."""
    gw = make_gateway(messaging_config(server.url(REQUESTS, ackWait="2"), server.url(RESPONSES),
                                       handlers=8))
    serve_models(gw)
    scenario = Scenario(1000)
    first, rest = scenario.messages[:500], scenario.messages[500:]
    async with Client(server) as client:
        await client.stream(REQUESTS)
        await client.publish(first)
        end = time.monotonic() + 60
        while await client.count(RESPONSES) < 300:
            assert time.monotonic() < end, "no progress before the restart"
            await asyncio.sleep(0.05)
    server.restart()
    async with Client(server) as client:
        await client.stream(REQUESTS)
        await client.publish(rest)
        responses = await client.read_all(1000)
        done = time.monotonic() + 60
        while True:  # wait for the last redeliveries, then check
            try:
                scenario.check(responses, duplicates_allowed=True)
                break
            except AssertionError:
                if time.monotonic() > done:
                    raise
                await asyncio.sleep(1)
                responses = await client.read_all(len(responses))
        info = await client.js.consumer_info(await client.stream(REQUESTS), "kvgate")
        assert info.num_pending == 0, info
    assert "broker error" in caplog.text  # the gateway saw the restart and came back
    assert gw.metric("kvgate_messaging_broker_errors_total") >= 1


async def test_two_gateways_share_a_stream(make_gateway, server):
    """Competing consumers: two gateway processes on one stream answer each message once
    between them, and both take a share."""
    config = messaging_config(server.url(REQUESTS), server.url(RESPONSES), handlers=4)
    gateways = [make_gateway(config), make_gateway(config)]
    for gw in gateways:
        serve_models(gw)
    scenario = Scenario(200)
    async with Client(server) as client:
        await client.stream(REQUESTS)
        await client.publish(scenario.messages)
        scenario.check(await client.read_all(200), duplicates_allowed=False)
    served = [sum(s.snapshot()["engine"]["prompt_tokens"] for s in gw.sims) for gw in gateways]
    assert all(count > 0 for count in served), served


async def test_a_server_that_comes_late_is_waited_for(make_gateway, tmp_path, caplog):
    """The gateway starts while the server is down: it backs off and retries (it does not fail
    to start), and answers once the server is up."""
    need("nats-server")
    late = NatsServer(tmp_path, "late")
    gw = make_gateway(messaging_config(late.url(REQUESTS), late.url(RESPONSES)))
    serve_models(gw)
    end = time.monotonic() + 30
    while "broker error" not in caplog.text:
        assert time.monotonic() < end, "no broker error logged"
        await asyncio.sleep(0.1)
    late.start()
    try:
        scenario = Scenario(20)
        async with Client(late) as client:
            await client.stream(REQUESTS)
            await client.publish(scenario.messages)
            scenario.check(await client.read_all(20), duplicates_allowed=False)
    finally:
        late.stop()


async def test_with_api_keys_a_stream_runs_under_its_key(make_gateway, server, tmp_path):
    """API keys on: the stream's requests run under the key it names (its models allowed,
    others not found), and once that key is revoked they are answered 401."""
    from tests.test_gateway_api_keys import write_keys
    keys = tmp_path / "keys.yaml"
    write_keys(keys, chat_only={"models": ["chat"]})
    config = messaging_config(server.url(REQUESTS), server.url(RESPONSES))
    config["messaging"]["streams"][0]["apiKey"] = "chat_only"
    gw = make_gateway({**config, "apiKeys": {"enabled": True, "file": str(keys),
                                             "reloadSeconds": 0.1}})
    serve_models(gw)

    def message(i: int, model: str) -> bytes:
        return json.dumps({"metadata": {"id": i}, "path": "/v1/chat/completions",
                           "body": {"model": model, "max_tokens": 2,
                                    "messages": [{"role": "user", "content": "hi"}]}}).encode()

    async with Client(server) as client:
        await client.stream(REQUESTS)
        await client.publish([message(0, "chat"), message(1, "emb")])
        got = {r["metadata"]["id"]: r["status_code"]
               for r in map(json.loads, await client.read_all(2))}
        assert got == {0: 200, 1: 404}  # a model the key may not use is not shown to it
        write_keys(keys, someone_else={"models": ["*"]})
        await asyncio.sleep(1)  # the gateway reloads the keys file every 0.1 s
        await client.publish([message(2, "chat")])
        last = json.loads((await client.read_all(3))[-1])
        assert (last["metadata"], last["status_code"]) == ({"id": 2}, 401), last
        assert last["body"]["error"]["code"] == "invalid_api_key"


async def test_kvgate_gateway_command_with_two_workers_answers_each_message_once(gw, server, tmp_path):
    """`kvgate gateway -c` wires messaging into every worker process: two workers consume one
    stream and each message is answered exactly once."""
    from tests.gateway_harness import model_manifest
    from tests.test_gateway_config import free_port, kvgate_command, wait_ready
    replica = gw.sim("chat", "s1")
    port = free_port()
    config = {"server": {"host": "127.0.0.1", "port": port, "metricsPort": 0, "logLevel": "warning"},
              "models": [model_manifest("chat")],
              "endpoints": {"chat": [{"address": replica.address, "key": "s1"}]},
              **messaging_config(server.url(REQUESTS), server.url(RESPONSES), handlers=8)}
    path = tmp_path / "kvgate.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([*kvgate_command(), "gateway", "-c", str(path), "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process, timeout=60)
        messages = [json.dumps({"metadata": {"id": i}, "path": "/v1/chat/completions",
                                "body": {"model": "chat", "max_tokens": 2, "messages": [
                                    {"role": "user", "content": f"hello {i}"}]}}).encode()
                    for i in range(200)]
        async with Client(server) as client:
            await client.stream(REQUESTS)
            await client.publish(messages)
            responses = [json.loads(r) for r in await client.read_all(200)]
            await asyncio.sleep(0.5)
            assert await client.count(RESPONSES) == 200  # none answered twice
        assert sorted(r["metadata"]["id"] for r in responses) == list(range(200))
        assert {r["status_code"] for r in responses} == {200}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            raise AssertionError(f"kvgate did not stop on SIGTERM: {stderr}")
    assert "Traceback" not in stderr and " ERROR " not in stderr, stderr
