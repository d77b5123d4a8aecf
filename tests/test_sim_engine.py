"""The simulated engine loop in-process: batch limits, chunked prefill, preemption, LoRA slots."""

import asyncio

import pytest

from kvgate_sim.engine import Engine, Sequence, Status
from kvgate_sim.errors import SimError
from kvgate_sim.profiles import (CPU_SCALED, L4_LLAMA31_8B, get_profile, scale_profile)
from kvgate_sim.tokenizer import PIECES, encode_prompt, filler_text


def prompt(n_tokens: int, tag: str = "p") -> list[int]:
    text = (tag + "-" + "abcdefghijklmnop" * n_tokens)[: 4 * (n_tokens - 1)]
    return encode_prompt(text)


async def run(engine: Engine, *seqs: Sequence) -> None:
    for s in seqs:
        engine.add(s)
    await asyncio.wait_for(asyncio.gather(*(s.wait_finished() for s in seqs)), 10)


@pytest.fixture
async def engine_factory():
    engines = []

    def make(**overrides) -> Engine:
        eng = Engine(get_profile("fast", **overrides))
        eng.start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        await eng.stop()


async def test_stop_passes_on_its_callers_cancellation() -> None:
    """A task cancelled while it stops the engine ends cancelled: the stepping task's own
    cancellation must not swallow it (a test harness once waited for ever on such a task)."""
    engine = Engine(get_profile("fast"))
    engine.start()
    stopper = asyncio.create_task(engine.stop())
    await asyncio.sleep(0)  # the stopper now waits for the stepping task to end
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await engine.stop()


async def test_generates_max_tokens_or_natural_stop(engine_factory):
    eng = engine_factory(natural_output_tokens=8)
    a = Sequence(prompt(50), max_tokens=5, target_tokens=8)
    b = Sequence(prompt(50, "q"), max_tokens=100, target_tokens=8)
    await run(eng, a, b)
    assert (len(a.output), a.finish_reason) == (5, "length")
    assert (len(b.output), b.finish_reason) == (8, "stop")
    assert eng.kv.usage() == 0.0 and not eng.running and not eng.waiting
    # Deterministic text: the same prompt gives the same answer.
    c = Sequence(prompt(50), max_tokens=5, target_tokens=8)
    await run(eng, c)
    assert c.output == a.output
    assert "".join(PIECES[p] for p in a.output) == filler_text(a.seed, 5)


async def test_prefix_hit_counts_full_blocks_below_prompt_length(engine_factory):
    eng = engine_factory()
    p = prompt(100)
    first = Sequence(p, 4, 4)
    await run(eng, first)
    second = Sequence(p, 4, 4)
    await run(eng, second)
    assert first.cached_tokens == 0
    # 100 tokens: hits are capped below the length, so 6 full blocks = 96 tokens.
    assert second.cached_tokens == 96
    assert eng.kv.queries == 200 and eng.kv.hits == 96


async def test_generated_tokens_are_cached_for_the_next_turn(engine_factory):
    eng = engine_factory()
    p = prompt(64)
    s1 = Sequence(p, 40, 40)
    await run(eng, s1)
    follow_up = s1.tokens + prompt(20, "next")[1:]  # history + reply + new message
    s2 = Sequence(follow_up, 4, 4)
    await run(eng, s2)
    assert s2.cached_tokens >= (64 + 40 - 1) // 16 * 16


async def test_chunked_prefill_respects_token_budget(engine_factory):
    eng = engine_factory(max_num_batched_tokens=64)
    s = Sequence(prompt(300), 1, 1)
    await run(eng, s)
    assert eng.steps >= 5  # 300 prompt tokens at 64 per step


async def test_max_num_seqs_limits_running(engine_factory):
    eng = engine_factory(max_num_seqs=2, step_fixed_s=0.005)
    seqs = [Sequence(prompt(20, f"s{i}"), 40, 40) for i in range(5)]
    for s in seqs:
        eng.add(s)
    await asyncio.sleep(0.03)
    assert len(eng.running) == 2 and len(eng.waiting) == 3
    await asyncio.wait_for(asyncio.gather(*(s.wait_finished() for s in seqs)), 10)
    assert all(len(s.output) == 40 for s in seqs)


async def test_preemption_on_kv_exhaustion_then_completion(engine_factory):
    # 24 blocks = 384 tokens; four sequences growing to ~150 tokens each cannot all fit.
    eng = engine_factory(num_kv_blocks=24)
    seqs = [Sequence(prompt(30, f"s{i}"), 120, 120) for i in range(4)]
    await run(eng, *seqs)
    assert eng.stats.preemptions > 0
    assert any(s.num_preemptions for s in seqs)
    # The newest sequences are the ones preempted.
    assert seqs[0].num_preemptions == 0
    assert all(len(s.output) == 120 and s.finish_reason == "length" for s in seqs)
    assert eng.kv.usage() == 0.0
    eng.kv.check_invariants()


async def test_priority_policy_admits_waiting_requests_by_priority(engine_factory):
    """Under vLLM's priority policy a request that arrives last with a lower `priority` value
    is admitted before those waiting ahead of it; FCFS keeps arrival order."""
    async def admission_order(policy: str) -> list[str]:
        eng = engine_factory(max_num_seqs=1, step_fixed_s=0.005, scheduling_policy=policy)
        first = Sequence(prompt(20, "first"), 10, 10, request_id="first")
        eng.add(first)
        await first.wait_progress(1)  # running: the others must wait for its slot
        waiters = []
        for name, priority in (("low", 5), ("default", 0), ("urgent", -10)):
            seq = Sequence(prompt(20, name), 3, 3, request_id=name)
            seq.priority = priority
            eng.add(seq)
            waiters.append(seq)
        await asyncio.wait_for(asyncio.gather(first.wait_finished(),
                                              *(s.wait_finished() for s in waiters)), 10)
        return [s.request_id for s in sorted(waiters, key=lambda s: s.scheduled_time)]

    assert await admission_order("priority") == ["urgent", "default", "low"]
    assert await admission_order("fcfs") == ["low", "default", "urgent"]


async def test_priority_policy_preempts_the_lowest_priority_request(engine_factory):
    # As the preemption test above, but the oldest sequence has the lowest priority: it goes.
    eng = engine_factory(num_kv_blocks=24, scheduling_policy="priority")
    seqs = [Sequence(prompt(30, f"s{i}"), 120, 120) for i in range(4)]
    seqs[0].priority = 1
    await run(eng, *seqs)
    assert seqs[0].num_preemptions > 0
    assert all(len(s.output) == 120 for s in seqs)
    assert eng.kv.usage() == 0.0
    eng.kv.check_invariants()


async def test_abort_frees_blocks(engine_factory):
    eng = engine_factory(step_fixed_s=0.002)
    s = Sequence(prompt(100), 1000, 1000)
    eng.add(s)
    await s.wait_progress(2)
    assert eng.kv.usage() > 0
    eng.abort(s)
    assert s.status is Status.ABORTED and eng.kv.usage() == 0.0 and not eng.running


async def test_lora_slots_limit_distinct_adapters_per_batch(engine_factory):
    eng = engine_factory(max_loras=1, step_fixed_s=0.005)
    a = Sequence(prompt(20, "a"), 40, 40, adapter="lora-a")
    b = Sequence(prompt(20, "b"), 5, 5, adapter="lora-b")
    base = Sequence(prompt(20, "c"), 5, 5)
    for s in (a, b, base):
        eng.add(s)
    await asyncio.sleep(0.03)
    assert eng.running_adapters() == ["lora-a"] and eng.waiting_adapters() == ["lora-b"]
    assert base.status is not Status.WAITING  # the base model is not held back
    await asyncio.wait_for(asyncio.gather(a.wait_finished(), b.wait_finished()), 10)
    assert b.first_token_time >= a.finish_time


def test_validate_lengths_like_vllm():
    eng = Engine(get_profile("fast", max_model_len=100))
    assert eng.validate(10, None) == 90
    with pytest.raises(SimError) as e:
        eng.validate(100, 1)
    assert e.value.status == 400 and "maximum context length is 100" in e.value.message
    with pytest.raises(SimError):
        eng.validate(50, 51)


def test_profiles_scale_keeps_ratios():
    scaled = scale_profile(L4_LLAMA31_8B, 0.125)
    assert scaled.num_kv_blocks == 640 and scaled.max_num_seqs == 32
    # A scaled replica with 1/8 of the sequences takes the same step time as the full one.
    full = L4_LLAMA31_8B.step_time(2048, 200, 60000)
    small = scaled.step_time(256, 25, 7500)
    assert small == pytest.approx(full)
    assert CPU_SCALED.time_scale == 2.0
    assert CPU_SCALED.max_model_len <= CPU_SCALED.kv_capacity_tokens
    with pytest.raises(KeyError):
        get_profile("nope")


async def test_stream_iterator_yields_every_token(engine_factory):
    eng = engine_factory(step_fixed_s=0.001)
    s = eng.add(Sequence(prompt(30), 12, 12))
    got = [p async for batch in eng.stream(s) for p in batch]
    assert got == s.output and len(got) == 12


async def test_a_failing_step_aborts_requests_but_engine_keeps_serving(engine_factory,
                                                                        monkeypatch):
    eng = engine_factory()
    real = eng._complete

    def boom(*_args):
        monkeypatch.setattr(eng, "_complete", real)
        raise RuntimeError("injected bug")

    monkeypatch.setattr(eng, "_complete", boom)
    bad = Sequence(prompt(20), 4, 4)
    await run(eng, bad)
    assert bad.status is Status.ABORTED
    good = Sequence(prompt(20, "g"), 4, 4)
    await run(eng, good)
    assert len(good.output) == 4
