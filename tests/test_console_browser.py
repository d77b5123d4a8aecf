"""The console in a real headless Chromium against `kvgate up` on simulated replicas: the page
shows the models and their replica counts, the playground streams a reply, a replica's load
rises while requests run and falls back after, and a model scales from zero when asked."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import openai
import pytest

from tests.browser_harness import chromium, missing_browser, until
from tests.local_harness import UpProcess, sim_model, wait_for

pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))

# Each simulated step takes 200x its modelled time (40 ms a token) and replies run to
# max_tokens: they stream over seconds, so the page can be seen while requests run.
SLOW = ("--time-scale", "200", "--natural-output-tokens", "1000")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    process = UpProcess(tmp_path_factory.mktemp("console-up"), [
        sim_model("chat", min_replicas=2, max_replicas=2, strategy="PrefixHash", args=SLOW),
        sim_model("zero", min_replicas=0, max_replicas=1, args=SLOW),
    ])
    try:
        wait_for(lambda: len(process.ready_pids("chat")) == 2, 60, "chat ready")
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def page(up: UpProcess) -> Iterator[Any]:
    driver = chromium()
    try:
        driver.get(f"http://127.0.0.1:{up.port}/ui")
        yield driver
    finally:
        driver.quit()


def card(page: Any, model: str) -> Any:
    return page.find_element("css selector", f'[data-model="{model}"]')


def text_of(page: Any, selector: str) -> str:
    return page.find_element("css selector", selector).text


def test_models_and_replica_counts(page: Any) -> None:
    until(lambda: card(page, "chat").find_element("css selector", ".ready").text == "2/2", 30,
          "chat 2/2")
    chat = card(page, "chat")
    assert "PrefixHash" in chat.text and "TextGeneration" in chat.text
    assert len(chat.find_elements("css selector", "tr[data-replica]")) == 2
    assert card(page, "zero").find_element("css selector", ".ready").text == "0/0"
    # the ring: two replicas' shares of the hash space, drawn as arcs
    ring = until(lambda: page.find_element("css selector", '[data-ring="chat"]'), 15, "ring")
    assert len(ring.find_elements("css selector", "tr[data-ring-replica]")) == 2
    assert len(ring.find_elements("css selector", "path")) > 2


def test_playground_streams_a_reply(page: Any) -> None:
    until(lambda: "chat" in [o.text for o in page.find_elements("css selector", "#chat-model option")],
          15, "chat in the picker")
    send(page, "chat", "Tell me about consistent hashing.")
    reply = page.find_elements("css selector", "#chat-log .msg.assistant .text")[-1]
    # part of the reply is on the page while the stream still runs, then all of it
    until(lambda: text_of(page, "#chat-state") == "streaming…" and reply.text, 30,
          "text while streaming")
    partial = reply.text
    until(lambda: text_of(page, "#chat-state") == "done", 60, "the end of the stream")
    assert len(reply.text) > len(partial) > 0


def test_replica_load_rises_while_requests_run(page: Any, up: UpProcess) -> None:
    def in_flight() -> int:
        return sum(int(cell.text) for cell in card(page, "chat").find_elements(
            "css selector", "tr[data-replica] .inflight"))

    until(lambda: in_flight() == 0, 30, "no load")
    finished: list[int] = []

    def long_stream(i: int) -> None:
        with openai.OpenAI(base_url=up.base_url, api_key="none", max_retries=0) as client:
            stream = client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": f"long {i}"}],
                max_tokens=150, stream=True)
            if "".join(c.choices[0].delta.content or "" for c in stream if c.choices):
                finished.append(i)

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        until(lambda: in_flight() >= 2, 30, "in-flight load on the page")
    finally:
        for thread in threads:
            thread.join(120)
    assert sorted(finished) == [0, 1, 2]
    until(lambda: in_flight() == 0, 30, "the load back to zero")
    until(lambda: float(card(page, "chat").find_element("css selector", ".rps").text) > 0, 15,
          "requests/s")


def test_model_scales_from_zero(page: Any) -> None:
    send(page, "zero", "wake up")
    until(lambda: card(page, "zero").find_element("css selector", ".ready").text == "1/1", 60,
          "zero 1/1")
    until(lambda: text_of(page, "#chat-state") == "done", 60, "the reply from the new replica")
    reply = page.find_elements("css selector", "#chat-log .msg.assistant .text")[-1]
    assert reply.text


def send(page: Any, model: str, text: str) -> None:
    from selenium.webdriver.support.ui import Select

    until(lambda: page.find_element("css selector", "#chat-send").is_enabled(), 60, "send ready")
    Select(page.find_element("css selector", "#chat-model")).select_by_value(model)
    max_tokens = page.find_element("css selector", "#chat-max")
    max_tokens.clear()
    max_tokens.send_keys("40")
    box = page.find_element("css selector", "#chat-input")
    box.clear()
    box.send_keys(text)
    page.find_element("css selector", "#chat-send").click()
