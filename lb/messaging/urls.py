"""The broker URLs of the `messaging:` section, read without importing any broker client.

Two forms, one per broker; the last path segment names what is consumed from or published to:

- ``nats://[user:password@]host[:4222]/<subject>[?stream=NAME&consumer=NAME&ackWait=SECONDS]``:
  a NATS JetStream subject. The stream holding the subject is found (or created, named after
  the subject, when none holds it); requests are read by the durable pull consumer ``consumer``
  (default ``kvgate``), which every gateway process shares.
- ``rabbit://[user:password@]host[:5672]/<queue>[?vhost=NAME]`` (``rabbits://`` for TLS): a
  durable RabbitMQ queue, declared if missing; responses go to the queue through the default
  exchange.

User and password are percent-decoded, as in any URL. ``${NAME}`` anywhere in a URL is replaced
by the environment variable NAME (percent-encoded), so credentials can come from a Secret rather
than sit in the config file; an unset variable is a config error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit

DEFAULT_PORTS = {"nats": 4222, "rabbit": 5672, "rabbits": 5671}
_OPTIONS = {"nats": frozenset({"stream", "consumer", "ackWait"}), "rabbit": frozenset({"vhost"}),
            "rabbits": frozenset({"vhost"})}
_NATS_SUBJECT = re.compile(r"[^\s*>.]+(\.[^\s*>.]+)*")  # no wildcards: one concrete subject
_NATS_NAME = re.compile(r"[A-Za-z0-9_-]+")  # stream and consumer names
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """One parsed broker URL: which broker, where, as whom, and the subject or queue."""

    scheme: str  # "nats", "rabbit" or "rabbits"
    host: str
    port: int
    name: str  # NATS subject or RabbitMQ queue
    user: str = ""
    password: str = field(default="", repr=False)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def broker(self) -> str:
        return "rabbit" if self.scheme.startswith("rabbit") else self.scheme

    @property
    def redacted(self) -> str:
        """The URL as logs show it: no password."""
        who = f"{self.user}@" if self.user else ""
        return f"{self.scheme}://{who}{self.host}:{self.port}/{self.name}"


def parse_broker_url(url: str, environ: Mapping[str, str] = os.environ) -> BrokerURL:
    """Read a broker URL, its ``${NAME}``s replaced from ``environ``; ValueError with a message
    a config error can show (password hidden)."""
    shown = _hide_password(url)
    url = _VARIABLE.sub(lambda m: _variable(m.group(1), environ, shown), url)
    parts = urlsplit(url)
    url = shown
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"unsupported broker URL {url!r}: expected nats://host:port/subject or "
                         "rabbit://user:password@host:port/queue")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    name = unquote(parts.path.lstrip("/"))
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - _OPTIONS[scheme])
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} in {url!r} (known: "
                         f"{', '.join(sorted(_OPTIONS[scheme]))})")
    parsed = BrokerURL(scheme, parts.hostname, port, name, unquote(parts.username or ""),
                       unquote(parts.password or ""), options)
    _check(parsed, url)
    return parsed


def _check(parsed: BrokerURL, url: str) -> None:
    if parsed.broker == "nats":
        if not _NATS_SUBJECT.fullmatch(parsed.name):
            raise ValueError(f"{url!r}: the path must be one NATS subject without wildcards, "
                             "e.g. nats://localhost:4222/requests")
        for key in ("stream", "consumer"):
            if key in parsed.options and not _NATS_NAME.fullmatch(parsed.options[key]):
                raise ValueError(f"{url!r}: {key} must be letters, digits, '-' or '_'")
        if "ackWait" in parsed.options:
            try:
                if float(parsed.options["ackWait"]) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{url!r}: ackWait must be a number of seconds > 0") from None
    elif not parsed.name or "/" in parsed.name:
        raise ValueError(f"{url!r}: the path must be one queue name, e.g. "
                         "rabbit://guest:guest@localhost:5672/requests")


def _variable(name: str, environ: Mapping[str, str], url: str) -> str:
    if name not in environ:
        raise ValueError(f"{url!r}: the environment variable {name} is not set")
    return quote(environ[name], safe="")


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def stream_name(subject: str) -> str:
    """The JetStream stream created for a subject no stream holds: `a.b-c` -> `KVGATE_a_b-c`."""
    return "KVGATE_" + re.sub(r"[^A-Za-z0-9_-]", "_", subject)
