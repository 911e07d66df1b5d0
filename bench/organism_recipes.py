"""Compare refusal-organism recipes on the organism's validation split, never the test split.

Why: choosing the recipe by its held-out test figures would make those figures optimistic.
Each recipe trains exactly as the real build does (the built-in train split with validation
carved out, plus the training-only prompts) and is scored on that validation split, which the
organism never sees. One JSON line per recipe is appended to ``--out``.

    python -m bench.organism_recipes                          # the default recipe
    python -m bench.organism_recipes --set frozen_fraction=0 --set epochs=3

With ~38 validation prompts per class, differences under ~10 points are noise. Each phase is
reported in wall and CPU seconds (the latter comparable on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from core.formatting import Formatter
from core.models import load_model, wrap_model
from core.organism import OrganismRecipe, evaluate_organism, organism_splits, trained_weights
from core.threads import AdaptiveThreads

REPO = Path(__file__).resolve().parent.parent


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(overrides: dict) -> dict:
    """Build the organism with the default recipe changed by ``overrides`` and score it on the
    organism's *validation* split (carved out of the built-in train split, never trained on)."""
    recipe = OrganismRecipe(**({"eval_base": False} | overrides))
    splits = organism_splits(recipe.split_seed, recipe.validation_fraction)
    val_harmful, val_harmless = splits["harmful"].validation, splits["harmless"].validation
    base = load_model("embedded", dtype="float32", device="cpu")
    fmt = Formatter(base.tokenizer, "none")
    policy = AdaptiveThreads.from_request(None)
    load_start = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    steps: dict[str, float] = {}
    _, items, model, losses, frozen = trained_weights(base, recipe, fmt, threads=policy, timings=steps)
    t2, c2 = time.perf_counter(), time.process_time()
    organism = wrap_model(model, base.tokenizer, name="organism (validation)", source="organism")
    ev = evaluate_organism(organism, base, recipe, prompts=(val_harmful, val_harmless))
    t3, c3 = time.perf_counter(), time.process_time()
    return {
        "overrides": overrides, "split": "validation", "n_examples": len(items), "losses": losses,
        "harmful_refused": ev["harmful_refusal"], "harmless_refused": ev["harmless_refusal"],
        "shape_matched_harmless_refused": ev.get("shape_matched_harmless_refusal"),
        "kl_first_token": ev["kl_first_token"]["mean"], "kl_response": ev.get("kl_response", {}).get("mean"),
        "data_seconds": round(steps["answers_seconds"] + steps["teacher_seconds"], 1),
        "train_seconds": round(steps["train_seconds"], 1),
        "eval_seconds": round(t3 - t2, 1), "total_seconds": round(t3 - t0, 1),
        # CPU seconds of this process (all its threads): comparable across runs on a shared machine
        "data_and_train_cpu_seconds": round(c2 - c0, 1),
        "eval_cpu_seconds": round(c3 - c2, 1), "total_cpu_seconds": round(c3 - c0, 1),
        "load_average": [round(x, 2) for x in load_start + os.getloadavg()],
        "n_train_tokens": sum(len(t.ids) for t in items),
        "eval_timings": ev.get("timings"), "frozen_blocks": frozen.split.n_frozen if frozen else 0,
        "threads": policy.summary(),
        "harmless_refused_prompts": [r["prompt"] for r in ev["examples"]["harmless_refused"]],
        "harmful_answered": [(r["prompt"], r["response"][:80]) for r in ev["examples"]["harmful_answered"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe field to change")
    parser.add_argument("--out", default=str(REPO / "bench" / "organism_recipes.jsonl"))
    args = parser.parse_args(argv)
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    row = run(overrides)
    print(json.dumps(row, indent=1))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
