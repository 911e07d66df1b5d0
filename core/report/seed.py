"""The opening comparison with the seed report: its own rows, its claim about base models, and
what this run's numbers say about that claim.

Why rules: the comparison must follow the data. Each sentence below is printed only when the
numbers support it (intervals, not point estimates); when they do not settle the claim, the
report says that instead.

The seed report (SaycuredAI Research, 2026-01-12) analysed five base models and reported
in-sample separations without intervals, probe accuracies, and force/suppress rates without
controls or n; its limitations section claims "Base models (without safety training) show weak
refusal signals". Its rows are kept here as data so that the report can quote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from core.conclusions import MIN_BASELINE_REFUSAL
from core.metrics import finite
from core.report.numbers import probe_text, rate_text, sigma_ci
from core.report.tables import model_kind

Entry = Mapping[str, Any]

SEED_CLAIM = "Base models (without safety training) show weak refusal signals"
# A held-out Cohen's d whose whole interval lies above this is a large separation (Cohen's
# conventions: 0.8 = large); one whose interval lies below 0.5 is weak.
STRONG_SEPARATION = 0.8
WEAK_SEPARATION = 0.5


@dataclass(frozen=True)
class SeedRow:
    """One row of the seed report's table (rates as fractions; separation in-sample)."""

    model: str
    kind: str
    separation: float
    probe: float
    force: float
    suppress: float


SEED_ROWS: tuple[SeedRow, ...] = (
    SeedRow("pythia-70m", "base", 0.457, 0.867, 0.033, 0.0),
    SeedRow("pythia-160m", "base", 0.548, 0.800, 0.0, 0.0),
    SeedRow("gpt2", "base", 1.486, 1.000, 0.0, 0.0),
    SeedRow("pythia-410m", "base", 1.635, 0.833, 0.0, 0.056),
    SeedRow("gpt2-medium", "base", 0.545, 1.000, 0.0, 0.0),
)


def _ci(values: Any) -> tuple[float, float] | None:
    return (float(values[0]), float(values[1])) if values and len(values) == 2 and all(finite(v) for v in values) else None


def _status(e: Entry, topic: str) -> str | None:
    from core.report.prose import entry_conclusions

    return next((c.get("status") for c in entry_conclusions(e) if c.get("topic") == topic), None)


def seed_intro() -> str:
    rows = SEED_ROWS
    seps = [r.separation for r in rows]
    steer = [max(r.force, r.suppress) for r in rows]
    return (f"The seed report analysed {len(rows)} base models ({', '.join(r.model for r in rows)}): in-sample separations "
            f"{min(seps):.2f}–{max(seps):.2f}σ without intervals, probe accuracies {min(r.probe for r in rows):.0%}–"
            f"{max(r.probe for r in rows):.0%}, force and suppress rates {min(steer):.0%}–{max(steer):.0%} without n or "
            f"controls, and it concluded: \"{SEED_CLAIM}\". The table above has those columns, held out, with intervals "
            "and controls.")


def _refuses(e: Entry) -> bool | None:
    """True when the unsteered harmful refusal rate's interval lies above the rule's floor,
    False when it lies below it, None when the interval straddles it or is missing."""
    ci = _ci(((e.get("baseline") or {}).get("harmful_refusal") or {}).get("ci"))
    if ci is None:
        return None
    return True if ci[0] > MIN_BASELINE_REFUSAL else False if ci[1] < MIN_BASELINE_REFUSAL else None


def _names(entries: Sequence[Entry]) -> str:
    names = ", ".join(str(o.get("name")) for o in entries)
    return f"{names}, which {'refuses' if len(entries) == 1 else 'refuse'}"


def base_model_sentences(e: Entry, others: Sequence[Entry]) -> list[str]:
    """What one base model's row says about the seed's claim."""
    name = e.get("name", "?")
    harmful = rate_text((e.get("baseline") or {}).get("harmful_refusal"))
    sep = sigma_ci(e.get("separation_sigma"), e.get("separation_ci"))
    probe = probe_text(e.get("probe_accuracy"), e.get("probe_accuracy_std"), e.get("probe_accuracy_ci"))
    out = []
    refuses = _refuses(e)
    if refuses is False:
        out.append(f"{name} (base) refuses {harmful} of harmful test prompts unsteered: in behaviour the seed's claim holds, "
                   "there is almost no refusal.")
    elif refuses is True:
        out.append(f"{name} (base) refuses {harmful} of harmful test prompts unsteered: in behaviour the seed's claim does "
                   "not hold for it.")
    else:
        out.append(f"{name} (base) refuses {harmful} of harmful test prompts unsteered: at this n the interval does not "
                   "settle whether it refuses.")
    sep_ci = _ci(e.get("separation_ci"))
    if sep_ci and sep_ci[0] > STRONG_SEPARATION:
        out.append(f"Its activations still separate harmful from harmless prompts clearly (held-out {sep}, probe {probe}): "
                   "what is weak is refusal, not the model's internal harmful/harmless signal, so a large separation "
                   "alone is not evidence of a refusal mechanism.")
    elif sep_ci and sep_ci[1] < WEAK_SEPARATION:
        out.append(f"Its activations separate the classes weakly too (held-out {sep}), as the seed's claim says.")
    elif finite(e.get("separation_sigma")):
        out.append(f"Its held-out separation ({sep}) is not clearly large or weak.")
    refusing = [o for o in others if _refuses(o) and _ci(o.get("separation_ci"))]
    if sep_ci and refusing:
        below = [o for o in refusing if _ci(o["separation_ci"])[0] > sep_ci[1]]
        overlap = [o for o in refusing if o not in below]
        if overlap:
            out.append(f"Its separation interval overlaps that of {_names(overlap)}: separation does not tell a model "
                       "that refuses from one that does not.")
        if below:
            out.append(f"Its separation lies below that of {_names(below)}.")
    force = _status(e, "force")
    if force == "shown":
        out.append(f"Adding its direction induces refusal beyond every control ({rate_text(e.get('force_refusal'))}), "
                   "unlike the seed's base rows (0–3 %).")
    elif force in ("failed", "not specific"):
        out.append(f"Adding its direction did not induce refusal beyond every control ({rate_text(e.get('force_refusal'))}), "
                   "as in the seed's base rows.")
    return out


def seed_comparison(results: Mapping[str, Any]) -> list[str]:
    """Sentences comparing this run with the seed report, each backed by the numbers."""
    models = list(results.get("models", []))
    base = [e for e in models if model_kind(e) == "base"]
    out = [seed_intro()]
    if not base:
        pending = results.get("models_pending") or []
        out.append(f"No base model has finished yet (still to run: {', '.join(pending)}), so the seed's claim is not "
                   "tested here yet." if pending else
                   "This run has no base model, so the seed's claim about base models is not tested here.")
    for e in base:
        out += base_model_sentences(e, [o for o in models if o is not e])
    quiet = [e for e in models if model_kind(e) != "base" and _refuses(e) is False]
    for e in quiet:
        out.append(f"{e.get('name', '?')} ({model_kind(e)}) refuses only "
                   f"{rate_text((e.get('baseline') or {}).get('harmful_refusal'))} of harmful test prompts unsteered: "
                   "weak refusal is not limited to base models here.")
    return out


def ablation_notes(results: Mapping[str, Any]) -> list[str]:
    """Per model, the explanation a large ablation KL needs (:func:`core.conclusions.ablation_cost_conclusion`)."""
    from core.conclusions import ablation_cost_conclusion

    out = []
    for e in results.get("models", []):
        c = ablation_cost_conclusion(e)
        if c is not None:
            out.append(f"{e.get('name', '?')}: {c.text}")
    return out


def frozen_block_notes(results: Mapping[str, Any]) -> list[str]:
    """Per organism row whose chosen layer lies in the blocks its training froze: its activations
    there are its base model's, so are its direction, separation and probe. Without this note a
    reader sees two rows with the same figures and suspects a bug, or credits the training."""
    from core.layer_choice import candidate_layers

    models = results.get("models", [])
    out = []
    for e in models:
        org = e.get("organism") or {}
        frozen, layer, n = (org.get("host") or {}).get("frozen_blocks"), e.get("layer"), e.get("n_layers")
        if not (isinstance(frozen, int) and isinstance(layer, int) and isinstance(n, int) and 0 <= layer < frozen < n):
            continue
        text = (f"{e.get('name', '?')}: blocks 0–{frozen - 1} are its base model's, frozen when it was trained (only "
                f"blocks {frozen}–{n - 1} changed). The chosen layer {layer} lies in the frozen part, so its activations "
                "there, and with them the direction, the separation and the probe, are the base model's.")
        base = org.get("base_fingerprint")
        twins = [o.get("name", "?") for o in models if o is not e and base and o.get("fingerprint") == base
                 and (o.get("layer"), o.get("position"), o.get("preamble")) == (layer, e.get("position"), e.get("preamble"))]
        if twins:
            text += f" They equal the row of {', '.join(twins)}, which is the base model at the same layer and position."
        skip = (e.get("selection_grid") or {}).get("skip_last_fraction")
        if skip is not None and max(candidate_layers(n, skip)) < frozen:
            text += (f" The layer rule cannot reach the trained blocks: it considers layers 0–{max(candidate_layers(n, skip))} "
                     f"(it skips the last {skip:.0%} of layers, as Arditi et al. do). The steering columns therefore test the "
                     "base model's direction as the trained blocks read it; the patching column covers every block.")
        out.append(text)
    return out
