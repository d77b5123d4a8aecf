"""KubeAI's messenger on a real RabbitMQ node: request messages from a queue, answered through a
real gateway (simulated replicas) on another queue.

The test side speaks to the node with aio-pika directly, not through the gateway's adapter. The
node is private to the module (own node name, ports, epmd, data and cookie under a tmp dir); a
RabbitMQ node takes seconds to boot, so the module's tests share it, each on its own queues.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import pytest

from tests.messaging_brokers import (RABBITMQ_SERVER, RabbitServer, Scenario, check_metrics,
                                     messaging_config, need, serve_models)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need(RABBITMQ_SERVER)
    broker = RabbitServer(tmp_path_factory.mktemp("rabbitmq"), "node")
    try:
        broker.start()
    except RuntimeError as exc:
        broker.close()
        pytest.skip(f"rabbitmq-server did not start: {exc}")
    yield broker
    broker.close()


class Client:
    """The test's own AMQP client: publishes requests (persistent, confirmed), counts and reads
    responses."""

    def __init__(self, server: RabbitServer, requests: str, responses: str) -> None:
        self.server = server
        self.requests, self.responses = requests, responses

    async def __aenter__(self) -> Client:
        self.connection: Any = await aio_pika.connect(self.server.amqp_url, timeout=10)
        self.channel = await self.connection.channel(publisher_confirms=True)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.connection.close()

    async def publish(self, messages: list[bytes]) -> None:
        """Publish them all, 100 awaiting their confirms at a time (one at a time, the
        gateway would answer as fast as they come, and no run would be "mid-run")."""
        await self.channel.declare_queue(self.requests, durable=True)
        exchange = self.channel.default_exchange
        for start in range(0, len(messages), 100):
            await asyncio.gather(*(exchange.publish(
                aio_pika.Message(data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self.requests) for data in messages[start:start + 100]))

    async def count(self, queue: str) -> int:
        declared = await self.channel.declare_queue(queue, durable=True)
        return declared.declaration_result.message_count

    async def read(self, responses: list[bytes], expected: int, deadline: float = 60) -> None:
        """Take responses off the queue into ``responses`` until it holds ``expected``."""
        queue = await self.channel.declare_queue(self.responses, durable=True)
        end = time.monotonic() + deadline
        while len(responses) < expected:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                assert time.monotonic() < end, f"{len(responses)} of {expected} responses"
                await asyncio.sleep(0.1)
                continue
            responses.append(message.body)
            await message.ack()


async def test_a_thousand_requests_get_a_thousand_responses(make_gateway, server):
    """1,000 messages of every kind each get exactly one response with their metadata; the
    requests queue is left empty."""
    gw = make_gateway(messaging_config(server.url("requests-a"), server.url("responses-a"),
                                       handlers=32))
    serve_models(gw)
    scenario = Scenario(1000)
    async with Client(server, "requests-a", "responses-a") as client:
        await client.publish(scenario.messages)
        responses: list[bytes] = []
        await client.read(responses, 1000)
        await asyncio.sleep(0.5)  # a duplicate would show up here
        assert await client.count("responses-a") == 0
        scenario.check(responses, duplicates_allowed=False)
        assert await client.count("requests-a") == 0
    check_metrics(gw, scenario)


async def test_a_node_restart_mid_run_loses_nothing_acknowledged(make_gateway, server, caplog):
    """The node is restarted once 300 responses are out, and half the requests are published
    only after it is back: the gateway's sessions fail, back off and reconnect; every request ends
    up answered (messages in flight at the restart may be answered twice: delivery is at least
    once)."""
    gw = make_gateway(messaging_config(server.url("requests-b"), server.url("responses-b"),
                                       handlers=4))
    serve_models(gw)
    scenario = Scenario(1000)
    first, rest = scenario.messages[:500], scenario.messages[500:]
    async with Client(server, "requests-b", "responses-b") as client:
        await client.publish(first)
        end = time.monotonic() + 60
        while await client.count("responses-b") < 300:
            assert time.monotonic() < end, "no progress before the restart"
            await asyncio.sleep(0.05)
    server.restart()
    responses: list[bytes] = []
    async with Client(server, "requests-b", "responses-b") as client:
        await client.publish(rest)
        await client.read(responses, 1000)
        done = time.monotonic() + 60
        while True:  # wait for the last redeliveries, then check
            try:
                scenario.check(responses, duplicates_allowed=True)
                break
            except AssertionError:
                if time.monotonic() > done:
                    raise
                await client.read(responses, len(responses) + 1, deadline=30)
        assert await client.count("requests-b") == 0
    assert "broker error" in caplog.text  # the gateway saw the restart and came back
    assert gw.metric("kvgate_messaging_broker_errors_total") >= 1
