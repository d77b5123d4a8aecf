"""NATS JetStream for the messenger (``nats-py``).

Requests are read by a durable pull consumer on the subject's stream, shared by every gateway
process (competing consumers: JetStream hands each message to one of them). A message counts as
in flight for ``ackWait`` seconds (default 30); the messenger reports progress well within that,
so a long generation is not redelivered, while a message whose process died is redelivered once
its ack wait lapses. Responses are published with JetStream's publish, which returns once the
stream has stored the message. A stream is created for a subject that no stream holds yet.

The client does not reconnect by itself: a lost connection is a broker error, and the messenger
opens a new session after its back-off (one rule for every broker).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig

from lb.messaging.broker import TooLarge
from lb.messaging.urls import BrokerURL, stream_name

log = logging.getLogger(__name__)

DEFAULT_CONSUMER = "kvgate"
DEFAULT_ACK_WAIT = 30.0
_FETCH_SECONDS = 1.0


async def _connect(url: BrokerURL) -> Any:
    async def on_error(exc: Exception) -> None:
        log.warning("nats %s: %s", url.redacted, exc)

    # nats-py retries a first connect max_reconnect_attempts times whatever allow_reconnect
    # says: one retry here, the messenger's back-off does the rest.
    connecting = nats.connect(servers=[f"nats://{url.host}:{url.port}"],
                              user=url.user or None, password=url.password or None,
                              allow_reconnect=False, max_reconnect_attempts=1,
                              reconnect_time_wait=0.5, connect_timeout=5, error_cb=on_error)
    return await asyncio.wait_for(connecting, 15)


async def _stream_for(js: Any, url: BrokerURL) -> str:
    """The stream holding the subject: the one named in the URL, the one that already holds the
    subject, or a new one (file storage: it survives a server restart)."""
    if "stream" in url.options:
        name = url.options["stream"]
        try:
            await js.stream_info(name)
            return name
        except nats.js.errors.NotFoundError:
            pass
    else:
        try:
            return await js.find_stream_name_by_subject(url.name)
        except nats.js.errors.NotFoundError:
            name = stream_name(url.name)
    await js.add_stream(name=name, subjects=[url.name])
    return name


class _Delivery:
    __slots__ = ("data", "_msg")

    def __init__(self, msg: Any) -> None:
        self.data: bytes = msg.data
        self._msg = msg

    async def ack(self) -> None:
        await self._msg.ack()

    async def nack(self) -> None:
        await self._msg.nak()

    async def progress(self) -> None:
        await self._msg.in_progress()


class _Subscription:
    def __init__(self, nc: Any, sub: Any, ack_wait: float) -> None:
        self._nc = nc
        self._sub = sub
        self.progress_seconds: float | None = ack_wait / 3

    async def receive(self, limit: int) -> list[_Delivery]:
        if self._nc.is_closed:
            raise ConnectionError("the connection to the NATS server is closed")
        try:
            msgs = await self._sub.fetch(limit, timeout=_FETCH_SECONDS)
        except nats.errors.TimeoutError:
            if self._nc.is_closed:
                raise ConnectionError("the connection to the NATS server is closed") from None
            return []
        return [_Delivery(msg) for msg in msgs]

    async def close(self) -> None:
        await _close(self._nc)


class _Publisher:
    def __init__(self, nc: Any, js: Any, subject: str) -> None:
        self._nc = nc
        self._js = js
        self._subject = subject

    async def publish(self, data: bytes) -> None:
        if len(data) > self._nc.max_payload:
            raise TooLarge(f"the NATS server takes at most {self._nc.max_payload} bytes")
        await self._js.publish(self._subject, data, timeout=10)

    async def close(self) -> None:
        await _close(self._nc)


async def _close(nc: Any) -> None:
    try:
        await nc.close()
    except Exception as exc:  # already gone: nothing left to release
        log.debug("nats: close: %s", exc)


async def subscribe(url: BrokerURL, prefetch: int) -> _Subscription:
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        stream = await _stream_for(js, url)
        ack_wait = float(url.options.get("ackWait", DEFAULT_ACK_WAIT))
        consumer = url.options.get("consumer", DEFAULT_CONSUMER)
        config = ConsumerConfig(ack_wait=ack_wait, max_ack_pending=-1)
        sub = await js.pull_subscribe(url.name, durable=consumer, stream=stream, config=config)
        return _Subscription(nc, sub, ack_wait)
    except BaseException:
        await _close(nc)
        raise


async def publisher(url: BrokerURL) -> _Publisher:
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        await _stream_for(js, url)
        return _Publisher(nc, js, url.name)
    except BaseException:
        await _close(nc)
        raise
