"""The simulated engine core: vLLM v1's scheduling loop, run in real time on asyncio.

Each step (as in vLLM v1's scheduler):
1. Running sequences first, oldest first: each gets the tokens it still needs (1 for a decoding
   sequence, the rest of its prompt for a chunked prefill) out of the `max_num_batched_tokens`
   budget. If its KV blocks cannot be allocated, the newest running sequence is preempted (its
   blocks freed, its progress discarded, put back at the head of the queue to be recomputed later)
   until the allocation succeeds or the sequence preempted itself.
2. If nothing was preempted, waiting sequences are admitted in order while there is budget, fewer
   than `max_num_seqs` are running and their blocks fit. Admission looks up the prompt's full
   blocks in the prefix cache; cached tokens skip prefill. A sequence whose LoRA adapter would
   exceed `max_loras` distinct adapters in the batch is skipped for this step.
3. The step lasts `profile.step_time(prefill tokens, decoding sequences, context tokens)` times
   `slowdown` (1 unless a fault slows the replica down); the engine sleeps that long, then every sequence whose computed tokens caught up with its length
   samples one token, which is handed to the request's waiter.

So time to first token = queueing + the steps needed to prefill the *uncached* part of the prompt,
which is what makes prefix-aware routing pay off on a real GPU.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict, deque
from enum import Enum
from typing import Any, AsyncIterator, Callable, Optional, Sequence as Seq

from .errors import SimError
from .kvcache import KVCache, extend_block_hashes, root_hash
from .profiles import Profile
from .stats import EngineStats
from .tokenizer import PIECE_IDS, output_piece, output_seed

log = logging.getLogger(__name__)
_ids = itertools.count(1)

# Sleep overshoot tolerated before the engine stops trying to catch up with its own clock.
_CATCH_UP_S = 0.005


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ABORTED = "aborted"


class Sequence:
    """One generation request inside the engine (vLLM's `Request`)."""

    __slots__ = (
        "request_id", "tokens", "prompt_len", "max_tokens", "target_tokens", "adapter", "seed",
        "output", "blocks", "block_hashes", "root", "num_computed", "num_registered",
        "num_cached_tokens", "status", "finish_reason", "num_preemptions", "arrival_time",
        "scheduled_time", "first_token_time", "last_token_time", "finish_time", "wake_each",
        "priority", "_waiter",
    )

    def __init__(self, prompt_tokens: Seq[int], max_tokens: int, target_tokens: int,
                 adapter: Optional[str] = None, request_id: Optional[str] = None) -> None:
        self.request_id = request_id or f"seq-{next(_ids)}"
        self.tokens: list[int] = list(prompt_tokens)
        self.prompt_len = len(self.tokens)
        self.max_tokens = max_tokens
        self.target_tokens = min(target_tokens, max_tokens)
        self.adapter = adapter
        self.seed = output_seed(self.tokens)
        self.output: list[int] = []  # indices into tokenizer.PIECES
        self.blocks: list[int] = []
        self.block_hashes: list[int] = []
        self.root = root_hash(adapter)
        self.num_computed = 0
        self.num_registered = 0
        self.num_cached_tokens = -1  # set at first scheduling, reported as usage cached_tokens
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None
        self.num_preemptions = 0
        self.arrival_time = 0.0
        self.scheduled_time = 0.0
        self.first_token_time = 0.0
        self.last_token_time = 0.0
        self.finish_time = 0.0
        # Streams want every token as it comes; non-streaming callers only the end (fewer wakeups).
        self.wake_each = True
        # vLLM's request `priority` (lower first); used only under the "priority" policy
        self.priority = 0
        self._waiter: Optional[asyncio.Future] = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED or self.status is Status.ABORTED

    @property
    def cached_tokens(self) -> int:
        return max(self.num_cached_tokens, 0)

    async def wait_finished(self) -> None:
        """Return once the sequence finished or was aborted."""
        while not self.finished:
            await self.wait_progress(len(self.output))

    async def wait_progress(self, seen: int) -> None:
        """Return once more than `seen` tokens are out or the sequence ended."""
        if len(self.output) > seen or self.finished:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiter = fut
        await fut

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)


class Engine:
    """Continuous-batching engine for one replica; `start()` runs its step loop as a task."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.block_size = profile.block_size
        self.kv = KVCache(profile.num_kv_blocks, profile.block_size,
                          profile.enable_prefix_caching)
        # vLLM refuses to start when one max-length sequence cannot fit; clamp instead.
        self.max_model_len = min(profile.max_model_len, self.kv.num_blocks * self.block_size)
        self.stats = EngineStats(max_model_len=self.max_model_len)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_priority = profile.scheduling_policy == "priority"
        self.lora_slots: OrderedDict[str, None] = OrderedDict()
        self.steps = 0
        self.busy_time = 0.0
        # Factor on every step's modelled time (the `slowdown` fault): a degraded replica whose
        # throughput drops, so its queue grows under load the others absorb.
        self.slowdown = 1.0
        self._work = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        # Receives each step's KV events (the KV cache's tuples), when they are enabled.
        self._on_kv_events: Optional[Callable[[list[tuple[Any, ...]]], None]] = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop stepping and end every in-flight sequence (as aborted) so waiters return."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Not ``await task`` under ``except CancelledError``: that also swallows the
            # cancellation of whoever is stopping us, and a caller cancelled mid-stop (a
            # harness tearing down) would then carry on as if it had not been, for ever.
            await asyncio.wait([task])
        for seq in list(self.running) + list(self.waiting):
            self.abort(seq)

    def enable_kv_events(self, sink: Callable[[list[tuple[Any, ...]]], None]) -> None:
        """Hand the KV cache's index changes to `sink` once per step, as vLLM's scheduler
        publishes one batch per step (and at once after a prefix-cache reset)."""
        self._on_kv_events = sink
        self.kv.enable_events()

    def flush_kv_events(self) -> None:
        events = self.kv.take_events()
        if events and self._on_kv_events is not None:
            self._on_kv_events(events)

    # --- requests ----------------------------------------------------------------------------

    def validate(self, prompt_len: int, max_tokens: Optional[int]) -> int:
        """Check lengths like vLLM and return the effective max_tokens."""
        mml = self.max_model_len
        if prompt_len >= mml:
            raise SimError(
                400, f"This model's maximum context length is {mml} tokens. However, your "
                f"request has {prompt_len} input tokens. Please reduce the length of the input "
                "messages.", "BadRequestError", "input_tokens")
        if max_tokens is None:
            return mml - prompt_len
        if max_tokens < 1:
            raise SimError(400, f"max_tokens must be at least 1, got {max_tokens}.",
                           "BadRequestError", "max_tokens")
        if prompt_len + max_tokens > mml:
            raise SimError(
                400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                f"model's maximum context length is {mml} tokens and your request has "
                f"{prompt_len} input tokens ({max_tokens} > {mml} - {prompt_len}).",
                "BadRequestError", "max_tokens")
        return max_tokens

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; tokens will appear in `seq.output` as steps complete."""
        seq.arrival_time = asyncio.get_running_loop().time()
        extend_block_hashes(seq.block_hashes, seq.tokens, self.block_size, seq.root)
        seq.status = Status.WAITING
        if self.by_priority:
            self._insert_by_priority(seq)
        else:
            self.waiting.append(seq)
        self._work.set()
        return seq

    def _insert_by_priority(self, seq: Sequence) -> None:
        """Place ``seq`` after every waiting sequence that comes first by (priority, arrival),
        as vLLM's priority queue orders its waiting requests."""
        rank = (seq.priority, seq.arrival_time)
        waiting = self.waiting
        at = len(waiting)
        while at > 0 and (waiting[at - 1].priority, waiting[at - 1].arrival_time) > rank:
            at -= 1
        waiting.insert(at, seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence (client went away); its blocks return to the pool, still cached."""
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.blocks)
            seq.blocks = []
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = Status.ABORTED
        seq.finish_reason = "abort"
        self.stats.aborted += 1
        seq._wake()

    async def stream(self, seq: Sequence) -> AsyncIterator[list[int]]:
        """Yield batches of new output piece indices until the sequence ends."""
        seen = 0
        while True:
            await seq.wait_progress(seen)
            out = seq.output
            if len(out) > seen:
                batch = out[seen:]
                seen = len(out)
                yield batch
            if seq.finished and seen >= len(seq.output):
                return

    # --- views for metrics -------------------------------------------------------------------

    def running_adapters(self) -> list[str]:
        return sorted({s.adapter for s in self.running if s.adapter})

    def waiting_adapters(self) -> list[str]:
        return sorted({s.adapter for s in self.waiting if s.adapter})

    def reset_prefix_cache(self) -> bool:
        ok = self.kv.reset()
        if self.kv.events:
            self.flush_kv_events()
        return ok

    # --- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Step forever; a bug in one step fails the in-flight requests, not the replica."""
        while True:
            try:
                await self._run_steps()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("engine step failed; aborting in-flight requests")
                for seq in list(self.running) + list(self.waiting):
                    self.abort(seq)

    async def _run_steps(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self.running and not self.waiting:
                if self.kv.events:  # left by a step that scheduled nothing
                    self.flush_kv_events()
                self._work.clear()
                await self._work.wait()
                deadline = loop.time()
            scheduled, extra_s = self._schedule()
            if not scheduled:
                # Nothing fits right now (should be rare); let arrivals/aborts change the state.
                await asyncio.sleep(max(self.profile.step_fixed_s, 0.001))
                deadline = loop.time()
                continue
            dt = (self._step_duration(scheduled) + extra_s) * self.slowdown
            now = loop.time()
            deadline = max(deadline, now - _CATCH_UP_S) + dt
            self.busy_time += dt
            await asyncio.sleep(max(0.0, deadline - now))
            self._complete(scheduled, loop.time())
            self.steps += 1
            if self.kv.events:  # None when KV events are off: one branch per step
                self.flush_kv_events()

    def _step_duration(self, scheduled: list[tuple[Sequence, int]]) -> float:
        prefill = decode = context = 0
        for seq, n in scheduled:
            context += seq.num_computed
            if n == 1 and seq.output:
                decode += 1
            else:
                prefill += n
        return self.profile.step_time(prefill, decode, context)

    # --- scheduling --------------------------------------------------------------------------

    def _blocks_needed(self, seq: Sequence, n_new: int) -> int:
        bs = self.block_size
        return -(-(seq.num_computed + n_new) // bs) - len(seq.blocks)

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], float]:
        """Pick this step's work: (sequence, tokens to compute) pairs, plus extra seconds."""
        budget = self.profile.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = self._schedule_running(scheduled, budget)
        budget -= sum(n for _, n in scheduled)
        extra = 0.0
        if not preempted:
            extra = self._admit_waiting(scheduled, budget)
        return scheduled, extra

    def _schedule_running(self, scheduled: list, budget: int) -> bool:
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n_new = min(seq.num_tokens - seq.num_computed, budget)
            while True:
                need = self._blocks_needed(seq, n_new)
                if need <= 0:
                    break
                blocks = self.kv.allocate(need)
                if blocks is not None:
                    seq.blocks.extend(blocks)
                    break
                at = self._victim()
                victim = running.pop(at)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return preempted
                if at < i:  # already given tokens this step: take them back
                    i -= 1
                    budget += scheduled.pop(at)[1]
            scheduled.append((seq, n_new))
            budget -= n_new
            i += 1
        return preempted

    def _victim(self) -> int:
        """Which running sequence a preemption takes: the newest (FCFS), or under the priority
        policy the one that comes last by (priority, arrival), as vLLM picks."""
        running = self.running
        if not self.by_priority:
            return len(running) - 1
        return max(range(len(running)), key=lambda k: (running[k].priority,
                                                        running[k].arrival_time))

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it (recompute later): at the head, or
        under the priority policy in its place by (priority, arrival)."""
        self.kv.free(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.status = Status.PREEMPTED
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        if self.by_priority:
            self._insert_by_priority(seq)
        else:
            self.waiting.appendleft(seq)

    def _lora_fits(self, adapter: Optional[str], active: set) -> bool:
        return not adapter or adapter in active or len(active) < self.profile.max_loras

    def _admit_waiting(self, scheduled: list, budget: int) -> float:
        """Admit waiting sequences in order; returns extra step seconds for LoRA slot swaps."""
        kv, bs, waiting, running = self.kv, self.block_size, self.waiting, self.running
        active = {s.adapter for s in running if s.adapter}
        skipped: list[Sequence] = []
        extra = 0.0
        now = asyncio.get_running_loop().time()
        while waiting and budget > 0 and len(running) < self.profile.max_num_seqs:
            seq = waiting[0]
            if not self._lora_fits(seq.adapter, active):
                skipped.append(waiting.popleft())
                continue
            # Like vLLM, at least the last token is always computed, so cap hits below the length.
            hit = kv.match_prefix(seq.block_hashes, (seq.num_tokens - 1) // bs)
            cached = len(hit) * bs
            n_new = min(seq.num_tokens - cached, budget)
            need = -(-(cached + n_new) // bs) - len(hit)
            if not kv.can_allocate(hit, need):
                break
            kv.acquire(hit)
            seq.blocks = hit + (kv.allocate(need) or [])
            seq.num_computed = cached
            seq.num_registered = len(hit)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = cached
                seq.scheduled_time = now
                kv.record_lookup(seq.num_tokens, cached)
            waiting.popleft()
            seq.status = Status.RUNNING
            running.append(seq)
            scheduled.append((seq, n_new))
            budget -= n_new
            if seq.adapter:
                extra += self._activate_lora(seq.adapter)
                active.add(seq.adapter)
        if skipped:
            waiting.extendleft(reversed(skipped))
        return extra

    def _activate_lora(self, adapter: str) -> float:
        """Put an adapter in a GPU slot (LRU); returns the swap cost in wall seconds."""
        slots = self.lora_slots
        if adapter in slots:
            slots.move_to_end(adapter)
            return 0.0
        if len(slots) >= self.profile.max_loras:
            in_use = {s.adapter for s in self.running}
            for name in slots:
                if name not in in_use:
                    del slots[name]
                    break
        slots[adapter] = None
        return self.profile.lora_swap_s * self.profile.time_scale

    # --- step completion ---------------------------------------------------------------------

    def _complete(self, scheduled: list[tuple[Sequence, int]], now: float) -> None:
        any_finished = False
        for seq, n in scheduled:
            if seq.status is not Status.RUNNING:
                continue  # aborted or preempted while the step ran
            seq.num_computed += n
            self._register_blocks(seq)
            if seq.num_computed >= seq.num_tokens:
                done = self._emit_token(seq, now)
                any_finished = any_finished or done
                if done or seq.wake_each:
                    seq._wake()
        if any_finished:
            self.running = [s for s in self.running if s.status is Status.RUNNING]

    def _register_blocks(self, seq: Sequence) -> None:
        n_full = seq.num_computed // self.block_size
        if n_full <= seq.num_registered:
            return
        hashes = seq.block_hashes
        if len(hashes) < n_full:
            extend_block_hashes(hashes, seq.tokens, self.block_size, seq.root)
        self.kv.register_run(seq.blocks, hashes, seq.num_registered, n_full, seq.tokens,
                             seq.adapter)
        seq.num_registered = n_full

    def _emit_token(self, seq: Sequence, now: float) -> bool:
        """Sample one token for `seq`; returns True when the sequence finished."""
        stats = self.stats
        piece = output_piece(seq.seed, len(seq.output))
        seq.output.append(piece)
        seq.tokens.append(PIECE_IDS[piece])
        stats.generation_tokens += 1
        if len(seq.output) == 1:
            seq.first_token_time = now
            stats.ttft.observe(now - seq.arrival_time)
            stats.prompt_tokens += seq.prompt_len
        else:
            stats.tpot.observe(now - seq.last_token_time)
        seq.last_token_time = now
        n_out = len(seq.output)
        if n_out < seq.target_tokens:
            return False
        seq.finish_reason = "length" if n_out >= seq.max_tokens else "stop"
        self._finish(seq, now)
        return True

    def _finish(self, seq: Sequence, now: float) -> None:
        seq.status = Status.FINISHED
        seq.finish_time = now
        self.kv.free(seq.blocks)
        seq.blocks = []
        st = self.stats
        st.requests_finished[seq.finish_reason] = st.requests_finished.get(seq.finish_reason, 0) + 1
        st.e2e.observe(now - seq.arrival_time)
        st.queue_time.observe(max(0.0, seq.scheduled_time - seq.arrival_time))
        st.req_prompt_tokens.observe(seq.prompt_len)
        st.req_generation_tokens.observe(len(seq.output))
