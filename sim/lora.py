"""Runtime LoRA adapter registry with vLLM's load/unload semantics.

This is the part the operator talks to (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) and the
part that decides whether a request naming an adapter is served or gets vLLM's 404. GPU slot limits
(`max_loras` adapters per batch) are the engine's concern, as in vLLM's scheduler.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from .errors import SimError


class LoRARegistry:
    """Adapters registered on one replica, keyed by name (vLLM serves a LoRA under its own name)."""

    def __init__(self, base_model: str, load_latency_s: float = 0.0) -> None:
        self.base_model = base_model
        self.load_latency_s = load_latency_s
        self._adapters: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def has(self, name: Optional[str]) -> bool:
        return bool(name) and name in self._adapters

    def items(self) -> list[tuple[str, str]]:
        """(name, path) of loaded adapters in load order."""
        return list(self._adapters.items())

    def path(self, name: str) -> Optional[str]:
        return self._adapters.get(name)

    def preload(self, name: str, path: str) -> None:
        """Register an adapter at startup without latency (vLLM's --lora-modules)."""
        self._adapters[name] = path

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def load(self, name: Optional[str], path: Optional[str],
                   load_inplace: bool = False) -> str:
        """Register an adapter after the load latency; vLLM's messages and statuses on error."""
        if not name or not path:
            raise SimError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                           "InvalidUserInput")
        async with self._lock(name):
            if name in self._adapters and not load_inplace:
                raise SimError(
                    400,
                    f"The lora adapter '{name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput")
            if self.load_latency_s > 0:
                await asyncio.sleep(self.load_latency_s)
            self._adapters[name] = path
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: Optional[str]) -> str:
        """Forget an adapter; 404 with vLLM's message when it is not loaded."""
        if not name:
            raise SimError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                           "InvalidUserInput")
        async with self._lock(name):
            if name not in self._adapters:
                raise SimError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self._adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."
