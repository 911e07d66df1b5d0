"""Why directional ablation broke Gemma 3 (KL ~12 nats on harmless prompts), and what fixes it.

Fits the refusal direction on built-in *train* prompts, then measures KL(clean ‖ ablated) of the
first response token on *validation* harmless prompts (test prompts are never used here) under
several ways of ablating, with a random direction of equal norm as the control:

* ``old``: the embeddings, every block output, and the outputs of every attention and MLP module
  (what core.steering did before it knew about post-norms);
* ``writes``: every write into the residual stream, i.e. the embeddings and, per block, the
  modules whose output is added to it (:func:`core.steering.residual_writers`);
* ``writes+blocks``: both (what ``ablate`` does now).

It also prints the diagnostics behind the explanation: the scaled embedding, the massive-
activation dimensions of the residual stream and how much of the direction sits on them, and the
mean and spread of the projection on the direction per layer.

    python -m bench.gemma_ablation --model gemma-3-270m --n-train 32 --n-kl 16
    python -m bench.gemma_ablation --centred --layers 4,10 --n-train 24 --n-kl 12

``--centred`` instead compares plain and *centred* projection ablation (x − ((x − μ)·v̂) v̂, μ the
mean train activation at the last token of that layer, the first position left alone), at one
block output and at every block output: how much of the damage is the massive mean component.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from core.activations import collect_activations, make_formatter
from core.directions import fit_directions
from core.generation import next_token_logits
from core.metrics import kl_divergence
from core.models import load_model
from core.prompts import builtin_three_way
from core.steering import _ablate_fn, embedding_modules, random_direction, residual_writers


def _centred_fn(unit: np.ndarray, mean_projection: float):
    """Ablation of the projection's deviation from ``mean_projection``; position 0 untouched."""
    import torch

    v = torch.tensor(unit, dtype=torch.float32)

    def edit(hidden, name):
        h = hidden.float()
        out = h - ((h @ v) - mean_projection).unsqueeze(-1) * v
        out[:, 0] = h[:, 0]
        return out.to(hidden.dtype)

    return edit


def centred_comparison(lm, fmt, harmless, clean, both: np.ndarray, dirs, layers) -> None:
    """KL of plain vs centred ablation, at one block output and at all of them (``--centred``)."""
    for layer in layers:
        u = dirs.direction(layer)
        for label, vec in (("refusal", u / np.linalg.norm(u)), ("random", random_direction(lm.d_model, seed=layer))):
            vec = vec / np.linalg.norm(vec)
            means = [float((both[:, i] @ vec).mean()) for i in range(lm.n_layers)]
            variants = {
                "plain, one layer": {lm.block_names[layer]: _ablate_fn(vec, 1.0)},
                "centred, one layer": {lm.block_names[layer]: _centred_fn(vec, means[layer])},
                "plain, every block": {n: _ablate_fn(vec, 1.0) for n in lm.block_names},
                "centred, every block": {n: _centred_fn(vec, means[i]) for i, n in enumerate(lm.block_names)},
            }
            row = {name: round(float(np.mean(kl_divergence(clean, next_token_logits(lm, fmt, harmless, edits=e)))), 3)
                   for name, e in variants.items()}
            print(json.dumps({"layer": layer, "direction": label, **row}), flush=True)


def _variants(lm) -> dict[str, list[str]]:
    emb = embedding_modules(lm)
    old = [*emb, *lm.block_names, *(n for n in lm.attn_names if n), *(n for n in lm.mlp_names if n)]
    writes = [*emb, *residual_writers(lm)]
    return {"old": old, "writes": writes, "writes+blocks": [*writes, *lm.block_names]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-train", type=int, default=32, help="train prompts per class (the direction)")
    ap.add_argument("--n-kl", type=int, default=16, help="validation harmless prompts (the KL)")
    ap.add_argument("--layers", default="", help="comma-separated layers (default: every third, and the best)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--centred", action="store_true", help="plain vs centred ablation (see the module docstring)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype)
    fmt = make_formatter(lm, None)
    h, b = builtin_three_way("harmful"), builtin_three_way("harmless")
    acts_h = collect_activations(lm, h.train[: args.n_train], formatter=fmt)
    acts_b = collect_activations(lm, b.train[: args.n_train], formatter=fmt)
    dirs = fit_directions(acts_h, acts_b, probe_folds=2)
    harmless = b.validation[: args.n_kl]
    clean = next_token_logits(lm, fmt, harmless)

    # diagnostics on the residual stream (train activations of both classes)
    both = np.concatenate([acts_h, acts_b])  # [n, L, d]
    emb = lm.model.get_input_embeddings()
    print(f"model {lm.name}: {lm.n_layers} layers, d={lm.d_model}, embedding {type(emb).__name__}"
          f" scale={float(getattr(emb, 'embed_scale', 1.0)):.2f}")
    print(f"residual writers per block: {residual_writers(lm)[:2]}")
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        layers = sorted(set(range(1, lm.n_layers - 1, 3)))
    if args.centred:
        centred_comparison(lm, fmt, harmless, clean, both, dirs, layers)
        print(f"{len(harmless)} validation harmless prompts; {time.perf_counter() - t0:.0f} s")
        return
    rows = []
    for layer in layers:
        u = dirs.direction(layer)
        mean_abs = np.abs(both[:, layer]).mean(0)
        top = np.argsort(-mean_abs)[:4]
        proj = both[:, layer] @ u
        ratio = mean_abs[top[0]] / np.median(mean_abs)
        row = {"layer": layer, "top_dims": top.tolist(), "top_over_median": float(ratio),
               "direction_mass_on_top4": float((u[top] ** 2).sum()),
               "proj_mean": float(proj.mean()), "proj_std": float(proj.std()),
               "mean_norm": float(dirs.mean_norm[layer])}
        rnd = random_direction(lm.d_model, seed=layer)
        for name, modules in _variants(lm).items():
            for label, vec in (("", u), ("random ", rnd)):
                fn = _ablate_fn(vec / np.linalg.norm(vec), 1.0)
                logits = next_token_logits(lm, fmt, harmless, edits={m: fn for m in modules})
                row[f"kl {label}{name}"] = float(np.mean(kl_divergence(clean, logits)))
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print(f"{len(harmless)} validation harmless prompts, {args.n_train}+{args.n_train} train prompts; "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
