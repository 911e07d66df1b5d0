"""Speed of activation patching on the embedded model (goal: a full residual layer × position
sweep for one pair in ≤ 15 s on a 2-core CPU).

    python -m bench.bench_patching            # the figures `make bench` collects
    python -m bench.bench_patching --full     # + the no-shortcut baselines and a 20-pair sweep
    python -m bench.bench_patching --results prompted-refusal [--source embedded] [--out FILE]
                                              # the science figures: sweep over the built-in pairs
    python -m bench.bench_patching --stagger [--source gemma-3-270m]
                                              # staggered runner against full passes (CPU-s)

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


def _median(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, float, Any]:
    """(median wall seconds, median CPU seconds of this process, last result). On a shared
    machine the CPU seconds are the steadier figure; with one thread they approximate the
    wall time on an idle core."""
    out = None
    for _ in range(warmup):
        out = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


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
        secs, cpu, r = _median(lambda: patch_pair(lm, fmt, harmful, harmless, sites=("resid",)), repeats)
        out[f"resid_sweep_{key}_s"] = secs
        out[f"resid_sweep_{key}_cpu_s"] = cpu
        T, L = len(r.tokens), lm.n_layers
        detail[key] = {"tokens": T, "shared_prefix": r.shared_prefix, "patched_runs": r.n_patched,
                       "forward_passes": r.n_forward, "cells": int(r.effects["resid"].size),
                       "tokens_computed": r.n_tokens, "tokens_naive": L * T * T}
        secs, cpu, r = _median(lambda: patch_pair(lm, fmt, harmful, harmless, sites=("resid", "attn", "mlp", "head"),
                                                  by_position=("resid",)), repeats)
        out[f"all_sites_{key}_s"] = secs
        out[f"all_sites_{key}_cpu_s"] = cpu
        detail[key]["all_sites_patched_runs"] = r.n_patched
    if full:
        fmt = Formatter(lm.tokenizer, PRESETS["none"])
        t, c = time.perf_counter(), time.process_time()
        r = patch_pair(lm, fmt, harmful, harmless, sites=("resid",), prefix_cache=False, skip_shared_prefix=False)
        out["resid_sweep_none_no_shortcuts_s"] = time.perf_counter() - t
        out["resid_sweep_none_no_shortcuts_cpu_s"] = time.process_time() - c
        detail["none"]["no_shortcuts_patched_runs"] = r.n_patched
        detail["none"]["no_shortcuts_tokens_computed"] = r.n_tokens
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


def results(preset: str = "prompted-refusal", source: str = "embedded", n_pairs: int | None = None,
            sites: tuple[str, ...] = ("resid", "attn", "mlp", "head"), out: str | None = None,
            require_behaviour: bool | str = True, min_gap: float = 0.0) -> dict:
    """Patch the built-in pairs (compliant -> refusal) and summarise: counts, critical sites, time."""
    from core.formatting import PRESETS, Formatter
    from core.models import load_model
    from core.patching import patch_pairs
    from core.prompts import load_pairs

    lm = load_model(source, dtype="float32", device="cpu")
    fmt = Formatter(lm.tokenizer, PRESETS[preset])
    started = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f} s  {message}", file=sys.stderr, flush=True)

    sweep = patch_pairs(lm, fmt, load_pairs(), n_pairs=n_pairs, sites=sites, by_position=("resid",),
                        require_behaviour=require_behaviour, min_gap=min_gap, progress=progress)
    d = sweep.to_dict()
    if out:
        Path(out).write_text(json.dumps(d))
    per_pair = [p.seconds for p in sweep.pairs]
    return {
        "source": source, "preset": preset, "require_behaviour": require_behaviour, "min_gap": min_gap,
        "sites": list(sites), "n_candidates": sweep.n_candidates, "n_used": sweep.n_used,
        "exclusion_counts": sweep.exclusion_counts, "seconds": sweep.seconds,
        "median_pair_s": statistics.median(per_pair) if per_pair else None,
        "clean_scores": {"used": [[p.m_refusal, p.m_compliant] for p in sweep.pairs],
                         "excluded": [[e["m_refusal"], e["m_compliant"]] for e in sweep.excluded]},
        "critical_message": sweep.critical_message,
        "n_critical": len(sweep.critical), "n_tested": sweep.n_tested, "fdr": sweep.fdr,
        "by_construction": [c.label for c in sweep.by_construction],
        "critical_top": [c.to_dict() for c in sweep.critical[:30]],
        "load_after": os.getloadavg()[0],
    }


def stagger(source: str = "embedded", n_pairs: int = 2, rounds: int = 2) -> dict:
    """CPU seconds of the default per-pair sweep (resid by position, attn, mlp) with the staggered
    runner (each patched row joins at its own block) and without it (every row runs every
    block), both presets, one thread, the two interleaved (reversed every other round) so that a
    busy machine slows them alike; with the block-token counts and the largest score difference."""
    import numpy as np
    import torch

    from core.formatting import PRESETS, Formatter
    from core.models import load_model
    from core.patching import patch_pair, staggered
    from core.prompts import load_pairs

    torch.set_num_threads(1)
    lm = load_model(source, dtype="float32", device="cpu")
    pairs = load_pairs()[:n_pairs]
    known = staggered.KNOWN
    out: dict[str, Any] = {"source": source, "n_pairs": n_pairs, "rounds": rounds, "threads": 1,
                           "load_before": os.getloadavg()[0]}
    modes = ("staggered", "full")
    try:
        for preset in ("prompted-refusal", "none"):
            fmt = Formatter(lm.tokenizer, PRESETS[preset])
            cpu = dict.fromkeys(modes, 0.0)
            scores: dict[str, list] = {}
            blocks: dict[str, int] = {}
            for k in range(rounds):
                for mode in (modes if k % 2 == 0 else modes[::-1]):
                    staggered.KNOWN = known if mode == "staggered" else frozenset()
                    c = time.process_time()
                    rs = [patch_pair(lm, fmt, a, b, sites=("resid", "attn", "mlp"), by_position=("resid",))
                          for a, b in pairs]
                    cpu[mode] += time.process_time() - c
                    scores[mode] = [r.scores for r in rs]
                    blocks[mode] = sum(r.n_block_tokens for r in rs)
            diff = max(float(np.nanmax(np.abs(x[site] - y[site])))
                       for x, y in zip(scores["staggered"], scores["full"]) for site in x)
            out[preset] = {"cpu_s": {m: cpu[m] / rounds for m in modes}, "block_tokens": blocks,
                           "ratio_cpu": cpu["staggered"] / cpu["full"], "max_abs_score_diff": diff}
    finally:
        staggered.KNOWN = known
    out["load_after"] = os.getloadavg()[0]
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also the slow no-shortcut baselines and 20 pairs")
    parser.add_argument("--results", metavar="PRESET", help="sweep the built-in pairs with this preamble preset")
    parser.add_argument("--source", default="embedded")
    parser.add_argument("--n-pairs", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the sweep's to_dict() JSON here")
    parser.add_argument("--sites", default="resid,attn,mlp,head")
    parser.add_argument("--relative", type=float, default=None, metavar="MIN_GAP",
                        help="keep pairs whose refusal score exceeds the compliant one by MIN_GAP (not the default rule)")
    parser.add_argument("--stagger", action="store_true", help="time the staggered runner against full passes")
    args = parser.parse_args()
    if args.stagger:
        print(json.dumps(stagger(args.source), indent=2))
    elif args.results:
        rule = dict(require_behaviour="relative", min_gap=args.relative) if args.relative is not None else {}
        print(json.dumps(results(args.results, args.source, args.n_pairs, tuple(args.sites.split(",")),
                                 out=args.out, **rule), indent=2))
    else:
        print(json.dumps(run(args.repeats, args.full), indent=2))
