"""The Batch API under `kvgate up`, for real: the store under the state directory by default,
1,000 lines (some invalid) run on simulated replicas through the official `openai` SDK, and
kvgate killed with SIGKILL mid-batch and started again on the same state directory: the batch
resumes at once (the lease's holder is a dead process of this host) and its output holds every
line exactly once, each with its own answer."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import openai

from tests.local_harness import FAST_LOCAL, UpProcess, sim_model, wait_for

CHAT = sim_model("chat", min_replicas=2, strategy="PrefixHash")
# A lease far longer than the test: the restarted kvgate must take the batch over because its
# holder's process is gone, not because the lease ran out.
CONFIG = {"local": FAST_LOCAL, "batch": {"pollSeconds": 0.1, "leaseSeconds": 3600, "concurrency": 4}}
LINES = 1000


def start(workdir: Path) -> tuple[UpProcess, openai.OpenAI]:
    up = UpProcess(workdir, [CHAT], config=CONFIG)
    up.wait_output("kvgate: ready:", timeout=60)
    return up, openai.OpenAI(base_url=up.base_url, api_key="k", max_retries=2, timeout=30)


def content(i: int) -> str:
    return f"tell me about item {i} " + "and more " * (i % 7)


def test_kvgate_up_batch_survives_sigkill(tmp_path: Path) -> None:
    lines = []
    for i in range(LINES):
        if i % 50 == 7:
            lines.append('{"custom_id": "broken", ')
            continue
        model = "missing" if i % 50 == 9 else "chat"
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/chat/completions",
                                 "body": {"model": model, "max_tokens": 5,
                                          "messages": [{"role": "user", "content": content(i)}]}}))
    up, client = start(tmp_path)
    try:
        assert (up.state_dir / "batch" / "batch.db").exists()
        upload = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 150, 60,
                 "a part of the batch")
        mid = client.batches.retrieve(batch.id)
        os.killpg(up.proc.pid, signal.SIGKILL)
        up.proc.wait(10)
        assert mid.status == "in_progress"
        assert mid.request_counts.completed + mid.request_counts.failed < LINES
    finally:
        up.close()
    up, client = start(tmp_path)
    try:
        done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed"
                        and b, 180, "the batch to complete after the restart")
        runnable = [i for i in range(LINES) if i % 50 not in (7, 9)]
        assert done.request_counts.total == LINES
        assert done.request_counts.completed == len(runnable)
        assert done.request_counts.failed == LINES - len(runnable)
        output = [json.loads(x) for x in
                  client.files.content(done.output_file_id).content.splitlines()]
        assert sorted(x["custom_id"] for x in output) == sorted(f"r{i}" for i in runnable)
        errors = [json.loads(x) for x in
                  client.files.content(done.error_file_id).content.splitlines()]
        # A line naming another model than the batch's is refused (batch.singleModel, on by
        # default as OpenAI requires one model per batch) like an unreadable one.
        assert not [x for x in errors if x["response"]]
        assert sorted(x["error"]["code"] for x in errors) == \
            sorted(["invalid_json_line", "mismatched_model"] * (LINES // 50))
        assert {x["custom_id"] for x in errors if x["error"]["code"] == "mismatched_model"} == \
            {f"r{i}" for i in range(LINES) if i % 50 == 9}
        # Each answer is the one its own prompt gets (the simulator answers a prompt the same
        # way every time): checked against the same requests sent directly, for a sample.
        by_id = {x["custom_id"]: x["response"]["body"] for x in output}
        for i in runnable[::97]:
            direct = client.chat.completions.create(
                model="chat", max_tokens=5, messages=[{"role": "user", "content": content(i)}])
            assert by_id[f"r{i}"]["choices"][0]["message"]["content"] == \
                direct.choices[0].message.content
            assert by_id[f"r{i}"]["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
    finally:
        up.close()
