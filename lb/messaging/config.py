"""The `messaging:` section of the gateway's config, in KubeAI's shape:

```yaml
messaging:
  errorMaxBackoff: 30s
  streams:
    - requestsURL: nats://nats:4222/requests
      responsesURL: nats://nats:4222/responses
      maxHandlers: 8
```

Every gateway process (each worker, each replica) consumes every stream: the broker shares a
stream's messages between them (a JetStream durable consumer, a RabbitMQ queue), so capacity
grows with the gateways and a process that dies leaves its unanswered messages to the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lb.messaging.urls import parse_broker_url
from lb.schema import SchemaError, setting

Duration = str | int | float  # "30s", "1m30s", "500ms" (Go style, as KubeAI writes it) or seconds
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_JSON = {"anyOf": [{"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"},
                            {"type": "number", "exclusiveMinimum": 0}]}
_URL_JSON = {"pattern": r"^(nats|rabbits?)://[^/]+/.+$"}


def seconds(value: Duration) -> float:
    """Seconds in a Go-style duration ("1m30s") or a plain number; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    parts = _DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise ValueError(f"not a duration: {value!r} (e.g. 500ms, 30s, 1m)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass(frozen=True, slots=True)
class MessageStream:
    """One subscription whose request messages are answered on one response topic."""

    requests_url: str = setting(key="requestsURL", json=_URL_JSON, doc=(
        "Where request messages are consumed: nats://host:4222/subject (JetStream) or "
        "rabbit://user:password@host:5672/queue."))
    responses_url: str = setting(key="responsesURL", json=_URL_JSON, doc=(
        "Where response messages are published, in the same forms."))
    max_handlers: int = setting(1, minimum=1, maximum=10_000, doc=(
        "Messages of this stream in flight at once in each gateway process."))
    api_key: str = setting("", doc=(
        "With apiKeys enabled: the name of the key the stream's requests run under (its models, "
        "limits and priority); required then."))

    def __post_init__(self) -> None:
        for key, url in (("requestsURL", self.requests_url), ("responsesURL", self.responses_url)):
            try:
                parse_broker_url(url)
            except ValueError as exc:
                raise SchemaError((key,), str(exc)) from None
        if parse_broker_url(self.requests_url) == parse_broker_url(self.responses_url):
            raise SchemaError(("responsesURL",), "must differ from requestsURL: responses would "
                              "be read back as requests")


@dataclass(frozen=True, slots=True)
class MessagingConfig:
    error_max_backoff: Duration = setting("30s", json=_DURATION_JSON, doc=(
        "Longest wait between attempts to reach a broker that failed: the n-th consecutive "
        "failure waits min(n seconds, this)."))
    streams: tuple[MessageStream, ...] = setting((), doc=(
        "Request subscriptions and their response topics (KubeAI's messaging.streams)."))

    def __post_init__(self) -> None:
        try:
            if seconds(self.error_max_backoff) <= 0:
                raise ValueError(f"must be > 0, got {self.error_max_backoff!r}")
        except ValueError as exc:
            raise SchemaError(("errorMaxBackoff",), str(exc)) from None

    @property
    def error_max_backoff_seconds(self) -> float:
        return seconds(self.error_max_backoff)
