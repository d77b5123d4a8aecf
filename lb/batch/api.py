"""The HTTP side of the Files and Batches API: OpenAI's routes, shapes and errors.

Files: ``POST /files`` (multipart: ``file``, ``purpose=batch``), ``GET /files``,
``GET /files/{id}``, ``GET /files/{id}/content``, ``DELETE /files/{id}``. Batches:
``POST /batches``, ``GET /batches``, ``GET /batches/{id}``, ``POST /batches/{id}/cancel``.
Everything is mounted under each API prefix (``/v1``, ``/openai/v1``); the store answers on its
own thread, so no route waits on the disk in the event loop.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
import uuid
from typing import Any, AsyncIterator, Callable

import orjson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from lb.batch.config import BatchConfig
from lb.batch.expiry import expiry_seconds, policy_seconds
from lb.batch.jsonl import ENDPOINTS
from lb.batch.store import Store
from lb.errors import GatewayError, bad_request

log = logging.getLogger(__name__)

_WINDOW = re.compile(r"([1-9][0-9]{0,6})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_JSON = 1024 * 1024  # a batch-create body is a few hundred bytes


class BatchApi:
    """The routes, over a store (None: the API is off and every route says how to turn it on).

    With API keys on, every route needs a key (``authenticate``: the key's name, or a 401) and
    a key sees only its own files and batches; a batch's lines run under the key that made it.
    """

    def __init__(self, store: Store | None, config: BatchConfig,
                 authenticate: Callable[[list[tuple[bytes, bytes]]], str] | None = None) -> None:
        self.store = store
        self.config = config
        self.authenticate = authenticate

    def _tenant(self, request: Request) -> str | None:
        return None if self.authenticate is None else self.authenticate(request.scope["headers"])

    def routes(self, prefixes: tuple[str, ...]) -> list[Route]:
        table: list[tuple[str, Callable[[Request], Any], list[str]]] = [
            ("/files", self._files, ["GET", "POST"]),
            ("/files/{file_id}", self._file, ["GET", "DELETE"]),
            ("/files/{file_id}/content", self._content, ["GET"]),
            ("/batches", self._batches, ["GET", "POST"]),
            ("/batches/{batch_id}", self._batch, ["GET"]),
            ("/batches/{batch_id}/cancel", self._cancel, ["POST"]),
        ]
        return [Route(prefix + path, _guarded(endpoint), methods=methods)
                for prefix in prefixes for path, endpoint, methods in table]

    def _store(self) -> Store:
        if self.store is None:
            raise GatewayError(404, "The Files and Batches API is off on this gateway: set "
                               "batch.stateDir in its config.", code="batch_api_disabled")
        return self.store

    # -- files -----------------------------------------------------------------------------

    async def _files(self, request: Request) -> Response:
        store = self._store()
        tenant = self._tenant(request)
        if request.method == "POST":
            return _json(await self._upload(store, request, tenant))
        params = request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request("order must be `asc` or `desc`.", param="order")
        files, more = await store.list_files(params.get("purpose") or None,
                                             params.get("after") or None,
                                             _limit(params.get("limit"), 10_000), order, tenant)
        return _json(_page(files, more))

    async def _upload(self, store: Store, request: Request, tenant: str | None) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise GatewayError(415, "Upload a file as multipart/form-data, with the fields "
                               "`file` and `purpose`.", code="unsupported_media_type")
        limit = self.config.max_file_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + 64 * 1024:
            raise _file_too_large(limit)
        parser = MultiPartParser(request.headers, _bounded(request.stream(), limit + 64 * 1024),
                                 max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise bad_request(f"The multipart body is malformed: {exc.message}") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise bad_request("The upload has no `file` part.", param="file")
            if purpose != "batch":
                raise bad_request(f"purpose must be `batch` (the only purpose this gateway "
                                  f"serves), not {purpose!r}.", param="purpose")
            if upload.size is not None and upload.size > limit:
                raise _file_too_large(limit)
            expires = expiry_seconds(form.get("expires_after[anchor]"),
                                     form.get("expires_after[seconds]"), "expires_after",
                                     self.config)
            if expires is None and self.config.file_expiry_seconds:
                expires = self.config.file_expiry_seconds  # OpenAI's default for batch files
            return await store.create_file(upload.filename or "upload.jsonl", "batch",
                                           upload.file, tenant, expires)
        finally:
            await form.close()

    async def _file(self, request: Request) -> Response:
        store = self._store()
        file_id = request.path_params["file_id"]
        tenant = self._tenant(request)
        if request.method == "DELETE":
            if not await store.delete_file(file_id, tenant):
                raise _no_file(file_id)
            return _json({"id": file_id, "object": "file", "deleted": True})
        found = await store.get_file(file_id, tenant)
        if found is None:
            raise _no_file(file_id)
        return _json(found)

    async def _content(self, request: Request) -> Response:
        store = self._store()
        file_id = request.path_params["file_id"]
        found = await store.get_file(file_id, self._tenant(request))
        if found is None:
            raise _no_file(file_id)
        chunks = store.read_file(file_id)
        first = await anext(chunks, b"")  # a body gone missing is found before the answer starts
        if not first and found["bytes"]:
            raise OSError(f"the body of {file_id} is missing")
        return StreamingResponse(_chained(first, chunks), media_type="application/octet-stream",
                                 headers={"content-length": str(found["bytes"])})

    # -- batches ---------------------------------------------------------------------------

    async def _batches(self, request: Request) -> Response:
        store = self._store()
        tenant = self._tenant(request)
        if request.method == "POST":
            return _json(await self._create(store, await _json_body(request), tenant))
        params = request.query_params
        batches, more = await store.list_batches(params.get("after") or None,
                                                 _limit(params.get("limit"), 100), tenant)
        return _json(_page(batches, more))

    async def _create(self, store: Store, body: dict[str, Any],
                      tenant: str | None) -> dict[str, Any]:
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}; got "
                              f"{endpoint!r}.", param="endpoint")
        window = self._window(body.get("completion_window"))
        metadata = _metadata(body.get("metadata"))
        output_expiry = policy_seconds(body.get("output_expires_after"), "output_expires_after",
                                       self.config)
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise bad_request("input_file_id is required.", param="input_file_id")
        found = await store.get_file(file_id, tenant)
        if found is None:
            raise _no_file(file_id, param="input_file_id")
        if found["purpose"] != "batch":
            raise bad_request(f"The file {file_id} has purpose {found['purpose']!r}; a batch "
                              "needs one uploaded with purpose `batch`.", param="input_file_id")
        now = int(time.time())
        return await store.create_batch({
            "id": "batch_" + uuid.uuid4().hex, "object": "batch", "endpoint": endpoint,
            "errors": None, "input_file_id": file_id,
            "completion_window": body["completion_window"], "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + window, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None, "metadata": metadata}, tenant,
            output_expiry)

    def _window(self, value: Any) -> int:
        """OpenAI's `24h`, or any `<n>s|m|h|d` up to batch.maxWindowSeconds."""
        match = _WINDOW.fullmatch(value) if isinstance(value, str) else None
        seconds = int(match[1]) * _UNITS[match[2]] if match else 0
        if not match or seconds > self.config.max_window_seconds:
            raise bad_request(f"completion_window must be a duration such as `24h` (at most "
                              f"{self.config.max_window_seconds} s); got {value!r}.",
                              param="completion_window")
        return seconds

    async def _batch(self, request: Request) -> Response:
        store = self._store()
        batch_id = request.path_params["batch_id"]
        found = await store.get_batch(batch_id, self._tenant(request))
        if found is None:
            raise _no_batch(batch_id)
        return _json(found)

    async def _cancel(self, request: Request) -> Response:
        store = self._store()
        batch_id = request.path_params["batch_id"]
        batch = await store.cancel_batch(batch_id, int(time.time()), self._tenant(request))
        if batch is None:
            raise _no_batch(batch_id)
        if batch["status"] not in ("cancelling", "cancelled"):
            raise GatewayError(409, f"The batch {batch_id} is {batch['status']} and can no "
                               "longer be cancelled.", code="batch_not_cancellable")
        return _json(batch)


def _guarded(endpoint: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """A store that cannot answer (a full disk, a broken volume) is a 503 in OpenAI's shape,
    not a traceback."""
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (OSError, sqlite3.Error) as exc:
            log.warning("batch store: %s %s failed: %s", request.method, request.url.path, exc)
            raise GatewayError(503, "The batch store is unavailable; try again later.",
                               code="store_unavailable") from None
    return guarded


async def _chained(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise _file_too_large(limit)
        yield chunk


async def _json_body(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > _MAX_JSON:
            raise GatewayError(413, "The request body is too large.", code="request_too_large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _metadata(value: Any) -> dict[str, str] | None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                       and len(v) <= 512 for k, v in value.items())):
        raise bad_request("metadata must be an object of at most 16 string pairs (keys up to "
                          "64 characters, values up to 512).", param="metadata")
    return value


def _limit(value: str | None, most: int) -> int:
    if value is None:
        return 20
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise bad_request(f"limit must be an integer from 1 to {most}.", param="limit")
    return int(value)


def _page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": more,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None}


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type="application/json")


def _no_file(file_id: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, f"No such File object: {file_id}.", code="file_not_found",
                        param=param)


def _no_batch(batch_id: str) -> GatewayError:
    return GatewayError(404, f"No such Batch object: {batch_id}.", code="batch_not_found")


def _file_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The file is larger than the {limit} bytes allowed "
                        "(batch.maxFileBytes).", code="file_too_large")
