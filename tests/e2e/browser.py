"""Headless Chromium for the report's checks and its benchmark: Debian's ``chromium`` driven
through Selenium and Debian's ``chromium-driver`` (both installed by scripts/setup.sh).

The system driver is named explicitly, so Selenium's own manager never looks for (or
downloads) a browser. As root Chromium needs ``--no-sandbox``; the other flags keep it from
reaching any network on its own (component updates, sync, background requests, QUIC), and
each browser gets a fresh profile that is removed with it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Iterator, Optional

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars")


def missing() -> Optional[str]:
    """Why the browser cannot run here, or None."""
    import os

    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not os.path.exists(path):
            return "{} is missing (apt-get install {}; bash scripts/setup.sh)".format(path, package)
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1300, height: int = 900) -> Iterator:
    """A Selenium WebDriver on a fresh headless Chromium, with the browser's console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vmtasks-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + ("--user-data-dir=" + profile, "--window-size={},{}".format(width, height)):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
