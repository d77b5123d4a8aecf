"""LoRA adapters in `kvgate up`, for real: adapters added to, changed in and removed from the
models file while it runs, checked on every simulated replica's own /v1/models, requested as
`<model>_<adapter>` through the gateway with the official `openai` SDK, and shown by
`kvgate status`."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from tests.local_harness import (FAST_LOCAL, UpProcess, kvgate, pid_alive, sim_model, wait_for,
                                 write_models)

# Loading an adapter takes the simulator 1.5 s: long enough to see requests wait for it.
LORA = ("--lora-load-latency", "1.5")


def lora_model(*adapters: tuple[str, str]) -> dict[str, Any]:
    return sim_model("base", min_replicas=2, args=LORA,
                     adapters=[{"name": name, "url": url} for name, url in adapters])


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    for name in ("sql", "sql-v2"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
    process = UpProcess(tmp_path, [lora_model()],
                        config={"local": FAST_LOCAL})
    try:
        process.wait_output("kvgate: ready:")
        wait_for(lambda: len(process.ready_pids("base")) == 2, 10, "two ready replicas")
        yield process
    finally:
        process.close()


def ask(up: UpProcess, model: str) -> str:
    client = openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=30)
    reply = client.chat.completions.create(
        model=model, max_tokens=4, messages=[{"role": "user", "content": "SELECT"}])
    return reply.choices[0].message.content or ""


def served(address: str) -> dict[str, str]:
    """The adapters a replica's server really has: {name: lora_path}, from its own /v1/models."""
    with urllib.request.urlopen(f"http://{address}/v1/models", timeout=5) as response:
        cards = json.load(response)["data"]
    return {c["id"]: c["root"] for c in cards if c.get("parent")}


def replicas(up: UpProcess) -> list[dict[str, Any]]:
    model = up.model("base")
    return [r for r in model["replicas"] if r["ready"]] if model else []


def everywhere(up: UpProcess, expected: dict[str, str]) -> bool:
    """Both ready replicas serve exactly `expected` and the gateway routes by it."""
    ready = replicas(up)
    return len(ready) == 2 and all(
        served(r["address"]) == expected and r["adapters"] == sorted(expected) for r in ready)


def test_adapters_follow_the_models_file(up: UpProcess, tmp_path: Path) -> None:
    sql, sql_v2 = str(tmp_path / "adapters" / "sql"), str(tmp_path / "adapters" / "sql-v2")
    # Added, with a path relative to the models file: every replica loads the resolved path, and
    # a request sent at once waits for a replica that has it instead of failing.
    write_models(up.models_path, [lora_model(("sql", "file://adapters/sql"))])
    wait_for(lambda: up.model("base")["adapters"] == ["sql"], 5, "the file re-read")
    assert ask(up, "base_sql")
    wait_for(lambda: everywhere(up, {"sql": sql}), 10, "sql on both replicas")
    listed = {m.id for m in openai.OpenAI(base_url=up.base_url, api_key="unused").models.list()}
    assert {"base", "base_sql"} <= listed

    status = kvgate("status", "--state-dir", str(up.state_dir)).stdout
    assert "base_sql" in status and status.count("adapters=sql") == 2

    _replaced_replica_gets_it_back(up, sql)

    # A changed URL reloads the adapter from the new place.
    write_models(up.models_path, [lora_model(("sql", "file://adapters/sql-v2"))])
    wait_for(lambda: everywhere(up, {"sql": sql_v2}), 10, "sql reloaded from sql-v2")
    assert ask(up, "base_sql")

    # An adapter that cannot be fetched (no ossutil, or no such bucket) is reported and retried;
    # the others keep being served.
    write_models(up.models_path, [lora_model(("sql", "file://adapters/sql-v2"), ("bad", "oss://b/bad"))])
    up.wait_output("loading bad failed")
    assert everywhere(up, {"sql": sql_v2})
    assert ask(up, "base_sql")

    # Removed: unloaded from every server, and the gateway answers 404.
    write_models(up.models_path, [lora_model()])
    wait_for(lambda: everywhere(up, {}), 10, "sql unloaded everywhere")
    with pytest.raises(openai.NotFoundError):
        ask(up, "base_sql")
    assert ask(up, "base")


def _replaced_replica_gets_it_back(up: UpProcess, sql: str) -> None:
    """A killed replica's replacement turns ready without the adapter and loads it (1.5 s);
    meanwhile adapter requests go only to the replica that has it, so none of them fails."""
    victim = min(up.ready_pids("base"))
    os.kill(victim, signal.SIGKILL)
    errors: list[str] = []
    done = threading.Event()
    sent = [0]

    def traffic() -> None:
        while not done.is_set():
            try:
                ask(up, "base_sql")
                sent[0] += 1
            except Exception as exc:  # asserted on below
                errors.append(repr(exc))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        # The replacement is in the gateway without the adapter (the 1.5 s load window) ...
        wait_for(lambda: any(r["pid"] != victim and r["adapters"] == [] for r in replicas(up)),
                 15, "the replacement ready, adapter not yet loaded")
        during = sent[0]
        # ... then has it like the other one.
        wait_for(lambda: everywhere(up, {"sql": sql}), 10, "sql on the replacement")
    finally:
        done.set()
        thread.join(30)
    assert errors == [] and sent[0] > during
    assert not pid_alive(victim)
