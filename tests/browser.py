"""Debian's chromium, driven by its chromedriver through selenium: the browser of the inspector
page's test (tests/test_inspector_page.py) and of its screenshot in the docs.

Nothing is downloaded: the browser and the driver are the system's (`make browser` installs the
Debian packages `chromium` and `chromium-driver`), and selenium is given both paths, so its own
driver manager never runs.

    python -m tests.browser http://127.0.0.1:3000/?user_id=u17 docs/img/inspector.png
"""

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless, no sandbox (root in CI), and nothing that reaches the network by itself.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def missing_browser() -> str | None:
    """Why the browser cannot run here, or None when chromium and chromedriver are installed."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if not absent:
        return None
    return f"{' and '.join(absent)} missing: run `make browser` (Debian: chromium chromium-driver)"


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator["WebDriver"]:  # noqa: F821
    """A headless chromium with a fresh profile, closed (and its profile removed) at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with TemporaryDirectory(prefix="shelfwise-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.add_argument(f"--window-size={width},{height}")
        # The console, to find Content-Security-Policy violations.
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


def screenshot(
    url: str,
    path: Path,
    wait_for: str = "#summary[data-user]",
    click_first_item: bool = False,
    size: tuple[int, int] = (1440, 1200),
) -> None:
    """Opens `url`, waits for the CSS selector `wait_for`, and saves the page as a PNG.

    With `click_first_item`, the first recommended item is clicked first (its similar items show).
    """
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(css: str):
        return WebDriverWait(driver, 30).until(
            ec.visibility_of_element_located(("css selector", css))
        )

    with chromium(*size) as driver:
        driver.get(url)
        shown(wait_for)
        if click_first_item:
            shown("#recommendations button.item").click()
            shown("#similar-panel[data-item]")
        # The whole page: the window grown until its viewport holds the document.
        chrome, height = driver.execute_script(
            "return [window.outerHeight - window.innerHeight,"
            " document.documentElement.scrollHeight]"
        )
        driver.set_window_size(size[0], height + chrome)
        driver.execute_script("window.scrollTo(0, 0)")
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("png", type=Path)
    parser.add_argument("--wait-for", default="#summary[data-user]")
    parser.add_argument("--click-first-item", action="store_true")
    args = parser.parse_args()
    screenshot(args.url, args.png, args.wait_for, args.click_first_item)
