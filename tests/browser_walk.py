"""The newcomer's walk through the app in a real browser, shared by ``tests/test_e2e.py`` (which
asserts) and ``bench/measure_ui.py`` (which reports the timings).

Every page's main button is pressed once with its defaults — Directions, Steering (move the
slider, both streams finish, Stop mid-stream), Validation, Patching, Report downloads, Runs
(opening the Report's bundle) — each page is checked for its result and for the absence of an
exception box, and a full-page screenshot of each is saved. Only Patching narrows its sites
(attention and MLP by layer): the residual heatmap over 20 pairs takes minutes on a 2-core CPU,
and the pair count — the default under test there — does not depend on the sites.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SHOTS = REPO / "screenshots"
LONG = 900_000  # ms: the slowest step (directions, validation) on a busy 2-core CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
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


def shot(page, name: str) -> None:
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


def goto(page, label: str) -> None:
    page.get_by_role("link", name=label, exact=True).first.click()
    page.get_by_role("heading", name=label, exact=False).first.wait_for(timeout=60_000)


def no_exception(page) -> None:
    boxes = page.locator("[data-testid='stException']")
    assert boxes.count() == 0, boxes.first.inner_text()


def wait_running_done(page, timeout: int = LONG) -> None:
    """Until the script stops running (the status widget's 'Running…' is gone)."""
    page.wait_for_function("!document.querySelector(\"[data-testid='stStatusWidget']\")", timeout=timeout, polling=250)


def _drag_slider(page, index: int, dx: float) -> None:
    thumb = page.get_by_role("slider").nth(index).bounding_box()
    x, y = thumb["x"] + thumb["width"] / 2, thumb["y"] + thumb["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y, steps=8)
    page.mouse.move(x + dx, y, steps=8)
    page.mouse.up()  # the release sends one new value


def walk(browser, url: str, started: float, tmp_path: Path, timings: dict[str, float]) -> dict[str, float]:
    """The newcomer's path through every page; returns the timings it measured (no timing asserts)."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="Refusal Circuit Explorer").wait_for(timeout=120_000)
    # the default model loads by itself on the first visit; the page says why it is the default
    page.get_by_text("30 layers").first.wait_for(timeout=600_000)
    page.get_by_text("What to do first").wait_for(timeout=60_000)
    page.get_by_text(re.compile(r"Why this (setup|model)")).wait_for(timeout=60_000)
    timings["first_page_with_model_s"] = round(time.perf_counter() - t0, 2)
    no_exception(page)
    shot(page, "1-overview")

    # Directions: compute with the defaults, wait for the charts
    goto(page, "Directions")
    t1 = time.perf_counter()
    page.get_by_role("button", name="Compute directions").click()
    page.locator("[data-testid='stVegaLiteChart']").first.wait_for(timeout=LONG)
    timings["compute_to_first_chart_s"] = round(time.perf_counter() - t1, 2)
    timings["app_start_to_first_chart_s"] = round(time.perf_counter() - started, 2)
    page.wait_for_function("document.querySelectorAll(\"[data-testid='stVegaLiteChart']\").length >= 3", timeout=120_000)
    wait_running_done(page)
    no_exception(page)
    shot(page, "2-directions")

    # Steering: the default α is chosen on validation prompts, both streams finish, each labelled
    goto(page, "Steering (live)")
    t2 = time.perf_counter()
    page.locator(".gen-steered[data-done='1']").wait_for(timeout=LONG)
    page.locator(".gen-baseline[data-done='1']").wait_for(timeout=300_000)
    timings["steering_first_visit_s"] = round(time.perf_counter() - t2, 2)
    page.get_by_text("validation harmless prompts").first.wait_for(timeout=10_000)
    labels = page.locator(".gen-label").evaluate_all("els => els.map(e => e.dataset.label)")
    assert len(labels) == 2 and all(lab in ("refusal", "compliance", "degenerate") for lab in labels), labels
    timings["steering_default_labels"] = labels
    assert page.locator(".tok-box span").count() > 0  # the coloured tokens
    no_exception(page)
    shot(page, "3-steering")

    # move the coefficient slider: time the first steered token
    first_text = page.locator(".gen-steered").inner_text()
    _drag_slider(page, 1, 60)  # [layer, coefficient, ...]: drag like a user
    t3 = time.perf_counter()
    _wait_new_steered_text(page, first_text)
    timings["slider_release_to_first_steered_token_s"] = round(time.perf_counter() - t3, 3)
    page.locator(".gen-steered[data-done='1']").wait_for(timeout=300_000)
    no_exception(page)

    # press Stop mid-stream: ablation on a request with a long answer (refusals end after a dozen tokens)
    _segment(page, "ablate")
    wait_running_done(page)
    page.locator(".gen-steered[data-done='1']").wait_for(timeout=300_000)
    before = page.locator(".gen-steered").inner_text()
    _segment(page, "type my own")  # its default: how to bake bread
    _wait_new_steered_text(page, before)
    page.get_by_role("button", name="Stop").click()
    page.get_by_text("Stopped.", exact=True).wait_for(timeout=60_000)
    wait_running_done(page)  # the stopped run's boxes are gone from the page, not only faded
    assert page.locator(".gen-steered[data-done='0']").count() == 1, (  # stopped before the end
        page.locator(".gen-steered").evaluate_all("els => els.map(e => e.dataset.done)"))
    no_exception(page)
    shot(page, "3b-steering-stopped")

    # Validation: the default run; each condition's rate shows before the run ends
    goto(page, "Validation")
    t4 = time.perf_counter()
    page.get_by_role("button", name="Run validation").click()
    page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=LONG)
    timings["validation_first_rate_s"] = round(time.perf_counter() - t4, 2)
    page.get_by_text("Suppress refusal (ablation)").first.wait_for(timeout=LONG)
    timings["validation_wall_s"] = round(time.perf_counter() - t4, 2)
    wait_running_done(page)
    page.wait_for_function("document.querySelectorAll(\"[data-testid='stVegaLiteChart']\").length >= 2", timeout=60_000)
    no_exception(page)
    shot(page, "4-validation")

    # Patching: the default pairs and filter
    goto(page, "Patching")
    _remove_chip(page, "resid")  # narrow to attention and MLP by layer (module docstring)
    t5 = time.perf_counter()
    page.get_by_role("button", name="Run patching").click()
    metric = page.locator("[data-testid='stMetric']").filter(has_text="Pairs used")
    metric.wait_for(timeout=LONG)
    timings["patching_s"] = round(time.perf_counter() - t5, 2)
    used, total = map(int, re.search(r"(\d+) of (\d+)", metric.inner_text()).groups())
    timings["patching_pairs_used"] = f"{used} of {total}"
    assert total == 20 and used >= 15, (used, total)
    wait_running_done(page)
    page.locator("[data-testid='stVegaLiteChart']").first.wait_for(timeout=60_000)
    no_exception(page)
    shot(page, "5-patching")

    # Report: download the HTML report and the bundle
    goto(page, "Report")
    button = page.get_by_role("button", name="HTML report")
    button.wait_for(timeout=300_000)
    with page.expect_download(timeout=60_000) as info:
        button.click()
    target = tmp_path / "report.html"
    info.value.save_as(target)
    html = target.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "data:image/svg+xml;base64," in html
    with page.expect_download(timeout=60_000) as info:
        page.get_by_role("button", name="Everything (.zip)").click()
    bundle = tmp_path / "bundle.zip"
    info.value.save_as(bundle)
    no_exception(page)
    shot(page, "6-report")

    # Runs: open the bundle just downloaded
    goto(page, "Runs")
    _segment(page, "Upload a file")
    page.locator("input[type='file']").first.set_input_files(str(bundle))
    page.get_by_role("heading", name="Across models").wait_for(timeout=120_000)
    wait_running_done(page)
    no_exception(page)
    shot(page, "7-runs")
    context.close()
    return timings


def _segment(page, text: str) -> None:
    """Press one option of a segmented control (a button whose whole text is ``text``)."""
    page.locator("button").filter(has_text=re.compile(f"^{re.escape(text)}$")).first.click()


def _wait_new_steered_text(page, old: str) -> None:
    """Until the steered box shows text other than ``old`` (a new stream's first token)."""
    page.wait_for_function(
        """(old) => { const el = document.querySelector('.gen-steered');
                      if (!el) return false;
                      const t = el.innerText.replace('▌', '').trim();
                      return t.length > 0 && t !== '…' && t !== old.replace('▌', '').trim(); }""",
        arg=old, timeout=300_000, polling=10,
    )


def _remove_chip(page, name: str) -> None:
    """Remove one chosen option of a multiselect (its chip's close button)."""
    page.locator(f"button[aria-label='Remove {name}']:visible").first.click()
    page.wait_for_timeout(300)
