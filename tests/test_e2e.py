"""End to end in a real browser: ``streamlit run app.py`` driven by Playwright with Debian's
Chromium (headless), on the embedded model. Computes directions, moves the steering slider and
sees a steered generation appear, downloads the report, and saves a screenshot of every page
under ``screenshots/`` (git-ignored) with the measured timings in ``screenshots/e2e-timings.json``.

Chromium comes from apt (``make e2e-deps``; Playwright's own browser download does not work
here). Without it the test is skipped with the reason — except under CI (``CI`` set), where a
missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SHOTS = REPO / "screenshots"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _need_browser() -> None:
    if Path(CHROMIUM).is_file():
        return
    reason = f"{CHROMIUM} not found: run `make e2e-deps` (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the app did not become healthy")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port with a fresh activation cache (the converted embedded model is reused)."""
    _need_browser()
    cache = tmp_path_factory.mktemp("e2e-cache")
    repo_models = REPO / "cache" / "models"
    if repo_models.is_dir():
        (cache / "models").symlink_to(repo_models, target_is_directory=True)
    port = _free_port()
    env = {**os.environ, "REFUSAL_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path_factory.mktemp("e2e-log") / "streamlit.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        healthy = _wait_healthy(url, proc)
        yield {"url": url, "started": started, "healthy_s": healthy, "log": log.name}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _shot(page, name: str) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its own container, so the
    viewport is stretched to the content's height for the picture."""
    SHOTS.mkdir(exist_ok=True)
    page.wait_for_timeout(500)  # let Vega finish drawing
    size = page.viewport_size
    height = page.evaluate(
        "Math.max(...[...document.querySelectorAll(\"[data-testid='stMain'], [data-testid='stMainBlockContainer']\")]"
        ".map(e => e.scrollHeight), 600)")
    page.set_viewport_size({"width": size["width"], "height": min(int(height) + 80, 7000)})
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    page.set_viewport_size(size)


def _goto(page, label: str) -> None:
    page.get_by_role("link", name=label, exact=True).first.click()
    page.get_by_role("heading", name=label, exact=False).first.wait_for(timeout=60_000)


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0


def browser_flow(browser, url: str, started: float, tmp_path: Path, timings: dict[str, float]) -> dict[str, float]:
    """The user's path through every page; returns the timings it measured (no timing asserts)."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="Refusal Circuit Explorer").wait_for(timeout=120_000)
    # the embedded model loads by itself on the first visit
    page.get_by_text("30 layers").first.wait_for(timeout=180_000)
    page.get_by_text("What to do first").wait_for(timeout=60_000)
    timings["first_page_with_model_s"] = round(time.perf_counter() - t0, 2)
    _no_exception(page)
    _shot(page, "1-overview")

    # Directions: compute, wait for the first chart
    _goto(page, "Directions")
    t1 = time.perf_counter()
    page.get_by_role("button", name="Compute directions").click()
    page.locator("[data-testid='stVegaLiteChart']").first.wait_for(timeout=600_000)
    timings["compute_to_first_chart_s"] = round(time.perf_counter() - t1, 2)
    timings["app_start_to_first_chart_s"] = round(time.perf_counter() - started, 2)
    page.wait_for_function("document.querySelectorAll(\"[data-testid='stVegaLiteChart']\").length >= 3", timeout=60_000)
    _no_exception(page)
    _shot(page, "2-directions")

    # Steering: first generation, then move the slider and time the first steered token
    _goto(page, "Steering (live)")
    steered = page.locator(".gen-steered")
    page.locator(".gen-steered[data-done='1']").wait_for(timeout=300_000)
    first_text = steered.inner_text()
    thumb = page.get_by_role("slider").nth(1).bounding_box()  # [layer, coefficient, ...]: drag like a user
    x, y = thumb["x"] + thumb["width"] / 2, thumb["y"] + thumb["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y, steps=8)
    page.mouse.move(x + 80, y, steps=8)
    page.mouse.up()  # the release sends one new value
    t2 = time.perf_counter()
    page.wait_for_function(
        """(old) => { const el = document.querySelector('.gen-steered');
                      if (!el) return false;
                      const t = el.innerText.replace('▌', '').trim();
                      return t.length > 0 && t !== '…' && t !== old.trim(); }""",
        arg=first_text, timeout=120_000, polling=10,
    )
    timings["slider_release_to_first_steered_token_s"] = round(time.perf_counter() - t2, 3)
    page.locator(".gen-steered[data-done='1']").wait_for(timeout=300_000)
    assert steered.inner_text().strip()
    assert page.locator(".tok-box span").count() > 0  # the coloured tokens
    _no_exception(page)
    _shot(page, "3-steering")

    for label, name in (("Validation", "4-validation"), ("Patching", "5-patching")):
        _goto(page, label)
        _no_exception(page)
        _shot(page, name)

    # Report: download the HTML report
    _goto(page, "Report")
    button = page.get_by_role("button", name="HTML report")
    button.wait_for(timeout=300_000)
    with page.expect_download(timeout=60_000) as info:
        button.click()
    target = tmp_path / "report.html"
    info.value.save_as(target)
    html = target.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "data:image/svg+xml;base64," in html
    _no_exception(page)
    _shot(page, "6-report")
    context.close()
    return timings


def test_browser_flow(server, browser, tmp_path):
    timings = browser_flow(browser, server["url"], server["started"], tmp_path,
                           {"server_healthy_s": round(server["healthy_s"], 2)})
    (SHOTS / "e2e-timings.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings))
