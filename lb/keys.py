"""API keys: who is calling, which models they may use, and what they may spend.

Keys live in a YAML file (``apiKeys.file``), one entry per key with its name, the sha256 of its
secret (never the secret itself), the model names it may use (globs), its limits, a priority
class and an optional expiry. A key may also carry a ``modelSelector`` (a Kubernetes label
selector over the Models' labels): it may then use a model only when a glob allows the name and
the selector matches the labels of the Model (an adapter: of its base Model). ``kvgate keys
create|list|revoke`` writes the file; the gateway polls its identity (mtime, size, inode: off
the request path, in a thread) and swaps the whole table in when it changes, so a revoked key is
refused within ``reloadSeconds`` and no restart is needed. A file that no longer parses is
reported and the keys in force are kept.

A request presents its key as ``Authorization: Bearer <secret>`` (OpenAI's SDKs) or
``x-api-key: <secret>`` (Anthropic's, on /v1/messages). The secret is hashed and looked up;
it is never logged, exported or stored in clear. A secret that was found is remembered in
memory (``KeyStore``'s cache, by the header's raw value) so that a key's next requests cost a
dict lookup instead of a parse and a SHA-256; the cache is emptied whenever the keys in force
change and holds only values that matched a key, so unknown secrets cannot grow it and always
pay the hash and the 401.
"""

from __future__ import annotations

import asyncio
import datetime
import fnmatch
import hashlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lb.errors import GatewayError
from lb.limits import LimitTable
from lb.selectors import Requirement, SelectorError, matches, parse_selector
from lb.schema import SchemaError, decode_object, read_yaml, setting

if TYPE_CHECKING:
    from lb.model import Model

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-kvg-"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
# The headers a client's key travels in: stripped before a request goes upstream.
KEY_HEADERS = frozenset((b"authorization", b"x-api-key"))


@dataclass(frozen=True, slots=True)
class ApiKeysConfig:
    enabled: bool = setting(False, doc="Require an API key from `file` on every API request (401 "
                            "without one), and apply its models and limits. Off: anyone who can "
                            "reach the gateway may use every model.")
    file: str = setting("", doc="The keys file (`kvgate keys create` writes it); read at start and "
                        "again whenever it changes.")
    reload_seconds: float = setting(2.0, doc="How often the keys file is checked for changes.",
                                    exclusive_minimum=0)
    upstream_key_env: dict[str, str] = setting(
        factory=dict, doc="Per model name: an environment variable holding the key sent to that "
        "model's servers as `Authorization: Bearer ...` (the client's own key never goes "
        "upstream).", json={"additionalProperties": {"type": "string", "minLength": 1}})


@dataclass(frozen=True, slots=True)
class KeyLimits:
    requests_per_minute: int = setting(0, doc="Requests admitted per minute (a burst of this "
                                       "many, then one every 60/N s); 0: no limit.", minimum=0,
                                       maximum=10**9)
    tokens_per_minute: int = setting(0, doc="Tokens per minute: prompt bytes / 4 + max_tokens at "
                                     "admission, corrected by the response's usage; 0: no limit.",
                                     minimum=0, maximum=10**10)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str = setting(doc="Who the key belongs to; the label of its metrics.", pattern=_NAME)
    hash: str = setting(doc="`sha256:` and the hex SHA-256 of the secret.",
                        pattern=r"^sha256:[0-9a-f]{64}$")
    models: tuple[str, ...] = setting(("*",), doc="Model names the key may use, as globs "
                                      "(`llama-*`); an adapter is `model_adapter`.")
    model_selector: str = setting("", doc="A Kubernetes label selector (`team=a,tier!=gpu`): "
                                  "the key may use only Models whose labels match it (an "
                                  "adapter: its base Model's), besides what `models` allows; "
                                  "empty: no selector.")
    limits: KeyLimits = field(default_factory=KeyLimits)
    priority: str = setting("default", doc="The key's priority class.", pattern=_NAME)
    expires_at: str = setting("", doc="ISO 8601 time after which the key is refused; empty: "
                              "never.")
    created_at: str = setting("", doc="When the key was created (informational).")


@dataclass(frozen=True, slots=True)
class KeysFile:
    keys: tuple[ApiKey, ...] = ()


def new_secret() -> str:
    """A fresh secret: the prefix and 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str | bytes) -> str:
    """The stored form of a secret."""
    data = secret.encode() if isinstance(secret, str) else secret
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_keys(path: str | Path) -> KeysFile:
    """Read and validate a keys file (sync: start-up, the CLI, or a worker thread)."""
    return read_yaml(path, keys_from_dict)


def keys_from_dict(data: Any) -> KeysFile:
    if isinstance(data, dict) and isinstance(data.get("keys"), list):
        # YAML reads an unquoted timestamp as a datetime; the schema speaks strings.
        data = {**data, "keys": [_timestamps_as_text(item) for item in data["keys"]]}
    keys = decode_object(KeysFile, data)
    names: set[str] = set()
    hashes: set[str] = set()
    for i, key in enumerate(keys.keys):
        if key.name in names:
            raise SchemaError(("keys", i, "name"), f"another key is named {key.name!r}")
        if key.hash in hashes:
            raise SchemaError(("keys", i, "hash"), "another key has the same hash")
        if key.model_selector:
            try:
                parse_selector(key.model_selector)
            except SelectorError as exc:
                raise SchemaError(("keys", i, "modelSelector"), str(exc)) from None
        if key.expires_at:
            try:
                expiry_of(key.expires_at)
            except ValueError:
                raise SchemaError(("keys", i, "expiresAt"), "expected an ISO 8601 time, got "
                                  f"{key.expires_at!r}") from None
        names.add(key.name)
        hashes.add(key.hash)
    return keys


def _timestamps_as_text(item: Any) -> Any:
    if not isinstance(item, dict):
        return item
    return {k: v.isoformat() if isinstance(v, (datetime.datetime, datetime.date)) else v
            for k, v in item.items()}


def expiry_of(text: str) -> float:
    """An ISO 8601 time as a Unix time; a time without a zone is UTC."""
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def keys_to_dict(keys: KeysFile) -> dict[str, Any]:
    """The file's form of ``keys`` (camelCase keys, defaults left out)."""
    out = []
    for key in keys.keys:
        entry: dict[str, Any] = {"name": key.name, "hash": key.hash, "models": list(key.models)}
        if key.model_selector:
            entry["modelSelector"] = key.model_selector
        limits = {k: v for k, v in (("requestsPerMinute", key.limits.requests_per_minute),
                                    ("tokensPerMinute", key.limits.tokens_per_minute)) if v}
        if limits:
            entry["limits"] = limits
        entry["priority"] = key.priority
        for name, value in (("expiresAt", key.expires_at), ("createdAt", key.created_at)):
            if value:
                entry[name] = value
        out.append(entry)
    return {"keys": out}


_NEVER = float("inf")  # the expiry of a key without one


class Tenant:
    """A key as the request path uses it: its name, models, limits and limit-table slot."""

    __slots__ = ("name", "rpm", "tpm", "rpm_text", "tpm_text", "priority", "expires", "slot",
                 "_pattern", "_selector", "allowed", "counts")

    def __init__(self, key: ApiKey, slot: int) -> None:
        self.name = key.name
        self.rpm = key.limits.requests_per_minute
        self.tpm = key.limits.tokens_per_minute
        self.rpm_text = b"%d" % self.rpm  # the x-ratelimit-limit-* values, made once
        self.tpm_text = b"%d" % self.tpm
        self.priority = key.priority
        self.expires = expiry_of(key.expires_at) if key.expires_at else _NEVER
        self.slot = slot
        self._pattern = re.compile("|".join(fnmatch.translate(p) for p in key.models) or "(?!)")
        self._selector: list[Requirement] | None = (parse_selector(key.model_selector)
                                                     if key.model_selector else None)
        # The names the key may use, each with the Model it was allowed on: the registry
        # replaces a Model's object whenever the Model changes (it is frozen), so another
        # object, perhaps with other labels, is decided again. Only names that exist and were
        # allowed are kept: the cache stays bounded. Read by ``lb.admission`` directly.
        self.allowed: dict[str, Model] = {}
        # The metrics' [admitted requests, tokens charged] of the key's name, shared with the
        # tenants it had before a reload (``lb.admission`` fetches it on first use).
        self.counts: list[int] | None = None

    def allows(self, name: str, model: Model) -> bool:
        """Whether the key may use ``name`` (a model, or ``model_adapter``) served by the Model
        ``model``: a glob allows the name and the selector, if any, matches ``model``'s
        labels."""
        if self.allowed.get(name) is model:
            return True
        ok = self._pattern.match(name) is not None and (
            self._selector is None or matches(self._selector, model.labels))
        if ok:
            self.allowed[name] = model
        return ok


def _ignore(name: str, reason: str) -> None:
    """A ``KeyStore.rejected`` that counts nothing."""


def _tag(digest_hex: str) -> int:
    return int(digest_hex[:16], 16) or 1  # 0 marks a free slot


class KeyStore:
    """The keys in force, by hash, and the loop that reloads them when their file changes."""

    # At most this many secrets are remembered (see ``authenticate``); past it the cache is
    # emptied and refills with the keys in use.
    CACHE_SIZE = 4096

    def __init__(self, config: ApiKeysConfig, table: LimitTable) -> None:
        self.config = config
        self.table = table
        self.tenants: dict[str, Tenant] = {}
        # Raw values of key headers that authenticated (``Authorization``, ``x-api-key``).
        self._known_bearer: dict[bytes, Tenant] = {}
        self._known_plain: dict[bytes, Tenant] = {}
        self._identity: tuple[int, int, int] | None = None
        self.reloads = 0
        # Told of each refusal (key name, reason), for the metrics: ``lb.admission`` sets it.
        self.rejected: Callable[[str, str], None] = _ignore
        self.load(read_keys(config.file), _identity(config.file))
        self.upstream_keys = _upstream_keys(config.upstream_key_env)

    def load(self, keys: KeysFile, identity: tuple[int, int, int] | None = None) -> None:
        """Put ``keys`` in force (the dict is swapped whole: a request sees old or new)."""
        tenants = {}
        for key in keys.keys:
            digest = key.hash[len("sha256:"):]
            tenants[digest] = Tenant(key, self.table.slot(_tag(digest)))
        # The secrets of the keys no longer in force are forgotten with them.
        self._known_bearer = {}
        self._known_plain = {}
        self.tenants = tenants
        self._identity = identity

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Tenant:
        """The tenant whose key the request carries, or a 401.

        The common case is one pass over the headers to the first key header and one dict
        lookup of its raw value (``Bearer sk-...`` as sent): a value that authenticated before
        is remembered per header name, so its scheme is not parsed nor its secret hashed
        again. Anything else takes ``_authenticate`` (parse, hash, look up, remember)."""
        for name, value in headers:
            if name == b"authorization":
                tenant = self._known_bearer.get(value)
                break
            if name == b"x-api-key":
                tenant = self._known_plain.get(value)
                break
        else:
            tenant = None
        if tenant is None:
            tenant = self._authenticate(headers)
        if tenant.expires != _NEVER and tenant.expires <= time.time():
            self.rejected(tenant.name, "expired")
            raise KeyExpired(tenant.name)
        return tenant

    def _authenticate(self, headers: list[tuple[bytes, bytes]]) -> Tenant:
        """The tenant of a key header not remembered: the secret found (the first Bearer
        token or ``x-api-key``), hashed and looked up; remembered under its header's raw value
        when it matched, else a 401. Only values that matched a key are remembered, so the
        cache holds about one entry per key in force (the cap is a second line of defence)."""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    secret, known = token.strip(), self._known_bearer
                    break
            elif name == b"x-api-key":
                secret, known = value.strip(), self._known_plain
                break
        else:
            secret = b""
        if not secret:
            self.rejected("unknown", "invalid_key")
            raise GatewayError(401, "You didn't provide an API key. Send it as `Authorization: "
                               "Bearer <key>`.", code="invalid_api_key")
        tenant = self.tenants.get(hashlib.sha256(secret).hexdigest())
        if tenant is None:
            self.rejected("unknown", "invalid_key")
            raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
        if self.cached_keys >= self.CACHE_SIZE:
            self._known_bearer.clear()
            self._known_plain.clear()
        known[value] = tenant
        return tenant

    def tenant_named(self, name: str) -> Tenant | None:
        """The key named ``name`` as it is now, for work that outlives a request (a batch's
        lines, a stream's messages): None once revoked (gone from the file) or expired."""
        for tenant in self.tenants.values():
            if tenant.name == name:
                return tenant if tenant.expires > time.time() else None
        return None

    @property
    def cached_keys(self) -> int:
        """How many secrets are remembered now."""
        return len(self._known_bearer) + len(self._known_plain)

    async def watch(self) -> None:
        """Reload the file whenever its identity changes; never on the request path."""
        while True:
            await asyncio.sleep(self.config.reload_seconds)
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad read
                log.exception("reloading the API keys failed; the keys in force are kept")

    async def reload(self) -> bool:
        """Re-read the file if it changed; True when new keys were put in force."""
        identity = await asyncio.to_thread(_identity, self.config.file)
        if identity == self._identity:
            return False
        try:
            keys = await asyncio.to_thread(read_keys, self.config.file)
        except SchemaError as exc:
            log.error("API keys not reloaded: %s; the keys in force are kept", exc)
            self._identity = identity  # reported once, not on every poll
            return False
        self.load(keys, identity)
        self.reloads += 1
        log.info("API keys reloaded from %s: %d keys", self.config.file, len(keys.keys))
        return True


class KeyExpired(GatewayError):
    """A known key past its expiry: 401, and counted under its name."""

    def __init__(self, name: str) -> None:
        super().__init__(401, "This API key has expired.", code="invalid_api_key")
        self.name = name


def check_keys(config: ApiKeysConfig) -> None:
    """Fail at start-up (before any worker forks) on a keys file or upstream key that would
    make every worker fail."""
    if config.enabled:
        read_keys(config.file)
        _upstream_keys(config.upstream_key_env)


def _identity(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten (in place, or renamed over as the CLI does)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _upstream_keys(env: dict[str, str]) -> dict[str, list[tuple[bytes, bytes]]]:
    """Per model, the Authorization header its servers get (from the named variables)."""
    out = {}
    for model, variable in env.items():
        value = os.environ.get(variable)
        if not value:
            raise SchemaError(("apiKeys", "upstreamKeyEnv", model),
                              f"the environment variable {variable} is not set")
        out[model] = [(b"authorization", b"Bearer " + value.encode())]
    return out

