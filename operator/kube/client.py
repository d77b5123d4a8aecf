"""Talking to the Kubernetes API: loading credentials, and the few calls the operator makes.

Config: inside a Pod the service account is used (``KUBERNETES_SERVICE_HOST`` is set there);
elsewhere a kubeconfig file (``$KUBECONFIG`` or ``~/.kube/config``) and its context.

``KubeApi`` wraps ``kubernetes_asyncio`` for the operator and returns plain dicts in the
API's own JSON shape (camelCase), which is what the planning code (`lb_operator.kube.pods`) reads:
pods are fetched with ``_preload_content=False`` and parsed once, instead of being deserialized
into ``V1Pod`` models and serialized back. Custom-object patches carry an explicit
merge-patch content type (kubernetes_asyncio would send a dict as a JSON patch, which the API
server rejects). Every error surfaces as ``kubernetes_asyncio``'s ``ApiException``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Awaitable, TypeVar

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import (ApiClient, BatchV1Api, Configuration, CoordinationV1Api,
                                       CoreV1Api, CustomObjectsApi, StorageV1Api)
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.client.rest import RESTResponse

from lb.model import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
T = TypeVar("T")


async def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An ApiClient from the in-cluster service account, or else from a kubeconfig file."""
    configuration = Configuration()
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kube_config.load_incluster_config(client_configuration=configuration)
    else:
        await kube_config.load_kube_config(config_file=kubeconfig, context=context,
                                           client_configuration=configuration,
                                           persist_config=False)
    return ApiClient(configuration)


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace to manage when none is given: the Pod's own, the context's, or "default"."""
    if kubeconfig is None and context is None and SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    try:
        contexts, current = kube_config.list_kube_config_contexts(kubeconfig)
    except (kube_config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def api_error_status(exc: ApiException) -> dict[str, Any]:
    """The ``Status`` object the API server sent with an error ({} when the body is not one)."""
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
    try:
        status = json.loads(body) if body else {}
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def api_error_text(exc: ApiException) -> str:
    """An API error as the server explained it: code, reason, its message and the causes in its
    details (a 422 lists each invalid field there), e.g. for a log line, a condition or an Event."""
    status = api_error_status(exc)
    text = f"API error {exc.status} {status.get('reason') or exc.reason}"
    if status.get("message"):
        text += f": {status['message']}"
    causes = [f"{c.get('field', '')}: {c.get('message', '')}".strip(": ")
              for c in (status.get("details") or {}).get("causes") or () if isinstance(c, dict)]
    causes = [c for c in causes if c and c not in text]
    if causes:
        text += f" ({'; '.join(causes)})"
    return text


def is_permanent(exc: BaseException) -> bool:
    """A 4xx that repeating the same request cannot fix (invalid, forbidden, ...). 409 (a
    concurrent write) and 429 (throttled) pass by themselves, and so do 408/410 (timeouts,
    expired watches): those are retried as usual."""
    return (isinstance(exc, ApiException) and exc.status is not None and 400 <= exc.status < 500
            and exc.status not in (408, 409, 410, 429))


async def or_none(call: Awaitable[T]) -> T | None:
    """The call's answer, or None when the object does not exist (404); other errors raise."""
    try:
        return await call
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def _raw_json(call: Awaitable[Any]) -> Any:
    """Read a ``_preload_content=False`` response as JSON, raising ApiException on an error."""
    response = await call
    try:
        data = await response.read()
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=RESTResponse(response, data))
    return json.loads(data)


class KubeApi:
    """The operator's API calls, as plain dicts. One instance per ApiClient.

    Every module of the operator reaches the API server through one of these: the calls below,
    or for the cache, adapters and autoscaler, the group clients it holds (`core`, `custom`,
    `coordination`, `batch`, `storage`), so credentials and clients are made in one place.
    """

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.core = CoreV1Api(client)
        self.custom = CustomObjectsApi(client)
        self.coordination = CoordinationV1Api(client)
        self.batch = BatchV1Api(client)
        self.storage = StorageV1Api(client)

    def plain(self, obj: Any) -> Any:
        """A kubernetes_asyncio model as the API's JSON (camelCase dicts)."""
        return self.client.sanitize_for_serialization(obj)

    # -- Models --------------------------------------------------------------------------------

    async def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await or_none(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                      PLURAL, name))

    async def replace_model_status(self, namespace: str, name: str,
                                   body: dict[str, Any]) -> dict[str, Any]:
        """PUT /status with the body's resourceVersion: a concurrent write answers 409."""
        return await self.custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body)

    async def get_model_scale(self, namespace: str, name: str) -> dict[str, Any]:
        return await self.custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace,
                                                                    PLURAL, name)

    async def replace_model_scale(self, namespace: str, name: str,
                                  scale: dict[str, Any]) -> dict[str, Any]:
        return await self.custom.replace_namespaced_custom_object_scale(
            GROUP, VERSION, namespace, PLURAL, name, scale)

    # -- Pods ----------------------------------------------------------------------------------

    async def list_pods(self, namespace: str, **params: Any) -> dict[str, Any]:
        """A PodList as JSON; params as for ``list_namespaced_pod`` (label_selector, ...)."""
        return await _raw_json(self.core.list_namespaced_pod(namespace, _preload_content=False,
                                                             **params))

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
        return await _raw_json(self.core.create_namespaced_pod(namespace, pod,
                                                               _preload_content=False))

    async def delete_pod(self, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete a Pod, only if it is still the one planned for (same uid). False if gone."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            await _raw_json(self.core.delete_namespaced_pod(name, namespace, body=body,
                                                            _preload_content=False))
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or replaced by another Pod of that name
                return False
            raise
        return True

    # -- ConfigMaps ----------------------------------------------------------------------------

    async def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await or_none(_raw_json(self.core.read_namespaced_config_map(
            name, namespace, _preload_content=False)))

    async def create_config_map(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await _raw_json(self.core.create_namespaced_config_map(namespace, body,
                                                                      _preload_content=False))

    async def replace_config_map(self, namespace: str, name: str,
                                 body: dict[str, Any]) -> dict[str, Any]:
        return await _raw_json(self.core.replace_namespaced_config_map(name, namespace, body,
                                                                       _preload_content=False))

    async def delete_config_map(self, namespace: str, name: str) -> None:
        await or_none(_raw_json(self.core.delete_namespaced_config_map(name, namespace,
                                                                       _preload_content=False)))

    # -- Leases --------------------------------------------------------------------------------

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await or_none(_raw_json(self.coordination.read_namespaced_lease(
            name, namespace, _preload_content=False)))

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await _raw_json(self.coordination.create_namespaced_lease(
            namespace, body, _preload_content=False))

    async def replace_lease(self, namespace: str, name: str,
                            body: dict[str, Any]) -> dict[str, Any]:
        return await _raw_json(self.coordination.replace_namespaced_lease(
            name, namespace, body, _preload_content=False))
