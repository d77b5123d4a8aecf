"""Closed-loop load generator replaying chat threads, like KubeAI's multi-turn benchmark.

`concurrency` slots each play one conversation at a time: send the history plus the next user
message as a streamed chat completion, record timings, append the reply, go on; when the thread
ends the slot takes the next unused thread, so exactly `concurrency` requests are in flight all
run long (a closed loop, as in the study).

Why slots join their first thread at a random turn: all threads starting at turn 0 together
would make the first minutes unrepresentative (short prompts, synchronized turns) and a run
would need several conversation lengths to settle. Starting each slot mid-conversation, with
filler replies standing in for the turns it skipped, gives the steady-state mix of prompt
lengths from the first request; the first requests are cold misses and fall in the warm-up.
Slots also start at random offsets over a few seconds, like users arriving: started together,
requests with equal output lengths stay in lockstep on each replica (admitted in one step,
finished in one step, resubmitted together), an artifact no real user population produces.

Measurement: a request counts when it *starts* inside the window; the load keeps running after
the window until those requests end (bounded by a drain cap), so slow requests are not
censored by the window edge. Tokens/s count only tokens that arrive inside the window.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import aiohttp
import orjson

from bench.workloads import ChatThread, Conversation, Workload, make_workload

_FILLER_WORDS = ("the", "answer", "depends", "on", "your", "setup", "so", "start", "with",
                 "small", "steps", "and", "check", "each", "result", "before", "moving", "on")


@dataclass(slots=True)
class RequestRecord:
    """Timings and sizes of one chat completion (times from `time.monotonic()`)."""

    slot: int
    thread_id: str
    turn: int
    start: float
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    end: Optional[float] = None
    output_tokens: int = 0
    window_tokens: int = 0  # output tokens that arrived inside the measurement window
    prompt_tokens: int = 0
    cached_tokens: int = 0
    max_itl: float = 0.0
    status: int = 0
    error: Optional[str] = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.end is not None and self.error is None and self.status == 200

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.start

    def to_row(self) -> list:
        """Compact row for result files: the text is dropped."""
        return [self.slot, self.thread_id, self.turn, self.start, self.first_token,
                self.last_token, self.end, self.output_tokens, self.window_tokens,
                self.prompt_tokens, self.cached_tokens, self.max_itl, self.status, self.error]


ROW_FIELDS = ("slot", "thread_id", "turn", "start", "first_token", "last_token", "end",
              "output_tokens", "window_tokens", "prompt_tokens", "cached_tokens", "max_itl",
              "status", "error")


class ThreadPool:
    """Deterministic source of threads: thread i is the same for every run and strategy.

    Generating text costs CPU, so threads are made ahead of a run (`ensure`) and only topped up
    during one if a run outlasts the estimate.
    """

    def __init__(self, workload: str, seed: int = 0, **params: object) -> None:
        self.workload = workload
        self.seed = seed
        self.params = params  # generator keyword arguments, e.g. prompt_chars=(100, 800)
        self._threads: tuple[ChatThread, ...] = ()
        self._meta: Optional[Workload] = None

    def ensure(self, n: int) -> None:
        if n > len(self._threads):
            self._meta = make_workload(self.workload, n, self.seed, **self.params)
            self._threads = self._meta.threads

    def __len__(self) -> int:
        return len(self._threads)

    def get(self, i: int) -> ChatThread:
        if i >= len(self._threads):
            self.ensure(max(i + 1, 2 * len(self._threads)))
        return self._threads[i]

    def summary(self) -> dict:
        return self._meta.summary() if self._meta else {}


def filler_reply(n_tokens: int, rng: random.Random) -> str:
    """Stand-in assistant text (~4 chars per token) for turns a slot skipped."""
    words: list[str] = []
    chars = 0
    while chars < 4 * n_tokens:
        w = rng.choice(_FILLER_WORDS)
        words.append(w)
        chars += len(w) + 1
    return " ".join(words)[: 4 * n_tokens]


def join_mid_thread(thread: ChatThread, rng: random.Random) -> Conversation:
    """A conversation fast-forwarded to a uniformly random turn, with filler replies."""
    conv = thread.conversation()
    for _ in range(rng.randrange(thread.num_turns)):
        conv.next_messages()
        conv.add_reply(filler_reply(thread.max_tokens, rng))
    return conv


@dataclass
class LoadConfig:
    url: str  # base URL of the OpenAI API, e.g. http://127.0.0.1:8000/v1
    model: str
    concurrency: int
    warmup_s: float
    duration_s: float
    drain_s: float = 30.0  # longest wait after the window for requests started inside it
    seed: int = 0
    request_timeout_s: float = 300.0
    join_mid_thread: bool = True
    ramp_s: float = 5.0  # slots start at seeded random offsets within this many seconds


@dataclass
class LoadResult:
    records: list[RequestRecord]
    window: tuple[float, float]
    cpu_s: float  # this process's CPU seconds during the window
    wall_s: float
    threads_started: int
    aborted_in_window: int = 0
    meta: dict = field(default_factory=dict)


class LoadGenerator:
    """Runs one measurement: `await LoadGenerator(cfg, pool).run(on_window=...)`."""

    def __init__(self, cfg: LoadConfig, pool: ThreadPool) -> None:
        self.cfg = cfg
        self.pool = pool
        self.records: list[RequestRecord] = []
        self._next_thread = cfg.concurrency
        self._window = (float("inf"), float("inf"))
        self._stopping = False
        self._url = cfg.url.rstrip("/") + "/chat/completions"

    async def run(self, on_window_start=None, on_window_end=None) -> LoadResult:
        """Drive the load; the callbacks (async, optional) run at the window's edges, e.g. to
        scrape replica counters, and their time is part of the window."""
        cfg = self.cfg
        self.pool.ensure(cfg.concurrency * 2)
        connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                        sock_read=cfg.request_timeout_s)
        t0 = time.monotonic()
        w0 = t0 + cfg.warmup_s
        self._window = (w0, w0 + cfg.duration_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            tasks = [asyncio.create_task(self._slot(http, i)) for i in range(cfg.concurrency)]
            try:
                cpu0, cpu1 = await self._measure(on_window_start, on_window_end)
                await self._drain()
            finally:
                self._stopping = True
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        w0, w1 = self._window
        aborted = sum(1 for r in self.records if w0 <= r.start < w1 and r.end is None)
        return LoadResult(self.records, self._window, cpu1 - cpu0, w1 - w0,
                          self._next_thread, aborted)

    async def _measure(self, on_start, on_end) -> tuple[float, float]:
        w0, w1 = self._window
        await asyncio.sleep(max(0.0, w0 - time.monotonic()))
        cpu0 = time.process_time()
        if on_start is not None:
            await on_start()
        await asyncio.sleep(max(0.0, w1 - time.monotonic()))
        if on_end is not None:
            await on_end()
        cpu1 = time.process_time()
        return cpu0, cpu1

    async def _drain(self) -> None:
        """Keep the load on until requests that started inside the window have ended."""
        w0, w1 = self._window
        deadline = time.monotonic() + self.cfg.drain_s
        while time.monotonic() < deadline:
            if not any(w0 <= r.start < w1 and r.end is None for r in self.records):
                return
            await asyncio.sleep(0.1)

    def _take_thread(self) -> ChatThread:
        i = self._next_thread
        self._next_thread += 1
        return self.pool.get(i)

    async def _slot(self, http: aiohttp.ClientSession, slot: int) -> None:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:slot:{slot}")
        first = self.pool.get(slot)
        conv = join_mid_thread(first, rng) if cfg.join_mid_thread else first.conversation()
        await asyncio.sleep(rng.uniform(0.0, cfg.ramp_s))
        while not self._stopping:
            if conv.done:
                conv = self._take_thread().conversation()
            turn = conv.turn
            messages = conv.next_messages()
            rec = RequestRecord(slot, conv.thread.thread_id, turn, time.monotonic())
            self.records.append(rec)
            await self._request(http, rec, messages, conv.thread.max_tokens)
            if rec.ok:
                conv.add_reply(rec.text)
                rec.text = ""
            else:
                conv = self._take_thread().conversation()  # the user gives up on this thread
                await asyncio.sleep(0.05)  # never spin on a dead endpoint

    async def _request(self, http: aiohttp.ClientSession, rec: RequestRecord,
                       messages: list[dict], max_tokens: int) -> None:
        body = orjson.dumps({"model": self.cfg.model, "messages": messages,
                             "max_tokens": max_tokens, "stream": True,
                             "stream_options": {"include_usage": True}})
        try:
            async with http.post(self._url, data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                else:
                    await self._read_stream(resp, rec)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"[:200]
        rec.end = time.monotonic()

    async def _read_stream(self, resp: aiohttp.ClientResponse, rec: RequestRecord) -> None:
        """Parse SSE events as they arrive; one timestamp per network read."""
        w0, w1 = self._window
        parts: list[str] = []
        buf = b""
        done = False
        async for chunk in resp.content.iter_any():
            now = time.monotonic()
            buf += chunk
            events = buf.split(b"\n\n")
            buf = events.pop()
            for ev in events:
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                n = self._event(orjson.loads(data), rec, parts)
                if n:
                    self._tokens(rec, n, now, w0, w1)
        rec.text = "".join(parts)
        if rec.error is None and not done:
            rec.error = "stream ended without [DONE]"

    @staticmethod
    def _event(obj: dict, rec: RequestRecord, parts: list[str]) -> int:
        """Apply one SSE event; returns how many content tokens it carried (0 or 1)."""
        if "error" in obj:
            rec.error = str(obj["error"].get("message", obj["error"]))[:200]
            return 0
        usage = obj.get("usage")
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens") or 0
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = details.get("cached_tokens") or 0
            if usage.get("completion_tokens") is not None:
                rec.output_tokens = usage["completion_tokens"]
        n = 0
        for choice in obj.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
                n += 1
        return n

    @staticmethod
    def _tokens(rec: RequestRecord, n: int, now: float, w0: float, w1: float) -> None:
        if rec.first_token is None:
            rec.first_token = now
        elif rec.last_token is not None:
            rec.max_itl = max(rec.max_itl, now - rec.last_token)
        rec.last_token = now
        rec.output_tokens += n
        if w0 <= now < w1:
            rec.window_tokens += n
