"""Run simulated replicas in-process: one event loop, one port per replica.

Why in one process: 8+ replicas with hundreds of open streams fit on two cores only if they share a
loop (no per-process interpreter overhead, no IPC); each replica still has its own engine, KV cache,
metrics registry and listening socket, so to a gateway they are independent servers.

    cluster = await start_replicas(8, profile="cpu-scaled", model_name="llama")
    ... cluster.urls ...
    await cluster.restart()   # fresh engines, same ports: cold caches between benchmark runs
    await cluster.stop()
"""

from __future__ import annotations

import socket
from typing import Any, Optional, Union

from aiohttp import web

from .profiles import Profile, get_profile
from .server import SimServer

ProfileLike = Union[str, Profile]


def _resolve_profile(profile: ProfileLike) -> Profile:
    return get_profile(profile) if isinstance(profile, str) else profile


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class Replica:
    """One simulated vLLM server listening on host:port; restartable on the same port."""

    def __init__(self, profile: ProfileLike = "fast", model_name: str = "sim-model", *,
                 host: str = "127.0.0.1", port: int = 0, **server_kwargs: Any) -> None:
        self.profile = _resolve_profile(profile)
        self.model_name = model_name
        self.host = host
        self.port = port
        self.server_kwargs = server_kwargs
        self.server: Optional[SimServer] = None
        self._runner: Optional[web.AppRunner] = None

    @property
    def address(self) -> str:
        """host:port, the form an endpoint registry stores."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> "Replica":
        """Start a fresh server (new engine, empty KV cache) on this replica's port."""
        if self._runner is not None:
            return self
        self.server = SimServer(self.profile, self.model_name, **self.server_kwargs)
        runner = web.AppRunner(self.server.app, handle_signals=False, access_log=None,
                               handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        try:
            await web.SockSite(runner, sock, backlog=2048).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Stop serving: in-flight sequences are aborted first so open streams end at once."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self.server is not None:
            await self.server.engine.stop()
        await runner.cleanup()

    async def restart(self) -> "Replica":
        await self.stop()
        return await self.start()

    def snapshot(self) -> dict:
        """The replica's /sim/stats payload, read directly."""
        if self.server is None:
            return {}
        return self.server.snapshot()


class SimCluster:
    """N replicas of one model on consecutive ports (or ephemeral ports when base_port is 0)."""

    def __init__(self, n: int, profile: ProfileLike = "fast", model_name: str = "sim-model", *,
                 host: str = "127.0.0.1", base_port: int = 0, seed: int = 0,
                 **server_kwargs: Any) -> None:
        if n < 1:
            raise ValueError("need at least one replica")
        prof = _resolve_profile(profile)
        kv_events = server_kwargs.pop("kv_events", None)  # ports offset per replica, like vLLM's DP
        self.replicas = [
            Replica(prof, model_name, host=host, port=base_port + i if base_port else 0,
                    seed=seed + i, rank=i,
                    kv_events=kv_events.for_rank(i) if kv_events is not None else None,
                    **server_kwargs)
            for i in range(n)
        ]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    async def start(self) -> "SimCluster":
        try:
            for r in self.replicas:
                await r.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        for r in self.replicas:
            await r.stop()

    async def restart(self) -> "SimCluster":
        """Fresh engines on the same ports (cold caches, zeroed counters)."""
        await self.stop()
        return await self.start()

    def snapshots(self) -> list[dict]:
        return [r.snapshot() for r in self.replicas]

    async def __aenter__(self) -> "SimCluster":
        return await self.start()

    async def __aexit__(self, *_exc: Any) -> None:
        await self.stop()


async def start_replicas(n: int, profile: ProfileLike = "fast", model_name: str = "sim-model",
                         *, host: str = "127.0.0.1", base_port: int = 0,
                         **server_kwargs: Any) -> SimCluster:
    """Start `n` replicas in the running event loop and return the started cluster.

    `server_kwargs` go to each `SimServer` (e.g. `startup_delay_s`, `lora_modules`,
    `enable_lora`, `faults` is built per replica from `seed`, `kv_events` is offset per
    replica).
    """
    return await SimCluster(n, profile, model_name, host=host, base_port=base_port,
                            **server_kwargs).start()
