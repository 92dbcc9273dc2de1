"""A real headless browser for tests of the HTML pages: Debian's `chromium`, driven offline.

Installed with apt when missing and we are root (once per machine; a test skips with the reason
when that is not possible). Pages are checked with `--dump-dom`: the test appends a script that
drives the page's own controls after it loads and writes what it reads back into the DOM, which
Chromium prints once the page's timers have run (`--virtual-time-budget`). No WebDriver, no
Playwright browser download, no network.
"""
from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import apt_install

PACKAGES = ["chromium"]
# Flags that work as root in a container without a display, GPU or network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
RESULT_ID = "test-result"


def _binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the chromium binary, installed on first use; skips the test when it cannot be had."""
    start = time.monotonic()
    why = apt_install(PACKAGES, lambda: _binary() is not None)
    if why:
        pytest.skip(f"no headless browser: {why}")
    if time.monotonic() - start > 1:
        print(f"installed chromium in {time.monotonic() - start:.0f} s")
    return _binary()


def run_page(chromium: str, page: Path, script: str, width: int = 1280, timeout: float = 60) -> str:
    """Open `page` with `script` appended, let it run, and return the text the script put into
    `<pre id="test-result">` (the script writes it with `window.testResult(text)`)."""
    harness = (f"<pre id='{RESULT_ID}'></pre><script>window.testResult = function (text) "
               f"{{ document.getElementById('{RESULT_ID}').textContent = text; }};\n"
               f"window.addEventListener('load', function () {{ try {{ {script} }} catch (e) "
               f"{{ window.testResult('ERROR ' + e + '\\n' + e.stack); }} }});</script>")
    with tempfile.TemporaryDirectory(prefix="chromium-") as tmp:
        driven = Path(tmp, page.name)
        driven.write_text(page.read_text().replace("</body>", harness + "</body>"))
        proc = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},900",
                               "--virtual-time-budget=10000", "--dump-dom", driven.as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    found = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', proc.stdout, re.S)
    assert proc.returncode == 0 and found, f"chromium failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    text = html.unescape(found.group(1))
    assert text and not text.startswith("ERROR"), text or "the test script wrote no result"
    return text
