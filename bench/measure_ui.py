"""Measure the app as a user meets it, in headless Chromium: ``make run`` (warm venv) → first
Directions chart, steering slider release → first steered token, and the default validation's
wall time. Not a test (no asserts on time).

    .venv/bin/python -m bench.measure_ui [--runs 1]

Starts ``make run`` on a free port with a fresh, empty activation cache (the converted embedded
model is reused, as on any machine after the first start), walks the same path as
``tests/test_e2e.py`` (:mod:`tests.browser_walk`) and prints one JSON line per run with the load
average beside it: figures taken while other processes run are inflated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.browser_walk import ARGS, CHROMIUM, REPO, free_port, wait_healthy, walk


def one_run() -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        if (REPO / "cache" / "models").is_dir():
            (cache / "models").symlink_to(REPO / "cache" / "models", target_is_directory=True)
        port = free_port()
        env = {**os.environ, "REFUSAL_CACHE_DIR": str(cache)}
        started = time.perf_counter()
        proc = subprocess.Popen(["make", "-s", "run", f"PORT={port}"], cwd=REPO, env=env,
                                stdout=open(Path(tmp) / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            healthy = wait_healthy(f"http://127.0.0.1:{port}", proc)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                timings = walk(browser, f"http://localhost:{port}", started, Path(tmp),
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
