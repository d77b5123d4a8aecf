"""The `Model` resource: the one definition shared by the gateway, both operator runtimes and the chart.

The dataclasses below *are* the schema. Parsing, validation, serialisation and the Kubernetes
CustomResourceDefinition are all derived from their fields and field metadata, so a field added
here shows up everywhere at once and the Python and cluster-side rules cannot drift apart.

Wire format: KubeAI's `kubeai.org/v1` Model (camelCase manifest keys), under `kvgate.dev/v1`.
A KubeAI manifest is accepted unchanged.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING, dataclass, field
from types import NoneType, UnionType
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence, Union, get_args, get_origin
from urllib.parse import parse_qsl

import yaml

from lb.schema import (FieldSpec, JsonSchema, Meta, SchemaError, camel, check_bounds, decode, decode_object,
                       fields_of, load_yaml_documents, setting, unknown_key)

GROUP = "kvgate.dev"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
KUBEAI_API_VERSION = "kubeai.org/v1"
KIND = "Model"
PLURAL = "models"

Engine = Literal["OLlama", "VLLM", "FasterWhisper", "Infinity", "Sim", "LlamaCpp"]
Feature = Literal["TextGeneration", "TextEmbedding", "SpeechToText", "Reranking"]
Strategy = Literal["LeastLoad", "PrefixHash", "Random", "LeastQueue", "CacheAware"]
PrefixSource = Literal["FirstUserMessage", "Conversation"]
LoadUnit = Literal["Requests", "Tokens"]
Scoring = Literal["CostModel", "Weights"]
ConditionStatus = Literal["True", "False", "Unknown"]
ENGINES: tuple[str, ...] = get_args(Engine)
FEATURES: tuple[str, ...] = get_args(Feature)
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# Sim emulates vLLM's runtime LoRA endpoints, so it takes adapters too.
ADAPTER_ENGINES = ("VLLM", "Sim")
PRIORITY_ENGINES = ("VLLM", "Sim")  # the engines with vLLM's --scheduling-policy priority
MODEL_URL_SCHEMES = ("hf", "pvc", "ollama", "s3", "gs", "oss", "file")
ADAPTER_URL_SCHEMES = ("hf", "s3", "gs", "oss", "file")
# A cache profile downloads the model once into shared storage: only remote object sources qualify.
CACHEABLE_SCHEMES = ("hf", "s3", "gs", "oss")
# Model servers cannot read these directly; only the cache-loading step fetches them.
CACHE_ONLY_SCHEMES = ("gs", "oss")
MAX_NAME_LENGTH = 40

# DNS-1123 subdomain, what Kubernetes enforces for object names: dots are allowed because
# KubeAI's own catalog uses them ("qwen2.5-7b-cpu"); '_' never is, which keeps "<model>_<adapter>" unambiguous.
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_URL_RE = re.compile(r"([a-z0-9]+)://(\S+)")
_URL_PARAMS = {"model": "a model name", "insecure": "true or false", "pull": "true or false"}


ModelValidationError = SchemaError  # the name the planes' callers know; located by wire path


# ---------------------------------------------------------------------------------------------
# Rules and field metadata: each constraint is written once and used both here and in the CRD.


@dataclass(frozen=True, slots=True)
class _Rule:
    """A constraint stated as CEL for the API server and as Python for local mode, side by side.

    `ok` takes the value the rule sits on (or `(old, new)` for update rules). `field` is where the
    error points, relative to that value.
    """

    message: str
    cel: str
    ok: Callable[..., bool]
    field: str = ""


@dataclass(frozen=True, slots=True)
class _Meta(Meta):
    """`Meta` plus what only the Model has: CEL rules beside their Python twins, list keys, immutability."""

    list_key: str | None = None  # items are unique by this key (a list-type map in Kubernetes)
    rules: tuple[_Rule, ...] = ()
    check: Callable[[Any], object] | None = None  # Python-only extra check; raises ValueError
    immutable: bool = False  # like CEL `self == oldSelf`: enforced only while both sides are set


def _field(default: Any = MISSING, *, factory: Any = MISSING, doc: str, **meta: Any) -> Any:
    return setting(default, factory=factory, meta=_Meta, doc=doc, **meta)


def _cel_strings(values: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _cel_prefixed(expr: str, schemes: Sequence[str]) -> str:
    return "(" + " || ".join(f'{expr}.startsWith("{s}://")' for s in schemes) + ")"


def _scheme_of(url: str) -> str:
    return url.partition("://")[0] if "://" in url else ""


def _scheme_rule(schemes: Sequence[str]) -> _Rule:
    listed = ", ".join(f'"{s}://"' for s in schemes)
    return _Rule(
        message=f"must start with one of {listed}",
        cel=_cel_prefixed("self", schemes),
        ok=lambda url: _scheme_of(url) in schemes,
    )


def _is_set(value: Any) -> bool:
    """Empty means unset, as with KubeAI's `omitempty` Go fields: "" and absent must not differ."""
    return value is not None and value != "" and value != () and value != {}


# ---------------------------------------------------------------------------------------------
# Model URLs


@dataclass(frozen=True, slots=True)
class ModelURL:
    """A parsed `url`: `<scheme>://<ref>[?model=..&insecure=..&pull=..]`.

    `name`/`path` split `ref` at the first "/" (bucket or PVC name, then the path inside it).
    """

    scheme: str
    ref: str
    params: Mapping[str, str]

    @property
    def name(self) -> str:
        return self.ref.partition("/")[0]

    @property
    def path(self) -> str:
        return self.ref.partition("/")[2]

    @property
    def model(self) -> str:
        """The model inside the source, for sources that hold several (e.g. an Ollama store on a PVC)."""
        return self.params.get("model", "")

    @property
    def insecure(self) -> bool:
        return self.params.get("insecure") == "true"

    @property
    def pull(self) -> bool:
        return self.params.get("pull") != "false"


def parse_model_url(url: str) -> ModelURL:
    """Parse a model or adapter url; raise ValueError saying what is wrong with it."""
    match = _URL_RE.fullmatch(url)
    if not match:
        raise ValueError(f"invalid url {url!r}: expected <scheme>://<ref> without spaces")
    scheme, rest = match.groups()
    ref, _, query = rest.partition("?")
    if not ref:
        raise ValueError(f"invalid url {url!r}: nothing after {scheme}://")
    pairs = parse_qsl(query, keep_blank_values=True)
    params = dict(pairs)
    if len(params) != len(pairs):
        raise ValueError(f"invalid url {url!r}: a query parameter is repeated")
    for key, value in params.items():
        _check_url_param(url, key, value)
    return ModelURL(scheme, ref, params)


def _check_url_param(url: str, key: str, value: str) -> None:
    if key not in _URL_PARAMS:
        raise ValueError(f"invalid url {url!r}: unknown query parameter {key!r} (known: {', '.join(_URL_PARAMS)})")
    valid = bool(value) if key == "model" else value in ("true", "false")
    if not valid:
        raise ValueError(f"invalid url {url!r}: {key}= must be {_URL_PARAMS[key]}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Model names with adapters ("<model>_<adapter>", KubeAI's convention in the OpenAI `model` field)


def split_model_adapter(requested: str) -> tuple[str, str]:
    """Split at the first "_": model names cannot contain one, adapter names come after it."""
    model, _, adapter = requested.partition("_")
    return model, adapter


def join_model_adapter(model: str, adapter: str) -> str:
    if "_" in model:
        raise ValueError(f"model name {model!r} contains '_', which separates model from adapter")
    return f"{model}_{adapter}" if adapter else model


# ---------------------------------------------------------------------------------------------
# Checking and encoding over the dataclasses (decoding is lb.schema's)


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, UnionType):
        return next(arg for arg in get_args(tp) if arg is not NoneType)
    return tp


def _check_value(tp: Any, meta: _Meta, value: Any, path: str) -> None:
    """One field's checks, on every construction (decoded or built in code): enum, bounds, list keys, rules."""
    tp = _strip_optional(tp)
    if get_origin(tp) is Literal and value not in get_args(tp):
        raise ModelValidationError(path, f"must be one of {', '.join(get_args(tp))}, got {value!r}")
    if get_origin(tp) is tuple:
        _check_items(get_args(tp)[0], meta, value, path)
    check_bounds(meta, value, path)
    for rule in meta.rules:
        if not rule.ok(value):
            raise ModelValidationError(path, f"{rule.message}, got {value!r}")
    if meta.check is not None:
        try:
            meta.check(value)
        except ValueError as err:
            raise ModelValidationError(path, str(err)) from None


def _check_items(item_tp: Any, meta: _Meta, items: tuple[Any, ...], path: str) -> None:
    seen: set[Any] = set()
    for i, item in enumerate(items):
        if get_origin(item_tp) is Literal:
            _check_value(item_tp, _Meta(), item, f"{path}[{i}]")
        if meta.list_key is not None:
            key = getattr(item, meta.list_key)
            if key in seen:
                raise ModelValidationError(f"{path}[{i}].{camel(meta.list_key)}", f"duplicate value {key!r}")
            seen.add(key)


class _Resource:
    """Shared behaviour of the schema dataclasses: validated on construction, to/from the wire."""

    __slots__ = ()
    _RULES: ClassVar[tuple[_Rule, ...]] = ()
    _UPDATE_RULES: ClassVar[tuple[_Rule, ...]] = ()

    def __post_init__(self) -> None:
        for spec in fields_of(type(self)):
            value = getattr(self, spec.name)
            if value is not None:
                _check_value(spec.type, spec.meta, value, spec.key)
        for rule in self._RULES:
            if not rule.ok(self):
                raise ModelValidationError(rule.field, rule.message)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Any:
        return decode_object(cls, obj)

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)


def _encode(value: Any) -> Any:
    if isinstance(value, _Resource):
        out = {}
        for spec in fields_of(type(value)):
            item = getattr(value, spec.name)
            if spec.required or _is_set(item):
                out[spec.key] = _encode(item)
        return out
    if isinstance(value, (tuple, list)):
        return [_encode(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _encode(item) for key, item in value.items()}
    return value


def _check_update(old: _Resource, new: _Resource, path: tuple[str, ...]) -> None:
    for spec in fields_of(type(old)):
        before, after = getattr(old, spec.name), getattr(new, spec.name)
        where = path + (spec.key,)
        if spec.meta.immutable and _is_set(before) and _is_set(after) and before != after:
            raise ModelValidationError(where, f"is immutable (was {before!r}, now {after!r})")
        if isinstance(before, _Resource) and isinstance(after, _Resource):
            _check_update(before, after, where)
    for rule in type(old)._UPDATE_RULES:
        if not rule.ok(old, new):
            raise ModelValidationError(rule.field, rule.message).under(path)


# ---------------------------------------------------------------------------------------------
# The schema


MAX_SPLITS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Split(_Resource):
    to: str = _field(
        doc="Where this share of the requests goes, by the name a client would ask for: another Model, or "
        "<model>_<adapter> (this Model's own adapters too).",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(_[a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
        max_length=127,
    )
    weight: int = _field(doc="Percent of the requests for this name sent there.", minimum=1, maximum=100)


def _splits_rule() -> _Rule:
    """The weights of a name's splits add up to at most 100 (the rest stays on the name)."""
    terms = " + ".join(f"(size(self.splits) > {i} ? self.splits[{i}].weight : 0)"
                       for i in range(MAX_SPLITS))
    return _Rule(field="splits", message="split weights add up to at most 100",
                 cel=f"!has(self.splits) || {terms} <= 100",
                 ok=lambda s: sum(split.weight for split in s.splits) <= 100)


def _splits_field() -> Any:
    return _field((), doc="Canary routing: a weighted share of the requests for this name goes to another "
                  "name instead (by the session header's value where a request has one, so a session stays "
                  "on one side; evenly spread otherwise); the answer keeps the name the client asked for.",
                  max_items=MAX_SPLITS, list_key="to")


@dataclass(frozen=True, slots=True, kw_only=True)
class Adapter(_Resource):
    name: str = _field(
        doc="Adapter name; requested as <model>_<name>, so it cannot contain '_'.",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
    )
    url: str = _field(
        doc="Where the LoRA adapter is loaded from.",
        rules=(_scheme_rule(ADAPTER_URL_SCHEMES),),
        check=parse_model_url,
    )
    splits: tuple[Split, ...] = _splits_field()

    _RULES: ClassVar[tuple[_Rule, ...]] = (_splits_rule(),)


@dataclass(frozen=True, slots=True, kw_only=True)
class File(_Resource):
    path: str = _field(
        doc="Absolute path where the file is mounted in the model server.",
        max_length=1024,
        rules=(
            _Rule(
                message="must be an absolute path without ':'",
                cel="self.startsWith('/') && !self.contains(':')",
                ok=lambda path: path.startswith("/") and ":" not in path,
            ),
        ),
    )
    content: str = _field(doc="Content of the file.", max_length=100000)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixHash(_Resource):
    mean_load_factor: int = _field(
        125,
        doc="Percent of the mean load a replica may carry before requests spill to the next one on the ring.",
        minimum=100,
    )
    replication: int = _field(
        256,
        doc="Virtual nodes per replica on the hash ring. Immutable: changing it would remap every prefix.",
        minimum=1,
        immutable=True,
    )
    prefix_char_length: int = _field(100, doc="Characters of the prompt that are hashed.", minimum=0)
    prefix_from: PrefixSource = _field(
        "FirstUserMessage",
        doc="What the hashed characters are taken from: the first user message (KubeAI's key), or the "
        "whole conversation as rendered from its start (tools, system prompt, every message), so requests "
        "that share a long system prompt or document meet on one replica.",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class KVEvents(_Resource):
    """Where each replica publishes its KV-cache events (vLLM's --kv-events-config)."""

    port: int = _field(5557, doc="Port of each replica's KV-event PUB socket (vLLM's endpoint).",
                       minimum=1, maximum=65535)
    replay_port: int = _field(
        5558, doc="Port of each replica's replay socket (vLLM's replay_endpoint); 0 if it has none, "
        "in which case a missed event leaves that replica's index untrusted until it restarts.",
        minimum=0, maximum=65535)
    topic: str = _field("", doc="Topic the replicas publish under (vLLM's topic; empty: any).")


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheAware(_Resource):
    """The CacheAware strategy: score replicas within CHWBL's bound by the prompt blocks they are
    believed to hold, their load and their engine's queue (llm-d's scorers, on the gateway's own
    prefix index or, with kvEvents, the engines' own caches)."""

    block_chars: int = _field(
        256,
        doc="Bytes of rendered conversation per block of the prefix index (~64 tokens at 4 bytes a "
        "token). Smaller blocks match more finely and cost more to hash and remember.",
        minimum=16, maximum=65536,
    )
    max_blocks: int = _field(
        128,
        doc="Blocks hashed per request: the index matches prompts on their first maxBlocks*blockChars "
        "bytes.",
        minimum=1, maximum=4096,
    )
    index_blocks: int = _field(
        8192,
        doc="Blocks remembered per replica, least recently routed forgotten first: size it like the "
        "replica's prefix cache (KV cache tokens * 4 / blockChars) so the index forgets what the engine "
        "would have evicted.",
        minimum=1, maximum=16777216,
    )
    mean_load_factor: int = _field(
        125,
        doc="The hard bound (CHWBL's): no replica takes a request while it carries this percent of the "
        "mean load or more, whatever its cache holds.",
        minimum=100,
    )
    scoring: Scoring = _field(
        "CostModel",
        doc="How candidates within the bound are compared. CostModel: the lowest estimated time to first "
        "token, in tokens of prefill (loadTokens per in-flight request + queueTokens per request waiting in "
        "the engine + the prompt's tokens the replica does not hold). Weights: the highest weighted sum of "
        "prefix share, headroom and engine queue (prefixWeight, loadWeight, queueWeight).",
    )
    load_tokens: int = _field(
        16,
        doc="CostModel: prefill tokens one in-flight request on a replica is worth to a new request's time "
        "to first token (a running request slows each engine step a little; requests still prefilling show "
        "up in the engine's queue).",
        minimum=0, maximum=1 << 20,
    )
    queue_tokens: int = _field(
        0,
        doc="CostModel: prefill tokens each request waiting in a replica's engine is worth (read from the "
        "replicas' metrics, engineMetrics; ignored when stale). Off by default: a reading is up to one "
        "scrape interval old, and at hundreds of picks a second the replica that looked idle gets them all "
        "(the routing study's documents workload: 2.4x PrefixHash's mean TTFT at 512, 0.43x at 0).",
        minimum=0, maximum=1 << 20,
    )
    prefix_weight: int = _field(
        3, doc="Weights scoring: weight of prefix affinity: the share of the prompt's blocks a replica is believed to hold.",
        minimum=0, maximum=1000,
    )
    load_weight: int = _field(
        1, doc="Weights scoring: weight of load: a replica's in-flight load relative to the busiest candidate's.",
        minimum=0, maximum=1000,
    )
    queue_weight: int = _field(
        1,
        doc="Weights scoring: weight of the engine's own queue (waiting requests, and a full KV cache as queued work) relative "
        "to the longest among candidates; read from the replicas' metrics (engineMetrics), ignored when stale.",
        minimum=0, maximum=1000,
    )
    kv_events: KVEvents | None = _field(
        None, doc="Follow the replicas' KV-cache events to know exactly which prompt blocks each "
        "one holds (the precise prefix index); unset: no subscription.")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancing(_Resource):
    strategy: Strategy = _field("LeastLoad", doc="How a replica is picked for each request.")
    prefix_hash: PrefixHash = _field(factory=PrefixHash, doc="Settings of the PrefixHash strategy.")
    cache_aware: CacheAware = _field(factory=CacheAware, doc="Settings of the CacheAware strategy.")
    load_unit: LoadUnit = _field(
        "Requests",
        doc="What a replica's load counts, for PrefixHash's bound and LeastLoad: in-flight requests, or "
        "their estimated tokens (prompt bytes / 4 + max_tokens), so a long prompt weighs what it costs.",
    )
    replica_capacity: int = _field(
        0, doc="Most in-flight load (in loadUnit) one replica is given; when every replica that could serve a "
        "request is there, the request queues in the gateway (by priority class, fair across API keys) "
        "instead of piling onto a model server. 0: no cap beyond the strategy's own bound.",
        minimum=0, maximum=1 << 30,
    )
    priority_scheduling: bool = _field(
        False, doc="The replicas schedule by priority (VLLM and Sim engines: --scheduling-policy priority): "
        "every request carries its priority class to the engine as vLLM's `priority` (minus the class's "
        "priority: higher classes are lower values, admitted first), replacing any the client sent, so the "
        "engine admits interactive prompts ahead of queued offline work.",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec(_Resource):
    url: str = _field(
        doc="Model source: hf://<repo>, pvc://<claim>[/<path>], ollama://<model>, s3://, gs://, oss:// "
        "or file://<path> (local mode); query parameters model=, insecure=, pull=.",
        rules=(_scheme_rule(MODEL_URL_SCHEMES),),
        check=parse_model_url,
    )
    engine: Engine = _field(doc="Model server that runs the model.")
    features: tuple[Feature, ...] = _field(doc="APIs the model serves.")
    adapters: tuple[Adapter, ...] = _field((), doc="LoRA adapters (VLLM and Sim engines).", list_key="name")
    splits: tuple[Split, ...] = _splits_field()
    resource_profile: str = _field(
        "",
        doc='Resources per replica, "<profile>:<count>", e.g. "nvidia-gpu-l4:1".',
        pattern=r"^([^:]+:[1-9][0-9]*)?$",
    )
    cache_profile: str = _field("", doc="Cache profile that stores the model files once.", immutable=True)
    image: str = _field("", doc="Model server image; chosen from engine and resource profile if empty.")
    args: tuple[str, ...] = _field((), doc="Extra model server arguments.")
    env: dict[str, str] = _field(factory=dict, doc="Extra model server environment variables.")
    env_from: tuple[dict[str, Any], ...] = _field(
        (), doc="Environment from Secrets or ConfigMaps (Kubernetes EnvFromSource)."
    )
    files: tuple[File, ...] = _field((), doc="Files mounted into the model server.", max_items=10, list_key="path")
    priority_class_name: str = _field("", doc="PriorityClass of the model server Pods.")
    replicas: int | None = _field(None, doc="Desired replicas; set by the autoscaler unless it is disabled.", minimum=0)
    min_replicas: int = _field(0, doc="Fewest replicas the autoscaler keeps (0 allows scale to zero).", minimum=0)
    max_replicas: int | None = _field(None, doc="Most replicas the autoscaler creates; no limit if unset.", minimum=1)
    autoscaling_disabled: bool = _field(False, doc="Leave replicas alone: no request-based autoscaling.")
    target_requests: int = _field(100, doc="Active requests per replica the autoscaler aims for.", minimum=1)
    scale_down_delay_seconds: int = _field(
        30, doc="How long load must stay lower before replicas are removed.", minimum=0
    )
    load_balancing: LoadBalancing = _field(factory=LoadBalancing, doc="How requests are spread over replicas.")
    owner: str = _field("", doc="Shown as owned_by in /v1/models.")

    _RULES: ClassVar[tuple[_Rule, ...]] = (
        _splits_rule(),
        _Rule(
            field="minReplicas",
            message="must be <= maxReplicas",
            cel="!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            ok=lambda s: s.max_replicas is None or s.min_replicas <= s.max_replicas,
        ),
        _Rule(
            field="adapters",
            message=f"adapters are only supported with engine {' or '.join(ADAPTER_ENGINES)}",
            cel=f"!has(self.adapters) || size(self.adapters) == 0 || self.engine in {_cel_strings(ADAPTER_ENGINES)}",
            ok=lambda s: not s.adapters or s.engine in ADAPTER_ENGINES,
        ),
        _Rule(
            field="loadBalancing",
            message=f"priorityScheduling is only supported with engine {' or '.join(PRIORITY_ENGINES)}",
            cel="!has(self.loadBalancing) || !has(self.loadBalancing.priorityScheduling) || "
            f"!self.loadBalancing.priorityScheduling || self.engine in {_cel_strings(PRIORITY_ENGINES)}",
            ok=lambda s: not s.load_balancing.priority_scheduling or s.engine in PRIORITY_ENGINES,
        ),
        _Rule(
            field="cacheProfile",
            message="only supported with urls " + ", ".join(f"{s}://" for s in CACHEABLE_SCHEMES),
            cel='!has(self.cacheProfile) || self.cacheProfile == "" || '
            + _cel_prefixed("self.url", CACHEABLE_SCHEMES),
            ok=lambda s: not s.cache_profile or _scheme_of(s.url) in CACHEABLE_SCHEMES,
        ),
        _Rule(
            field="url",
            message="urls " + ", ".join(f"{s}://" for s in CACHE_ONLY_SCHEMES) + " need a cacheProfile",
            cel="!" + _cel_prefixed("self.url", CACHE_ONLY_SCHEMES)
            + ' || (has(self.cacheProfile) && self.cacheProfile != "")',
            ok=lambda s: _scheme_of(s.url) not in CACHE_ONLY_SCHEMES or bool(s.cache_profile),
        ),
    )
    _UPDATE_RULES: ClassVar[tuple[_Rule, ...]] = (
        _Rule(
            field="url",
            message="is immutable while a cacheProfile is set",
            cel='!has(oldSelf.cacheProfile) || oldSelf.cacheProfile == "" || self.url == oldSelf.url',
            ok=lambda old, new: not old.cache_profile or old.url == new.url,
        ),
    )

    def clamp_replicas(self, n: int) -> int:
        """Bound a requested replica count: out-of-range requests are normal (autoscaler, kubectl scale)."""
        n = max(n, self.min_replicas)
        return n if self.max_replicas is None else min(n, self.max_replicas)

    def parsed_url(self) -> ModelURL:
        return parse_model_url(self.url)

    def parsed_resource_profile(self) -> tuple[str, int] | None:
        """("nvidia-gpu-l4", 2) for "nvidia-gpu-l4:2"; None when no profile is set."""
        if not self.resource_profile:
            return None
        name, _, count = self.resource_profile.rpartition(":")
        return name, int(count)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStatusReplicas(_Resource):
    all: int = _field(0, doc="Replicas that exist.", minimum=0)
    ready: int = _field(0, doc="Replicas that serve requests.", minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStatusCache(_Resource):
    loaded: bool = _field(False, doc="Whether the model files are in the cache.")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCondition(_Resource):
    """metav1.Condition's shape, so kubectl and tooling that read conditions understand them."""

    type: str = _field(doc="Condition type, e.g. CacheReady or Valid.", max_length=316)
    status: ConditionStatus = _field(doc="True, False or Unknown.")
    reason: str = _field(doc="CamelCase reason for the last transition.", max_length=1024)
    message: str = _field("", doc="Human-readable details.", max_length=32768)
    last_transition_time: str = _field(doc="When the status last changed (RFC 3339).")
    observed_generation: int | None = _field(
        None, doc="metadata.generation the condition was computed from.", minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStatus(_Resource):
    replicas: ModelStatusReplicas = _field(factory=ModelStatusReplicas, doc="Replica counts.")
    cache: ModelStatusCache | None = _field(None, doc="Cache state, when a cacheProfile is used.")
    conditions: tuple[ModelCondition, ...] = _field(
        (), doc="Observations of the operator: Valid (spec and profiles usable), CacheReady.", list_key="type")
    selector: str = _field("", doc="Label selector of the Model's Pods (the scale subresource's, for HPA/KEDA).")


_NAME_RULE = _Rule(
    field="metadata.name",
    message=f"must be at most {MAX_NAME_LENGTH} characters: it prefixes the names of generated objects",
    cel=f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    ok=lambda m: len(m.name) <= MAX_NAME_LENGTH,
)


_ENVELOPE = ("apiVersion", "kind", "metadata", "spec", "status")


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    """A Model manifest. Only the metadata the planes use is kept; server-set metadata is dropped."""

    name: str
    spec: ModelSpec
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    status: ModelStatus | None = None

    def __post_init__(self) -> None:
        # The API server checks the name format itself; local mode needs the same check, and '_'
        # must never appear because it separates model from adapter in requests.
        if not _NAME_RE.fullmatch(self.name):
            raise ModelValidationError(
                "metadata.name", f"must be lowercase alphanumerics, '-' and '.' (DNS-1123), got {self.name!r}"
            )
        if not _NAME_RULE.ok(self):
            raise ModelValidationError(_NAME_RULE.field, f"{_NAME_RULE.message}, got {len(self.name)}")

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Model:
        """Decode a manifest; metadata keys other than ours (uid, resourceVersion, ...) are dropped."""
        obj = decode(dict[str, Any], obj)
        for key in obj:
            if key not in _ENVELOPE:
                raise unknown_key((key,), _ENVELOPE)
        if obj.get("apiVersion") not in (API_VERSION, KUBEAI_API_VERSION):
            raise ModelValidationError(
                "apiVersion", f"expected {API_VERSION} or {KUBEAI_API_VERSION}, got {obj.get('apiVersion')!r}"
            )
        if obj.get("kind") != KIND:
            raise ModelValidationError("kind", f"expected {KIND}, got {obj.get('kind')!r}")
        meta = decode(dict[str, Any], obj.get("metadata"), "metadata")
        for key, where in (("name", meta), ("spec", obj)):
            if where.get(key) is None:
                raise ModelValidationError("metadata.name" if key == "name" else key, "required key is missing")
        return cls(
            name=decode(str, meta["name"], "metadata.name"),
            namespace=decode(str, meta.get("namespace") or "default", "metadata.namespace"),
            labels=decode(dict[str, str], meta.get("labels") or {}, "metadata.labels"),
            annotations=decode(dict[str, str], meta.get("annotations") or {}, "metadata.annotations"),
            spec=decode_object(ModelSpec, obj["spec"], "spec"),
            status=decode(ModelStatus | None, obj.get("status"), "status"),
        )

    def to_dict(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        out = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": self.spec.to_dict()}
        if self.status is not None:
            out["status"] = self.status.to_dict()
        return out


def validate_update(old: Model, new: Model) -> None:
    """Reject changes the API server would refuse (transition rules), for local mode's file reloads."""
    _check_update(old.spec, new.spec, ("spec",))


# ---------------------------------------------------------------------------------------------
# CustomResourceDefinition, generated from the dataclasses above


def _cel(rules: Sequence[_Rule]) -> list[dict[str, str]]:
    return [{"rule": rule.cel, "message": f"{rule.field}: {rule.message}" if rule.field else rule.message}
            for rule in rules]


class _CrdSchema(JsonSchema):
    """lb.schema's JSON schema with the Kubernetes extensions: list maps, CEL rules, open objects."""

    def open_object(self) -> dict[str, Any]:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

    def field(self, spec: FieldSpec) -> dict[str, Any]:
        schema = super().field(spec)
        meta = spec.meta
        if not isinstance(meta, _Meta):
            return schema
        if meta.list_key:
            schema["x-kubernetes-list-type"] = "map"
            schema["x-kubernetes-list-map-keys"] = [camel(meta.list_key)]
        validations = _cel(meta.rules)
        if meta.immutable:
            validations.append({"rule": "self == oldSelf", "message": "is immutable"})
        if validations:
            schema["x-kubernetes-validations"] = validations
        return schema

    def object(self, cls: type) -> dict[str, Any]:
        schema = super().object(cls)
        rules = cls._RULES + cls._UPDATE_RULES
        if rules:
            schema["x-kubernetes-validations"] = _cel(rules)
        return schema


_PRINTER_COLUMNS = (
    {"name": "Engine", "type": "string", "jsonPath": ".spec.engine"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas.all"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.replicas.ready"},
    {"name": "Min", "type": "integer", "jsonPath": ".spec.minReplicas", "priority": 1},
    {"name": "Max", "type": "integer", "jsonPath": ".spec.maxReplicas", "priority": 1},
    {"name": "URL", "type": "string", "jsonPath": ".spec.url", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)


def crd_manifest() -> dict[str, Any]:
    """The Model CustomResourceDefinition (apiextensions.k8s.io/v1) for the chart to install."""
    root = {
        "description": "A model served through the kvgate gateway (KubeAI-compatible).",
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _CrdSchema().object(ModelSpec),
            "status": _CrdSchema().object(ModelStatus),
        },
        "required": ["spec"],
        "x-kubernetes-validations": _cel([_NAME_RULE]),
    }
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": root},
        "subresources": {
            "status": {},
            "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas.all",
                      "labelSelectorPath": ".status.selector"},
        },
        "additionalPrinterColumns": [dict(column) for column in _PRINTER_COLUMNS],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower()},
            "scope": "Namespaced",
            "versions": [version],
        },
    }


# ---------------------------------------------------------------------------------------------
# Command line: `python -m lb.model crd` for the chart, `validate` for model catalogs


def _validate_stream(label: str, text: str) -> int:
    """Check every Model in a YAML stream; a bad one is reported as `file:line: model name: key: problem`."""
    failures = 0
    try:
        docs = load_yaml_documents(text, label)
    except SchemaError as err:
        print(err, file=sys.stderr)
        return 1
    for doc, lines in docs:
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        try:
            model = Model.from_dict(doc)
        except ModelValidationError as err:
            failures += 1
            name = (doc.get("metadata") or {}).get("name", "?")
            print(err.at(label, lines.of(err.path), f"model {name}"), file=sys.stderr)
        else:
            print(f"{label}: {model.name}: ok")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lb.model", description="The kvgate Model resource.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("crd", help="print the Model CustomResourceDefinition as YAML")
    check = commands.add_parser("validate", help="check the Model manifests in YAML files ('-' for stdin)")
    check.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(yaml.safe_dump(crd_manifest(), sort_keys=False, width=120))
        return 0
    failures = 0
    for path in args.files:
        if path == "-":
            failures += _validate_stream("<stdin>", sys.stdin.read())
        else:
            with open(path, encoding="utf-8") as handle:
                failures += _validate_stream(path, handle.read())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
