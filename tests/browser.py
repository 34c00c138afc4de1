"""Loads a self-contained HTML page in headless Chromium (Debian's `chromium`) and counts the
images the browser decoded, read back from the DOM; skips, saying why, where none is installed."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

LOADED = re.compile(r"<div id=\"e2-loaded\">(\d+)/(\d+)</div>")


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def images_loaded(page: str, scratch: Path) -> tuple[int, int]:
    """(images decoded, images on the page) as Chromium loads `page`."""
    found = browser()
    if found is None:
        pytest.skip("no Chromium to load report.html in (Debian: apt-get install chromium); the page was checked "
                    "as text only")
    probe = scratch / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => {"
                                  "const all = [...document.images];"
                                  "const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;"
                                  "document.body.insertAdjacentHTML('beforeend', "
                                  "`<div id=\"e2-loaded\">${ok}/${all.length}</div>`);});</script></body>"))
    dom = subprocess.run([found, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    got = LOADED.search(dom)
    assert got, dom[-2000:]
    return int(got.group(1)), int(got.group(2))
