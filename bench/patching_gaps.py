"""Score gaps of the built-in patching pairs: how many pairs each ``min_gap`` keeps.

The normalised patching effect divides by the pair's score gap (refusal score of the harmful
prompt minus that of its harmless twin, in log-odds), so a pair with a tiny gap turns small
score changes into huge effects and dominates the mean over pairs. This prints the gaps of
the pairs that pass each behaviour filter (strict: harmful > 0 > harmless; relative: harmful >
harmless) and how many survive each candidate ``min_gap``; it needs only the two clean runs per
pair (seconds), no patching.

    python -m bench.patching_gaps [--preset prompted-refusal] [--source embedded]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CANDIDATES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def gaps(preset: str = "prompted-refusal", source: str = "embedded") -> dict:
    """Clean refusal scores of every built-in pair, the behaving pairs' gaps and the survivors per min_gap."""
    import numpy as np

    from core.formatting import PRESETS, Formatter
    from core.generation import next_token_logits
    from core.metrics import refusal_score, refusal_token_ids
    from core.models import load_model
    from core.prompts import load_pairs

    lm = load_model(source, dtype="float32", device="cpu")
    fmt = Formatter(lm.tokenizer, PRESETS[preset])
    pairs = load_pairs()
    ids = refusal_token_ids(lm.tokenizer)
    harmful = refusal_score(next_token_logits(lm, fmt, [h for h, _ in pairs]), ids)
    harmless = refusal_score(next_token_logits(lm, fmt, [b for _, b in pairs]), ids)
    harmful, harmless = np.asarray(harmful, dtype=float), np.asarray(harmless, dtype=float)
    gap = harmful - harmless
    out: dict = {"source": source, "preset": preset, "n_pairs": len(pairs)}
    for rule, keep in (("strict", (harmful > 0) & (harmless < 0)), ("relative", gap > 0)):
        g = np.sort(gap[keep])
        out[rule] = {
            "n_kept": int(keep.sum()),
            "gap_quantiles": {q: round(float(np.quantile(g, q)), 3) for q in (0.0, 0.1, 0.5, 0.9, 1.0)} if g.size else {},
            "gaps_sorted": [round(float(x), 3) for x in g],
            "kept_by_min_gap": {str(m): int((g >= m).sum()) for m in CANDIDATES},
            "first_20_pairs_kept_by_min_gap": {str(m): int((gap[:20][keep[:20]] >= m).sum()) for m in CANDIDATES},
        }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="prompted-refusal")
    parser.add_argument("--source", default="embedded")
    args = parser.parse_args()
    print(json.dumps(gaps(args.preset, args.source), indent=2))
