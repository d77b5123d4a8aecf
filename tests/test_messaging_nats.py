"""KubeAI's messenger on a real NATS server with JetStream: request messages from a subject,
answered through a real gateway (simulated replicas) on another subject.

The test side speaks to the server with nats-py directly, not through the gateway's adapter.
Each test starts its own server on a free port with its store under the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest

from tests.messaging_brokers import NatsServer, Scenario, messaging_config, need, serve_models

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


async def test_a_server_restart_mid_run_loses_nothing_acknowledged(make_gateway, server, caplog):
    """The server is restarted once a third of the responses are out: the gateway's sessions
    fail, back off and reconnect; every request ends up answered (messages in flight at the
    restart may be answered twice: delivery is at least once)."""
    gw = make_gateway(messaging_config(server.url(REQUESTS, ackWait="2"), server.url(RESPONSES),
                                       handlers=8))
    serve_models(gw)
    scenario = Scenario(1000)
    async with Client(server) as client:
        await client.stream(REQUESTS)
        await client.publish(scenario.messages)
        end = time.monotonic() + 60
        while (before := await client.count(RESPONSES)) < 300:
            assert time.monotonic() < end, "no progress before the restart"
            await asyncio.sleep(0.05)
    server.restart()
    assert before < 1000, "the run ended before the restart"
    async with Client(server) as client:
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
