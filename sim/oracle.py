"""The oracle router: the limit of routing, for the routing study only.

It runs inside the simulator's process, beside the replicas it routes to, and reads what no
production router can have: each replica's true KV cache (the blocks of the prompt it would hit)
and its scheduler's state at the instant of the pick (sequences waiting and running, prefill
left). For every request it estimates each replica's time to first token with the replica's own
cost model (``Profile.step_time``'s terms), adds the prefill work the request would leave for
those after it (``marginal_cost``), and forwards the request, byte for byte and streamed, to the
replica where that sum is lowest. Replicas are never overloaded by a hard bound here:
the estimate already counts their queues, which is the point of an oracle.

    oracle = Oracle(cluster)
    await oracle.start("127.0.0.1", 9000)   # the routing study's `--oracle-port`
    ...
    await oracle.stop()

What the estimate leaves out (so the oracle is a near-limit, not a proof of optimality): later
arrivals (it is greedy, request by request), and requests of the same prefix in flight to one
replica whose blocks are not cached yet (each is costed as a miss).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import aiohttp
import orjson
from aiohttp import web

from .cluster import SimCluster
from .engine import Engine, Sequence, Status
from .errors import SimError
from .kvcache import extend_block_hashes, root_hash
from .tokenizer import encode_chat, encode_prompt

__all__ = ["Oracle", "estimate_ttft", "marginal_cost", "MISS_WEIGHT"]

# How many times over a miss's prefill counts (besides the requester's own wait): chosen from
# quick runs of the documents workload (1: 725 ms mean TTFT, 3: 543, 8: 322; the replica's own
# sequence count, tried as a parameter-free weight, gave 444). Quick runs on a shared machine
# are noisy: read it as "misses cost several times their own prefill", not as a fitted figure.
MISS_WEIGHT = 8.0

# Request headers not passed on (hop-by-hop, or recomputed by the client session).
_DROP = frozenset({"host", "content-length", "connection", "transfer-encoding",
                   "keep-alive", "accept-encoding"})


def estimate_ttft(engine: Engine, tokens: list[int], hashes: list[int], in_transit: int,
                  memo: dict[str, int]) -> float:
    """Seconds until ``engine`` would emit the first token of a prompt of ``tokens`` (block
    ``hashes``) sent now: the prefill ahead of it (waiting sequences' uncached tokens, running
    ones' unfinished prefill, ``in_transit`` tokens forwarded but not yet queued) plus its own
    uncached tokens, at the profile's prefill cost, in steps that each also pay the fixed
    cost and every running sequence's decode and context reads.

    ``memo`` keeps each waiting sequence's uncached tokens (request id -> tokens) so a long
    queue is matched against the cache once, not at every pick."""
    profile, bs = engine.profile, engine.block_size
    kv = engine.kv
    hit = len(kv.match_prefix(hashes, (len(tokens) - 1) // bs)) if tokens else 0
    ahead = in_transit
    for seq in engine.waiting:
        ahead += _waiting_uncached(engine, seq, memo)
    context = 0
    for seq in engine.running:
        context += seq.num_computed
        if seq.num_computed < seq.prompt_len and seq.status is Status.RUNNING:
            ahead += seq.prompt_len - seq.num_computed
    own = max(len(tokens) - hit * bs, 1)
    prefill = ahead + own
    steps = math.ceil(prefill / profile.max_num_batched_tokens)
    per_step = (profile.step_fixed_s
                + profile.decode_seq_s * (len(engine.running) + len(engine.waiting))
                + profile.context_token_s * context)
    return (steps * per_step + profile.prefill_token_s * prefill) * engine.slowdown


def marginal_cost(engine: Engine, tokens: list[int], hashes: list[int], in_transit: int,
                  memo: dict[str, int]) -> float:
    """What sending the prompt to ``engine`` costs: its own estimated TTFT, plus its uncached
    prefill ``MISS_WEIGHT`` times over, for what a miss does to the requests around it (its
    prefill chunks lengthen the steps of every sequence on the replica, and the blocks it
    fills evict prefixes that later requests would have hit).

    Minimising the request's own TTFT alone is greedy in the wrong way: an idle replica
    without the prefix always looks best for the request at hand. A first version of this
    oracle did so and lost to PrefixHash on shared documents (1,114 ms mean TTFT against
    903 in one quick run); costing each miss for the others brought it to 322 ms."""
    bs = engine.block_size
    hit = len(engine.kv.match_prefix(hashes, (len(tokens) - 1) // bs)) if tokens else 0
    added = (MISS_WEIGHT * engine.profile.prefill_token_s * max(len(tokens) - hit * bs, 1)
             * engine.slowdown)
    return estimate_ttft(engine, tokens, hashes, in_transit, memo) + added


def _waiting_uncached(engine: Engine, seq: Sequence, memo: dict[str, int]) -> int:
    tokens = memo.get(seq.request_id)
    if tokens is None:
        bs = engine.block_size
        hit = len(engine.kv.match_prefix(seq.block_hashes, (seq.num_tokens - 1) // bs))
        tokens = memo[seq.request_id] = seq.num_tokens - hit * bs
    return tokens


class Oracle:
    """An OpenAI-compatible front for a ``SimCluster`` that routes by true cache and queue."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.picks = [0] * len(cluster)  # requests sent to each replica
        self._in_transit = [0] * len(cluster)  # prompt tokens forwarded, not yet queued
        self._memo: list[dict[str, int]] = [{} for _ in range(len(cluster))]
        self._session: Optional[aiohttp.ClientSession] = None
        self._runner: Optional[web.AppRunner] = None
        self.port = 0
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._forward)
        app.router.add_post("/v1/completions", self._forward)
        app.router.add_get("/v1/models", self._forward)
        app.router.add_get("/health", self._health)
        app.router.add_get("/oracle/stats", self._stats)
        self.app = app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "Oracle":
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                               handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=2048)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the pick ----------------------------------------------------------------------------

    def pick(self, body: Any, path: str) -> tuple[int, int]:
        """(replica index, prompt tokens) of the lowest estimated TTFT for this request body."""
        tokens = _prompt_tokens(body, path)
        adapter = None
        best, best_cost = 0, math.inf
        for i, replica in enumerate(self.cluster.replicas):
            server = replica.server
            if server is None or not replica.running:
                continue
            if isinstance(body, dict) and body.get("model") not in (None, server.model_name):
                adapter = body.get("model")
            engine = server.engine
            hashes = extend_block_hashes([], tokens, engine.block_size, root_hash(adapter))
            memo = self._memo[i]
            if len(memo) > 4 * (len(engine.waiting) + 64):  # forget sequences long admitted
                waiting = {seq.request_id for seq in engine.waiting}
                self._memo[i] = memo = {k: v for k, v in memo.items() if k in waiting}
            cost = marginal_cost(engine, tokens, hashes, self._in_transit[i], memo)
            if cost < best_cost:
                best, best_cost = i, cost
        return best, len(tokens)

    # --- HTTP --------------------------------------------------------------------------------

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None  # the replica answers a malformed body in its own words
        index, n_tokens = self.pick(body, request.path)
        replica = self.cluster.replicas[index]
        self.picks[index] += 1
        self._in_transit[index] += n_tokens
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        queued = False
        try:
            async with self._session.request(request.method, replica.url + request.path_qs,
                                             data=raw or None, headers=headers) as upstream:
                self._in_transit[index] -= n_tokens  # the engine has it now
                queued = True
                resp = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items()
                    if k.lower() in ("content-type", "cache-control")})
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientError as exc:
            return web.json_response({"error": {
                "message": f"the oracle could not reach replica {index}: {exc}",
                "type": "BadGateway", "param": None, "code": 502}}, status=502)
        finally:
            if not queued:
                self._in_transit[index] -= n_tokens

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"picks": self.picks})


def _prompt_tokens(body: Any, path: str) -> list[int]:
    """The prompt's token ids as the replicas will tokenize it ([] when there is none to
    match: the pick then goes by queues alone)."""
    if not isinstance(body, dict):
        return []
    try:
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            return encode_chat(messages) if isinstance(messages, list) and messages else []
        prompt = body.get("prompt")
        return encode_prompt(prompt) if isinstance(prompt, str) else []
    except (SimError, TypeError, ValueError, KeyError, AttributeError):
        return []
