"""selfflow serve's web page in a real browser: Debian's chromium driven by Playwright (its own browser
download is never used: ``executable_path``). Skipped, with the reason, where either is missing;
``.ci/run`` installs chromium with apt-get.

``SELFFLOW_SCREENSHOT=path.png`` also writes the screenshot there, and ``SELFFLOW_SERVE_CKPT`` serves that
digits model instead of the test's own; docs/serve_page.png was made with
``SELFFLOW_SCREENSHOT=docs/serve_page.png SELFFLOW_SERVE_CKPT=runs/quickstart/student pytest tests/test_serve_browser.py``.
"""
import os
import shutil
from pathlib import Path

import pytest

from support import fit, free_port, tiny_run
from test_serve import start_server

CHROMIUM = os.environ.get("SELFFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives chromium with playwright (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def test_the_page_fills_its_grid_with_decoded_pngs(browser, tmp_path):
    ckpt = os.environ.get("SELFFLOW_SERVE_CKPT")
    if not ckpt:
        ckpt = tmp_path / "run"
        fit(tiny_run(ckpt, train={"steps": 2}))
    port = free_port()
    server = start_server(ckpt, port)
    offsite = []
    try:
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.on("request", lambda request: offsite.append(request.url)
                if not request.url.startswith(("data:", f"http://127.0.0.1:{port}/")) else None)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelectorAll('#label option').length === 11", timeout=30_000)
        assert page.is_visible("#label") and not page.is_visible("#prompt")  # a class model: a class picker
        page.select_option("#label", "7")
        page.fill("#n", "8")
        page.fill("#seed", "3")
        page.click("#generate")
        page.wait_for_selector("#status[data-done='8']", timeout=60_000)
        widths = page.eval_on_selector_all("#grid img", "images => images.map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)])")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        if os.environ.get("SELFFLOW_SCREENSHOT"):
            shutil.copyfile(tmp_path / "page.png", os.environ["SELFFLOW_SCREENSHOT"])
        captions = page.eval_on_selector_all("#grid .cell div", "cells => cells.map(c => c.textContent)")
    finally:
        server.terminate()
        server.wait(60)
    assert widths == [[True, 8, "data:image/png;base64,"]] * 8  # 8×8 PNGs the browser decoded
    assert all(text.startswith(f"seed {3 + k}, class 7") and text.endswith("ms") for k, text in enumerate(captions))
    assert (tmp_path / "page.png").stat().st_size > 1000
    assert not offsite, f"the page fetched from outside the server: {offsite}"
    assert server.returncode == 0
