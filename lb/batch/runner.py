"""Running batches: claim one, check its input, send its requests through the gateway's own
routing, record each result as it comes, and write the output and error files.

Each line goes through the gateway's ASGI app in-process (``lb.loopback``), exactly as a
client's request would: model and adapter resolution, prefix routing, the queue (scale
from zero), retries on other replicas, ejection and metrics all apply, and no socket is involved.

A worker commits each result before it takes the next line (results that arrive together share
one transaction), so a process that dies loses only the answers of requests in flight; whoever
takes the batch over (at once if the holder's process is gone from this host, else when its
lease lapses) runs only the lines with no recorded result. Each recorded line is final: the
output has every line exactly once, and a replica sees a line twice only if it was in flight
when the process died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Callable

from lb.batch.config import BatchConfig
from lb.batch.jsonl import check_input, error_line, response_line
from lb.batch.limits import BatchLimits
from lb.batch.store import FAILED, SUCCEEDED, Result, Store, owner_name
from lb.errors import error_body
from lb.loopback import Abort, App, Reply, call_app

log = logging.getLogger(__name__)

_EXPIRED = "This request could not be executed before the completion window expired."
_CANCELLED = "This request was not executed: the batch was cancelled."
_BROKEN = "The model server closed the connection before its answer was complete."
_BUSY = 429  # the queue is full (or shed the line): wait and send again, it is not the line's fault


class BatchRunner:
    """The batch worker of one gateway process."""

    def __init__(self, store: Store, app: App, config: BatchConfig,
                 tenants: Callable[[str], Any] | None = None) -> None:
        self.store = store
        self.app = app
        self.config = config
        # API keys on: the live Tenant of a key name (None once revoked or expired).
        self.tenants = tenants
        self.owner = owner_name()
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Claim batches and run them, until cancelled (their leases then lapse)."""
        try:
            while True:
                await self._claim()
                await asyncio.sleep(self.config.poll_seconds)
        finally:
            tasks = list(self._running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim(self) -> None:
        free = self.config.max_running - len(self._running)
        if free <= 0:
            return
        try:
            ids = await self.store.claim(self.owner, time.time(), self.config.lease_seconds, free)
        except Exception as exc:  # a busy or broken disk: try again next time round
            log.warning("batch store: cannot claim batches: %s", exc)
            return
        for batch_id in ids:
            if batch_id not in self._running:
                task = asyncio.get_running_loop().create_task(self._guarded(batch_id))
                self._running[batch_id] = task

    async def _guarded(self, batch_id: str) -> None:
        try:
            await _Run(self, batch_id).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: runner failed; it will be taken up again", batch_id)
        finally:
            self._running.pop(batch_id, None)


class _Run:
    """One batch, run by its lease holder from wherever it stopped."""

    def __init__(self, runner: BatchRunner, batch_id: str) -> None:
        self.runner = runner
        self.store = runner.store
        self.config = runner.config
        self.owner = runner.owner
        self.batch_id = batch_id
        self.stop = asyncio.Event()
        self.why = ""  # "cancelled", "expired" or "lost" once stop is set
        self.results: list[Result] = []
        self._committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()
        self._abort = Abort()
        self.tenant: str | None = None

    async def run(self) -> None:
        batch = await self.store.get_batch(self.batch_id)
        if batch is None:
            return
        self.tenant = await self.store.batch_tenant(self.batch_id)
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(batch))
        try:
            await self._advance(batch)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _advance(self, batch: dict[str, Any]) -> None:
        status = batch["status"]
        expires = batch.get("expires_at")
        if expires and time.time() >= expires and status in ("validating", "in_progress"):
            self._halt("expired")  # also a batch whose runner died while it expired
        if status == "validating" and not await self._validate(batch):
            return
        if status in ("validating", "in_progress"):
            await self._execute(batch)
        if self.why == "lost":
            return
        if not self.why and status == "cancelling":
            self.why = "cancelled"
        final = {"cancelled": "cancelled", "expired": "expired"}.get(self.why, "completed")
        await self._finish(final)

    # -- lease, cancel and expiry ----------------------------------------------------------

    async def _keep_lease(self, batch: dict[str, Any]) -> None:
        """Renew the lease a few times per lease period; notice a cancel (which may have come
        through another process) and the end of the completion window."""
        period = self.config.lease_seconds / 3
        expires = batch.get("expires_at") or float("inf")
        while True:
            await asyncio.sleep(min(period, max(0.05, expires - time.time())))
            status = await self.store.renew(self.batch_id, self.owner,
                                            time.time() + self.config.lease_seconds)
            if status is None:
                self._halt("lost")
                log.warning("batch %s: lease lost to another process", self.batch_id)
                return
            if status == "cancelling":
                self._halt("cancelled")
            elif time.time() >= expires and status in ("validating", "in_progress"):
                self._halt("expired")

    def _halt(self, why: str) -> None:
        if not self.stop.is_set():
            self.why = why
            self.stop.set()
            self._abort.fire()

    # -- validating ------------------------------------------------------------------------

    async def _validate(self, batch: dict[str, Any]) -> bool:
        """Check the input file; True when the batch may run (now `in_progress`)."""
        data = await self.store.file_bytes(batch["input_file_id"])
        if data is None:
            return await self._fail(batch, [{"code": "file_not_found", "param": "input_file_id",
                                             "line": None, "message": "The input file "
                                             f"{batch['input_file_id']} no longer exists."}])
        checked = await asyncio.to_thread(check_input, data, batch["endpoint"],
                                          BatchLimits.of(self.config, batch["endpoint"]))
        if not checked.rows:
            return await self._fail(batch, [{"code": "empty_file", "param": "input_file_id",
                                             "line": None, "message": "The input file has no "
                                             "request lines."}])
        if len(checked.rows) > self.config.max_requests:
            return await self._fail(batch, [{
                "code": "too_many_requests", "param": "input_file_id", "line": None,
                "message": f"The input file has {len(checked.rows)} requests; a batch may "
                           f"hold {self.config.max_requests}."}])
        if not checked.runnable:  # nothing would run: refuse the batch as OpenAI does
            return await self._fail(batch, [e.as_dict() for e in checked.errors[:100]])
        if not await self.store.add_requests(self.batch_id, self.owner, checked.rows):
            return False
        # (a cancel that came meanwhile stays: the store never turns `cancelling` back)
        return await self.store.update_batch(self.batch_id, self.owner, "in_progress",
                                             in_progress_at=int(time.time()))

    async def _fail(self, batch: dict[str, Any], errors: list[dict[str, Any]]) -> bool:
        if await self.store.update_batch(self.batch_id, self.owner,
                                         errors={"object": "list", "data": errors}):
            await self.store.finalize(self.batch_id, self.owner, "failed", int(time.time()))
        return False

    # -- in progress -----------------------------------------------------------------------

    async def _execute(self, batch: dict[str, Any]) -> None:
        if self.stop.is_set():
            return
        pending = await self.store.pending(self.batch_id)
        if not pending:  # all done before a restart: only the files are left to write
            return
        queue = iter(pending)
        endpoint = batch["endpoint"]
        headers = [(b"x-kvgate-batch-id", self.batch_id.encode())]
        workers = [asyncio.get_running_loop().create_task(self._work(queue, endpoint, headers))
                   for _ in range(min(self.config.concurrency, len(pending)))]
        flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        stopped = asyncio.get_running_loop().create_task(self.stop.wait())
        try:
            await asyncio.wait([*workers, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not stopped.done():
                await asyncio.wait([asyncio.gather(*workers, return_exceptions=True), stopped],
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._abort.fire()  # requests in flight end as a client's that hung up would
            for task in (*workers, stopped):
                task.cancel()
            await asyncio.gather(*workers, stopped, return_exceptions=True)
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await self._flush()
        for task in workers:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _work(self, queue: Any, endpoint: str,
                    headers: list[tuple[bytes, bytes]]) -> None:
        for line, custom_id, body in queue:
            if self.stop.is_set():
                return
            reply = await self._send(endpoint, body, headers)
            if reply.status == 0:  # aborted: the line stays pending
                return
            status, body = reply.status, b"".join(reply.chunks)
            if not reply.complete:  # the replica broke off mid-body: what came is not an answer
                status, body = 502, error_body(502, _BROKEN, code="upstream_error")
            request_id = reply.header(b"x-request-id") or "req_" + uuid.uuid4().hex
            output, usage = response_line(custom_id, status, request_id, body)
            await self._commit((line, SUCCEEDED if status < 400 else FAILED, output, usage))

    async def _send(self, endpoint: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Reply:
        """The request through the gateway; a full queue is waited out, not recorded."""
        while True:
            tenant = None
            if self.tenant is not None and self.runner.tenants is not None:
                tenant = self.runner.tenants(self.tenant)
                if tenant is None:
                    return _revoked(self.tenant)
            reply = await call_app(self.runner.app, endpoint, body, headers, self._abort, tenant)
            if reply.status != _BUSY or self.stop.is_set():
                return reply
            retry = reply.header(b"retry-after")
            await asyncio.sleep(float(retry) if retry.isdigit() else 1.0)

    async def _commit(self, result: Result) -> None:
        """Record a result before taking the next line (so a crash re-runs only what was in
        flight); results that arrive while a commit is under way go together in the next."""
        self.results.append(result)
        committed = self._committed
        self._wake.set()
        await committed

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        if not self.results:
            return
        results, self.results = self.results, []
        committed, self._committed = self._committed, asyncio.get_running_loop().create_future()
        try:
            recorded = await self.store.record(self.batch_id, self.owner, results)
        except Exception as exc:  # the batch is left to its lease: taken up again later
            log.warning("batch %s: cannot record results: %s", self.batch_id, exc)
            recorded = False
        committed.set_result(None)
        if not recorded:
            self._halt("lost")

    # -- the end ---------------------------------------------------------------------------

    async def _finish(self, final: str) -> None:
        """What did not run fails with the reason (expired, cancelled); the files are written.
        A cancel that came as the last requests finished still ends the batch `cancelled`."""
        if final == "completed":
            if not await self.store.update_batch(self.batch_id, self.owner, "finalizing",
                                                 finalizing_at=int(time.time())):
                return
            batch = await self.store.get_batch(self.batch_id)
            if batch is not None and batch["status"] == "cancelling":
                final = "cancelled"
        if final != "completed":
            code, message = (("batch_expired", _EXPIRED) if final == "expired"
                             else ("batch_cancelled", _CANCELLED))
            if not await self.store.fail_pending(
                    self.batch_id, self.owner,
                    lambda line, custom_id: error_line(custom_id, code, message)):
                return
        await self.store.finalize(self.batch_id, self.owner, final, int(time.time()))


def _revoked(name: str) -> Reply:
    """The answer to a line whose batch's API key is no longer valid."""
    body = error_body(401, f"The API key `{name}` that created this batch has been revoked or "
                      "has expired.", code="invalid_api_key")
    return Reply(401, [(b"content-type", b"application/json")], [body], True)
