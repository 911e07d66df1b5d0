"""End to end in a real browser: ``streamlit run app.py`` driven by Playwright with Debian's
Chromium (headless), on the embedded model. The newcomer's walk (:mod:`browser_walk`) presses
each page's main button once with its defaults — Directions, Steering (slider, both streams,
Stop), Validation, Patching, Report downloads, Runs — checks each result and that no page shows
an exception, and saves a full-page screenshot of every page under ``screenshots/``
(git-ignored) with the measured timings in ``screenshots/e2e-timings.json``.

Chromium comes from apt (``make e2e-deps``; Playwright's own browser download does not work
here). Without it the test is skipped with the reason — except under CI (``CI`` set), where a
missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser_walk import ARGS, CHROMIUM, REPO, SHOTS, free_port, wait_healthy, walk

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _need_browser() -> None:
    if Path(CHROMIUM).is_file():
        return
    reason = f"{CHROMIUM} not found: run `make e2e-deps` (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port with a fresh activation cache (the converted embedded model is reused)."""
    _need_browser()
    cache = tmp_path_factory.mktemp("e2e-cache")
    repo_models = REPO / "cache" / "models"
    if repo_models.is_dir():
        (cache / "models").symlink_to(repo_models, target_is_directory=True)
    port = free_port()
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
        healthy = wait_healthy(url, proc)
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


def test_newcomer_walk(server, browser, tmp_path):
    timings = walk(browser, server["url"], server["started"], tmp_path, {"server_healthy_s": round(server["healthy_s"], 2)})
    timings["load_average_1_5_15"] = [round(x, 1) for x in os.getloadavg()]
    (SHOTS / "e2e-timings.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings))
