"""The web UI in a real browser: Debian's headless chromium, driven by Playwright.

Never `playwright install` (no downloads): the system chromium is used. In CI (CI=true)
a missing chromium or Playwright fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium_or_skip() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path, reason = None, "the Python package playwright is missing: pip install 'distilsd[browser-test]'"
    else:
        reason = "Debian's chromium is missing: apt-get install -y chromium"
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)
    return path


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_ui_generates_an_image_in_chromium(make_service):
    chromium = chromium_or_skip()
    pytest.importorskip("gradio", reason="needs the serve extra")
    from playwright.sync_api import sync_playwright

    from distilsd.generate.metadata import parse_a1111_parameters
    from distilsd.serve.api import create_app
    from distilsd.serve.server import serve_in_thread

    service = make_service(ui=True, api_key="ui-key")
    app = create_app(service)
    ARTIFACTS.mkdir(exist_ok=True)
    with serve_in_thread(app, service, service.settings) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(90_000)
            # The key is needed: the UI sends the browser to the sign-in page first.
            page.goto(f"{url}/ui/")
            assert page.url.endswith("/login")
            page.fill("input[name=key]", "ui-key")
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/ui/")

            # Before any run the outputs are empty (no "0" seed).
            assert page.locator("#seed-used textarea, #seed-used input").first.input_value() == ""
            # A size out of range says so instead of being clamped.
            page.locator("#prompt textarea").fill("a red circle")
            page.locator("#width input").fill("2000")
            page.locator("#generate").click()
            page.get_by_text("Width 2000 is out of range").first.wait_for(state="visible")
            page.locator("#width input").fill("64")

            page.locator("#steps input[type=number]").fill("4")
            page.locator("#seed input").fill("1234")
            page.locator("#generate").click()
            image = page.locator("#gallery img").first
            image.wait_for(state="visible")
            page.wait_for_function(
                "() => document.querySelector('#seed-used textarea, #seed-used input')?.value === '1234'"
            )
            page.screenshot(path=str(ARTIFACTS / "serve-ui.png"), full_page=True)

            # The served PNG carries its parameters (what a download gets).
            src = image.get_attribute("src")
            response = page.request.get(src if src.startswith("http") else url + src)
            assert response.ok and response.body()[:8] == b"\x89PNG\r\n\x1a\n"
            from io import BytesIO

            from PIL import Image

            parameters = Image.open(BytesIO(response.body())).text["parameters"]
            assert parse_a1111_parameters(parameters)["Seed"] == "1234"
            assert parse_a1111_parameters(parameters)["prompt"] == "a red circle"

            # Compare: the same prompt and seed on both served models, large, with the speed ratio.
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare-prompt textarea").fill("a red circle")
            page.locator("#compare-steps input[type=number]").fill("4")
            page.locator("#compare").click()
            page.wait_for_function(
                "() => /x (faster|slower) than/.test(document.querySelector('#compare-summary')?.innerText || '')"
            )
            for k in range(2):
                shown = page.locator(f"#compare-{k} img")
                shown.wait_for(state="visible")
                box = shown.bounding_box()
                assert min(box["width"], box["height"]) >= 256, box  # 64 px images, shown large
            summary = page.locator("#compare-summary").inner_text()
            assert "pipeline" in summary and "pipeline+unet:pipeline" in summary and "(reference)" in summary
            page.screenshot(path=str(ARTIFACTS / "serve-ui-compare.png"), full_page=True)

            # History: the three images of this page, each with its parameters.
            page.get_by_role("tab", name="History").click()
            page.wait_for_function("() => document.querySelectorAll('#history img').length >= 3")
            page.locator("#history img").first.click()
            page.wait_for_function(
                "() => /Seed: /.test(document.querySelector('#history-parameters textarea')?.value || '')"
            )
        except Exception:
            if "page" in locals():
                page.screenshot(path=str(ARTIFACTS / "serve-ui-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (ARTIFACTS / "serve-ui.png").stat().st_size > 10_000
