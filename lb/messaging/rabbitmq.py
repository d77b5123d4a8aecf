"""RabbitMQ for the messenger (``aio-pika``).

Requests are consumed from a durable queue with manual acks and a prefetch of ``maxHandlers``;
every gateway process consumes the same queue (competing consumers: RabbitMQ hands each message
to one of them, and requeues the unacknowledged ones of a consumer whose connection ends).
Responses go through the default exchange to a durable queue as persistent messages on a channel
with publisher confirms, so a publish returns once the broker has taken responsibility for it.
Queues are declared (durable) if missing.

The connection does not reconnect by itself: a lost connection is a broker error, and the
messenger opens a new session after its back-off (one rule for every broker).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.connection import make_url

from lb.messaging.urls import BrokerURL

log = logging.getLogger(__name__)

_WAIT_SECONDS = 1.0


async def _connect(url: BrokerURL) -> Any:
    """A connection, closed again if it cannot be made (``aio_pika.connect`` leaves that to
    the garbage collector, which cannot await the close)."""
    connection = aio_pika.Connection(make_url(
        host=url.host, port=url.port, login=url.user or "guest", password=url.password or "guest",
        virtualhost=url.options.get("vhost", "/"), ssl=url.scheme == "rabbits"))
    try:
        await connection.connect(timeout=10)
    except BaseException:
        await _close(connection)
        raise
    return connection


class _Delivery:
    __slots__ = ("data", "_message")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self.data: bytes = message.body
        self._message = message

    async def ack(self) -> None:
        await self._message.ack()

    async def nack(self) -> None:
        await self._message.nack(requeue=True)

    async def progress(self) -> None:
        """RabbitMQ keeps an unacknowledged message for as long as its consumer is connected."""


class _Subscription:
    progress_seconds: float | None = None

    def __init__(self, connection: Any, channel: Any) -> None:
        self._connection = connection
        self._channel = channel
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await self._inbox.put(message)

    async def receive(self, limit: int) -> list[_Delivery]:
        self._check()
        try:
            first = await asyncio.wait_for(self._inbox.get(), _WAIT_SECONDS)
        except asyncio.TimeoutError:
            self._check()
            return []
        out = [_Delivery(first)]
        while len(out) < limit and not self._inbox.empty():
            out.append(_Delivery(self._inbox.get_nowait()))
        return out

    def _check(self) -> None:
        if self._connection.is_closed or self._channel.is_closed:
            raise ConnectionError("the connection to the RabbitMQ server is closed")

    async def close(self) -> None:
        await _close(self._connection)


class _Publisher:
    def __init__(self, connection: Any, channel: Any, queue: str) -> None:
        self._connection = connection
        self._channel = channel
        self._queue = queue

    async def publish(self, data: bytes) -> None:
        message = aio_pika.Message(data, content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self._channel.default_exchange.publish(message, routing_key=self._queue, timeout=10)

    async def close(self) -> None:
        await _close(self._connection)


async def _close(connection: Any) -> None:
    try:
        await connection.close()
    except Exception as exc:  # already gone: nothing left to release
        log.debug("rabbitmq: close: %s", exc)


async def subscribe(url: BrokerURL, prefetch: int) -> _Subscription:
    connection = await _connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(url.name, durable=True)
        subscription = _Subscription(connection, channel)
        await queue.consume(subscription.on_message, no_ack=False)
        return subscription
    except BaseException:
        await _close(connection)
        raise


async def publisher(url: BrokerURL) -> _Publisher:
    connection = await _connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(url.name, durable=True)
        return _Publisher(connection, channel, url.name)
    except BaseException:
        await _close(connection)
        raise
