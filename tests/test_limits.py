"""The per-key budgets (lb.limits) on a clock the test controls: bursts, replenishment, refusals
that charge nothing, usage corrections, and two processes sharing one table; each for the C
core (lb/_limits.pyx) and its pure twin, and the two compared call by call."""

from __future__ import annotations

import multiprocessing
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.limits import WINDOW_NS, LimitTable, PyBudgets, duration_text, usage_in

S = 1_000_000_000


@pytest.fixture(params=["c", "python"])
def table(request):
    if request.param == "c":
        pytest.importorskip("lb._limits", reason="the C core is not built")
    t = LimitTable(capacity=64, pure=request.param == "python")
    assert isinstance(t.budgets, PyBudgets) == (request.param == "python")
    yield t
    t.close()


def test_a_burst_of_the_limit_then_one_per_interval(table):
    slot = table.slot(42)
    now = 10 * WINDOW_NS
    decisions = [table.admit(slot, 3, 0, 1, now) for _ in range(4)]
    assert [d.refused for d in decisions] == ["", "", "", "requests"]
    assert [d.remaining_requests for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].retry_after_ns == 20 * S  # one request comes back every 20 s
    assert decisions[2].reset_requests_ns == 60 * S  # all three back after a minute
    assert table.admit(slot, 3, 0, 1, now + 20 * S - 1).refused == "requests"
    assert table.admit(slot, 3, 0, 1, now + 20 * S).refused == ""
    assert table.admit(slot, 3, 0, 1, now + 20 * S).refused == "requests"


def test_a_refusal_charges_nothing(table):
    slot = table.slot(7)
    now = WINDOW_NS
    assert table.admit(slot, 10, 100, 90, now).refused == ""
    refused = table.admit(slot, 10, 100, 20, now)
    assert refused.refused == "tokens" and refused.remaining_tokens == 10
    assert refused.remaining_requests == 9  # the refused request's unit was not taken
    assert table.admit(slot, 10, 100, 10, now).refused == ""
    assert table.admit(slot, 10, 100, 101, now + 10 * WINDOW_NS).retry_after_ns == WINDOW_NS


def test_usage_corrections(table):
    slot = table.slot(9)
    now = WINDOW_NS
    assert table.admit(slot, 0, 1000, 900, now).refused == ""
    table.adjust_tokens(slot, 1000, 6 - 900)  # the answer said 6
    assert table.admit(slot, 0, 1000, 990, now).remaining_tokens == 4
    table.adjust_tokens(slot, 1000, -10_000)  # a refund banks no more than a full budget
    assert table.admit(slot, 0, 1000, 1000, now).refused == ""
    assert table.admit(slot, 0, 1000, 1, now).refused == "tokens"


def test_slots_by_tag(table):
    assert table.slot(1) == table.slot(1) != table.slot(2)
    with pytest.raises(ValueError):
        table.slot(0)


def _spend(table: LimitTable, slot: int, n: int, out: multiprocessing.Queue) -> None:
    out.put(sum(table.admit(slot, 500, 0, 1).refused == "" for _ in range(n)))


def test_two_processes_share_one_budget(table):
    slot = table.slot(5)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(table, slot, 400, out)) for _ in range(2)]
    began = time.monotonic()
    for p in procs:
        p.start()
    admitted = out.get(timeout=60) + out.get(timeout=60)
    elapsed = time.monotonic() - began
    for p in procs:
        p.join(30)
    # 500 a minute: 500 at once, plus one per 0.12 s while the 800 requests ran; per-process
    # budgets would have let all 800 through.
    assert 500 <= admitted <= 500 + int(elapsed / 0.12) + 1 < 800


def test_durations_as_openai_writes_them():
    assert duration_text(20_000_000) == "20ms"
    assert duration_text(int(1.5 * S)) == "1.5s"
    assert duration_text(360 * S) == "6m0s"


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.integers(-S, 2 * WINDOW_NS), st.integers(0, 10**15),
                 st.sampled_from([0, 999_999, 1_000_000, S - 1, S, S + 1, 1_050 * 10**6,
                                  1_001 * 10**6, WINDOW_NS - 1, WINDOW_NS, WINDOW_NS + 1])))
def test_the_c_durations_are_the_twins(ns):
    """The C core writes the reset times of its header lines itself."""
    core = pytest.importorskip("lb._limits", reason="the C core is not built")
    assert core.duration_text(ns) == duration_text(ns)


def test_admitted_requests_get_their_header_lines(table):
    lines = table.admit_lines(0, 3, 1000, 10, now=WINDOW_NS)
    assert lines == (b"x-ratelimit-limit-requests: 3\r\nx-ratelimit-remaining-requests: 2\r\n"
                     b"x-ratelimit-reset-requests: 20s\r\nx-ratelimit-limit-tokens: 1000\r\n"
                     b"x-ratelimit-remaining-tokens: 990\r\nx-ratelimit-reset-tokens: 600ms\r\n")
    assert table.admit_lines(1, 0, 60, 1, now=WINDOW_NS) == (
        b"x-ratelimit-limit-tokens: 60\r\nx-ratelimit-remaining-tokens: 59\r\n"
        b"x-ratelimit-reset-tokens: 1s\r\n")
    assert table.admit_lines(2, 0, 0, 10**9, now=WINDOW_NS) == b""  # no limits, no lines
    for _ in range(2):
        table.admit_lines(0, 3, 1000, 10, now=WINDOW_NS)
    refused = table.admit_lines(0, 3, 1000, 10, now=WINDOW_NS)  # a refusal is its Decision
    assert refused.refused == "requests" and refused.retry_after_ns == 20 * S


USAGE_PARTS = st.sampled_from([b'"total_tokens"', b'"input_tokens"', b'"output_tokens"', b":",
                                b" ", b"\n", b"\t", b"12", b"0", b"999999999", b"1000000001",
                                b"}", b",", b'"usage": {', b"data: ", b"x"])
USAGES = st.lists(USAGE_PARTS, max_size=14).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(USAGES)
def test_the_c_usage_search_is_the_twins(tail):
    core = pytest.importorskip("lb._limits", reason="the C core is not built")
    assert core.usage_in(tail) == usage_in(tail)


def test_usage_as_the_answers_write_it():
    assert usage_in(b'{"usage": {"prompt_tokens": 5, "total_tokens": 17}}') == 17
    assert usage_in(b'"usage":{"input_tokens":3,"output_tokens" : 4}}') == 7
    assert usage_in(b'{"usage": {"input_tokens": 3}}') is None
    assert usage_in(b'"total_tokens": "x", "input_tokens": 1, "output_tokens": 2') is None
    assert usage_in(b'"total_tokens": 1000000001') is None  # not believed
    assert usage_in(b"data: [DONE]") is None


CALLS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["admit", "admit_lines"]), st.integers(0, 3),
              st.sampled_from([0, 1, 3, 60, 10**9]),
              st.sampled_from([0, 10, 1000, 10**10]), st.integers(0, 5000),
              st.integers(0, 3 * WINDOW_NS)),
    st.tuples(st.just("adjust"), st.integers(0, 3), st.sampled_from([0, 1000, 10**10]),
              st.integers(-5000, 5000)),
    st.tuples(st.just("settle"), st.integers(0, 3), st.sampled_from([0, 1000, 10**10]),
              st.integers(0, 5000), USAGES)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(CALLS)
def test_the_twins_agree(calls):
    """Every decision and every word of the table, after any sequence of calls."""
    pytest.importorskip("lb._limits", reason="the C core is not built")
    tables = [LimitTable(capacity=8), LimitTable(capacity=8, pure=True)]
    try:
        now = WINDOW_NS
        for call in calls:
            if call[0] in ("admit", "admit_lines"):
                what, slot, rpm, tpm, tokens, step = call
                now += step // 7
                a, b = (getattr(t, what)(slot, rpm, tpm, tokens, now) for t in tables)
                assert a == b
            elif call[0] == "settle":
                _, slot, tpm, estimate, tail = call
                a, b = (t.settle(slot, tpm, estimate, tail) for t in tables)
                assert a == b
            else:
                _, slot, tpm, delta = call
                for t in tables:
                    t.adjust_tokens(slot, tpm, delta)
            assert bytes(tables[0].buffer) == bytes(tables[1].buffer)
    finally:
        for t in tables:
            t.close()
