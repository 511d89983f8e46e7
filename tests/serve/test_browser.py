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


def test_worklist_view_orders_unreviewed_studies_and_a_review_closes_an_item(system_program, server_factory, jpegs,
                                                                            tmp_path):
    """Five X-rays and a colour photo: the page's worklist is the API's order (likely pneumonia first, the photo
    'not assessed' and shown without a probability), and reviewing an item removes it from the list."""
    import httpx
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    chromium = system_program("chromium", "chromium", [CHROMIUM])
    server = server_factory(api_key=KEY)
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(photo)
    files = [*map(str, jpegs[:5]), str(photo)]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.set_input_files("#file-input", files)
            expect(page.locator("#status")).to_contain_text("6 file(s) analysed", timeout=60_000)
            rows = page.locator("#worklist tbody tr")
            expect(rows).to_have_count(6)
            api = httpx.get(server.url + "/worklist", headers={"X-API-Key": KEY}).json()
            order = [i["filename"] for i in api["items"]]
            assert [rows.nth(k).locator(".file-cell").text_content() for k in range(6)] == order
            tiers = [i["tier"] for i in api["items"]]
            rank = {"likely pneumonia": 1, "not assessed": 2, "likely normal": 3}
            assert [rank[t] for t in tiers] == sorted(rank[t] for t in tiers)
            photo_row = rows.nth(order.index("photo.png"))
            expect(photo_row.locator("td").nth(1)).to_have_text("not assessed")
            expect(photo_row.locator("td").nth(4)).to_have_text("not assessed")  # no probability shown
            expect(page.locator("#worklist-rule")).to_contain_text("likely pneumonia")
            rows.first.click()
            # opening a study may compute its heatmap on the server first
            expect(page.locator("#study-id")).to_have_text(api["items"][0]["study_id"], timeout=15_000)
            page.fill("#reviewer", "Dr Worklist")
            page.click("#agree")
            expect(rows).to_have_count(5)
            assert [rows.nth(k).locator(".file-cell").text_content() for k in range(5)] == order[1:]
            assert errors == []
        finally:
            browser.close()


def test_a_not_assessed_study_shows_why_never_a_probability_and_no_heatmap(system_program, server_factory, tmp_path):
    """A colour photo: the headline says 'not assessed' (not 0.99), the figures are hidden, the study list says
    'not assessed', and the page never asks for a heatmap that cannot exist."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    chromium = system_program("chromium", "chromium", [CHROMIUM])
    server = server_factory(api_key=KEY)
    photo = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(photo)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.set_input_files("#file-input", str(photo))
            expect(page.locator("#label")).to_have_text(re.compile(r"^not assessed: "), timeout=30_000)
            expect(page.locator("#figures")).to_be_hidden()
            expect(page.locator("#heatmap")).to_be_hidden()
            expect(page.locator("#legend")).to_be_hidden()
            expect(page.locator("#heatmap-note")).to_have_text("No heatmap: the model did not assess this film.")
            expect(page.locator("#warnings")).to_contain_text("colour image")
            row = page.locator("#studies tbody tr").first
            expect(row.locator("td").nth(5)).to_have_text("not assessed")
            row.click()
            expect(page.locator("#label")).to_have_text(re.compile(r"^not assessed: "))
            assert not [u for u in requests if u.endswith("/heatmap.png")], requests
        finally:
            browser.close()
