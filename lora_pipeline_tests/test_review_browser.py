"""The caption review page (review.html, beside report.md) in a real browser: Debian's Chromium driven by
Playwright opens it from the snapshot folder (file://), its thumbnails load, and the filter by finding shows only
the rows with that finding."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.core.paths import REVIEW_PAGE
from lora_pipeline.runs.instance import instance
from lora_pipeline.runs.jobs import run_job

CHROMIUM = Path("/usr/bin/chromium")
VERSION = "hardware-design-aesthetic-v1"  # 8 images of batch curated-2026-10

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium: `make test` installs it")


def _visible_images(page) -> list[str]:
    rows = "#rows tbody tr:not([hidden])"
    return page.eval_on_selector_all(rows, "rows => rows.map(r => r.querySelector('code').textContent)")


def test_the_review_page_filters_by_finding(sample_root):
    from playwright.sync_api import sync_playwright

    sidecar = sample_root.batch("curated-2026-10") / "cur-04-cream.txt"
    sidecar.chmod(0o644)
    sidecar.write_text("hdaesth, top view, appliance, glossy finish\n")  # a banned word: an error finding
    inst = instance()
    inst.add_dynamic_partitions("dataset_versions", [VERSION])
    outcome = run_job("build_dataset_job", VERSION, inst, quiet=True)
    page_path = sample_root.dataset(VERSION) / REVIEW_PAGE
    assert outcome.metadata("dataset_report")["review_page"] == page_path.resolve().as_uri()  # the UI links it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_path.as_uri())
            assert page.title() == f"Caption review: {VERSION}"
            assert len(_visible_images(page)) == 8 and page.text_content("#shown") == "8 shown"
            first = page.locator("#rows tbody tr img").first
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle())

            page.select_option("#finding", "banned_word")
            assert _visible_images(page) == ["img/10_hdaesth/cur-04-cream.png"]
            assert page.text_content("#shown") == "1 shown"
            row = page.locator("#rows tbody tr:not([hidden])")
            assert "banned_word" in row.locator(".error").first.text_content()
            assert "appliance" in row.locator(".caption").text_content()

            page.select_option("#finding", "*")  # any finding: at least the banned word
            rows = page.locator("#rows tbody tr").evaluate_all(
                "rows => rows.map(r => [r.querySelector('code').textContent, r.dataset.findings])"
            )
            assert _visible_images(page) == [image for image, findings in rows if findings]
            assert "img/10_hdaesth/cur-04-cream.png" in _visible_images(page)
            page.select_option("#finding", "")
            assert len(_visible_images(page)) == 8
        finally:
            browser.close()
