"""Measure the app as a user meets it: ``make run`` (warm venv) → first chart, and steering
slider release → first steered token, in headless Chromium. Not a test (no asserts on time).

    .venv/bin/python tests/measure_ui.py [--runs 1]

Starts ``make run`` on a free port with a fresh, empty activation cache (the converted embedded
model is reused, as on any machine after the first start), drives the same path as
``tests/test_e2e.py`` and prints one JSON line per run with the load average beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from test_e2e import ARGS, CHROMIUM, REPO, _free_port, _wait_healthy, browser_flow  # noqa: E402


def one_run() -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        if (REPO / "cache" / "models").is_dir():
            (cache / "models").symlink_to(REPO / "cache" / "models", target_is_directory=True)
        port = _free_port()
        env = {**os.environ, "REFUSAL_CACHE_DIR": str(cache)}
        started = time.perf_counter()
        proc = subprocess.Popen(["make", "-s", "run", f"PORT={port}"], cwd=REPO, env=env,
                                stdout=open(Path(tmp) / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            healthy = _wait_healthy(f"http://127.0.0.1:{port}", proc)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                timings = browser_flow(browser, f"http://localhost:{port}", started, Path(tmp),
                                       {"make_run_to_healthy_s": round(healthy, 2)})
                browser.close()
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    timings["load_average_1_5_15"] = [round(x, 1) for x in os.getloadavg()]
    timings["cpus"] = os.cpu_count()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.runs):
        print(json.dumps(one_run()), flush=True)


if __name__ == "__main__":
    main()
