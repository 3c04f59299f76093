"""The demo page, driven in headless Chromium (Debian's build) by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (make test installs it in CI)"
)


@contextmanager
def page_of(server: Server) -> Iterator[Any]:
    """The demo page, loaded, with its model list filled in."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server.url + "/")
            page.wait_for_selector("#model option[value='auto']", state="attached")
            yield page
        finally:
            browser.close()


def compare_rows(page: Any) -> dict[str, list[str]]:
    """Once Compare all has finished: each row's cells, by the mode it ran."""
    page.wait_for_selector("#compare-table tbody tr[data-mode='cascade'] td.note")
    return {
        row.get_attribute("data-mode"): row.locator("td").all_inner_texts()
        for row in page.locator("#compare-table tbody tr").all()
    }


def photo_files(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        paths.append(tmp_path / f"photo-{i}.jpg")
        paths[-1].write_bytes(images.jpeg(320 - 40 * i, 240))
    return [str(p) for p in paths]


@needs_chromium
def test_page_classifies_several_photos_with_a_named_model(tiny_server: Server, tmp_path: Path) -> None:
    with page_of(tiny_server) as page:
        page.select_option("#model", "slow")
        page.set_input_files("#file", photo_files(tmp_path, 2))
        page.click("#send")
        page.wait_for_selector("#result:not([hidden])")
        labels = page.locator("#answers tbody td.label").all_inner_texts()
        assert len(labels) == 2 and set(labels) <= {"cat", "dog"}
        assert "model slow" in page.inner_text("#meta")
        assert page.inner_text("#error") == ""


@needs_chromium
def test_page_auto_with_a_budget_says_what_it_picked(tiny_server: Server, tmp_path: Path) -> None:
    with page_of(tiny_server) as page:
        page.select_option("#model", "auto")
        assert page.is_visible("#budget")
        page.fill("#budget", "5000")
        page.fill("#floor", "90")  # only "slow" (92 % on its hardest source) meets it
        page.set_input_files("#file", photo_files(tmp_path, 1))
        page.click("#send")
        page.wait_for_selector("#result:not([hidden])")
        assert page.inner_text("#meta").startswith("auto picked slow")
        page.fill("#floor", "99.9")  # no model meets it: the documented 422, shown
        page.click("#send")
        page.wait_for_function("document.getElementById('error').textContent.includes('422')")
        assert "constraints_unsatisfiable" in page.inner_text("#error")


@needs_chromium
def test_page_cascade_reports_escalations(tiny_server: Server, tmp_path: Path) -> None:
    with page_of(tiny_server) as page:
        page.select_option("#model", "cascade")
        page.fill("#min-confidence", "0.9999")  # every tiny-model answer is below it: all escalate
        page.set_input_files("#file", photo_files(tmp_path, 2))
        page.click("#send")
        page.wait_for_selector("#result:not([hidden])")
        assert "cascade fast → slow: 2 of 2 escalated" in page.inner_text("#meta")
        assert page.locator("#answers tbody tr", has_text="slow (escalated)").count() == 2


@needs_chromium
def test_page_compares_every_model_auto_and_the_cascade(tiny_server: Server, tmp_path: Path) -> None:
    with page_of(tiny_server) as page:
        page.set_input_files("#file", photo_files(tmp_path, 2))
        # A budget no machine misses: "slow" takes about 200 ms here, and at the page's default
        # of 200 ms `auto` once found no model (predicted ~204 ms on a slow minute in CI).
        page.fill("#budget", "5000")
        page.fill("#floor", "90")
        page.click("#compare")
        rows = compare_rows(page)
        assert list(rows) == ["fast", "slow", "auto", "cascade"]
        for mode, cells in rows.items():
            assert len(cells) == 6, (mode, cells)  # model, 2 photos, latency, accuracy, how
            assert all(c.split()[0] in ("cat", "dog") for c in cells[1:3]), cells
            assert float(cells[3]) > 0
        assert rows["fast"][4].startswith("87.00 %")  # the tiny manifest's hardest-source figure
        assert rows["auto"][5].startswith("auto picked")
        assert rows["cascade"][5].startswith("cascade fast → slow")
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
