"""One simulated vLLM replica as an aiohttp application.

Surface (what a vLLM OpenAI server answers, plus a small `/sim/*` admin API):
- `POST /v1/chat/completions`, `POST /v1/completions`: streaming (SSE) and not, `max_tokens` /
  `max_completion_tokens`, `stream_options.include_usage`, `ignore_eos`, `min_tokens`, usage with
  `prompt_tokens_details.cached_tokens`;
- `POST /v1/responses` (OpenAI's Responses API) and `POST /v1/messages` (Anthropic's Messages
  API, errors in Anthropic's shape): read as chats, run on the engine like them (prefix cache,
  batching), streamed as their own named SSE events (`kvgate_sim.responses_api`,
  `kvgate_sim.messages_api`);
- `POST /tokenize`, `POST /detokenize` (vLLM's, at the root): the simulator's tokenizer;
- `POST /v1/score`, `POST /v1/rerank` (also `/score`, `/rerank`, `/v2/rerank`): word-overlap
  scores (`kvgate_sim.scoring`);
- `POST /v1/embeddings` (deterministic unit vectors), `GET /v1/models` (base model + adapters);
- `GET /health` (503 while starting or forced unhealthy), `GET /metrics` (vLLM metric names),
  `GET /version`, `POST /reset_prefix_cache`;
- `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter` (vLLM's messages and statuses);
- `GET|POST /sim/faults` (failure injection), `GET /sim/stats` (JSON counters for tests/harness),
  `GET /sim/cache` (the block hashes the prefix cache holds: what a KV-event subscriber mirrors),
  `GET /sim/traceparents` (the W3C `traceparent` of recent inference requests, by their
  `X-Request-Id`: what a gateway propagated).

With `kv_events` enabled, the engine's prefix-cache changes go out in vLLM's KV-event format
(`kvgate_sim.kv_events`).

The handlers stay thin: parse once, hand a `Sequence` to the engine, turn its tokens into bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Optional

import orjson
from aiohttp import web

from . import formats, messages_api, responses_api, scoring
from .engine import Engine, Sequence, Status
from .errors import SimError, model_not_found
from .faults import Faults
from .kv_events import KVEventsConfig, ZmqEventPublisher
from .lora import LoRARegistry
from .metrics import CONTENT_TYPE, make_registry, render
from .profiles import Profile
from .tokenizer import (count_tokens, decode, encode, encode_chat, encode_prompt,
                        valid_token)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# vLLM's CompletionRequest defaults max_tokens to 16 (OpenAI's default); chat has no default.
# Inference requests whose traceparent is remembered (the oldest forgotten first).
TRACEPARENTS_KEPT = 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class ServerStats:
    """HTTP-level counters of one replica (served as JSON on /sim/stats)."""

    requests: int = 0
    active: int = 0
    completed: int = 0
    streams: int = 0
    injected_errors: int = 0
    dropped: int = 0
    resets: int = 0
    client_disconnects: int = 0
    by_path: dict = field(default_factory=dict)
    by_status: dict = field(default_factory=dict)

    def count_status(self, status: int) -> None:
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1


class _StreamCut(Exception):
    """Raised inside a stream after an injected reset, to stop writing."""


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(err: SimError) -> web.Response:
    return _json(err.body(), err.status)


def _reset_transport(request: web.Request) -> None:
    """Abort the TCP connection with RST (SO_LINGER 0), like a crashed upstream."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _int_field(body: dict, *names: str) -> Optional[int]:
    """First present integer field among `names` (None when absent/null)."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise SimError(400, f"{name} must be an integer", param=name)
        return value
    return None


class SimServer:
    """A simulated vLLM replica: engine, LoRA registry, faults, metrics and the aiohttp app."""

    def __init__(self, profile: Profile, model_name: str = "sim-model", *,
                 model_path: Optional[str] = None, startup_delay_s: float = 0.0,
                 faults: Optional[dict[str, Any]] = None,
                 lora_modules: Optional[dict[str, str]] = None, enable_lora: bool = True,
                 seed: int = 0, kv_events: Optional[KVEventsConfig] = None,
                 rank: int = 0) -> None:
        """`faults` holds initial failure-injection settings (see `kvgate_sim.faults`);
        `kv_events` is vLLM's --kv-events-config, already offset for this replica, whose
        index in its cluster is `rank` (the batches' data_parallel_rank)."""
        self.profile = profile
        self.model_name = model_name
        self.model_path = model_path or model_name
        self.enable_lora = enable_lora
        self.faults = Faults(startup_delay_s=startup_delay_s, seed=seed)
        if faults:
            self.faults.update(faults)
        self.engine = Engine(profile)
        self.engine.slowdown = self.faults.slowdown
        self.kv_events: Optional[ZmqEventPublisher] = None
        if kv_events is not None and kv_events.enabled:
            self.kv_events = ZmqEventPublisher(kv_events, profile.block_size, rank)
        self.lora = LoRARegistry(model_name, profile.lora_load_s * profile.time_scale)
        for name, path in (lora_modules or {}).items():
            self.lora.preload(name, path)
        self.registry = make_registry(self.engine, model_name, enable_lora)
        self.stats = ServerStats()
        # X-Request-Id ("" when absent) -> the traceparent that came with it, newest last
        self.traceparents: dict[str, str] = {}
        self.created = int(time.time())
        self.app = self._build_app()

    # --- app ---------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/chat/completions", self._inference(self.chat_completions))
        r.add_post("/v1/completions", self._inference(self.completions))
        r.add_post("/v1/embeddings", self._inference(self.embeddings))
        r.add_post("/v1/responses", self._inference(self.responses))
        r.add_post("/v1/messages", self._inference(self.messages, anthropic=True))
        r.add_post("/tokenize", self._inference(self.tokenize))
        r.add_post("/detokenize", self._inference(self.detokenize))
        for path in ("/v1/score", "/score"):
            r.add_post(path, self._inference(self.score))
        for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            r.add_post(path, self._inference(self.rerank))
        r.add_get("/v1/models", self._plain(self.models))
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/version", self._plain(self.version))
        r.add_post("/reset_prefix_cache", self._plain(self.reset_prefix_cache))
        if self.enable_lora:
            r.add_post("/v1/load_lora_adapter", self._plain(self.load_lora_adapter))
            r.add_post("/v1/unload_lora_adapter", self._plain(self.unload_lora_adapter))
        r.add_get("/sim/faults", self._plain(self.get_faults))
        r.add_post("/sim/faults", self._plain(self.set_faults))
        r.add_get("/sim/stats", self._plain(self.sim_stats))
        r.add_get("/sim/cache", self._plain(self.sim_cache))
        r.add_get("/sim/traceparents", self._plain(self.sim_traceparents))
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        if self.kv_events is not None:
            await self.kv_events.start()
            self.engine.enable_kv_events(self.kv_events.publish)
        self.engine.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.engine.stop()
        if self.kv_events is not None:
            await self.kv_events.close()

    def _plain(self, handler: Handler) -> Handler:
        """Wrap a non-inference handler: SimError -> vLLM-shaped JSON error."""
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except SimError as err:
                return _error(err)
        return wrapped

    def _inference(self, handler: Handler, anthropic: bool = False) -> Handler:
        """Wrap an inference handler with counting, readiness and failure injection; errors in
        Anthropic's shape on its API's route."""
        def _error(err: SimError) -> web.Response:
            return _json(messages_api.error_body(err) if anthropic else err.body(), err.status)

        async def wrapped(request: web.Request) -> web.StreamResponse:
            st = self.stats
            st.requests += 1
            st.by_path[request.path] = st.by_path.get(request.path, 0) + 1
            st.active += 1
            status = 500
            self._remember_traceparent(request)
            try:
                early = await self._pre_checks(request)
                if early is not None:
                    status = early.status
                    return early
                resp = await handler(request)
                status = resp.status
                return resp
            except SimError as err:
                status = err.status
                return _error(err)
            except asyncio.CancelledError:
                st.client_disconnects += 1
                status = 499
                raise
            except Exception:  # a simulator bug must still look like a server error, not hang
                log.exception("unhandled error serving %s", request.path)
                return _error(SimError(500, "Internal server error"))
            finally:
                st.active -= 1
                st.count_status(status)
                if status < 400:
                    st.completed += 1
        return wrapped

    def _remember_traceparent(self, request: web.Request) -> None:
        """Keep the request's traceparent (if any) under its X-Request-Id, bounded."""
        traceparent = request.headers.get("traceparent")
        if traceparent is None:
            return
        kept = self.traceparents
        request_id = request.headers.get("x-request-id", "")
        kept.pop(request_id, None)
        kept[request_id] = traceparent
        if len(kept) > TRACEPARENTS_KEPT:
            del kept[next(iter(kept))]

    async def _pre_checks(self, request: web.Request) -> Optional[web.StreamResponse]:
        f = self.faults
        if not f.ready():
            raise SimError(503, "The server is starting up.", "ServiceUnavailableError")
        if f.take_drop():
            self.stats.dropped += 1
            _reset_transport(request)
            return web.Response(status=599)
        status = f.take_error()
        if status is not None:
            self.stats.injected_errors += 1
            raise SimError(status, f"Injected failure (status {status}).")
        if f.extra_latency_s > 0:
            await asyncio.sleep(f.extra_latency_s)
        return None

    # --- request parsing ---------------------------------------------------------------------

    @staticmethod
    async def _body(request: web.Request) -> dict:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SimError(400, f"JSON decode error: {exc}") from None
        if not isinstance(body, dict):
            raise SimError(400, "Request body must be a JSON object.")
        return body

    def _resolve_model(self, model: Any) -> Optional[str]:
        """None for the base model, the adapter name for a loaded LoRA, else vLLM's 404."""
        if model is None or model == self.model_name or model == self.model_path:
            return None
        if isinstance(model, str) and self.lora.has(model):
            return model
        raise model_not_found(str(model))

    def _new_sequence(self, tokens: list[int], max_tokens: Optional[int], body: dict,
                      adapter: Optional[str], stream: bool) -> Sequence:
        max_tokens = self.engine.validate(len(tokens), max_tokens)
        target = self.profile.natural_output_tokens
        if body.get("ignore_eos"):
            target = max_tokens
        min_tokens = body.get("min_tokens")
        if isinstance(min_tokens, int) and not isinstance(min_tokens, bool):
            target = max(target, min_tokens)
        seq = Sequence(tokens, max_tokens, target, adapter)
        seq.wake_each = stream
        seq.priority = self._priority(body)
        return seq

    def _priority(self, body: dict) -> int:
        """vLLM's request `priority`: any value but 0 needs the priority scheduling policy."""
        priority = _int_field(body, "priority") or 0
        if priority and not self.engine.by_priority:
            raise SimError(400, f"Got priority {priority} but Priority scheduling is not "
                           "enabled.", param="priority")
        return priority

    @staticmethod
    def _include_usage(body: dict) -> bool:
        opts = body.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage"))

    # --- inference handlers ------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        adapter = self._resolve_model(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SimError(400, "'messages' must be a non-empty list.", param="messages")
        stream = bool(body.get("stream"))
        max_tokens = _int_field(body, "max_completion_tokens", "max_tokens")
        seq = self._new_sequence(encode_chat(messages), max_tokens, body, adapter, stream)
        model = body.get("model") or self.model_name
        if stream:
            return await self._stream(request, [seq], formats.StreamEncoder("chat", model),
                                      self._include_usage(body))
        await self._run_to_end([seq])
        return _json(formats.chat_response(
            model, formats.text_of(seq.output), seq.finish_reason or "abort", seq.prompt_len,
            len(seq.output), seq.cached_tokens))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        adapter = self._resolve_model(body.get("model"))
        prompts = self._prompts(body.get("prompt"))
        stream = bool(body.get("stream"))
        max_tokens = _int_field(body, "max_tokens")
        if "max_tokens" not in body:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        seqs = [self._new_sequence(encode_prompt(p), max_tokens, body, adapter, stream)
                for p in prompts]
        model = body.get("model") or self.model_name
        if stream:
            return await self._stream(request, seqs, formats.StreamEncoder("completion", model),
                                      self._include_usage(body))
        await self._run_to_end(seqs)
        return _json(formats.completion_response(
            model, [(formats.text_of(s.output), s.finish_reason or "abort") for s in seqs],
            sum(s.prompt_len for s in seqs), sum(len(s.output) for s in seqs),
            sum(s.cached_tokens for s in seqs)))

    @staticmethod
    def _prompts(prompt: Any) -> list:
        """Split a completions `prompt` into per-choice prompts (str or token-id lists)."""
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                return [prompt]
            if all(isinstance(p, list) for p in prompt):
                return list(prompt)
        raise SimError(400, "'prompt' must be a string, a list of strings, or token ids.",
                       param="prompt")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._resolve_model(body.get("model"))
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and
                                       all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise SimError(400, "'input' must be a string or a non-empty list.", param="input")
        dim = _int_field(body, "dimensions") or self.profile.embedding_dim
        fmt = body.get("encoding_format") or "float"
        data, n_tokens = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            n_tokens += count_tokens(text) if isinstance(item, str) else len(item)
            vec = formats.embedding_vector(text, dim)
            data.append({"index": i, "object": "embedding",
                         "embedding": formats.encode_embedding(vec, fmt)})
        return _json({"id": formats.new_id("embd"), "object": "list",
                      "created": int(time.time()), "model": body.get("model") or self.model_name,
                      "data": data, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens,
                                              "completion_tokens": 0,
                                              "prompt_tokens_details": None}})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        adapter = self._resolve_model(body.get("model"))
        messages = responses_api.chat_messages(body)
        stream = bool(body.get("stream"))
        seq = self._new_sequence(encode_chat(messages), _int_field(body, "max_output_tokens"),
                                 body, adapter, stream)
        response = responses_api.ResponseObject(body, body.get("model") or self.model_name)
        if stream:
            return await self._stream_events(request, seq, responses_api.ResponseEvents(response))
        await self._run_to_end([seq])
        return _json(response.final(formats.text_of(seq.output), seq.finish_reason or "abort",
                                    seq.prompt_len, len(seq.output), seq.cached_tokens))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        adapter = self._resolve_model(body.get("model"))
        messages = messages_api.chat_messages(body)
        max_tokens = _int_field(body, "max_tokens")
        if max_tokens is None:
            raise SimError(400, "max_tokens: Field required", param="max_tokens")
        stream = bool(body.get("stream"))
        seq = self._new_sequence(encode_chat(messages), max_tokens, body, adapter, stream)
        model = body.get("model") or self.model_name
        events = messages_api.MessageEvents(model)
        if stream:
            return await self._stream_events(request, seq, events)
        await self._run_to_end([seq])
        return _json(messages_api.message(
            events.id, model, formats.text_of(seq.output), seq.finish_reason, seq.prompt_len,
            len(seq.output), seq.cached_tokens))

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        """vLLM's /tokenize: a `prompt`, or chat `messages` rendered as chat renders them."""
        body = await self._body(request)
        self._resolve_model(body.get("model"))
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise SimError(400, "'messages' must be a non-empty list.", param="messages")
            tokens = encode_chat(messages, body.get("add_generation_prompt", True) is not False)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise SimError(400, "'prompt' must be a string.", param="prompt")
            tokens = (encode_prompt(prompt) if body.get("add_special_tokens", True) is not False
                      else encode(prompt))
        strs = [decode([t]) for t in tokens] if body.get("return_token_strs") else None
        return _json({"count": len(tokens), "max_model_len": self.engine.max_model_len,
                      "tokens": tokens, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._resolve_model(body.get("model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                type(t) is int and valid_token(t) for t in tokens):
            raise SimError(400, "'tokens' must be a list of token ids of this model.",
                           param="tokens")
        return _json({"prompt": decode(tokens)})

    async def score(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._resolve_model(body.get("model"))
        return _json(scoring.score_response(body.get("model") or self.model_name,
                                            scoring.score_pairs(body)))

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._resolve_model(body.get("model"))
        return _json(scoring.rerank_response(body.get("model") or self.model_name, body))

    # --- running sequences -------------------------------------------------------------------

    async def _run_to_end(self, seqs: list[Sequence]) -> None:
        """Submit and wait for non-streaming sequences; abort them if the client goes away."""
        try:
            for seq in seqs:
                self.engine.add(seq)
            for seq in seqs:
                await seq.wait_finished()
        finally:
            for seq in seqs:
                self.engine.abort(seq)
        if any(s.status is Status.ABORTED for s in seqs):
            raise SimError(500, "The engine stopped before the request finished.")

    async def _stream(self, request: web.Request, seqs: list[Sequence],
                      enc: formats.StreamEncoder, include_usage: bool) -> web.StreamResponse:
        """Serve sequences as one SSE stream, in choice order."""
        self.stats.streams += 1
        for seq in seqs:
            self.engine.add(seq)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        writer = _EventWriter(request, resp, self.faults.take_reset())
        try:
            await resp.prepare(request)
            for index, seq in enumerate(seqs):
                await self._stream_one(writer, seq, enc, index)
            if include_usage:
                await writer.write([enc.usage_event(
                    sum(s.prompt_len for s in seqs), sum(len(s.output) for s in seqs),
                    sum(s.cached_tokens for s in seqs))])
            await writer.write([formats.DONE])
            await resp.write_eof()
        except _StreamCut:
            self.stats.resets += 1
        except ConnectionError:
            self.stats.client_disconnects += 1
        finally:
            for seq in seqs:
                self.engine.abort(seq)
        return resp

    async def _stream_one(self, writer: "_EventWriter", seq: Sequence,
                          enc: formats.StreamEncoder, index: int) -> None:
        if enc.chat:
            await writer.write([enc.start(index)])
        seen = 0
        while True:
            await seq.wait_progress(seen)
            out = seq.output
            new = out[seen:]
            seen += len(new)
            if seq.status is Status.FINISHED and seen == len(out):
                events = enc.tokens(new[:-1], index) if new else []
                events.append(enc.last(new[-1] if new else None, seq.finish_reason or "stop",
                                       index))
                await writer.write(events)
                return
            if new:
                await writer.write(enc.tokens(new, index))
            if seq.status is Status.ABORTED:
                await writer.write([enc.error_event("The engine stopped.")])
                return

    async def _stream_events(self, request: web.Request, seq: Sequence,
                             events: Any) -> web.StreamResponse:
        """Serve one sequence as a stream of named events (the Responses and Messages APIs):
        ``events`` gives the opening events (sent with the first token), each token's, and
        the closing ones."""
        self.stats.streams += 1
        self.engine.add(seq)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        writer = _EventWriter(request, resp, self.faults.take_reset())
        try:
            await resp.prepare(request)
            seen, opened = 0, False
            while True:
                await seq.wait_progress(seen)
                new = seq.output[seen:]
                seen += len(new)
                if not opened and (new or seq.finished):
                    await writer.write(events.opening(seq))
                    opened = True
                if new:
                    await writer.write(events.tokens(new))
                if seq.status is Status.FINISHED and seen == len(seq.output):
                    await writer.write(events.closing(seq))
                    break
                if seq.status is Status.ABORTED:
                    await writer.write([events.failed("The engine stopped.")])
                    break
            await resp.write_eof()
        except _StreamCut:
            self.stats.resets += 1
        except ConnectionError:
            self.stats.client_disconnects += 1
        finally:
            self.engine.abort(seq)
        return resp

    # --- other handlers ----------------------------------------------------------------------

    async def models(self, _request: web.Request) -> web.StreamResponse:
        cards = [formats.model_card(self.model_name, self.model_path, None,
                                    self.engine.max_model_len, self.created)]
        cards += [formats.model_card(name, path, self.model_name, None, self.created)
                  for name, path in self.lora.items()]
        return _json({"object": "list", "data": cards})

    async def health(self, _request: web.Request) -> web.StreamResponse:
        ok = self.faults.ready() and not self.faults.unhealthy
        return web.Response(status=200 if ok else 503)

    async def metrics(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE})

    async def version(self, _request: web.Request) -> web.StreamResponse:
        return _json({"version": "kvgate-sim"})

    async def reset_prefix_cache(self, _request: web.Request) -> web.StreamResponse:
        if not self.engine.reset_prefix_cache():
            raise SimError(500, "Failed to reset prefix cache: blocks are in use.")
        return web.Response(status=200)

    async def load_lora_adapter(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        msg = await self.lora.load(body.get("lora_name"), body.get("lora_path"),
                                   bool(body.get("load_inplace")))
        return web.Response(text=msg)

    async def unload_lora_adapter(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return web.Response(text=await self.lora.unload(body.get("lora_name")))

    async def get_faults(self, _request: web.Request) -> web.StreamResponse:
        return _json(self.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.StreamResponse:
        self.faults.update(await self._body(request))
        self.engine.slowdown = self.faults.slowdown  # the one fault the engine itself applies
        return _json(self.faults.as_dict())

    async def sim_stats(self, _request: web.Request) -> web.StreamResponse:
        return _json(self.snapshot())

    async def sim_cache(self, _request: web.Request) -> web.StreamResponse:
        """The prefix cache's block hashes (sorted) and the KV-event stream's position, so a
        test in another process can compare a subscriber's index with the real contents."""
        kv = self.engine.kv
        return _json({"block_size": kv.block_size, "block_hashes": kv.cached_hashes(),
                      "kv_events": self.kv_events.describe() if self.kv_events else None})

    async def sim_traceparents(self, _request: web.Request) -> web.StreamResponse:
        """The traceparents recent inference requests carried, by X-Request-Id ("" for none)."""
        return _json(self.traceparents)

    def snapshot(self) -> dict:
        """Counters of this replica for tests and the harness (also served on /sim/stats)."""
        eng, kv, st = self.engine, self.engine.kv, self.engine.stats
        return {
            "model": self.model_name,
            "profile": self.profile.name,
            "http": asdict(self.stats),
            "engine": {
                "running": len(eng.running),
                "waiting": len(eng.waiting),
                "steps": eng.steps,
                "busy_time_s": round(eng.busy_time, 6),
                "kv_cache_usage": kv.usage(),
                "kv_blocks_total": kv.num_blocks,
                "kv_blocks_free": kv.num_free,
                "kv_blocks_cached": kv.num_cached,
                "evicted_blocks": kv.evictions,
                "prefix_cache_queries": kv.queries,
                "prefix_cache_hits": kv.hits,
                "prefix_cache_hit_rate": kv.hits / kv.queries if kv.queries else 0.0,
                "preemptions": st.preemptions,
                "prompt_tokens": st.prompt_tokens,
                "generation_tokens": st.generation_tokens,
                "requests_finished": dict(st.requests_finished),
                "aborted": st.aborted,
                "ttft_mean_s": st.ttft.mean(),
                "ttft_count": st.ttft.count,
                "itl_mean_s": st.tpot.mean(),
                "running_adapters": eng.running_adapters(),
                "waiting_adapters": eng.waiting_adapters(),
                "lora_slots": list(eng.lora_slots),
            },
            "adapters": [name for name, _ in self.lora.items()],
            "faults": self.faults.as_dict(),
            "kv_events": self.kv_events.describe() if self.kv_events else None,
        }


class _EventWriter:
    """Writes SSE events, cutting the connection after an injected event budget."""

    __slots__ = ("request", "resp", "budget", "sent")

    def __init__(self, request: web.Request, resp: web.StreamResponse,
                 budget: Optional[int]) -> None:
        self.request = request
        self.resp = resp
        self.budget = budget
        self.sent = 0

    async def write(self, events: list[bytes]) -> None:
        if self.budget is not None:
            allowed = self.budget - self.sent
            if len(events) >= allowed:
                if allowed > 0:
                    await self.resp.write(b"".join(events[:allowed]))
                    self.sent += allowed
                await self._cut()
        if events:
            await self.resp.write(events[0] if len(events) == 1 else b"".join(events))
            self.sent += len(events)

    async def _cut(self) -> None:
        # Writes go to the socket at once; give the peer a moment to read the allowed events
        # before the RST discards anything still unread.
        await asyncio.sleep(0.02)
        _reset_transport(self.request)
        raise _StreamCut()
