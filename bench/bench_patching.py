"""Speed of activation patching on the embedded model (issue 4: full residual layer × position
sweep for one pair in ≤ 15 s on a 2-core CPU).

    python -m bench.bench_patching            # the figures `make bench` collects
    python -m bench.bench_patching --full     # + the no-shortcut baselines and a 20-pair sweep

Figures are medians of ``repeats`` runs after one warm-up. The load average is recorded next
to them because the development machine is shared: compare timings only at similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _median(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run(repeats: int = 3, full: bool = False) -> dict:
    """Timings (seconds) of one-pair sweeps on the embedded model, fp32 on the CPU."""
    import torch

    from core.formatting import PRESETS, Formatter
    from core.models import load_model
    from core.patching import patch_pair, patch_pairs
    from core.prompts import load_pairs

    lm = load_model("embedded", dtype="float32", device="cpu")
    harmful, harmless = load_pairs()[0]
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0]}
    detail: dict[str, Any] = {"pair": [harmful, harmless]}
    for preset, key in (("none", "none"), ("prompted-refusal", "prompted")):
        fmt = Formatter(lm.tokenizer, PRESETS[preset])
        secs, r = _median(lambda: patch_pair(lm, fmt, harmful, harmless, sites=("resid",)), repeats)
        out[f"resid_sweep_{key}_s"] = secs
        detail[key] = {"tokens": len(r.tokens), "shared_prefix": r.shared_prefix, "patched_runs": r.n_patched,
                       "forward_passes": r.n_forward, "cells": int(r.effects["resid"].size)}
        secs, r = _median(lambda: patch_pair(lm, fmt, harmful, harmless, sites=("resid", "attn", "mlp", "head"),
                                             by_position=("resid",)), repeats)
        out[f"all_sites_{key}_s"] = secs
        detail[key]["all_sites_patched_runs"] = r.n_patched
    if full:
        fmt = Formatter(lm.tokenizer, PRESETS["none"])
        t = time.perf_counter()
        r = patch_pair(lm, fmt, harmful, harmless, sites=("resid",), prefix_cache=False, skip_shared_prefix=False)
        out["resid_sweep_none_no_shortcuts_s"] = time.perf_counter() - t
        detail["none"]["no_shortcuts_patched_runs"] = r.n_patched
        fmt = Formatter(lm.tokenizer, PRESETS["prompted-refusal"])
        t = time.perf_counter()
        patch_pair(lm, fmt, harmful, harmless, sites=("resid",), prefix_cache=False)
        out["resid_sweep_prompted_no_prefix_cache_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sweep = patch_pairs(lm, fmt, load_pairs(), n_pairs=20, sites=("resid", "attn", "mlp"))
        out["sweep_20_pairs_prompted_s"] = time.perf_counter() - t
        detail["sweep_20_pairs"] = {"n_used": sweep.n_used, "n_excluded": sweep.n_excluded}
    out["load_after"] = os.getloadavg()[0]
    out["detail"] = detail
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also the slow no-shortcut baselines and 20 pairs")
    args = parser.parse_args()
    print(json.dumps(run(args.repeats, args.full), indent=2))
