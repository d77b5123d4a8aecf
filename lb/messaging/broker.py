"""What the messenger needs of a broker, and nothing more: receive request messages, settle each
(ack once its response is published, or hand it back), and publish responses.

Each broker (``nats_jetstream``, ``rabbitmq``) implements it with its own async client, imported
only when a stream uses it. A broker's trouble surfaces as an exception from these calls; the
messenger then closes the session and opens a new one after a back-off.
"""

from __future__ import annotations

from typing import Protocol

from lb.messaging.urls import BrokerURL


class TooLarge(Exception):
    """A message the broker refuses for its size (the message's fault, not the broker's)."""


class Delivery(Protocol):
    """One request message, unsettled until ``ack`` or ``nack``."""

    data: bytes

    async def ack(self) -> None:
        """Done with: the broker will not deliver it again."""

    async def nack(self) -> None:
        """Not done with: the broker delivers it again (here or to another consumer)."""

    async def progress(self) -> None:
        """Still being worked on: keeps a broker with an ack deadline from redelivering it."""


class Subscription(Protocol):
    # How often a delivery in flight must report progress (None: the broker needs no reminder).
    progress_seconds: float | None

    async def receive(self, limit: int) -> list[Delivery]:
        """Between 0 and ``limit`` messages, waiting at most about a second for the first."""

    async def close(self) -> None: ...


class Publisher(Protocol):
    async def publish(self, data: bytes) -> None:
        """Returns once the broker has stored the message (a JetStream ack, a publisher
        confirm), so that acknowledging the request afterwards loses nothing."""

    async def close(self) -> None: ...


async def subscribe(url: BrokerURL, prefetch: int) -> Subscription:
    """A subscription to the queue or subject of ``url``; at most ``prefetch`` unsettled."""
    if url.broker == "nats":
        from lb.messaging import nats_jetstream
        return await nats_jetstream.subscribe(url, prefetch)
    from lb.messaging import rabbitmq
    return await rabbitmq.subscribe(url, prefetch)


async def publisher(url: BrokerURL) -> Publisher:
    """A publisher to the queue or subject of ``url``."""
    if url.broker == "nats":
        from lb.messaging import nats_jetstream
        return await nats_jetstream.publisher(url)
    from lb.messaging import rabbitmq
    return await rabbitmq.publisher(url)
