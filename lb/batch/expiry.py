"""File expiry as OpenAI defines it: the request fields that set it, and the sweeper that deletes
expired files.

A file uploaded with ``expires_after`` (``{"anchor": "created_at", "seconds": N}``, multipart
``expires_after[anchor]`` / ``expires_after[seconds]``), or written for a batch created with
``output_expires_after``, carries ``expires_at``. From that second on the store hides it (every
route answers 404, as for a deleted file); the sweeper deletes its body and metadata later, off
the request path. Of all the processes sharing a store only the holder of the store's
``sweeper`` role sweeps (a lease in the store, like a batch's), so a cluster's replicas do not
race one another over the same files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from lb.batch.config import MAX_EXPIRY_SECONDS, BatchConfig
from lb.batch.store import Store, owner_name
from lb.errors import bad_request

log = logging.getLogger(__name__)

ROLE = "sweeper"
_BATCH = 500  # files deleted per store transaction


def expiry_seconds(anchor: Any, seconds: Any, field: str, config: BatchConfig) -> int | None:
    """The seconds of an expiration policy (None: none given), or a 400 naming the bad part.

    ``anchor`` and ``seconds`` come from JSON (numbers) or from multipart fields (strings)."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise bad_request(f"{field}.anchor must be `created_at` (the only anchor); got "
                          f"{anchor!r}.", param=f"{field}.anchor")
    if isinstance(seconds, str) and seconds.strip().isdigit():
        seconds = int(seconds)
    low = config.min_expiry_seconds
    if (not isinstance(seconds, int) or isinstance(seconds, bool)
            or not low <= seconds <= MAX_EXPIRY_SECONDS):
        raise bad_request(f"{field}.seconds must be an integer from {low} to "
                          f"{MAX_EXPIRY_SECONDS} (30 days); got {seconds!r}.",
                          param=f"{field}.seconds")
    return seconds


def policy_seconds(value: Any, field: str, config: BatchConfig) -> int | None:
    """A JSON expiration policy object (``output_expires_after``): its seconds, or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"anchor", "seconds"}:
        raise bad_request(f"{field} must be an object {{\"anchor\": \"created_at\", "
                          f"\"seconds\": N}}.", param=field)
    if "anchor" not in value or "seconds" not in value:
        missing = "anchor" if "anchor" not in value else "seconds"
        raise bad_request(f"{field}.{missing} is required.", param=f"{field}.{missing}")
    if isinstance(value["seconds"], str):  # JSON has numbers; only a form's fields are text
        raise bad_request(f"{field}.seconds must be an integer.", param=f"{field}.seconds")
    return expiry_seconds(value["anchor"], value["seconds"], field, config)


class Sweeper:
    """Deletes expired files every ``batch.sweepSeconds``, while this process holds the role."""

    def __init__(self, store: Store, config: BatchConfig) -> None:
        self.store = store
        self.config = config
        self.owner = owner_name()

    async def run(self) -> None:
        """Until cancelled; a store that fails is tried again next period."""
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("batch store: cannot sweep expired files: %s", exc)
            await asyncio.sleep(self.config.sweep_seconds)

    async def sweep_once(self) -> int:
        """One pass, if the role is ours: the number of files deleted."""
        lease = max(3 * self.config.sweep_seconds, self.config.lease_seconds)
        if not await self.store.hold(ROLE, self.owner, time.time(), lease):
            return 0
        total = 0
        while (deleted := await self.store.sweep(int(time.time()), _BATCH)) > 0:
            total += deleted
            if deleted < _BATCH:
                break
        if total:
            log.info("batch store: deleted %d expired files", total)
        return total

