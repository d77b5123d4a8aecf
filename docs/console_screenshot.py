"""Takes the console screenshot in the README: `kvgate up` on simulated replicas, some traffic,
and the page in a headless Chromium. Run from the repository root:

    .venv/bin/python docs/console_screenshot.py [docs/console.png]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from tests.browser_harness import chromium, missing_browser, until  # noqa: E402
from tests.local_harness import UpProcess, sim_model, wait_for  # noqa: E402

SLOW = ("--time-scale", "200", "--natural-output-tokens", "1000")


def traffic(base_url: str, model: str, stop: threading.Event, tokens: int) -> None:
    """Streams one request after another until ``stop``."""
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
        i = 0
        while not stop.is_set():
            i += 1
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"question {i % 7}"}],
                max_tokens=tokens, stream=True)
            for _ in stream:
                pass


def main(out: Path) -> None:
    reason = missing_browser()
    if reason:
        sys.exit(f"cannot take the screenshot: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapters" / "sql"
        adapter.mkdir(parents=True)
        up = UpProcess(Path(tmp), [
            sim_model("llama-3.1-8b", min_replicas=3, max_replicas=3, strategy="PrefixHash",
                      args=SLOW, adapters=[{"name": "sql", "url": f"file://{adapter}"}]),
            sim_model("qwen-coder", min_replicas=2, max_replicas=2, strategy="LeastLoad",
                      args=SLOW),
            sim_model("mistral-7b", min_replicas=0, max_replicas=1, args=SLOW),
        ])
        stop = threading.Event()
        try:
            wait_for(lambda: len(up.ready_pids("llama-3.1-8b")) == 3
                     and len(up.ready_pids("qwen-coder")) == 2, 60, "replicas ready")
            wait_for(lambda: all(r["adapters"] for r in up.model("llama-3.1-8b")["replicas"]),
                     60, "the adapter loaded")
            workers = [threading.Thread(target=traffic, args=(up.base_url, m, stop, n), daemon=True)
                       for m, n in (("llama-3.1-8b", 30),) * 5 + (("qwen-coder", 60),) * 2]
            for worker in workers:
                worker.start()
            driver = chromium(1400, 1400)
            try:
                driver.get(f"http://127.0.0.1:{up.port}/ui")
                until(lambda: driver.find_elements("css selector", '[data-ring="llama-3.1-8b"]'), 30,
                      "the rings")
                time.sleep(20)  # a sparkline's worth of traffic
                from selenium.webdriver.support.ui import Select
                Select(driver.find_element("css selector", "#chat-model")).select_by_value(
                    "llama-3.1-8b_sql")
                driver.find_element("css selector", "#chat-input").send_keys(
                    "Which replica owns my prompt?")
                driver.find_element("css selector", "#chat-send").click()
                until(lambda: driver.find_element("css selector", "#chat-state").text == "done",
                      30, "the reply")
                driver.save_screenshot(str(out))
            finally:
                driver.quit()
        except AssertionError:
            print(up.output[-3000:], file=sys.stderr)
            raise
        finally:
            stop.set()
            up.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs" / "console.png"))
