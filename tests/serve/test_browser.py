"""The web viewer end to end: headless Debian Chromium (Playwright) against a real server."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
KEY = "browser-test-key"


def test_viewer_upload_heatmap_slider_review(system_program, server_factory, jpegs, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    chromium = system_program("chromium", "chromium", [CHROMIUM])
    server = server_factory(api_key=KEY)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            expect(page.locator("#status")).to_have_text("enter the API key to start")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.set_input_files("#file-input", str(jpegs[1]))

            expect(page.locator("#label")).to_have_text(re.compile(r"^(NORMAL|PNEUMONIA)$"), timeout=30_000)
            expect(page.locator("#status")).to_contain_text("1 file(s) analysed")
            prob = float(page.text_content("#probability"))
            assert 0.0 <= prob <= 1.0
            heat = page.locator("#heatmap")
            expect(heat).to_be_visible()
            page.wait_for_function("document.getElementById('heatmap').complete")
            assert heat.evaluate("img => img.naturalWidth") == 224
            assert page.locator("#image").evaluate("img => img.naturalWidth") == 224

            page.locator("#opacity").fill("30")
            assert heat.evaluate("img => img.style.opacity") == "0.3"

            row = page.locator("#studies tbody tr")
            expect(row).to_have_count(1)
            expect(row.locator(".review-cell")).to_have_text("not reviewed")
            expect(row.locator(".file-cell")).to_have_text(jpegs[1].name)  # rows are told apart by file name
            expect(row.locator(".patient-cell")).to_have_text("–")  # a JPEG has no patient id
            page.fill("#reviewer", "Dr Playwright")
            page.click("#agree")
            expect(page.locator("#review-status")).to_have_text("agreed (Dr Playwright)")
            expect(row.locator(".review-cell")).to_have_text("agreed (Dr Playwright)")

            shot = tmp_path / "viewer.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
            assert errors == []
        finally:
            browser.close()
