"""A faithful, in-memory fake of the Kubernetes API server for the operator's tests.

It speaks the real HTTP protocol (JSON over HTTP/1.1, chunked watch streams) so the real
``kubernetes_asyncio`` client talks to it unchanged::

    async with FakeKube() as kube:
        async with kube.api_client() as api:
            pods = await CoreV1Api(api).list_namespaced_pod("default", label_selector="app=x")

What it implements, with the API server's semantics: get / list (label and field selectors,
limit/continue) / watch (resourceVersion resume from an event log, 410 Expired when the resume
point has been compacted away, bookmarks, timeoutSeconds, selector transitions turning into
ADDED/DELETED) / create (201, generateName, AlreadyExists) / replace (optimistic concurrency) /
patch (merge, strategic-merge for built-in types, JSON patch) / delete (finalizers,
deletionTimestamp, preconditions, owner-reference garbage collection) / deletecollection, the
``status`` subresource (isolated from the main resource) and the ``scale`` subresource of the
Model custom resource (derived from ``lb.model.crd_manifest()``), errors as ``Status`` objects.

Fault injection: ``fail_next`` / ``fail_for`` (N requests or a time window answer with a status),
``drop_watches`` (close open watch streams, optionally in the middle of an event),
``compact`` (the next resume gets 410 Gone), ``latency``.

Known deviations from a real API server are listed in ``DEVIATIONS`` below.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from aiohttp import web

DEVIATIONS = """\
- No authentication/authorization (RBAC is not enforced; `requests`/`rbac_usage()` record what was used).
- No schema validation, pruning, defaulting or CEL rules for Models; built-in objects get only minimal
  validation (names, pod containers) and no defaulting (e.g. no restartPolicy/imagePullPolicy defaults).
- Namespaces need not exist. No admission (quotas, limit ranges, service accounts) but the
  Priority plugin's check that a Pod's priorityClassName exists.
- No kubelet/scheduler/controllers: pods stay Pending until a test sets their status (set_pod_ready);
  a deleted pod disappears at once unless `pod_termination_delay` is set (then it is Terminating for
  that long, with deletionTimestamp); Jobs never run.
- Garbage collection (ownerReferences) runs synchronously inside the DELETE, and inside a CREATE
  whose owners are all gone already (the object is added, then deleted); foreground deletion
  deletes dependents first instead of using the foregroundDeletion finalizer.
- Strategic merge patch knows only common merge keys (containers, env, ports, volumes, conditions, ...)
  and the $patch: delete/replace directives; server-side apply (apply-patch+yaml) answers 415.
- `limit`/`continue` pages come from the current state, not a consistent snapshot; list
  `resourceVersion`/`resourceVersionMatch` parameters are ignored (always the latest state).
- `dryRun` answers 400; managedFields are not maintained.
- Bookmarks are sent every `bookmark_interval` seconds (real: about once a minute).
"""

# ---------------------------------------------------------------------------------------------
# Resource types


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # has a status subresource
    scale: dict[str, str] | None = None  # {"specReplicasPath": ..., "statusReplicasPath": ...}
    generation: bool = False  # metadata.generation is maintained
    custom: bool = False
    field_labels: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def singular(self) -> str:
        return self.kind.lower()


_POD_FIELDS = ("status.phase", "spec.nodeName", "status.podIP", "spec.restartPolicy",
               "spec.schedulerName", "spec.serviceAccountName", "status.nominatedNodeName",
               "spec.hostNetwork")
_EVENT_FIELDS = ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                 "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                 "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type")

BUILTIN_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "pods", "Pod", status=True, generation=True, field_labels=_POD_FIELDS),
    ResourceType("", "v1", "configmaps", "ConfigMap"),
    ResourceType("", "v1", "secrets", "Secret", field_labels=("type",)),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", status=True),
    ResourceType("", "v1", "events", "Event", field_labels=_EVENT_FIELDS),
    ResourceType("", "v1", "services", "Service", status=True),
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, status=True,
                 field_labels=("status.phase",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", namespaced=False),
    ResourceType("batch", "v1", "jobs", "Job", status=True, generation=True,
                 field_labels=("status.successful",)),
)


def model_resource_type() -> ResourceType:
    """The Model custom resource, read from the CRD the chart installs."""
    from lb.model import crd_manifest

    crd = crd_manifest()
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("storage"))
    subresources = version.get("subresources") or {}
    return ResourceType(spec["group"], version["name"], spec["names"]["plural"], spec["names"]["kind"],
                        namespaced=spec["scope"] == "Namespaced", status="status" in subresources,
                        scale=subresources.get("scale"), generation=True, custom=True)


# ---------------------------------------------------------------------------------------------
# Errors


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict", 410: "Expired",
            415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests",
            500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


class KubeError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "message": self.message,
                                "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {"kind": rt.plural}
    if name:
        details["name"] = name
    if rt.group:
        details["group"] = rt.group
    return details


def _resource_name(rt: ResourceType) -> str:
    return f"{rt.plural}.{rt.group}" if rt.group else rt.plural


def not_found(rt: ResourceType, name: str) -> KubeError:
    return KubeError(404, f'{_resource_name(rt)} "{name}" not found', "NotFound", _details(rt, name))


def conflict(rt: ResourceType, name: str, why: str = "the object has been modified; please apply "
             "your changes to the latest version and try again") -> KubeError:
    return KubeError(409, f'Operation cannot be fulfilled on {_resource_name(rt)} "{name}": {why}',
                     "Conflict", _details(rt, name))


def invalid(rt: ResourceType, name: str, why: str) -> KubeError:
    """422 as the API server words it: the message, and each field error as a cause."""
    field_name, _, message = why.partition(": ")
    kind = "FieldValueRequired" if message.startswith("Required value") else "FieldValueInvalid"
    return KubeError(422, f'{rt.kind} "{name}" is invalid: {why}', "Invalid",
                     {**_details(rt, name), "kind": rt.kind,
                      "causes": [{"reason": kind, "message": message or why, "field": field_name}]})


def forbidden(rt: ResourceType, name: str, why: str) -> KubeError:
    return KubeError(403, f'{_resource_name(rt)} "{name}" is forbidden: {why}', "Forbidden",
                     _details(rt, name))


# The Priority admission plugin's built-in classes; others must exist as PriorityClass objects.
SYSTEM_PRIORITY_CLASSES = ("system-cluster-critical", "system-node-critical")


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


# ---------------------------------------------------------------------------------------------
# Selectors


_LABEL_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_EXISTS_RE = re.compile(rf"^(!?)\s*({_LABEL_KEY})$")
_SET_RE = re.compile(rf"^({_LABEL_KEY})\s+(in|notin)\s+\(([^)]*)\)$")
_EQ_RE = re.compile(rf"^({_LABEL_KEY})\s*(==|=|!=|>|<)\s*([-A-Za-z0-9_.]*)$")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """Kubernetes label selector syntax: ``a=b, c!=d, e in (f,g), h notin (i), j, !k, n>1``."""
    if not text or not text.strip():
        return lambda labels: True
    requirements: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_top_level(text):
        if m := _SET_RE.match(part):
            key, op = m.group(1), m.group(2)
            values = {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                requirements.append(lambda l, k=key, vs=values: k in l and l[k] in vs)
            else:
                requirements.append(lambda l, k=key, vs=values: k not in l or l[k] not in vs)
        elif m := _EQ_RE.match(part):
            key, op, value = m.groups()
            if op in ("=", "=="):
                requirements.append(lambda l, k=key, v=value: l.get(k) == v)
            elif op == "!=":
                requirements.append(lambda l, k=key, v=value: l.get(k) != v)
            else:
                try:
                    bound = int(value)
                except ValueError:
                    raise KubeError(400, f"unable to parse requirement: for 'Gt', 'Lt' operators, "
                                         f"the value must be an integer: {part}") from None
                requirements.append(lambda l, k=key, b=bound, gt=op == ">": _num_cmp(l.get(k), b, gt))
        elif m := _EXISTS_RE.match(part):
            negate, key = m.groups()
            if negate:
                requirements.append(lambda l, k=key: k not in l)
            else:
                requirements.append(lambda l, k=key: k in l)
        else:
            raise KubeError(400, f"unable to parse requirement: invalid label selector: {part!r}")
    return lambda labels: all(req(labels) for req in requirements)


def _num_cmp(value: str | None, bound: int, greater: bool) -> bool:
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return number > bound if greater else number < bound


def _field_value(obj: dict[str, Any], path: str) -> str:
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, dict):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def parse_field_selector(rt: ResourceType, text: str | None) -> Callable[[dict[str, Any]], bool]:
    if not text or not text.strip():
        return lambda obj: True
    requirements: list[Callable[[dict[str, Any]], bool]] = []
    allowed = ("metadata.name", "metadata.namespace", *rt.field_labels)
    for part in _split_top_level(text):
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", part)
        if not m:
            raise KubeError(400, f"invalid selector: '{text}'; can't understand '{part}'")
        path, op, value = m.groups()
        if path not in allowed:
            raise KubeError(400, f'"{path}" is not a known field selector: only "metadata.name", '
                                 f'"metadata.namespace"' + "".join(f', "{f}"' for f in rt.field_labels))
        if op == "!=":
            requirements.append(lambda o, p=path, v=value: _field_value(o, p) != v)
        else:
            requirements.append(lambda o, p=path, v=value: _field_value(o, p) == v)
    return lambda obj: all(req(obj) for req in requirements)


# ---------------------------------------------------------------------------------------------
# Patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Merge keys of the list fields most often patched (from the Kubernetes OpenAPI
# x-kubernetes-patch-merge-key annotations).
_SMP_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "ports": "containerPort", "volumes": "name", "volumeMounts": "mountPath",
    "volumeDevices": "devicePath", "conditions": "type", "imagePullSecrets": "name",
    "ownerReferences": "uid", "hostAliases": "ip", "containerStatuses": "name",
    "initContainerStatuses": "name", "podIPs": "ip", "resourceClaims": "name",
    "topologySpreadConstraints": "topologyKey",
}
_SMP_SET_LISTS = {"finalizers"}  # primitive lists with patchStrategy=merge


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in value]
            continue
        if key.startswith("$setElementOrder/") or key == "$retainKeys":
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in _SMP_MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _smp_merge_list(result[key], value, _SMP_MERGE_KEYS[key])
        elif isinstance(value, list) and key in _SMP_SET_LISTS and isinstance(result.get(key), list):
            result[key] = list(result[key]) + [v for v in value if v not in result[key]]
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    return result


def _smp_merge_list(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    result = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            result.append(copy.deepcopy(item))
            continue
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, dict) and old.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append({k: v for k, v in copy.deepcopy(item).items() if k != "$patch"})
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


class JsonPatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise JsonPatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, dict):
            if part not in doc:
                raise JsonPatchError(f"doc is missing path: /{'/'.join(parts)}")
            doc = doc[part]
        elif isinstance(doc, list):
            try:
                doc = doc[int(part)]
            except (ValueError, IndexError):
                raise JsonPatchError(f"doc is missing path: /{'/'.join(parts)}") from None
        else:
            raise JsonPatchError(f"doc is missing path: /{'/'.join(parts)}")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise JsonPatchError(f"unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        try:
            return parent.pop(int(last))
        except (ValueError, IndexError):
            raise JsonPatchError(f"unable to remove index {last}") from None
    raise JsonPatchError("remove on a scalar")


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                index = int(last)
            except ValueError:
                raise JsonPatchError(f"invalid array index {last}") from None
            if not 0 <= index <= len(parent):
                raise JsonPatchError(f"add operation does not apply: index {index} out of bounds")
            parent.insert(index, value)
    else:
        raise JsonPatchError(f"add operation does not apply: doc is missing path: /{'/'.join(parts)}")
    return doc


def json_patch(doc: Any, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch."""
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise JsonPatchError(f"invalid operation {op!r}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            if not parts:
                doc = copy.deepcopy(op.get("value"))
                continue
            parent = _walk(doc, parts[:-1])
            if isinstance(parent, dict) and parts[-1] not in parent:
                raise JsonPatchError(f"replace operation does not apply: doc is missing key: {op['path']}")
            _walk(doc, parts)
            if isinstance(parent, list):
                parent[int(parts[-1])] = copy.deepcopy(op.get("value"))
            else:
                parent[parts[-1]] = copy.deepcopy(op.get("value"))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_walk(doc, source))
            doc = _add(doc, parts, value)
        elif kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise JsonPatchError(f"testing value {op['path']} failed: test failed")
        else:
            raise JsonPatchError(f"Unexpected kind: {kind}")
    return doc


# ---------------------------------------------------------------------------------------------
# Store, events, watchers


@dataclass
class Event:
    rv: int
    rt: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    prev: dict[str, Any] | None = None


_DROP = object()
_DROP_MID = object()
_STOP = object()


@dataclass(eq=False)
class _Watcher:
    rt: ResourceType
    namespace: str | None
    match: Callable[[dict[str, Any]], bool]
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def wants(self, event: Event) -> bool:
        if event.rt.key != self.rt.key:
            return False
        return self.namespace is None or event.obj["metadata"].get("namespace") == self.namespace

    def translate(self, event: Event) -> tuple[str, dict[str, Any]] | None:
        now = self.match(event.obj)
        if event.type == "MODIFIED" and event.prev is not None:
            before = self.match(event.prev)
            if now and before:
                return "MODIFIED", event.obj
            if now:
                return "ADDED", event.obj
            if before:
                prev = copy.deepcopy(event.prev)
                prev["metadata"]["resourceVersion"] = str(event.rv)
                return "DELETED", prev
            return None
        return (event.type, event.obj) if now else None


@dataclass
class Fault:
    """A request fault: answer matching requests with ``status`` while active."""
    status: int = 500
    count: int | None = 1  # None: until `until` (or forever)
    until: float | None = None
    method: str | None = None
    path: str | re.Pattern[str] | None = None  # substring or regex of the path
    watch: bool | None = None  # only watch requests (True) / only non-watch (False)
    message: str = "fake injected failure"
    hits: int = 0

    def active(self) -> bool:
        if self.until is not None and time.monotonic() >= self.until:
            return False
        return self.count is None or self.hits < self.count

    def matches(self, request: web.Request) -> bool:
        if self.method and request.method.upper() != self.method.upper():
            return False
        if self.path is not None:
            if isinstance(self.path, re.Pattern):
                if not self.path.search(request.path):
                    return False
            elif self.path not in request.path:
                return False
        if self.watch is not None and _is_watch(request.query) != self.watch:
            return False
        return True


def _is_watch(query: Any) -> bool:
    return str(query.get("watch", "")).lower() in ("true", "1")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _without_rv(obj: dict[str, Any]) -> dict[str, Any]:
    clone = dict(obj)
    clone["metadata"] = {k: v for k, v in obj.get("metadata", {}).items()
                         if k not in ("resourceVersion", "managedFields")}
    return clone


class FakeKube:
    """In-memory Kubernetes API server on 127.0.0.1 (ephemeral port).

    Use ``async with FakeKube() as kube`` and ``kube.api_client()``. Stored objects are never
    mutated in place; helpers return deep copies.
    """

    def __init__(self, *, event_window: int = 10_000, bookmark_interval: float = 1.0,
                 pod_termination_delay: float | None = None,
                 extra_types: Iterable[ResourceType] = ()) -> None:
        self.types: dict[tuple[str, str], ResourceType] = {}
        for rt in (*BUILTIN_TYPES, model_resource_type(), *extra_types):
            self.types[rt.key] = rt
        self.model_type = model_resource_type()
        self.event_window = event_window
        self.bookmark_interval = bookmark_interval
        self.pod_termination_delay = pod_termination_delay
        self.latency: float = 0.0
        self.latency_filter: Callable[[web.Request], bool] | None = None
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.calls: list[tuple[str, str, str, str | None]] = []  # (verb, group, resource[/sub], ns)
        self._rv = 0
        self._oldest_resumable = 0  # a watch may resume from any rv >= this
        self._store: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self._log: deque[Event] = deque()
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> "FakeKube":
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        self._closing = True
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(_STOP)
        await asyncio.sleep(0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "FakeKube":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def configuration(self) -> Any:
        from kubernetes_asyncio.client import Configuration

        return Configuration(host=self.url)

    def api_client(self) -> Any:
        """A new ``kubernetes_asyncio.client.ApiClient`` for this server (close it, or use
        ``async with``)."""
        from kubernetes_asyncio.client import ApiClient

        return ApiClient(self.configuration())

    def write_kubeconfig(self, path: str, namespace: str = "default") -> str:
        """A kubeconfig file pointing at this server (for processes that load one)."""
        import yaml

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                       "namespace": namespace}}],
        }
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle)
        return path

    # -- fault injection -----------------------------------------------------------------------

    def fail_next(self, count: int = 1, status: int = 500, *, method: str | None = None,
                  path: str | re.Pattern[str] | None = None, watch: bool | None = None,
                  message: str = "fake injected failure") -> Fault:
        """The next ``count`` requests matching method/path(/watch) get ``status``."""
        fault = Fault(status=status, count=count, method=method, path=path, watch=watch, message=message)
        self.faults.append(fault)
        return fault

    def fail_for(self, seconds: float, status: int = 500, **match: Any) -> Fault:
        """Every matching request gets ``status`` for the next ``seconds``."""
        fault = Fault(status=status, count=None, until=time.monotonic() + seconds, **match)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def drop_watches(self, *, mid_event: bool = True, resource: str | None = None) -> int:
        """Close open watch streams abruptly (``mid_event``: after half an event line). Returns
        how many were dropped."""
        dropped = 0
        for watcher in list(self._watchers):
            if resource is None or self._lookup(resource).key == watcher.rt.key:
                watcher.queue.put_nowait(_DROP_MID if mid_event else _DROP)
                dropped += 1
        return dropped

    def compact(self) -> None:
        """Forget the event log: a watch resuming from any earlier resourceVersion gets 410."""
        self._log.clear()
        self._oldest_resumable = self._rv

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    @property
    def resource_version(self) -> int:
        return self._rv

    # -- test helpers --------------------------------------------------------------------------

    def _lookup(self, kind: str) -> ResourceType:
        lowered = kind.lower()
        for rt in self.types.values():
            if lowered in (rt.plural, rt.kind.lower(), f"{rt.plural}.{rt.group}"):
                return rt
        raise KeyError(f"unknown resource {kind!r}")

    def objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Snapshot (deep copies) of the stored objects of a kind ("pods", "Pod", "models")."""
        rt = self._lookup(kind)
        return [copy.deepcopy(obj) for obj in self._select(rt, namespace)]

    def get(self, kind: str, name: str, namespace: str | None = "default") -> dict[str, Any] | None:
        rt = self._lookup(kind)
        obj = self._store.get(self._key(rt, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def create(self, kind: str, body: dict[str, Any], namespace: str | None = "default") -> dict[str, Any]:
        """Create an object directly (as a controller outside the operator would)."""
        rt = self._lookup(kind)
        return copy.deepcopy(self._create(rt, namespace if rt.namespaced else None, body))

    def update_status(self, kind: str, name: str, status: dict[str, Any],
                      namespace: str | None = "default", merge: bool = True) -> dict[str, Any]:
        rt = self._lookup(kind)
        old = self._get(rt, namespace if rt.namespaced else None, name)
        new = copy.deepcopy(old)
        new["status"] = merge_patch(old.get("status") or {}, status) if merge else status
        return copy.deepcopy(self._update(rt, old, new, "status"))

    def set_pod_ready(self, name: str, namespace: str = "default", ip: str = "127.0.0.1",
                      ready: bool = True) -> dict[str, Any]:
        """Mark a pod Running with ``podIP`` and a Ready condition (what kubelet would do)."""
        now = _now()
        flag = "True" if ready else "False"
        pod = self._get(self.types[("", "pods")], namespace, name)
        containers = [c.get("name", "") for c in (pod.get("spec") or {}).get("containers") or []]
        status = {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
            "startTime": (pod.get("status") or {}).get("startTime") or now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "Ready", "status": flag, "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {"name": c, "ready": ready, "started": True, "restartCount": 0, "image": "",
                 "imageID": "", "state": {"running": {"startedAt": now}}} for c in containers],
        }
        return self.update_status("pods", name, status, namespace, merge=False)

    def patch(self, kind: str, name: str, patch: dict[str, Any],
              namespace: str | None = "default") -> dict[str, Any]:
        """Merge-patch the main resource directly (as another client would), bypassing faults."""
        rt = self._lookup(kind)
        old = self._get(rt, namespace if rt.namespaced else None, name)
        return copy.deepcopy(self._update(rt, old, merge_patch(old, patch), None))

    def set_pod_phase(self, name: str, phase: str, namespace: str = "default") -> dict[str, Any]:
        return self.update_status("pods", name, {"phase": phase}, namespace)

    def delete(self, kind: str, name: str, namespace: str | None = "default") -> dict[str, Any]:
        rt = self._lookup(kind)
        return copy.deepcopy(self._delete(rt, namespace if rt.namespaced else None, name, {}))

    def rbac_usage(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource[/subresource], verb) triples the clients used."""
        return {(group, resource, verb) for verb, group, resource, _ in self.calls}

    # -- store ---------------------------------------------------------------------------------

    @staticmethod
    def _key(rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (rt.group, rt.plural, namespace or "", name)

    def _select(self, rt: ResourceType, namespace: str | None,
                match: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        items = [obj for (group, plural, ns, _), obj in self._store.items()
                 if (group, plural) == rt.key and (namespace is None or ns == namespace)
                 and (match is None or match(obj))]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items

    def _get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._store.get(self._key(rt, namespace, name))
        if obj is None:
            raise not_found(rt, name)
        return obj

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, event: Event) -> None:
        self._log.append(event)
        while len(self._log) > self.event_window:
            dropped = self._log.popleft()
            self._oldest_resumable = max(self._oldest_resumable, dropped.rv)
        for watcher in list(self._watchers):
            if watcher.wants(event):
                watcher.queue.put_nowait(event)

    def _commit(self, rt: ResourceType, obj: dict[str, Any], etype: str,
                prev: dict[str, Any] | None) -> dict[str, Any]:
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        key = self._key(rt, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if etype == "DELETED":
            self._store.pop(key, None)
        else:
            self._store[key] = obj
        self._emit(Event(rv, rt, etype, obj, prev))
        return obj

    def _check_kind(self, rt: ResourceType, body: Any, name_hint: str = "") -> None:
        if not isinstance(body, dict):
            raise KubeError(400, "the body of the request was in an unknown format - "
                                 "accepted media types include: application/json")
        kind, api_version = body.get("kind"), body.get("apiVersion")
        if kind and kind != rt.kind:
            raise KubeError(400, f"the kind in the data ({kind}) does not match the expected kind "
                                 f"({rt.kind})")
        if api_version and api_version != rt.api_version:
            raise KubeError(400, f"the API version in the data ({api_version}) does not match the "
                                 f"expected API version ({rt.api_version})")
        if not isinstance(body.get("metadata", {}), dict):
            raise invalid(rt, name_hint, "metadata: Invalid value: must be an object")

    def _validate(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        name = meta.get("name", "")
        if not _NAME_RE.match(name) or len(name) > 253:
            raise invalid(rt, name, f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 '
                                    "subdomain must consist of lower case alphanumeric characters, "
                                    "'-' or '.', and must start and end with an alphanumeric character")
        for field_name in ("labels", "annotations"):
            values = meta.get(field_name)
            if values is not None and (not isinstance(values, dict)
                                       or not all(isinstance(v, str) for v in values.values())):
                raise invalid(rt, name, f"metadata.{field_name}: Invalid value: values must be strings")
        if rt.key == ("", "pods"):
            containers = (obj.get("spec") or {}).get("containers")
            if not isinstance(containers, list) or not containers:
                raise invalid(rt, name, "spec.containers: Required value")
            for i, container in enumerate(containers):
                if not isinstance(container, dict) or not container.get("name"):
                    raise invalid(rt, name, f"spec.containers[{i}].name: Required value")
                if not container.get("image"):
                    raise invalid(rt, name, f"spec.containers[{i}].image: Required value")
        if rt.key == ("batch", "jobs") and not isinstance((obj.get("spec") or {}).get("template"), dict):
            raise invalid(rt, name, "spec.template: Required value")

    def _admit(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        """The Priority admission plugin: a Pod naming a PriorityClass that does not exist is
        forbidden (a 4xx that retrying cannot fix until the Pod names another class)."""
        priority_class = (obj.get("spec") or {}).get("priorityClassName") if rt.key == ("", "pods") else None
        if priority_class and priority_class not in SYSTEM_PRIORITY_CLASSES and self.get(
                "priorityclasses", priority_class, namespace=None) is None:
            raise forbidden(rt, obj["metadata"]["name"],
                            f"no PriorityClass with name {priority_class} was found")

    @staticmethod
    def _normalize_secret(rt: ResourceType, obj: dict[str, Any]) -> None:
        if rt.key == ("", "secrets") and "stringData" in obj:
            data = dict(obj.get("data") or {})
            for key, value in (obj.pop("stringData") or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data

    def _create(self, rt: ResourceType, namespace: str | None, body: Any) -> dict[str, Any]:
        self._check_kind(rt, body)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise KubeError(400, "the namespace of the provided object does not match the "
                                     "namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise invalid(rt, "", "metadata.name: Required value: name or generateName is required")
            for _ in range(8):
                meta["name"] = prefix[:58] + "".join(random.choice(_SUFFIX_CHARS) for _ in range(5))
                if self._key(rt, namespace, meta["name"]) not in self._store:
                    break
        if meta.get("resourceVersion"):
            raise invalid(rt, meta["name"], "metadata.resourceVersion: Invalid value: "
                                            "resourceVersion should not be set on objects to be created")
        self._validate(rt, obj)
        self._admit(rt, obj)
        if self._key(rt, namespace, meta["name"]) in self._store:
            raise KubeError(409, f'{_resource_name(rt)} "{meta["name"]}" already exists',
                            "AlreadyExists", _details(rt, meta["name"]))
        for transient in ("uid", "creationTimestamp", "deletionTimestamp",
                          "deletionGracePeriodSeconds", "generation", "selfLink", "managedFields"):
            meta.pop(transient, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if rt.generation:
            meta["generation"] = 1
        if rt.status:
            obj.pop("status", None)
            if rt.key in (("", "pods"), ("", "persistentvolumeclaims")):
                obj["status"] = {"phase": "Pending"}
            elif rt.key == ("", "namespaces"):
                obj["status"] = {"phase": "Active"}
            elif not rt.custom:
                obj["status"] = {}
        self._normalize_secret(rt, obj)
        created = self._commit(rt, obj, "ADDED", None)
        if self._orphaned(obj):  # its owners are gone: the garbage collector removes it
            self._delete(rt, namespace, meta["name"], {"propagationPolicy": "Background"})
        return created

    def _orphaned(self, obj: dict[str, Any]) -> bool:
        """Whether every owner the object names is gone (a create that raced its owner's
        deletion, e.g. a reconcile already running when its Model was deleted)."""
        refs = obj["metadata"].get("ownerReferences") or []
        if not refs:
            return False
        alive = {o["metadata"].get("uid") for o in self._store.values()}
        return not any(ref.get("uid") in alive for ref in refs)

    def _update(self, rt: ResourceType, old: dict[str, Any], body: Any,
                subresource: str | None) -> dict[str, Any]:
        name = old["metadata"]["name"]
        self._check_kind(rt, body, name)
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise KubeError(400, f"the name of the object ({meta['name']}) does not match the name "
                                 f"on the URL ({name})")
        if rt.namespaced and meta.get("namespace") and meta["namespace"] != old["metadata"]["namespace"]:
            raise KubeError(400, "the namespace of the provided object does not match the "
                                 "namespace sent on the request")
        if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name)
        if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
            raise conflict(rt, name, f"Precondition failed: UID in precondition: {meta['uid']}, "
                                     f"UID in object meta: {old['metadata']['uid']}")
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            new_meta = new.setdefault("metadata", {})
            for kept in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                         "deletionGracePeriodSeconds", "generation"):
                if kept in old["metadata"]:
                    new_meta[kept] = old["metadata"][kept]
                else:
                    new_meta.pop(kept, None)
            if rt.status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            self._normalize_secret(rt, new)
            self._validate(rt, new)
            if rt.key == ("", "pods"):
                self._check_pod_update(rt, old, new)
            if old["metadata"].get("deletionTimestamp"):
                added = set(new_meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
                if added:
                    raise invalid(rt, name, "metadata.finalizers: Forbidden: no new finalizers can be "
                                            "added if the object is being deleted")
            if rt.generation and _spec_part(new) != _spec_part(old):
                new_meta["generation"] = old["metadata"].get("generation", 1) + 1
        if _without_rv(new) == _without_rv(old):
            return old  # a no-op write does not change resourceVersion nor emit an event
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._remove(rt, new, old, "Background")
        return self._commit(rt, new, "MODIFIED", old)

    @staticmethod
    def _check_pod_update(rt: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> None:
        def mutable_stripped(spec: dict[str, Any]) -> dict[str, Any]:
            spec = copy.deepcopy(spec or {})
            for list_name in ("containers", "initContainers"):
                for container in spec.get(list_name) or []:
                    if isinstance(container, dict):
                        container.pop("image", None)
            for allowed in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
                spec.pop(allowed, None)
            return spec

        if mutable_stripped(old.get("spec")) != mutable_stripped(new.get("spec")):
            raise invalid(rt, old["metadata"]["name"],
                          "spec: Forbidden: pod updates may not change fields other than "
                          "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                          "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing "
                          "tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 "
                          "if it was previously negative)")

    def _remove(self, rt: ResourceType, obj: dict[str, Any], prev: dict[str, Any] | None,
                propagation: str) -> dict[str, Any]:
        """Remove an object for good (DELETED event) and garbage-collect its dependents."""
        obj = copy.deepcopy(obj)
        result = self._commit(rt, obj, "DELETED", prev)
        self._collect(obj["metadata"]["uid"], propagation)
        return result

    def _collect(self, owner_uid: str, propagation: str) -> None:
        for key, dependent in list(self._store.items()):
            refs = dependent["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                continue
            dep_rt = self.types[(key[0], key[1])]
            if propagation == "Orphan":
                new = copy.deepcopy(dependent)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self._commit(dep_rt, new, "MODIFIED", dependent)
            elif self._store.get(key) is dependent:
                self._delete(dep_rt, key[2] or None, key[3], {"propagationPolicy": "Background"})

    def _delete(self, rt: ResourceType, namespace: str | None, name: str,
                options: dict[str, Any]) -> dict[str, Any]:
        old = self._get(rt, namespace, name)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != old["metadata"]["uid"]:
            raise conflict(rt, name, f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                                     f"UID in object meta: {old['metadata']['uid']}")
        if preconditions.get("resourceVersion") and \
                preconditions["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name, "Precondition failed: ResourceVersion in precondition: "
                                     f"{preconditions['resourceVersion']}, ResourceVersion in object "
                                     f"meta: {old['metadata']['resourceVersion']}")
        propagation = options.get("propagationPolicy")
        if propagation is None and options.get("orphanDependents") is not None:
            propagation = "Orphan" if options["orphanDependents"] else "Background"
        if propagation is None:
            propagation = "Orphan" if rt.key == ("batch", "jobs") else "Background"
        if propagation not in ("Orphan", "Background", "Foreground"):
            raise invalid(rt, name, f'propagationPolicy: Unsupported value: "{propagation}"')
        if old["metadata"].get("deletionTimestamp"):
            return old
        grace = options.get("gracePeriodSeconds")
        delay = self.pod_termination_delay if rt.key == ("", "pods") else None
        if delay is not None and grace == 0:
            delay = None
        if old["metadata"].get("finalizers") or delay is not None:
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = int(delay or 0) if delay is not None else 0
            if rt.generation:
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            result = self._commit(rt, new, "MODIFIED", old)
            if delay is not None:
                asyncio.get_running_loop().call_later(delay, self._finish_termination, rt, namespace,
                                                      name, new["metadata"]["uid"])
            return result
        if propagation == "Foreground":
            self._collect(old["metadata"]["uid"], "Foreground")
            old = self._get(rt, namespace, name)
        return self._remove(rt, old, old, propagation)

    def _finish_termination(self, rt: ResourceType, namespace: str | None, name: str, uid: str) -> None:
        obj = self._store.get(self._key(rt, namespace, name))
        if obj is None or obj["metadata"]["uid"] != uid or obj["metadata"].get("finalizers"):
            return
        self._remove(rt, obj, obj, "Background")

    def _scale_of(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        assert rt.scale is not None
        spec_path = rt.scale["specReplicasPath"].lstrip(".")
        status_path = rt.scale["statusReplicasPath"].lstrip(".")
        spec_value = _field_value(obj, spec_path)
        status_value = _field_value(obj, status_path)
        meta = obj["metadata"]
        scale: dict[str, Any] = {
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                               "creationTimestamp") if k in meta},
            "spec": {"replicas": int(spec_value or 0)},
            "status": {"replicas": int(status_value or 0)},
        }
        selector_path = rt.scale.get("labelSelectorPath")
        if selector_path and _field_value(obj, selector_path.lstrip(".")):
            scale["status"]["selector"] = _field_value(obj, selector_path.lstrip("."))
        return scale

    def _write_scale(self, rt: ResourceType, old: dict[str, Any], scale: Any) -> dict[str, Any]:
        name = old["metadata"]["name"]
        if not isinstance(scale, dict) or scale.get("kind") not in (None, "Scale"):
            raise KubeError(400, "the body of the request was in an unknown format")
        meta = scale.get("metadata") or {}
        if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name)
        replicas = (scale.get("spec") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise KubeError(422, f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid '
                                 f"value: {replicas}: must be greater than or equal to 0", "Invalid")
        new = copy.deepcopy(old)
        parts = rt.scale["specReplicasPath"].lstrip(".").split(".")  # type: ignore[index]
        target = new
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = replicas
        new["metadata"].pop("resourceVersion", None)
        return self._scale_of(rt, self._update(rt, old, new, None))

    # -- HTTP ----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.latency and (self.latency_filter is None or self.latency_filter(request)):
            await asyncio.sleep(self.latency)
        for fault in self.faults:
            if fault.active() and fault.matches(request):
                fault.hits += 1
                return _json_response(KubeError(fault.status, fault.message).status(), fault.status)
        try:
            return await handler(request)
        except KubeError as err:
            return _json_response(err.status(), err.code)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts == ["version"]:
            return _json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-kvgate-fake",
                                   "platform": "linux/amd64"})
        if parts in (["healthz"], ["readyz"], ["livez"]):
            return web.Response(text="ok")
        if parts == ["api"]:
            return _json_response({"kind": "APIVersions", "versions": ["v1"],
                                   "serverAddressByClientCIDRs": []})
        if parts == ["apis"]:
            return _json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                   "groups": [self._group_doc(g) for g in self._groups()]})
        if len(parts) >= 2 and parts[0] == "api" and parts[1] == "v1":
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        elif len(parts) == 2 and parts[0] == "apis" and parts[1] in self._groups():
            return _json_response({"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(parts[1])})
        else:
            raise KubeError(404, "the server could not find the requested resource")
        if not rest:
            return _json_response(self._resource_list(group, version))
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        rt = self.types.get((group, rest[0]))
        if rt is None or rt.version != version or (namespace is not None and not rt.namespaced):
            raise KubeError(404, "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if len(rest) > 3 or (subresource and not (subresource == "status" and rt.status)
                             and not (subresource == "scale" and rt.scale)):
            raise KubeError(404, "the server could not find the requested resource")
        if rt.namespaced and name is not None and namespace is None:
            raise KubeError(404, "the server could not find the requested resource")
        if request.query.get("dryRun"):
            raise KubeError(400, "dryRun is not supported by the fake API server")
        resource = rt.plural + (f"/{subresource}" if subresource else "")
        method = request.method
        if name is None:
            if method == "GET":
                verb = "watch" if _is_watch(request.query) else "list"
                self.calls.append((verb, group, resource, namespace))
                if verb == "watch":
                    return await self._watch(request, rt, namespace)
                return _json_response(self._list(rt, namespace, request.query))
            if method == "POST":
                self.calls.append(("create", group, resource, namespace))
                if rt.namespaced and namespace is None:
                    raise KubeError(404, "the server could not find the requested resource")
                obj = self._create(rt, namespace, await self._body(request))
                return _json_response(obj, 201)
            if method == "DELETE":
                self.calls.append(("deletecollection", group, resource, namespace))
                return _json_response(await self._delete_collection(request, rt, namespace))
            raise KubeError(405, "the server does not allow this method on the requested resource")
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if verb is None or (verb == "delete" and subresource):
            raise KubeError(405, "the server does not allow this method on the requested resource")
        self.calls.append((verb, group, resource, namespace))
        if method == "GET":
            obj = self._get(rt, namespace, name)
            return _json_response(self._scale_of(rt, obj) if subresource == "scale" else obj)
        if method == "DELETE":
            options = await self._body(request, default={})
            if not isinstance(options, dict):
                raise KubeError(400, "invalid DeleteOptions")
            for param, key in (("propagationPolicy", "propagationPolicy"),
                               ("gracePeriodSeconds", "gracePeriodSeconds")):
                if param in request.query:
                    value: Any = request.query[param]
                    options[key] = int(value) if key == "gracePeriodSeconds" else value
            return _json_response(self._delete(rt, namespace, name, options))
        body = await self._body(request)
        old = self._get(rt, namespace, name)
        if method == "PATCH":
            body = self._apply_patch(rt, old, body, request.content_type, subresource)
        if subresource == "scale":
            return _json_response(self._write_scale(rt, old, body))
        return _json_response(self._update(rt, old, body, subresource))

    async def _body(self, request: web.Request, default: Any = None) -> Any:
        raw = await request.read()
        if not raw.strip():
            if default is not None:
                return default
            raise KubeError(400, "the body of the request was in an unknown format")
        try:
            return json.loads(raw)
        except ValueError as err:
            raise KubeError(400, f"the body of the request was in an unknown format - accepted media "
                                 f"types include: application/json ({err})") from None

    def _apply_patch(self, rt: ResourceType, old: dict[str, Any], patch: Any, content_type: str,
                     subresource: str | None) -> Any:
        target = self._scale_of(rt, old) if subresource == "scale" else old
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise KubeError(400, "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            try:
                return json_patch(target, patch)
            except JsonPatchError as err:
                raise KubeError(422, str(err)) from None
        if content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if content_type.startswith("application/strategic") and rt.custom and subresource != "scale":
                raise KubeError(415, "strategic merge patch is not supported for custom resources; "
                                     "use application/merge-patch+json or application/json-patch+json")
            if not isinstance(patch, dict):
                raise KubeError(422, f'"" is invalid: patch: Invalid value: "{json.dumps(patch)}": '
                                     "couldn't get version/kind; json parse error: json: cannot "
                                     "unmarshal array into Go value of type struct")
            if content_type == "application/merge-patch+json":
                return merge_patch(target, patch)
            return strategic_merge_patch(target, patch)
        if content_type == "application/apply-patch+yaml":
            raise KubeError(415, "server-side apply is not supported by the fake API server")
        raise KubeError(415, f'the body of the request was in an unknown format - accepted media types '
                             f'include: application/json-patch+json, application/merge-patch+json, '
                             f'application/apply-patch+yaml ({content_type})')

    def _list_doc(self, rt: ResourceType, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not rt.custom:  # built-in list items carry no kind/apiVersion
            items = [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items]
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _matcher(self, rt: ResourceType, query: Any) -> Callable[[dict[str, Any]], bool]:
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(rt, query.get("fieldSelector"))
        return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)

    def _list(self, rt: ResourceType, namespace: str | None, query: Any) -> dict[str, Any]:
        items = self._select(rt, namespace, self._matcher(rt, query))
        token = query.get("continue")
        if token:
            try:
                start = json.loads(base64.urlsafe_b64decode(token.encode()))
            except ValueError:
                raise KubeError(400, "continue key is not valid") from None
            items = [i for i in items
                     if [i["metadata"].get("namespace", ""), i["metadata"]["name"]] > start]
        doc = self._list_doc(rt, items)
        limit = int(query.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            page = items[:limit]
            last = page[-1]["metadata"]
            doc = self._list_doc(rt, page)
            doc["metadata"]["continue"] = base64.urlsafe_b64encode(
                json.dumps([last.get("namespace", ""), last["name"]]).encode()).decode()
            doc["metadata"]["remainingItemCount"] = len(items) - limit
        return doc

    async def _delete_collection(self, request: web.Request, rt: ResourceType,
                                 namespace: str | None) -> dict[str, Any]:
        options = await self._body(request, default={})
        if "propagationPolicy" in request.query:
            options["propagationPolicy"] = request.query["propagationPolicy"]
        deleted = []
        for obj in self._select(rt, namespace, self._matcher(rt, request.query)):
            meta = obj["metadata"]
            if self._key(rt, meta.get("namespace"), meta["name"]) in self._store:
                deleted.append(self._delete(rt, meta.get("namespace"), meta["name"], dict(options)))
        return self._list_doc(rt, deleted)

    async def _watch(self, request: web.Request, rt: ResourceType, namespace: str | None) -> web.StreamResponse:
        query = request.query
        watcher = _Watcher(rt, namespace, self._matcher(rt, query))
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        bookmarks = str(query.get("allowWatchBookmarks", "")).lower() in ("true", "1")
        send_initial = str(query.get("sendInitialEvents", "")).lower() == "true"
        rv_param = query.get("resourceVersion", "")
        expired: int | None = None
        initial: list[tuple[str, dict[str, Any]]] = []
        # Everything up to registering the watcher is synchronous, so no event is missed.
        if rv_param in ("", "0") or send_initial:
            initial = [("ADDED", obj) for obj in self._select(rt, namespace, watcher.match)]
        else:
            try:
                since = int(rv_param)
            except ValueError:
                raise KubeError(400, f'invalid resource version "{rv_param}"') from None
            if since < self._oldest_resumable:
                expired = since
            else:
                for event in self._log:
                    if event.rv > since and watcher.wants(event):
                        watcher.queue.put_nowait(event)
        self._watchers.add(watcher)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)

            async def send(etype: str, obj: dict[str, Any]) -> None:
                await response.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

            if expired is not None:
                error = KubeError(410, f"too old resource version: {expired} ({self._oldest_resumable})",
                                  "Expired")
                await send("ERROR", error.status())
                await response.write_eof()
                return response
            for etype, obj in initial:
                await send(etype, obj)
            if send_initial and bookmarks:
                await send("BOOKMARK", self._bookmark(rt, initial_end=True))
            deadline = time.monotonic() + timeout if timeout is not None else None
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                waits = [w for w in (deadline, next_bookmark if bookmarks else None) if w is not None]
                wait = max(0.0, min(waits) - now) if waits else None
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        if bookmarks:
                            await send("BOOKMARK", self._bookmark(rt))
                        break
                    await send("BOOKMARK", self._bookmark(rt))
                    next_bookmark = time.monotonic() + self.bookmark_interval
                    continue
                if item is _STOP:
                    break
                if item is _DROP or item is _DROP_MID:
                    if item is _DROP_MID:
                        await response.write(b'{"type":"MODIFIED","object":{"kind":"')
                    transport = request.transport
                    if transport is not None:
                        transport.abort()
                    return response
                translated = watcher.translate(item)
                if translated is not None:
                    await send(*translated)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(watcher)
        return response

    def _bookmark(self, rt: ResourceType, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}

    # -- discovery -----------------------------------------------------------------------------

    def _groups(self) -> list[str]:
        return sorted({rt.group for rt in self.types.values() if rt.group})

    def _group_doc(self, group: str) -> dict[str, Any]:
        versions = sorted({rt.version for rt in self.types.values() if rt.group == group})
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = []
        for rt in self.types.values():
            if rt.group != group or rt.version != version:
                continue
            resources.append({"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": ["create", "delete", "deletecollection", "get",
                                                         "list", "patch", "update", "watch"]})
            if rt.status:
                resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced":
                                  rt.namespaced, "kind": rt.kind, "verbs": ["get", "patch", "update"]})
            if rt.scale:
                resources.append({"name": f"{rt.plural}/scale", "singularName": "", "namespaced":
                                  rt.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale",
                                  "verbs": ["get", "patch", "update"]})
        if not resources:
            raise KubeError(404, "the server could not find the requested resource")
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
