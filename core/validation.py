"""Does the direction *cause* refusal? Steering experiments against controls.

Three questions, each answered on the held-out test prompts with a seeded random direction of
equal norm as the control (a direction that moves behaviour only as much as a random one has
not been shown to be special):

* **Force refusal** — harmless prompts with +α·v̂ added at the chosen layer, for a sweep of α.
* **Suppress refusal** — harmful prompts with v̂ ablated everywhere, and with −α·v̂ at the layer.
* **Side effects** — KL divergence of the first-response-token distribution on harmless prompts,
  intervened vs clean (small = the intervention leaves ordinary behaviour alone).

Rates come from the substring judge on greedy generations (:func:`core.metrics.refusal_rate`),
each with its Wilson 95 % interval. The headline force coefficient is the *smallest* α in the
sweep whose rate reaches :data:`FORCE_TARGET_RATE` (else the α with the highest rate): the
least intervention that does the job, so the KL next to it is not inflated by overshooting.
The headline suppression is directional ablation.

:func:`scan_layers` is the fast (no generation) per-layer ablation screen that feeds
:func:`core.directions.choose_layer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from core.directions import LayerDirections, candidate_layers
from core.formatting import Formatter
from core.generation import next_token_logits
from core.metrics import Rate, kl_divergence, refusal_rate, refusal_score, refusal_token_ids
from core.models import LoadedModel
from core.steering import Intervention, ablate, add, edits_for, random_like, steered_generate, subtract

Progress = Callable[[float, str], None]

# Coefficients in normalised units (multiples of the layer's mean activation norm).
# Measured on SmolLM2-135M-Instruct, prompted-refusal preset (formatter key fb986f18…), position
# "last", layer 23 (the default rule's pick), 40+40 test prompts (/work/notes/science-results.md):
# adding 0.25 -> 77.5 % harmless refusal (random direction 12.5 %), 0.5 -> 95 % (random 30 %),
# 0.75 -> 90 % (random 0 %) with KL rising 0.20 -> 0.69 -> 1.23; an earlier run showed 1.0
# overshooting into degenerate text. The raw direction (norm 46 = 0.12 of the mean norm 373) is too
# small. Subtracting 0.5 -> 17.5 % harmful refusal (random 65 %). So the sweep brackets 0.5.
DEFAULT_FORCE_COEFFICIENTS: tuple[float, ...] = (0.25, 0.5, 0.75)
DEFAULT_SUBTRACT_COEFFICIENTS: tuple[float, ...] = (0.5,)
# The judge's refusal phrases appear in the first few tokens; 16–24 tokens suffice and keep
# validation affordable on a CPU.
DEFAULT_MAX_NEW_TOKENS = 24
FORCE_TARGET_RATE = 0.9


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


@dataclass
class SteerPoint:
    """One coefficient of a sweep: the steered rate, the random-direction control, the KL."""

    coefficient: float
    rate: Rate
    random_rate: Rate
    kl: float  # mean KL(clean ‖ steered) on harmless prompts, first response token
    random_kl: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "coefficient": self.coefficient,
            "rate": self.rate.to_dict(),
            "random_rate": self.random_rate.to_dict(),
            "kl": _f(self.kl),
            "random_kl": _f(self.random_kl),
        }


ForcePoint = SteerPoint


@dataclass
class ValidationResult:
    layer: int
    position: str | int
    method: str
    n_harmful: int
    n_harmless: int
    coefficients_normalised: bool
    scale: float  # the layer's mean activation norm (the unit of normalised coefficients)
    seed: int
    max_new_tokens: int
    baseline: dict[str, Rate]
    force: list[SteerPoint]
    suppress_ablation: dict[str, Any]  # {"rate": Rate, "random_rate": Rate, "kl_harmless": float, "random_kl_harmless": float}
    suppress_subtract: list[SteerPoint]  # rates on harmful prompts; kl on harmless
    force_coefficient: float | None
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    # -- headline numbers ----------------------------------------------------------------
    def _force_point(self) -> SteerPoint | None:
        return next((p for p in self.force if p.coefficient == self.force_coefficient), None)

    @property
    def force_refusal(self) -> dict[str, Any]:
        p = self._force_point()
        if p is None:
            return {"rate": None, "ci": None, "random_control_rate": None, "random_control_ci": None, "coefficient": None, "n": self.n_harmless}
        return {
            "rate": p.rate.rate, "ci": list(p.rate.ci), "k": p.rate.successes, "n": p.rate.n,
            "random_control_rate": p.random_rate.rate, "random_control_ci": list(p.random_rate.ci),
            "coefficient": p.coefficient, "kl": _f(p.kl),
        }

    @property
    def suppress_refusal(self) -> dict[str, Any]:
        r: Rate = self.suppress_ablation["rate"]
        c: Rate = self.suppress_ablation["random_rate"]
        return {
            "rate": r.rate, "ci": list(r.ci), "k": r.successes, "n": r.n,
            "random_control_rate": c.rate, "random_control_ci": list(c.ci),
            "coefficient": "ablate",
        }

    @property
    def kl_harmless(self) -> dict[str, float | None]:
        p = self._force_point()
        return {"ablation": _f(self.suppress_ablation["kl_harmless"]), "force": _f(p.kl) if p else None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "position": self.position,
            "method": self.method,
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "coefficients_normalised": self.coefficients_normalised,
            "scale": self.scale,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "baseline": {k: v.to_dict() for k, v in self.baseline.items()},
            "force": [p.to_dict() for p in self.force],
            "suppress_ablation": {
                "rate": self.suppress_ablation["rate"].to_dict(),
                "random_rate": self.suppress_ablation["random_rate"].to_dict(),
                "kl_harmless": _f(self.suppress_ablation["kl_harmless"]),
                "random_kl_harmless": _f(self.suppress_ablation["random_kl_harmless"]),
            },
            "suppress_subtract": [p.to_dict() for p in self.suppress_subtract],
            "force_refusal": self.force_refusal,
            "suppress_refusal": self.suppress_refusal,
            "kl_harmless": self.kl_harmless,
            "force_rule": f"smallest coefficient with rate ≥ {FORCE_TARGET_RATE:.0%}, else the highest rate",
            "samples": list(self.samples),
            "seconds": self.seconds,
        }


def choose_force_coefficient(points: Sequence[SteerPoint], target: float = FORCE_TARGET_RATE) -> float | None:
    """Smallest coefficient whose rate reaches ``target``; else the one with the highest rate
    (the smaller coefficient on ties)."""
    if not points:
        return None
    ordered = sorted(points, key=lambda p: abs(p.coefficient))
    for p in ordered:
        if p.rate.rate >= target:
            return p.coefficient
    return max(ordered, key=lambda p: (p.rate.rate, -abs(p.coefficient))).coefficient


class _Steps:
    """Progress in equal steps, with a message per step."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = max(total, 1), 0, progress

    def __call__(self, message: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(min(1.0, self.done / self.total), message)


def run_validation(
    lm: LoadedModel,
    formatter: Formatter,
    dirs: LayerDirections,
    layer: int,
    harmful_test: Sequence[str],
    harmless_test: Sequence[str],
    *,
    coefficients: Sequence[float] = DEFAULT_FORCE_COEFFICIENTS,
    subtract_coefficients: Sequence[float] = DEFAULT_SUBTRACT_COEFFICIENTS,
    normalised: bool = True,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    n_samples: int = 4,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ValidationResult:
    """Force / suppress refusal with random-direction controls and KL (module docstring).

    The random control of every intervention is :func:`core.steering.random_like` with
    ``seed`` (one random direction, reused across coefficients), so reruns are identical.
    """
    t0 = time.perf_counter()
    layer = lm.check_layer(layer)
    dirs.check_layer(layer)
    harmful, harmless = list(harmful_test), list(harmless_test)
    if not harmful or not harmless:
        raise ValueError("validation needs harmful and harmless test prompts; one set is empty")
    if not coefficients:
        raise ValueError("give at least one force coefficient")
    n_gen = 2 + 2 + 2 * len(coefficients) + 2 * len(subtract_coefficients)
    n_kl = 1 + 2 + 2 * len(coefficients) + 2 * len(subtract_coefficients)
    step = _Steps(n_gen + n_kl, progress)

    def gen(prompts: list[str], ivs: list[Intervention], what: str) -> list[str]:
        out = steered_generate(lm, formatter, prompts, ivs, max_new_tokens=max_new_tokens, batch_size=batch_size)
        step(what)
        return out

    clean_logits = next_token_logits(lm, formatter, harmless, batch_size=batch_size)
    step("clean first-token logits")

    def kl(ivs: list[Intervention], what: str) -> float:
        logits = next_token_logits(lm, formatter, harmless, edits=edits_for(lm, ivs), batch_size=batch_size)
        step(what)
        return float(np.mean(kl_divergence(clean_logits, logits)))

    base_harmful = gen(harmful, [], "baseline on harmful")
    base_harmless = gen(harmless, [], "baseline on harmless")
    baseline = {"harmful_refusal": refusal_rate(base_harmful), "harmless_refusal": refusal_rate(base_harmless)}

    abl = ablate(dirs, layer)
    abl_rand = random_like(abl, seed)
    abl_out = gen(harmful, [abl], "ablation on harmful")
    suppress_ablation = {
        "rate": refusal_rate(abl_out),
        "random_rate": refusal_rate(gen(harmful, [abl_rand], "random ablation on harmful")),
        "kl_harmless": kl([abl], "KL of ablation"),
        "random_kl_harmless": kl([abl_rand], "KL of random ablation"),
    }

    force: list[SteerPoint] = []
    force_out: dict[float, list[str]] = {}
    for c in coefficients:
        iv = add(dirs, layer, c, normalised)
        rnd = random_like(iv, seed)
        force_out[c] = gen(harmless, [iv], f"add {c:g}")
        force.append(SteerPoint(
            c, refusal_rate(force_out[c]), refusal_rate(gen(harmless, [rnd], f"random add {c:g}")),
            kl([iv], f"KL of add {c:g}"), kl([rnd], f"KL of random add {c:g}"),
        ))

    sub_points: list[SteerPoint] = []
    for c in subtract_coefficients:
        iv = subtract(dirs, layer, c, normalised)
        rnd = random_like(iv, seed)
        sub_points.append(SteerPoint(
            c, refusal_rate(gen(harmful, [iv], f"subtract {c:g}")),
            refusal_rate(gen(harmful, [rnd], f"random subtract {c:g}")),
            kl([iv], f"KL of subtract {c:g}"), kl([rnd], f"KL of random subtract {c:g}"),
        ))

    chosen = choose_force_coefficient(force)
    samples: list[dict[str, str]] = []
    for i in range(min(n_samples, len(harmful))):
        samples.append({"prompt": harmful[i], "kind": "harmful", "intervention": "ablate",
                        "baseline": base_harmful[i], "steered": abl_out[i]})
    for i in range(min(n_samples, len(harmless))):
        samples.append({"prompt": harmless[i], "kind": "harmless", "intervention": f"add {chosen:g}",
                        "baseline": base_harmless[i], "steered": force_out[chosen][i]})
    return ValidationResult(
        layer=layer, position=dirs.position, method=dirs.method,
        n_harmful=len(harmful), n_harmless=len(harmless),
        coefficients_normalised=normalised, scale=float(dirs.mean_norm[layer]) if normalised else 1.0,
        seed=seed, max_new_tokens=max_new_tokens,
        baseline=baseline, force=force, suppress_ablation=suppress_ablation, suppress_subtract=sub_points,
        force_coefficient=chosen, samples=samples, seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------
# the fast per-layer screen (no generation)
# ---------------------------------------------------------------------------------------
@dataclass
class LayerScan:
    """Per-layer effect of ablating that layer's direction, from first-token logits only."""

    layers: list[int]
    baseline_score: float  # mean refusal score (log-odds) on harmful prompts, unsteered
    ablated_score: np.ndarray  # [L] NaN where not scanned
    ablation_effect: np.ndarray  # [L] baseline − ablated (larger = ablation removes more refusal)
    kl: np.ndarray  # [L] mean KL on harmless prompts under that ablation
    n_harmful: int
    n_harmless: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "baseline_score": _f(self.baseline_score),
            "ablated_score": [_f(x) for x in self.ablated_score],
            "ablation_effect": [_f(x) for x in self.ablation_effect],
            "kl": [_f(x) for x in self.kl],
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
        }


def scan_layers(
    lm: LoadedModel,
    formatter: Formatter,
    dirs: LayerDirections,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    skip_last_fraction: float = 0.2,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> LayerScan:
    """For each candidate layer, ablate its direction everywhere and measure the drop of the
    refusal score on ``harmful`` and the KL on ``harmless`` (one forward pass each; no
    generation). Feed ``ablation_effect`` and ``kl`` to :func:`core.directions.choose_layer`.
    Use prompts the direction was *not* fitted on if you can (e.g. a slice of the test split)."""
    harmful, harmless = list(harmful), list(harmless)
    if not harmful or not harmless:
        raise ValueError("the layer scan needs harmful and harmless prompts")
    todo = [lm.check_layer(i) for i in layers] if layers is not None else candidate_layers(dirs.n_layers, skip_last_fraction)
    ids = refusal_token_ids(lm.tokenizer)
    step = _Steps(2 + 2 * len(todo), progress)
    base = float(np.mean(refusal_score(next_token_logits(lm, formatter, harmful, batch_size=batch_size), ids)))
    step("baseline refusal score")
    clean = next_token_logits(lm, formatter, harmless, batch_size=batch_size)
    step("clean harmless logits")
    n = dirs.n_layers
    ablated, kls = np.full(n, np.nan), np.full(n, np.nan)
    for layer in todo:
        try:
            iv = ablate(dirs, layer)
        except ValueError:  # no direction at this layer
            step(f"layer {layer} skipped")
            step(f"layer {layer} skipped")
            continue
        edits = edits_for(lm, [iv])
        ablated[layer] = float(np.mean(refusal_score(next_token_logits(lm, formatter, harmful, edits=edits, batch_size=batch_size), ids)))
        step(f"layer {layer}: refusal score")
        kls[layer] = float(np.mean(kl_divergence(clean, next_token_logits(lm, formatter, harmless, edits=edits, batch_size=batch_size))))
        step(f"layer {layer}: KL")
    return LayerScan(todo, base, ablated, base - ablated, kls, len(harmful), len(harmless))
