"""A real headless Chromium driven through selenium, for the console's tests and screenshot.

Debian's ``chromium`` and ``chromium-driver`` (listed in ``.ci/system-packages.txt``) are used
as installed: selenium is given the driver's path, so it never looks for one to download.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Callable

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def missing_browser() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra)"
    if not any(shutil.which(name) for name in CHROMIUM):
        return "no Chromium (.ci/system-packages.sh installs Debian's chromium)"
    if not shutil.which(DRIVER):
        return "no chromedriver (.ci/system-packages.sh installs Debian's chromium-driver)"
    return None


def chromium(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium session (close it with ``quit()``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(n) for n in CHROMIUM if shutil.which(n))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which(DRIVER)))
    driver.set_page_load_timeout(30)
    return driver


def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy (stale or missing elements count as not yet)."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except WebDriverException:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
