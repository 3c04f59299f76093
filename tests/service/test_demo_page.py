"""The demo page, driven in headless Chromium (Debian's build) by Playwright."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.service import images
from tests.support import Server

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed CI machine with no network: no GPU, no background traffic.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test installs it in CI)")
def test_page_classifies_an_uploaded_photo(tiny_server: Server, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(images.jpeg(320, 240))
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(tiny_server.url + "/")
            page.wait_for_selector("#model option[value='slow']", state="attached")
            page.select_option("#model", "slow")
            page.set_input_files("#file", str(photo))
            page.click("#send")
            page.wait_for_selector("#result:not([hidden])")
            assert page.inner_text("#label") in ("cat", "dog")
            assert "model slow" in page.inner_text("#meta")
            assert page.locator("#probs tbody tr").count() == 2
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
