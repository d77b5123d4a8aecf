"""Benchmark workloads: deterministic per seed, within their stated size ranges, pure data."""

import pytest

from bench.workloads import (PREFIX_CHARS, make_workload, multi_turn_threads,
                             shared_prefix_threads, unique_prompt_threads)


def test_multi_turn_is_deterministic_and_seed_dependent():
    a = multi_turn_threads(50, seed=3)
    b = multi_turn_threads(50, seed=3)
    c = multi_turn_threads(50, seed=4)
    assert a == b
    assert a.threads != c.threads
    # A smaller workload is a prefix of a larger one with the same seed.
    assert multi_turn_threads(20, seed=3).threads == a.threads[:20]


def test_multi_turn_sizes_and_variety():
    w = multi_turn_threads(400, seed=11)
    for t in w.threads:
        assert 5 <= t.num_turns <= 30
        assert 500 <= t.user_chars <= 3000
        assert all(m.strip() for m in t.user_messages)
        assert t.max_tokens == 40 and not t.stateless and t.system_prompt is None
    firsts = {t.user_messages[0][:PREFIX_CHARS] for t in w.threads}
    assert len(firsts) == len(w.threads)  # routing keys differ thread to thread
    s = w.summary()
    assert s["turns_min"] <= 7 and s["turns_max"] >= 28
    assert s["user_chars_min"] < 700 and s["user_chars_max"] > 2700
    words = {word for t in w.threads for m in t.user_messages for word in m.split()}
    assert len(words) > 500


def test_conversation_replay_appends_history():
    t = multi_turn_threads(1, seed=0).threads[0]
    conv = t.conversation()
    first = conv.next_messages()
    assert first == [{"role": "user", "content": t.user_messages[0]}]
    conv.add_reply("reply one")
    second = conv.next_messages()
    assert second[:2] == first + [{"role": "assistant", "content": "reply one"}]
    assert second[2] == {"role": "user", "content": t.user_messages[1]}
    while not conv.done:
        conv.add_reply("r")
        if not conv.done:
            conv.next_messages()
    assert conv.turn == t.num_turns
    with pytest.raises(IndexError):
        conv.next_messages()


def test_shared_prefix_groups_share_system_prompt_only():
    w = shared_prefix_threads(4, 5, seed=2)
    assert len(w) == 20
    by_group: dict = {}
    for t in w.threads:
        by_group.setdefault(t.group, set()).add(t.system_prompt)
        assert 2000 - 200 <= len(t.system_prompt) <= 6000
        assert 1 <= t.num_turns <= 3
    assert len(by_group) == 4 and all(len(s) == 1 for s in by_group.values())
    assert len({next(iter(s)) for s in by_group.values()}) == 4
    assert len({t.user_messages[0] for t in w.threads}) == 20
    conv = w.threads[0].conversation()
    assert conv.next_messages()[0]["role"] == "system"
    assert shared_prefix_threads(4, 5, seed=2) == w


def test_unique_prompts_share_nothing_and_carry_no_history():
    w = unique_prompt_threads(30, seed=5)
    prompts = [m for t in w.threads for m in t.user_messages]
    assert len(set(p[:40] for p in prompts)) == len(prompts)
    assert all(500 <= len(p) <= 3000 for p in prompts)
    t = w.threads[0]
    conv = t.conversation()
    conv.next_messages()
    conv.add_reply("whatever")
    assert conv.next_messages() == [{"role": "user", "content": t.user_messages[1]}]
    assert unique_prompt_threads(30, seed=5) == w


def test_make_workload_by_name():
    assert make_workload("multi-turn", 10, seed=1) == multi_turn_threads(10, seed=1)
    assert len(make_workload("shared-prefix", 40, seed=1)) == 48  # 3 groups of 16
    assert make_workload("unique-prompts", 3).name == "unique-prompts"
    with pytest.raises(KeyError):
        make_workload("sharegpt", 1)


def test_system_prompt_requests_share_their_application_prompt_only():
    from bench.workloads import system_prompt_threads
    from kvgate_sim.tokenizer import encode_chat

    w = system_prompt_threads(60, seed=5, prompts=6)
    assert w == system_prompt_threads(60, seed=5, prompts=6)
    assert w.summary()["system_prompts"] == 6
    questions = set()
    for i, t in enumerate(w.threads):
        assert t.stateless and t.group == f"app-{i % 6}" and t.num_turns == 1
        assert t.system_prompt == w.threads[i % 6].system_prompt
        conv = t.conversation()
        while not conv.done:
            messages = conv.next_messages()
            assert [m["role"] for m in messages] == ["system", "user"]  # one question, alone
            questions.add(messages[1]["content"][:PREFIX_CHARS])
            conv.add_reply("ok")
    assert len(questions) == sum(t.num_turns for t in w.threads)  # KubeAI's keys all differ
    tokens = [len(encode_chat([{"role": "system", "content": p}]))
              for p in {t.system_prompt for t in w.threads}]
    assert 1900 <= min(tokens) and max(tokens) <= 3100  # ~2,000-3,000 tokens each
    assert make_workload("system-prompt", 3).name == "system-prompt"
