"""Choosing the refusal direction's token position and layer on validation prompts.

Arditi et al. (2024) fit a difference-of-means direction at every post-instruction token
position × every layer and keep the one that, on *validation* prompts, best removes refusal
when ablated while still inducing it when added and leaving harmless prompts alone. We do the
same, so that nothing reported on the test split was chosen by looking at it.

Layer convention. A grid layer ``l`` is the residual stream at the **input** of block ``l`` (as
Arditi et al. index it), i.e. the output of block ``l − 1``. The input of block 0 is the token
embedding, which at the post-instruction positions is the same template token for every prompt,
so it has no direction and is not a candidate. The rest of the tool (``LayerDirections``,
steering, validation) indexes block **outputs**; :attr:`GridResult.output_layer` converts the
winner (``l − 1``). "The last 20 % of layers excluded" is counted in the input convention.

Scores, per candidate direction ``r`` (raw difference of train means), on validation prompts,
from the first response token's logits (no generation):

* *bypass* — mean refusal score (:func:`core.metrics.refusal_score`, log-odds) on harmful
  prompts with ``r`` ablated everywhere (every layer, every position);
* *induce* — mean refusal score on harmless prompts with ``r`` added at the input of block ``l``;
* *KL* — mean KL(clean ‖ ablated) of the first response token on harmless prompts.

Rule (:func:`pick_winner`): keep candidates outside the last 20 % of layers with induce > 0,
KL ≤ 0.1 and bypass below the unsteered harmful score (ablation must lower refusal); the lowest
bypass wins. When nothing survives, the result says so (``found`` False) and falls back to the
candidate whose direction best separates the *validation* prompts (still no test data).

Speed: no generation, and only the first response token's logits are computed. Induce reuses
the clean run (``core.clean_run``, Llama-style models): the clean residual stream at each
candidate layer's input is computed once, and each candidate reruns only blocks ``l`` … end,
the shared preamble once per batch (other models add the vector with a hook in a full pass;
both give the same scores). Ablation changes every layer, so it is a full pass per candidate,
the preamble once per call (``core.forward``) and the harmful and harmless prompts in one
batched call. Induce is scored first, and with
``prune`` (the default) a candidate whose induce score is ≤ 0 — which the rule rejects whatever
its other scores — is not ablated at all (its bypass and KL stay blank), so the winner is the
same as with the full grid. The grid's size is set by ``positions``, ``layer_stride`` and the
number of validation prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from core.directions import separation
from core.layer_choice import DEFAULT_SKIP_LAST_FRACTION
from core.errors import SplitError
from core.prompts import MIN_VALIDATION
from core.progress import Progress


DEFAULT_MAX_KL = 0.1
# The default grid (app and batch runner alike): sized so that the whole grid, scored on the
# embedded model with the prompted-refusal preset, stays within a minute on a 2-core CPU
# (measurement and command in docs/decisions.md). 0 positions = all of them, stride 1 = every layer.
DEFAULT_POSITIONS = 2
DEFAULT_LAYER_STRIDE = 4
DEFAULT_N_PROMPTS = 32
RULE = ("lowest bypass score (harmful refusal with the direction ablated) among candidates with induce > 0, "
        "KL ≤ {max_kl:g} on harmless prompts, bypass below the unsteered score, outside the last {skip:.0%} of layers; "
        "scored on validation prompts")
FALLBACK_RULE = "largest separation of validation prompts along the direction, outside the last {skip:.0%} of layers"


def grid_layers(n_layers: int, stride: int = 1) -> list[int]:
    """Grid layers (block-input index) 1 … L−1, every ``stride``-th, always including the last."""
    if stride < 1:
        raise ValueError("layer_stride must be at least 1")
    return list(range(n_layers - 1, 0, -stride))[::-1]


def first_excluded_layer(n_layers: int, skip_last_fraction: float = DEFAULT_SKIP_LAST_FRACTION) -> int:
    """Block-input layers ≥ this are excluded (the last ``floor(L × fraction)``)."""
    if not 0 <= skip_last_fraction < 1:
        raise ValueError("skip_last_fraction must be in [0, 1)")
    return n_layers - int(np.floor(n_layers * skip_last_fraction + 1e-9))


@dataclass
class Winner:
    position_index: int
    layer_index: int
    found: bool  # False: nothing passed the filters; the fallback rule chose
    rule: str
    reason: str


def pick_winner(
    bypass: np.ndarray, induce: np.ndarray, kl: np.ndarray, val_separation: np.ndarray, excluded: np.ndarray,
    baseline_harmful: float, *, max_kl: float = DEFAULT_MAX_KL, skip_last_fraction: float = DEFAULT_SKIP_LAST_FRACTION,
) -> Winner:
    """The rule of the module docstring on ``[P, Lg]`` score arrays (``excluded``: ``[Lg]`` bool)."""
    bypass, induce, kl = (np.asarray(a, dtype=np.float64) for a in (bypass, induce, kl))
    sep = np.asarray(val_separation, dtype=np.float64)
    allowed = np.broadcast_to(~np.asarray(excluded, dtype=bool)[None, :], bypass.shape)
    scored = allowed & np.isfinite(induce)  # bypass/KL may be blank where induce ≤ 0 pruned them
    with np.errstate(invalid="ignore"):
        lowers = scored & np.isfinite(bypass) & (bypass < baseline_harmful)
        induces = scored & (induce > 0)
        gentle = scored & np.isfinite(kl) & (kl <= max_kl)
    ok = lowers & induces & gentle
    if ok.any():
        flat = np.where(ok, bypass, np.inf)
        p, l = np.unravel_index(int(np.argmin(flat)), flat.shape)
        return Winner(int(p), int(l), True, RULE.format(max_kl=max_kl, skip=skip_last_fraction),
                      f"lowest bypass score {bypass[p, l]:.2f} (unsteered {baseline_harmful:.2f}), induce {induce[p, l]:.2f}, "
                      f"KL {kl[p, l]:.3f}; {int(ok.sum())} of {int(scored.sum())} candidates passed the filters")
    counts = (f"of {int(scored.sum())} scored candidates, {int(lowers.sum())} lowered the refusal score, "
              f"{int(induces.sum())} induced refusal (induce > 0), {int(gentle.sum())} kept KL ≤ {max_kl:g}")
    plain = ("no candidate induces refusal when added" if not induces.any() else
             "no candidate lowers refusal when ablated" if not lowers.any() else "no candidate passed all the filters")
    key = np.where(allowed & np.isfinite(sep), sep, -np.inf)
    if not np.isfinite(key).any():
        key = np.where(allowed, 0.0, -np.inf)
    p, l = np.unravel_index(int(np.argmax(key)), key.shape)
    return Winner(int(p), int(l), False, FALLBACK_RULE.format(skip=skip_last_fraction),
                  f"{plain} ({counts}); fell back to the largest validation separation ({sep[p, l]:.2f}σ)")


@dataclass
class GridResult:
    """Scores of every position × layer candidate on validation prompts, and the winner."""

    positions: list[int]  # negative token offsets, e.g. [-5, …, -1]
    position_tokens: list[str]
    layers: list[int]  # block-input index (see module docstring)
    n_layers: int
    bypass: np.ndarray  # [P, Lg]
    induce: np.ndarray  # [P, Lg]
    kl: np.ndarray  # [P, Lg]
    val_separation: np.ndarray  # [P, Lg]
    excluded: np.ndarray  # [Lg] bool
    baseline_harmful: float
    baseline_harmless: float
    n_harmful: int
    n_harmless: int
    max_kl: float
    skip_last_fraction: float
    winner: Winner
    seconds: float = 0.0

    @property
    def position(self) -> int:
        return self.positions[self.winner.position_index]

    @property
    def layer(self) -> int:
        """The winner's layer, block-input convention."""
        return self.layers[self.winner.layer_index]

    @property
    def output_layer(self) -> int:
        """The winner's layer as the rest of the tool indexes it (block output = input − 1)."""
        return self.layer - 1

    def to_dict(self) -> dict[str, Any]:
        def grid(a: np.ndarray) -> list[list[float | None]]:
            return [[float(x) if np.isfinite(x) else None for x in row] for row in np.asarray(a, dtype=np.float64)]

        return {
            "positions": list(self.positions), "position_tokens": list(self.position_tokens),
            "layers": list(self.layers), "layer_convention": "residual stream at the input of block l (= output of block l-1)",
            "n_layers": self.n_layers,
            "bypass": grid(self.bypass), "induce": grid(self.induce), "kl": grid(self.kl),
            "val_separation": grid(self.val_separation), "excluded": [bool(x) for x in self.excluded],
            "baseline_harmful": self.baseline_harmful, "baseline_harmless": self.baseline_harmless,
            "n_harmful": self.n_harmful, "n_harmless": self.n_harmless, "split": "validation",
            "max_kl": self.max_kl, "skip_last_fraction": self.skip_last_fraction,
            "not_ablated": "bypass and KL are blank where induce ≤ 0 already fails the rule (pruned)",
            "winner": {"position": self.position, "position_token": self.position_tokens[self.winner.position_index],
                       "layer": self.layer, "output_layer": self.output_layer, "found": self.winner.found,
                       "rule": self.winner.rule, "reason": self.winner.reason},
            "seconds": round(self.seconds, 2),
        }


def _tokens(formatter: Any, positions: Sequence[int]) -> list[str]:
    enc = formatter.encode(["x"])
    ids = enc.input_ids[0, : enc.lengths[0]].tolist()
    tok = formatter.tokenizer
    return [tok.decode([ids[len(ids) + p]]) if -p <= len(ids) else "?" for p in positions]  # "\n", not "Ċ"


def check_validation(harmful: Sequence[str], harmless: Sequence[str], setting: str = "prompts.validation_fraction") -> None:
    """A clear error when validation cannot support a choice (empty or too small)."""
    if min(len(harmful), len(harmless)) < MIN_VALIDATION:
        raise SplitError(f"{setting}: the validation split has {len(harmful)} harmful and {len(harmless)} harmless prompts; "
                         f"choosing a position and layer needs at least {MIN_VALIDATION} per class. Raise {setting} or add prompts.")


def score_grid(
    lm: Any,
    formatter: Any,
    harmful_train: np.ndarray,
    harmless_train: np.ndarray,
    harmful_val_acts: np.ndarray,
    harmless_val_acts: np.ndarray,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    positions: Sequence[int],
    *,
    layer_stride: int = 1,
    max_kl: float = DEFAULT_MAX_KL,
    skip_last_fraction: float = DEFAULT_SKIP_LAST_FRACTION,
    batch_size: int = 16,
    prune: bool = True,
    fast: bool | None = None,
    progress: Progress | None = None,
) -> GridResult:
    """Score every candidate (module docstring). Activations are block outputs ``[n, P, L, d]``
    at ``positions`` (train: to fit; validation: for the fallback separation). ``fast`` (default:
    wherever the model supports it) scores induce from a cached clean run (``core.clean_run``);
    False forces the plain hook path, which gives the same scores up to rounding."""
    from core.generation import next_token_logits
    from core.metrics import kl_divergence, refusal_score, refusal_token_ids
    from core.steering import Intervention, edits_for
    import torch

    t0 = time.perf_counter()
    check_validation(harmful_val, harmless_val)
    h_tr, b_tr = np.asarray(harmful_train, np.float32), np.asarray(harmless_train, np.float32)
    h_va, b_va = np.asarray(harmful_val_acts, np.float32), np.asarray(harmless_val_acts, np.float32)
    n_pos, n_layers = len(positions), lm.n_layers
    for name, a in (("harmful_train", h_tr), ("harmless_train", b_tr), ("harmful_val_acts", h_va), ("harmless_val_acts", b_va)):
        if a.ndim != 4 or a.shape[1:3] != (n_pos, n_layers):
            raise ValueError(f"{name}: expected activations [n, {n_pos} positions, {n_layers} layers, d], got {a.shape}")
    layers = grid_layers(n_layers, layer_stride)
    cut = first_excluded_layer(n_layers, skip_last_fraction)
    excluded = np.array([l >= cut for l in layers])
    todo = [(pi, li) for pi in range(n_pos) for li, l in enumerate(layers) if not excluded[li]]
    harmful, harmless = list(harmful_val), list(harmless_val)
    ids = refusal_token_ids(lm.tokenizer)
    total = len(todo) + 1

    def say(done: int, message: str) -> None:
        if progress:
            progress(min(1.0, done / total), message)

    from core import clean_run

    fast = clean_run.supported(lm) if fast is None else fast
    cached = None
    if fast:  # clean states at each candidate layer's input, computed once; induce reruns only the blocks above
        cached = clean_run.CleanRun(lm, formatter, harmless, {layers[li] for _, li in todo})
        clean = torch.cat([clean_run.CleanRun(lm, formatter, harmful, ()).logits, cached.logits])
    else:
        clean = next_token_logits(lm, formatter, harmful + harmless, batch_size=batch_size)
    base_h = float(np.mean(refusal_score(clean[: len(harmful)], ids)))
    base_b = float(np.mean(refusal_score(clean[len(harmful):], ids)))
    clean_b = clean[len(harmful):]
    say(1, "unsteered validation logits")

    shape = (n_pos, len(layers))
    bypass, induce, kl, sep = (np.full(shape, np.nan) for _ in range(4))
    diff = h_tr.astype(np.float64).mean(0) - b_tr.astype(np.float64).mean(0)  # [P, L, d]
    for done, (pi, li) in enumerate(todo, start=2):
        out = layers[li] - 1  # block-output index of this block-input layer
        r = diff[pi, out]
        norm = float(np.linalg.norm(r))
        if not np.isfinite(norm) or norm == 0:
            say(done, f"position {positions[pi]}, layer {layers[li]}: no direction")
            continue
        u = r / norm
        sep[pi, li] = separation(h_va[:, pi, out] @ u, b_va[:, pi, out] @ u)
        if cached is not None:
            added = cached.logits_with_added(layers[li], r.astype(np.float32))
        else:
            added = next_token_logits(lm, formatter, harmless, batch_size=batch_size,
                                      edits=edits_for(lm, [Intervention("add", r.astype(np.float32), out, 1.0, norm)]))
        induce[pi, li] = float(np.mean(refusal_score(added, ids)))
        if prune and not induce[pi, li] > 0:
            say(done, f"position {positions[pi]}, layer {layers[li]}: induce {induce[pi, li]:.2f} ≤ 0, not ablated")
            continue
        ablated = next_token_logits(lm, formatter, harmful + harmless, batch_size=batch_size,
                                    edits=edits_for(lm, [Intervention("ablate", r.astype(np.float32), None)]))
        bypass[pi, li] = float(np.mean(refusal_score(ablated[: len(harmful)], ids)))
        kl[pi, li] = float(np.mean(kl_divergence(clean_b, ablated[len(harmful):])))
        say(done, f"position {positions[pi]}, layer {layers[li]}: bypass {bypass[pi, li]:.2f}, induce {induce[pi, li]:.2f}")

    winner = pick_winner(bypass, induce, kl, sep, excluded, base_h, max_kl=max_kl, skip_last_fraction=skip_last_fraction)
    return GridResult(
        positions=list(positions), position_tokens=_tokens(formatter, positions), layers=layers, n_layers=n_layers,
        bypass=bypass, induce=induce, kl=kl, val_separation=sep, excluded=excluded,
        baseline_harmful=base_h, baseline_harmless=base_b, n_harmful=len(harmful), n_harmless=len(harmless),
        max_kl=max_kl, skip_last_fraction=skip_last_fraction, winner=winner, seconds=time.perf_counter() - t0,
    )


def grid_positions(formatter: Any, count: int = 0) -> list[int]:
    """The post-instruction offsets to score, earliest first: all of them (``count`` 0) or the
    last ``count``."""
    offsets = sorted(formatter.post_instruction_positions())  # [-n, …, -1]
    return offsets if count <= 0 else offsets[-count:]


def select(
    lm: Any, formatter: Any, harmful_train: Sequence[str], harmless_train: Sequence[str],
    harmful_val: Sequence[str], harmless_val: Sequence[str], *, positions: int = DEFAULT_POSITIONS,
    layer_stride: int = DEFAULT_LAYER_STRIDE, n_prompts: int | None = DEFAULT_N_PROMPTS, max_kl: float = DEFAULT_MAX_KL, skip_last_fraction: float = DEFAULT_SKIP_LAST_FRACTION,
    batch_size: int = 16, prune: bool = True, fast: bool | None = None, progress: Progress | None = None,
) -> GridResult:
    """Collect the activations the grid needs and score it: the one call the batch runner and
    the Directions page make. ``n_prompts`` caps the validation prompts per class."""
    from core.activations import collect_activations

    check_validation(harmful_val, harmless_val)
    hv, bv = list(harmful_val)[:n_prompts], list(harmless_val)[:n_prompts]
    pos = grid_positions(formatter, positions)
    sets = [harmful_train, harmless_train, hv, bv]
    acts = []
    for i, prompts in enumerate(sets):
        sub = None if progress is None else (lambda f, m, i=i: progress(0.1 * (i + f) / len(sets), m))
        acts.append(collect_activations(lm, prompts, position=pos, formatter=formatter, batch_size=batch_size, progress=sub))
    sub = None if progress is None else (lambda f, m: progress(0.1 + 0.9 * f, m))
    return score_grid(lm, formatter, *acts, hv, bv, pos, layer_stride=layer_stride, max_kl=max_kl,
                      skip_last_fraction=skip_last_fraction, batch_size=batch_size, prune=prune, fast=fast,
                      progress=sub)


# ---------------------------------------------------------------------------------------
# the force coefficient, on validation prompts
# ---------------------------------------------------------------------------------------
# A coefficient whose answers on validation prompts are broken text more often than this is
# not eligible: steering that breaks the model has not forced refusal (core.judge).
MAX_DEGENERATE_RATE = 0.1


@dataclass
class CoefficientChoice:
    """The force coefficient chosen on validation harmless prompts, with the sweep behind it."""

    coefficient: float
    rule: str
    points: list[dict[str, Any]]  # {"coefficient", "rate", "degenerate": Rate.to_dict(), "eligible"}
    n: int
    split: str = "validation"

    def to_dict(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient, "rule": self.rule, "split": self.split, "n": self.n,
                "points": list(self.points)}


def pick_coefficient(coefficients: Sequence[float], refusal: Sequence[float], degenerate: Sequence[float], *,
                     target: float, max_degenerate: float = MAX_DEGENERATE_RATE) -> tuple[float, list[bool]]:
    """The rule of :func:`choose_coefficient` on rates already measured (coefficients sorted by
    size): among coefficients with a degenerate rate ≤ ``max_degenerate``, the smallest whose
    refusal rate reaches ``target``, else the highest refusal rate (the smaller on ties); when
    every coefficient breaks the model, the one with the fewest degenerate answers. Returns the
    coefficient and which coefficients were eligible."""
    eligible = [d <= max_degenerate for d in degenerate]
    pool = [i for i, ok in enumerate(eligible) if ok]
    if not pool:
        return coefficients[int(np.argmin(degenerate))], eligible
    hit = next((i for i in pool if refusal[i] >= target), None)
    if hit is None:
        hit = max(pool, key=lambda i: (refusal[i], -i))
    return coefficients[hit], eligible


def choose_coefficient(
    lm: Any, formatter: Any, dirs: Any, layer: int, harmless_val: Sequence[str], coefficients: Sequence[float], *,
    normalised: bool = True, max_new_tokens: int = 24, batch_size: int = 16, progress: Progress | None = None,
    max_degenerate: float = MAX_DEGENERATE_RATE,
) -> CoefficientChoice:
    """The force coefficient by :func:`pick_coefficient` from the judge's labels of validation
    harmless prompts steered with +α·v̂ at ``layer`` (refusals and degenerate answers counted
    apart). A single coefficient is taken as given, without generating."""
    from core.metrics import label_rates
    from core.judge import judge_all
    from core.steering import add, steered_generate
    from core.validation import FORCE_TARGET_RATE

    coefs = sorted({float(c) for c in coefficients}, key=abs)
    if not coefs:
        raise ValueError("give at least one force coefficient")
    if len(coefs) == 1:
        return CoefficientChoice(coefs[0], "the only coefficient given (steering.coefficients)", [], 0, "none (not chosen)")
    prompts = list(harmless_val)
    check_validation(prompts, prompts)
    points, refusal, degenerate = [], [], []
    for i, c in enumerate(coefs):
        out = steered_generate(lm, formatter, prompts, [add(dirs, layer, c, normalised)], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
        rates = label_rates(judge_all(out))
        refusal.append(rates["refusal"].rate)
        degenerate.append(rates["degenerate"].rate)
        points.append({"coefficient": c, "rate": rates["refusal"].to_dict(), "degenerate": rates["degenerate"].to_dict()})
        if progress:
            progress((i + 1) / len(coefs), f"add {c:g} on validation: {rates['refusal']} refused, "
                                           f"{rates['degenerate'].successes} degenerate")
    chosen, eligible = pick_coefficient(coefs, refusal, degenerate, target=FORCE_TARGET_RATE, max_degenerate=max_degenerate)
    for point, ok in zip(points, eligible):
        point["eligible"] = ok
    rule = (f"smallest coefficient whose refusal rate on validation harmless prompts reaches {FORCE_TARGET_RATE:.0%}, "
            f"else the highest rate, among those with at most {max_degenerate:.0%} degenerate answers")
    return CoefficientChoice(chosen, rule, points, len(prompts))
