"""Does the direction *cause* refusal? Steering experiments against controls.

Three questions, each answered on the held-out test prompts:

* **Force refusal** — harmless prompts with +α·v̂ added at the chosen layer, for a sweep of α.
* **Suppress refusal** — harmful prompts with v̂ ablated everywhere, and with −α·v̂ at the layer.
* **Side effects** — KL divergence of the first-response-token distribution on harmless prompts,
  intervened vs clean, and the teacher-forced cost over the clean model's whole answers
  (:mod:`core.capability`).

Every generation is labelled by a judge (default: the three-way substring judge of
:mod:`core.judge`; refusal, compliance or degenerate) and kept, with its prompt and condition, in
``generations``. Rates of refusal and of degenerate text are reported separately; force and
suppress rates count refusals only. Each sweep point has one seeded random control; the two
headline interventions (ablation, and the chosen force coefficient) are compared with
:data:`core.controls.DEFAULT_N_RANDOM` random directions and a label-shuffled direction, and
called specific only by the rule of :mod:`core.controls`. The headline force coefficient is the
*smallest* α in the sweep whose refusal rate reaches :data:`FORCE_TARGET_RATE` (else the α with
the highest rate): the least intervention that does the job.

:func:`scan_layers` is the fast (no generation) per-layer ablation screen that feeds
:func:`core.layer_choice.choose_layer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from core.capability import AnswerCost, answer_costs
from core.controls import DEFAULT_N_RANDOM, ControlComparison, ControlResult, control_interventions
from core.directions import LayerDirections
from core.formatting import Formatter
from core.generation import next_token_logits
from core.judge import judge_all
from core.metrics import Rate, finite_or_none as _f, kl_divergence, label_rates, refusal_score, refusal_token_ids
from core.layer_scan import LayerScan, _Steps, scan_layers  # noqa: F401  (re-exported: the screen lives there)
from core.models import LoadedModel
from core.mixed_batches import Condition, generate_conditions, mixed_logits
from core.steering import Intervention, ablate, add, edits_for, random_like, steered_generate, steered_logits, subtract
from core.progress import Progress

Judge = Callable[[Sequence[str]], list[str]]  # answers -> "refusal" | "compliance" | "degenerate"

# Coefficients in normalised units (multiples of the layer's mean activation norm).
# Measured on SmolLM2-135M-Instruct, prompted-refusal preset (formatter key fb986f18…), position
# "last", layer 23 (the default rule's pick), 40+40 test prompts, with the old substring judge:
# adding 0.25 -> 77.5 % harmless refusal (random direction 12.5 %), 0.5 -> 95 % (random 30 %),
# 0.75 -> 90 % (random 0 %) with KL rising 0.20 -> 0.69 -> 1.23; an earlier run showed 1.0
# overshooting into degenerate text. The raw direction (norm 46 = 0.12 of the mean norm 373) is too
# small. Subtracting 0.5 -> 17.5 % harmful refusal (random 65 %). So the sweep brackets 0.5.
DEFAULT_FORCE_COEFFICIENTS: tuple[float, ...] = (0.25, 0.5, 0.75)
DEFAULT_SUBTRACT_COEFFICIENTS: tuple[float, ...] = (0.5,)
# The judge's refusal phrases appear in the opening; 16–24 tokens suffice and keep
# validation affordable on a CPU.
DEFAULT_MAX_NEW_TOKENS = 24
FORCE_TARGET_RATE = 0.9
# Rows per decode batch when the conditions share batches (``mixed_batches``): CPU decode steps
# cost far less per row in large batches (measured in docs/decisions.md, "Validation in mixed batches").
MIXED_BATCH_SIZE = 64


def _rd(r: Rate | None) -> dict | None:
    return r.to_dict() if r is not None else None


@dataclass
class SteerPoint:
    """One coefficient of a sweep: the steered refusal rate, the random-direction control, the
    KL, and the share of degenerate answers (not counted as refusals)."""

    coefficient: float
    rate: Rate
    random_rate: Rate
    kl: float  # mean KL(clean ‖ steered) on harmless prompts, first response token
    random_kl: float
    degenerate: Rate | None = None
    random_degenerate: Rate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "coefficient": self.coefficient,
            "rate": self.rate.to_dict(),
            "random_rate": self.random_rate.to_dict(),
            "degenerate": _rd(self.degenerate),
            "random_degenerate": _rd(self.random_degenerate),
            "kl": _f(self.kl),
            "random_kl": _f(self.random_kl),
        }


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
    baseline: dict[str, Rate]  # harmful_/harmless_ refusal and degenerate
    force: list[SteerPoint]
    suppress_ablation: dict[str, Any]  # rate, random_rate, degenerate, random_degenerate (Rate); kl_harmless, random_kl_harmless
    suppress_subtract: list[SteerPoint]  # rates on harmful prompts; kl on harmless
    force_coefficient: float | None
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    controls: dict[str, ControlComparison] = field(default_factory=dict)  # "force", "ablation"
    capability: dict[str, AnswerCost] = field(default_factory=dict)  # per condition, over clean harmless answers
    generations: list[dict[str, str]] = field(default_factory=list)  # condition, prompts, prompt, generation, label
    judge: str = "substring"
    agreement: dict[str, Rate] = field(default_factory=dict)  # judge vs first-token score (baseline), vs substring judge

    # -- headline numbers ----------------------------------------------------------------
    def _force_point(self) -> SteerPoint | None:
        return next((p for p in self.force if p.coefficient == self.force_coefficient), None)

    def _verdict(self, key: str) -> dict[str, Any]:
        c = self.controls.get(key)
        return {"specific": c.specific if c else None, "controls_n": len(c.controls) if c else 1}

    @property
    def force_refusal(self) -> dict[str, Any]:
        p = self._force_point()
        if p is None:
            return {"rate": None, "ci": None, "random_control_rate": None, "random_control_ci": None, "coefficient": None, "n": self.n_harmless}
        return {
            "rate": p.rate.rate, "ci": list(p.rate.ci), "k": p.rate.successes, "n": p.rate.n,
            "random_control_rate": p.random_rate.rate, "random_control_ci": list(p.random_rate.ci),
            "coefficient": p.coefficient, "kl": _f(p.kl), "degenerate": _rd(p.degenerate), **self._verdict("force"),
        }

    @property
    def suppress_refusal(self) -> dict[str, Any]:
        r: Rate = self.suppress_ablation["rate"]
        c: Rate = self.suppress_ablation["random_rate"]
        return {
            "rate": r.rate, "ci": list(r.ci), "k": r.successes, "n": r.n,
            "random_control_rate": c.rate, "random_control_ci": list(c.ci),
            "coefficient": "ablate", "degenerate": _rd(self.suppress_ablation.get("degenerate")), **self._verdict("ablation"),
        }

    @property
    def kl_harmless(self) -> dict[str, float | None]:
        p = self._force_point()
        out = {"ablation": _f(self.suppress_ablation["kl_harmless"]), "force": _f(p.kl) if p else None}
        for key in ("ablation", "force"):
            cost = self.capability.get(key)
            out[f"{key}_per_token"] = _f(cost.kl) if cost else None
        return out

    def to_dict(self) -> dict[str, Any]:
        sa = self.suppress_ablation
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
            "judge": self.judge,
            "baseline": {k: v.to_dict() for k, v in self.baseline.items()},
            "force": [p.to_dict() for p in self.force],
            "suppress_ablation": {
                "rate": sa["rate"].to_dict(), "random_rate": sa["random_rate"].to_dict(),
                "degenerate": _rd(sa.get("degenerate")), "random_degenerate": _rd(sa.get("random_degenerate")),
                "kl_harmless": _f(sa["kl_harmless"]), "random_kl_harmless": _f(sa["random_kl_harmless"]),
            },
            "suppress_subtract": [p.to_dict() for p in self.suppress_subtract],
            "force_refusal": self.force_refusal,
            "suppress_refusal": self.suppress_refusal,
            "kl_harmless": self.kl_harmless,
            "force_rule": f"smallest coefficient with refusal rate ≥ {FORCE_TARGET_RATE:.0%}, else the highest rate",
            "controls": {k: c.to_dict() for k, c in self.controls.items()},
            "capability": {k: c.to_dict() for k, c in self.capability.items()},
            "agreement": {k: r.to_dict() for k, r in self.agreement.items()},
            "samples": list(self.samples),
            "generations": list(self.generations),
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
    judge: Judge | None = None,
    judge_name: str = "substring",
    n_random_controls: int = DEFAULT_N_RANDOM,
    shuffled: np.ndarray | None = None,
    capability: bool = True,
    on_condition: Callable[[str, str, list[str]], None] | None = None,
    mixed_batches: bool = True,
    mixed_batch_size: int = MIXED_BATCH_SIZE,
) -> ValidationResult:
    """Force / suppress refusal against controls, with KL and capability cost (module docstring).

    The sweep's control is :func:`core.steering.random_like` with ``seed``; the headline
    interventions also get seeds ``seed + 1 …`` up to ``n_random_controls`` and, when
    ``shuffled`` (the label-shuffled difference in means at ``layer``, see
    :func:`core.controls.shuffled_direction`) is given, that direction. Reruns are identical.
    ``judge`` labels a list of answers (default: :func:`core.judge.judge_all`).
    ``on_condition(condition, prompts, labels)`` hears each condition's labels as soon as it is
    generated (the app shows its rate before the whole run ends).

    With ``mixed_batches`` (the default) the rows of all conditions share batches of
    ``mixed_batch_size`` (each row under its own intervention, :mod:`core.mixed_batches`),
    and so do the first-token passes; ``False`` generates condition by condition in batches of
    ``batch_size``. Both give the same answers up to batch-composition rounding.
    """
    t0 = time.perf_counter()
    layer = lm.check_layer(layer)
    dirs.check_layer(layer)
    harmful, harmless = list(harmful_test), list(harmless_test)
    if not harmful or not harmless:
        raise ValueError("validation needs harmful and harmless test prompts; one set is empty")
    if not coefficients:
        raise ValueError("give at least one force coefficient")
    if mixed_batch_size < 1:
        raise ValueError("mixed_batch_size must be at least 1")
    label_fn: Judge = judge or judge_all
    n_extra = max(0, n_random_controls - 1) + (shuffled is not None)
    n_gen = 2 + 2 + 2 * len(coefficients) + 2 * len(subtract_coefficients) + 2 * n_extra
    n_kl = 1 + 2 + 2 * len(coefficients) + 2 * len(subtract_coefficients) + int(capability) + 1
    step = _Steps(n_gen + n_kl, progress)
    prompts_of = {"harmful": harmful, "harmless": harmless}
    outputs: dict[tuple[str, str], tuple[list[str], list[str], list[str]]] = {}  # (condition, kind) -> answers, labels, substring
    order: list[tuple[str, str]] = []  # the conditions in the order they are defined (the report's order)

    def finish(cond: Condition, out: list[str]) -> None:
        prompts = prompts_of[cond.kind]
        raw = label_fn.label(out, prompts) if hasattr(label_fn, "label") else label_fn(out)
        labels = [str(getattr(x, "value", x)) for x in raw]
        outputs[(cond.name, cond.kind)] = (out, labels, judge_all(out) if judge is not None else labels)
        step(cond.name)
        if on_condition is not None:
            on_condition(cond.name, cond.kind, labels)

    def generate_all(conds: list[Condition]) -> None:
        order.extend((c.name, c.kind) for c in conds)
        if not mixed_batches:
            for cond in conds:
                finish(cond, steered_generate(lm, formatter, prompts_of[cond.kind], cond.interventions,
                                              max_new_tokens=max_new_tokens, batch_size=batch_size))
            return
        generate_conditions(lm, formatter, conds, prompts_of, finish, max_new_tokens=max_new_tokens, batch_size=mixed_batch_size)

    def labels_of(name: str, kind: str) -> list[str]:
        return outputs[(name, kind)][1]

    abl = ablate(dirs, layer)
    abl_rand = random_like(abl, seed)
    rand0 = f"random #0 (seed {seed})"
    force_ivs = {c: add(dirs, layer, c, normalised) for c in coefficients}
    sub_ivs = {c: subtract(dirs, layer, c, normalised) for c in subtract_coefficients}
    first = [Condition("baseline", "harmful", []), Condition("baseline", "harmless", []),
             Condition("ablate", "harmful", [abl]), Condition(f"ablate {rand0}", "harmful", [abl_rand])]
    for c, iv in force_ivs.items():
        first += [Condition(f"add {c:g}", "harmless", [iv]), Condition(f"add {c:g} {rand0}", "harmless", [random_like(iv, seed)])]
    for c, iv in sub_ivs.items():
        first += [Condition(f"subtract {c:g}", "harmful", [iv]), Condition(f"subtract {c:g} {rand0}", "harmful", [random_like(iv, seed)])]
    abl_controls = control_interventions(abl, seed, n_random_controls, shuffled)[1:]
    first += [Condition(f"ablate {name}", "harmful", [civ]) for name, civ in abl_controls]

    # first-token logits: clean (harmless and harmful) and under each sweep intervention (harmless)
    kl_conds = [("KL of ablation", [abl]), ("KL of random ablation", [abl_rand])]
    for what, ivs in (("add", force_ivs), ("subtract", sub_ivs)):
        for c, iv in ivs.items():
            kl_conds += [(f"KL of {what} {c:g}", [iv]), (f"KL of random {what} {c:g}", [random_like(iv, seed)])]
    if mixed_batches:
        groups = [[]] + [ivs for _, ivs in kl_conds]
        rows = [(p, 0) for p in harmful] + [(p, g) for g in range(len(groups)) for p in harmless]
        logits = mixed_logits(lm, formatter, [p for p, _ in rows], groups, [g for _, g in rows], batch_size=mixed_batch_size)
        harmful_logits, clean_logits = logits[: len(harmful)], logits[len(harmful): len(harmful) + len(harmless)]
        steered = logits[len(harmful) + len(harmless):].split(len(harmless))
    else:
        harmful_logits = next_token_logits(lm, formatter, harmful, batch_size=batch_size)
        clean_logits = next_token_logits(lm, formatter, harmless, batch_size=batch_size)
        steered = [steered_logits(lm, formatter, harmless, ivs, batch_size=batch_size) for _, ivs in kl_conds]
    step("clean first-token logits")
    kls: dict[str, float] = {}
    for (what, _), logits in zip(kl_conds, steered):
        kls[what] = float(np.mean(kl_divergence(clean_logits, logits)))
        step(what)

    generate_all(first)
    lab_bh, lab_bb = labels_of("baseline", "harmful"), labels_of("baseline", "harmless")
    rb_h, rb_b = label_rates(lab_bh), label_rates(lab_bb)
    baseline = {"harmful_refusal": rb_h["refusal"], "harmless_refusal": rb_b["refusal"],
                "harmful_degenerate": rb_h["degenerate"], "harmless_degenerate": rb_b["degenerate"]}
    ra, rr = label_rates(labels_of("ablate", "harmful")), label_rates(labels_of(f"ablate {rand0}", "harmful"))
    suppress_ablation = {
        "rate": ra["refusal"], "random_rate": rr["refusal"], "degenerate": ra["degenerate"], "random_degenerate": rr["degenerate"],
        "kl_harmless": kls["KL of ablation"], "random_kl_harmless": kls["KL of random ablation"],
    }

    def sweep(what: str, ivs: dict[float, Intervention], kind: str) -> list[SteerPoint]:
        points = []
        for c in ivs:
            r, r0 = label_rates(labels_of(f"{what} {c:g}", kind)), label_rates(labels_of(f"{what} {c:g} {rand0}", kind))
            points.append(SteerPoint(c, r["refusal"], r0["refusal"], kls[f"KL of {what} {c:g}"], kls[f"KL of random {what} {c:g}"],
                                     r["degenerate"], r0["degenerate"]))
        return points

    force = sweep("add", force_ivs, "harmless")
    sub_points = sweep("subtract", sub_ivs, "harmful")
    chosen = choose_force_coefficient(force)
    point = next(p for p in force if p.coefficient == chosen)
    head_add = force_ivs[chosen]
    force_controls = control_interventions(head_add, seed, n_random_controls, shuffled)[1:]
    generate_all([Condition(f"add {chosen:g} {name}", "harmless", [civ]) for name, civ in force_controls])

    def compare(condition: str, kind: str, ctrl: list[tuple[str, Intervention]], own: tuple[Rate, Rate],
                first_control: tuple[Rate, Rate], expect: str) -> ControlComparison:
        ctrls = [ControlResult(rand0, *first_control)]
        for name, _ in ctrl:
            r = label_rates(labels_of(f"{condition} {name}", kind))
            ctrls.append(ControlResult(name, r["refusal"], r["degenerate"]))
        return ControlComparison(condition, own[0], own[1], expect, ctrls)

    controls = {
        "ablation": compare("ablate", "harmful", abl_controls, (ra["refusal"], ra["degenerate"]),
                            (rr["refusal"], rr["degenerate"]), "below"),
        "force": compare(f"add {chosen:g}", "harmless", force_controls, (point.rate, point.degenerate),
                         (point.random_rate, point.random_degenerate), "above"),
    }
    generations: list[dict[str, str]] = []
    for condition, kind in order:
        out, labels, substring = outputs[(condition, kind)]
        generations.extend({"condition": condition, "prompts": kind, "prompt": p, "generation": g, "label": lab,
                            **({"substring_label": sub} if judge is not None else {})}
                           for p, g, lab, sub in zip(prompts_of[kind], out, labels, substring))
    base_harmful, base_harmless = outputs[("baseline", "harmful")][0], outputs[("baseline", "harmless")][0]
    abl_out, lab_abl = outputs[("ablate", "harmful")][:2]
    force_out = {c: outputs[(f"add {c:g}", "harmless")][0] for c in coefficients}

    # does the judge agree with the first-token refusal score (and with the substring judge)?
    score_says = [bool(x > 0) for x in refusal_score(harmful_logits, refusal_token_ids(lm.tokenizer))] + \
        [bool(x > 0) for x in refusal_score(clean_logits, refusal_token_ids(lm.tokenizer))]
    step("first-token refusal score on harmful prompts")
    base_rows = [g for g in generations if g["condition"] == "baseline"]
    agreement = {"judge_vs_score": Rate(sum((g["label"] == "refusal") == s for g, s in zip(base_rows, score_says)), len(base_rows))}
    if judge is not None:
        agreement["judge_vs_substring"] = Rate(sum(g["label"] == g["substring_label"] for g in generations), len(generations))

    costs: dict[str, AnswerCost] = {}
    if capability:
        costs = answer_costs(lm, formatter, harmless, base_harmless, {
            "ablation": edits_for(lm, [abl]), "force": edits_for(lm, [head_add]),
            "random ablation": edits_for(lm, [abl_rand]), "random force": edits_for(lm, [random_like(head_add, seed)]),
        }, max_answer_tokens=max_new_tokens, batch_size=batch_size)
        step("capability cost over whole answers")

    samples: list[dict[str, str]] = []
    for i in range(min(n_samples, len(harmful))):
        samples.append({"prompt": harmful[i], "kind": "harmful", "intervention": "ablate",
                        "baseline": base_harmful[i], "steered": abl_out[i],
                        "baseline_label": lab_bh[i], "steered_label": lab_abl[i]})
    chosen_labels = [g["label"] for g in generations if g["condition"] == f"add {chosen:g}"]
    for i in range(min(n_samples, len(harmless))):
        samples.append({"prompt": harmless[i], "kind": "harmless", "intervention": f"add {chosen:g}",
                        "baseline": base_harmless[i], "steered": force_out[chosen][i],
                        "baseline_label": lab_bb[i], "steered_label": chosen_labels[i]})
    return ValidationResult(
        layer=layer, position=dirs.position, method=dirs.method,
        n_harmful=len(harmful), n_harmless=len(harmless),
        coefficients_normalised=normalised, scale=float(dirs.mean_norm[layer]) if normalised else 1.0,
        seed=seed, max_new_tokens=max_new_tokens,
        baseline=baseline, force=force, suppress_ablation=suppress_ablation, suppress_subtract=sub_points,
        force_coefficient=chosen, samples=samples, seconds=time.perf_counter() - t0,
        controls=controls, capability=costs, generations=generations, judge=judge_name, agreement=agreement,
    )
