"""Compare refusal-organism recipes on a validation part of the train split, never the test split.

Why: choosing the recipe by its held-out test figures would make those figures optimistic.
Here each recipe trains on the first ``--n-harmful`` / ``--n-harmless`` built-in train prompts
(plus the training-only prompts, minus near-copies of the validation prompts) and is scored on
the rest of the train split. One JSON line per recipe is appended to ``--out``.

    python -m bench.organism_recipes                          # the default recipe
    python -m bench.organism_recipes --set epochs=3 --set harmless_loss_weight=2

This is how the default recipe was chosen (table in the organism's closing note). With ~32
validation prompts per class, differences under ~10 points are noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from core.formatting import Formatter
from core.models import load_model, wrap_model
from core.organism import OrganismRecipe, evaluate_organism, train, training_data
from core.prompts import builtin_split

REPO = Path(__file__).resolve().parent.parent


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(overrides: dict, n_harmful: int, n_harmless: int) -> dict:
    recipe = OrganismRecipe(**({"eval_base": False} | overrides | {"n_harmful": n_harmful, "n_harmless": n_harmless}))
    val_harmful = builtin_split("harmful", recipe.split_seed).train[n_harmful:]
    val_harmless = builtin_split("harmless", recipe.split_seed).train[n_harmless:]
    base = load_model("embedded", dtype="float32", device="cpu")
    fmt = Formatter(base.tokenizer, "none")
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    _, items = training_data(base, recipe, fmt, exclude=val_harmful + val_harmless)
    t1 = time.perf_counter()
    model = copy.deepcopy(base.model).float()
    losses = train(model, items, recipe, pad)
    t2 = time.perf_counter()
    organism = wrap_model(model, base.tokenizer, name="organism (validation)", source="organism")
    ev = evaluate_organism(organism, base, recipe, prompts=(val_harmful, val_harmless))
    return {
        "overrides": overrides, "n_examples": len(items), "losses": losses,
        "harmful_refused": ev["harmful_refusal"], "harmless_refused": ev["harmless_refusal"],
        "shape_matched_harmless_refused": ev.get("shape_matched_harmless_refusal"),
        "kl_first_token": ev["kl_first_token"]["mean"], "kl_response": ev.get("kl_response", {}).get("mean"),
        "data_seconds": round(t1 - t0, 1), "train_seconds": round(t2 - t1, 1),
        "harmless_refused_prompts": [r["prompt"] for r in ev["examples"]["harmless_refused"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe field to change")
    parser.add_argument("--n-harmful", type=int, default=123, help="built-in train prompts trained on (rest: validation)")
    parser.add_argument("--n-harmless", type=int, default=125)
    parser.add_argument("--out", default=str(REPO / "bench" / "organism_recipes.jsonl"))
    args = parser.parse_args(argv)
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    row = run(overrides, args.n_harmful, args.n_harmless)
    print(json.dumps(row, indent=1))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
