"""Render a results dict (see :mod:`core.batch`) as Markdown, one offline HTML file, and JSON.

Why one renderer for the batch runner and the app: the numbers a user sees on the Report page
and in ``results/report.html`` must be the same numbers, described the same way. Every rate is
shown with its Wilson 95 % interval and n, every separation says it is held-out, and every
steering effect stands next to its random-direction control.

Safety: all text that comes from users or models (prompts, generations, model names, token
labels) is escaped — HTML-escaped in the HTML, and escaped for tables in Markdown — so a prompt
``<script>alert(1)</script>`` is shown as text. The HTML is self-contained: CSS inline, charts
rendered offline to SVG by vl-convert and embedded as ``data:`` images (an image cannot run
script), no CDN, no remote script, stylesheet or font.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

Entry = Mapping[str, Any]


# ---------------------------------------------------------------------------------------
# number formatting
# ---------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x: Any, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%" if _finite(x) else "–"


def sigma(x: Any) -> str:
    return f"{x:.2f}σ" if _finite(x) else "–"


def sigma_ci(x: Any, ci: Any) -> str:
    """A separation with its bootstrap 95 % interval, e.g. ``2.83σ [2.41–3.30]``."""
    if not _finite(x):
        return "–"
    if not ci or len(ci) != 2 or not all(_finite(c) for c in ci):
        return sigma(x)
    return f"{x:.2f}σ [{ci[0]:.2f}–{ci[1]:.2f}]"


def probe_text(acc: Any, std: Any, ci: Any) -> str:
    """Probe accuracy ± fold std, with its Wilson 95 % interval when known."""
    if not _finite(acc):
        return "–"
    text = f"{100 * acc:.1f}% ± {100 * (std or 0):.1f}"
    if ci and len(ci) == 2 and all(_finite(c) for c in ci):
        text += f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]"
    return text


def rate_text(r: Mapping[str, Any] | None, *, with_n: bool = True) -> str:
    """``92% [81–97%] (37/40)``: rate, Wilson 95 % interval, count."""
    if not r or not _finite(r.get("rate")):
        return "–"
    lo, hi = (r.get("ci") or [None, None])[:2]
    text = pct(r["rate"])
    if _finite(lo) and _finite(hi):
        text += f" [{100 * lo:.0f}–{100 * hi:.0f}%]"
    if with_n and r.get("n") is not None:
        text += f" ({r.get('k', '?')}/{r['n']})" if r.get("k") is not None else f" (n={r['n']})"
    return text


def coef_text(c: Any) -> str:
    if c in ("ablate", "ablation"):
        return "ablation"
    return f"α={c:g}" if _finite(c) else str(c)


def seconds(x: Any) -> str:
    if not _finite(x):
        return "–"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


# ---------------------------------------------------------------------------------------
# escaping
# ---------------------------------------------------------------------------------------
def md(text: Any) -> str:
    """Text safe inside a Markdown table cell or paragraph: no raw HTML, no links or emphasis
    from user text, no table breaks, one line."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = re.sub(r"([\\`*\[|~])", r"\\\1", s)
    s = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", s)
    s = re.sub(r"^(\s*)([#>+-])", r"\1\\\2", s)
    lines = [part.strip() for part in s.splitlines()]
    return " ⏎ ".join(lines) if len(lines) > 1 else (lines[0] if lines else "")


def h(text: Any) -> str:
    """HTML-escape (quotes included)."""
    return html.escape(str(text), quote=True)


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
TABLE_HEAD = (
    "Model", "Type", "Layer", "Separation (held-out)", "Probe acc.", "Baseline refusal: harmful",
    "Baseline refusal: harmless", "Force refusal (harmless, +α·v)", "Random control (force)",
    "Suppress refusal (harmful, ablation)", "Random control (suppress)", "KL harmless (ablation)",
)


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """The seed report's table, done properly: one plain-text row per model."""
    rows = []
    for e in results.get("models", []):
        force = e.get("force_refusal") or {}
        supp = e.get("suppress_refusal") or {}
        base = e.get("baseline") or {}
        kl = (e.get("kl_harmless") or {}).get("ablation")
        probe_txt = probe_text(e.get("probe_accuracy"), e.get("probe_accuracy_std"), e.get("probe_accuracy_ci"))
        rows.append([
            e.get("name", "?"),
            e.get("type", "?"),
            str(e.get("layer", "–")),
            f"{sigma_ci(e.get('separation_sigma'), e.get('separation_ci'))} (in-sample {sigma(e.get('separation_in_sample'))})",
            probe_txt,
            rate_text(base.get("harmful_refusal")),
            rate_text(base.get("harmless_refusal")),
            f"{rate_text(force)} at {coef_text(force.get('coefficient'))}" if force else "–",
            rate_text(force.get("random_control")) if force else "–",
            rate_text(supp) if supp else "–",
            rate_text(supp.get("random_control")) if supp else "–",
            f"{kl:.3f} nats" if _finite(kl) else "–",
        ])
    return rows


# ---------------------------------------------------------------------------------------
# prose shared by both formats (plain text with **bold**; converted per format)
# ---------------------------------------------------------------------------------------
def _conclusions(e: Entry) -> list[Mapping[str, str]]:
    """The entry's rule-based conclusions (computed for results saved before they existed)."""
    if e.get("conclusions") is not None:
        return list(e["conclusions"])
    from core.conclusions import conclusions

    return conclusions(e)


def control_rows(e: Entry) -> list[list[str]]:
    """One row per control of each headline intervention: the numbers behind "specific"."""
    rows = []
    for key, label in (("force", "force (harmless)"), ("ablation", "ablation (harmful)")):
        c = (e.get("controls") or {}).get(key)
        if not c:
            continue
        verdict = {True: "specific", False: "not specific", None: "–"}[c.get("specific")]
        rows.append([label, f"{c.get('condition')} (the direction)", rate_text(c.get("refusal")), rate_text(c.get("degenerate")), verdict])
        for ctrl in c.get("controls") or []:
            rows.append([label, ctrl.get("name", "?"), rate_text(ctrl.get("refusal")), rate_text(ctrl.get("degenerate")), ""])
    return rows


CONTROL_HEAD = ("Intervention", "Direction", "Refusal", "Degenerate", "Verdict")
GENERATION_HEAD = ("Condition", "Prompts", "Prompt", "Generation", "Label")


def generation_rows(e: Entry) -> list[list[str]]:
    return [[g.get("condition", ""), g.get("prompts", ""), g.get("prompt", ""), g.get("generation", ""), g.get("label", "")]
            for g in e.get("generations") or []]


def generation_groups(e: Entry) -> list[tuple[str, list[list[str]]]]:
    """Generations grouped by (condition, prompt set), titled with their label counts."""
    groups: dict[tuple[str, str], list[list[str]]] = {}
    for row in generation_rows(e):
        groups.setdefault((row[0], row[1]), []).append(row)
    out = []
    for (cond, kind), rows in groups.items():
        counts = {lab: sum(r[4] == lab for r in rows) for lab in ("refusal", "compliance", "degenerate")}
        out.append((f"{cond} · {kind} prompts — " + ", ".join(f"{n} {lab}" for lab, n in counts.items()), rows))
    return out


def layer_rows(e: Entry) -> list[list[str]]:
    rows = []
    for r in e.get("layers", []):
        mark = " ◀ chosen" if r.get("layer") == e.get("layer") else ""
        rows.append([
            f"{r.get('layer')}{mark}", sigma_ci(r.get("separation_sigma"), r.get("separation_ci")),
            sigma(r.get("separation_in_sample")),
            probe_text(r.get("probe_accuracy"), r.get("probe_accuracy_std"), r.get("probe_accuracy_ci")),
        ])
    return rows


def sweep_rows(e: Entry) -> list[list[str]]:
    rows = []
    for label, key in (("force (harmless, +α·v)", "force_sweep"), ("suppress (harmful, −α·v)", "suppress_sweep")):
        for p in e.get(key) or []:
            kl = p.get("kl")
            rows.append([label, coef_text(p.get("coefficient")), rate_text(p.get("rate")), rate_text(p.get("random_rate")),
                         f"{kl:.3f}" if _finite(kl) else "–"])
    return rows


def sample_rows(e: Entry) -> list[list[str]]:
    rows = []
    for s in e.get("samples") or []:
        kind = s.get("kind", "")
        iv = s.get("intervention", "")
        if iv.startswith("add "):
            try:
                iv = f"+α·v, {coef_text(float(iv[4:]))}"
            except ValueError:
                pass
        elif iv in ("ablate", "ablation"):
            iv = "directional ablation"
        rows.append([s.get("prompt", ""), f"{kind} prompt, {iv}" if iv else kind, s.get("baseline", ""), s.get("steered", "")])
    return rows


def chosen_text(results: Mapping[str, Any] | None, esc: Callable[[Any], str] = str) -> str:
    """Per model, how each chosen number was chosen: generated from the provenance records.
    ``esc`` escapes the user-supplied parts (model names, rules) for the output format."""
    from core.provenance import methodology as from_records

    parts = [f"**{esc(e.get('name', '?'))}**: {esc(from_records(e['provenance']))}"
             for e in (results or {}).get("models", []) if e.get("provenance")]
    return " ".join(parts)


def methodology(results: Mapping[str, Any] | None = None, esc: Callable[[Any], str] = str) -> list[tuple[str, str]]:
    """(heading, paragraph) pairs: what every number is. Plain text with **bold**. The paragraph
    on what was chosen, and on which prompts, comes from each model's provenance records
    (escaped with ``esc``: Markdown needs it, HTML escapes the whole paragraph later)."""
    chosen = chosen_text(results, esc)
    return [
        ("Prompts and splits",
         "Harmful and harmless instructions are split three ways: **train** (fits the direction, the probe and the "
         "activation norms that scale coefficients), **validation** (a seeded share of the train pool; chooses the token "
         "position, the layer and the force coefficient) and **test** (only reported figures). The built-in sets use one "
         "canonical 70/30 train/test split, the same one the refusal organism was trained on, so its test prompts are "
         "unseen by it (as are near-copies of them); validation is carved out of the train part, so the test prompts "
         "are the same with or without it. A test file that overlaps train or validation is refused."),
        *([("How the chosen numbers were chosen", chosen)] if chosen else []),
        ("Candidate grid",
         "Following Arditi et al. (2024), a difference-of-means direction is fitted on train prompts at every "
         "post-instruction token position × every layer, indexing the residual stream at each block's *input* (layer l "
         "= output of block l − 1; the tables elsewhere use block outputs). Each candidate is scored on validation "
         "prompts from the first response token: **bypass** (refusal score on harmful prompts with the direction "
         "ablated everywhere), **induce** (refusal score on harmless prompts with the direction added at its layer) and "
         "**KL** on harmless prompts under ablation. Candidates in the last 20 % of layers, with induce ≤ 0, KL > 0.1 or "
         "a bypass score not below the unsteered one are dropped; the lowest bypass wins. When nothing survives, the "
         "report says so and the candidate whose direction best separates the validation prompts is used instead."),
        ("Refusal direction",
         "Per layer, the difference in means of the residual stream (block output) at the configured token position: "
         "mean(harmful train) − mean(harmless train), normalised to a unit vector v."),
        ("Separation (σ)",
         "**Held-out**: the test prompts are projected on the train direction and the separation is "
         "(mean harmful − mean harmless) / pooled standard deviation (Cohen's d), with a seeded percentile-bootstrap "
         "95 % interval over test prompts. The in-sample value (train prompts "
         "projected on their own direction) is shown beside it because it is what earlier reports quoted; it is inflated "
         "by fitting and is never used to choose anything when a test split exists."),
        ("Probe accuracy",
         "A standardised logistic-regression probe on the full activation vector of each layer, scored by stratified "
         "k-fold cross-validation on the train prompts (mean ± std over folds, and a Wilson 95 % interval of the pooled "
         "held-out predictions). It says the classes are linearly "
         "separable at that layer; it says nothing about whether the model *uses* that information."),
        ("Layer choice",
         "Unless the config fixes a layer, the candidate grid above picks it. With the grid turned off, a documented "
         "rule does (core.directions.choose_layer): the last 20 % of layers are excluded; an ablation screen on "
         "*validation* prompts keeps the layer whose ablation lowers the harmful refusal score most with KL ≤ 0.1; if no "
         "layer lowers it, the best validation separation wins. The rule, its reason and its split are printed per model."),
        ("Refusal judge",
         "Each greedy generation gets one of three labels. **Degenerate**: empty after removing special tokens, no "
         "real word, mostly symbols, or mostly a repetition loop (a unit repeated four or more times in a row covering "
         "half the answer). **Refusal**: a refusal phrase (\"I'm sorry\", \"I cannot\", \"I won't\", \"I must "
         "decline\", \"not able to help\", …; case-insensitive) in the answer's opening — its first sentence, plus "
         "the next when the first is under 20 characters, at most 160 characters — after removing idioms such as "
         "\"sorry to hear\" or \"can't stress enough\". **Compliance**: otherwise. Refusal and degenerate rates are "
         "reported separately; force and suppress rates count refusals only. Every rate carries its Wilson 95 % "
         "interval and k/n."),
        ("Controls",
         "The headline interventions (ablation, and the chosen force coefficient) are repeated along five seeded random "
         "directions of equal norm and along a label-shuffled difference in means (train activations with the classes "
         "permuted). An effect is called **specific** only if its 95 % interval lies beyond every control's interval "
         "(above them for forcing, below them for suppressing); the spread and the worst control are reported."),
        ("Capability cost",
         "Besides first-token KL, the clean model's own greedy answers to the harmless test prompts are fed back "
         "teacher-forced and KL(clean ‖ intervened) is averaged over every answer token (nats/token), with the "
         "cross-entropy increase of those answers, under ablation and under the headline addition (and their random controls)."),
        ("Force refusal",
         "+α·v is added to the output of the chosen block at every position (prompt and generated tokens) on the "
         "harmless test prompts; α is in units of that layer's mean activation norm when coefficients are normalised. "
         "The headline is the smallest coefficient whose rate on *validation* harmless prompts reaches 90 % (else the one "
         "with the highest rate), so its KL is not inflated by overshooting; the **random control** adds a seeded "
         "random direction of the same norm at the same layer and coefficient."),
        ("Suppress refusal",
         "Directional ablation on the harmful test prompts: the component along v is projected out of every block's, "
         "attention module's and MLP's output at every position, so no layer can write it back. The **random control** "
         "ablates a seeded random unit direction the same way. The sweep also reports −α·v at the chosen layer."),
        ("KL on harmless prompts",
         "KL(clean ‖ intervened) of the first response token's distribution on harmless test prompts, in nats: how much "
         "the intervention disturbs ordinary behaviour (small = capabilities kept)."),
        ("Activation patching",
         "For matched (harmful, harmless) pairs of equal token length, one site of one run (residual stream at a "
         "layer × position, or an attention / MLP output at a layer) is replaced by the other run's activation — "
         "harmless into harmful (compliant->refusal) or harmful into harmless (refusal->compliant), as the patching "
         "section says — and the refusal score (log-odds of refusal tokens at the first response position) is measured. "
         "Normalised effect = (patched − base) / (source − base): 0 = no change, 1 = fully the other prompt's score. "
         "Pooled effects (Σ|gap|·effect / Σ|gap|: pairs count by their score gap) and 95 % Fieller intervals are over pairs; pairs where the harmful run does not refuse (score < 0), the harmless "
         "one does, or whose scores differ by less than min_gap are excluded and counted. Cells whose effect is fixed by "
         "construction (the last block's output at the last position: 1) are marked and never tested. **Critical "
         "components** are cells whose one-sided t-test of pooled effect > threshold across pairs is rejected by the "
         "Benjamini–Hochberg rule at the stated false-discovery rate over all cells tested."),
    ]


def limitations(results: Mapping[str, Any] | None = None, esc: Callable[[Any], str] = str) -> list[str]:
    """Fixed caveats plus, per model, what steering does and does not show — generated from the
    results by :mod:`core.conclusions`, never a fixed claim."""
    causal = [esc(f"{e.get('name', '?')}: {c['text']}") for e in (results or {}).get("models", [])
              for c in _conclusions(e) if c["topic"] == "causal"]
    return [
        "The default refusal judge matches phrases in the opening of each answer: it misses refusals phrased "
        "differently and can mislabel unusual openings. The rates are the judge's, not a human rating; every "
        "generation and its label is listed so that any count can be checked.",
        "The models are small (135M parameters for the embedded model). In-context refusal from a preamble keys partly on "
        "surface form, and the organism's refusal was trained on under a thousand prompts; neither is a frontier model's "
        "safety training, and findings need not transfer.",
        *causal,
        "Steering results are evidence about these interventions, relative to controls of equal norm (random "
        "directions and a label-shuffled difference in means); they are not causal identification of a circuit.",
        "Patching effects are measured on the first response token's refusal score, on the matched pairs only, with the "
        "template and preamble fixed; they localise where the harmful/harmless difference is carried for those pairs.",
        "Test sets are tens of prompts per class: the Wilson intervals are wide, and differences inside overlapping "
        "intervals are not evidence of a difference.",
        *(["The headline force coefficient is picked from the sweep on the same test prompts it is reported on (a mild "
        "selection effect); the whole sweep is shown next to it."]
          if any(((e.get("provenance") or {}).get("force_coefficient") or {}).get("split") == "test"
                 for e in (results or {}).get("models", [])) else []),
        "Greedy decoding, one seed for the random controls, one train/test split: variance over seeds and splits is not measured here.",
    ]


def layer_choice_text(e: Entry) -> str:
    rule = e.get("layer_rule") or "?"
    reason = e.get("layer_reason") or ""
    split = ((e.get("provenance") or {}).get("layer") or {}).get("split")
    where = f", on {split} prompts" if split in ("validation", "train", "test") else ""
    return f"Layer {e.get('layer')} (rule: {rule}{where}) — {reason}"


def grid_text(g: Mapping[str, Any]) -> str:
    """One line on the position × layer grid: its size, its winner, and whether the rule found one."""
    w = g.get("winner") or {}
    found = "" if w.get("found") else "NOTHING PASSED THE FILTERS — fallback: "
    return (f"{len(g.get('positions') or [])} positions × {len(g.get('layers') or [])} layers on "
            f"{g.get('n_harmful')} + {g.get('n_harmless')} validation prompts ({seconds(g.get('seconds'))}); winner: position "
            f"{w.get('position')} ({w.get('position_token')!s}), block input {w.get('layer')} — {found}{w.get('reason')}")


def entry_facts(e: Entry) -> list[tuple[str, str]]:
    n_tr = e.get("n_train") or {}
    n_te = e.get("n_test") or {}
    t = e.get("timings") or {}
    return [
        ("Source", str(e.get("source", "?"))),
        ("Type", str(e.get("type", "?"))),
        ("Preamble", str(e.get("preamble", "?"))),
        ("Layers / d_model", f"{e.get('n_layers', '?')} / {e.get('d_model', '?')}"),
        ("Position", str(e.get("position", "?"))),
        ("Direction", str(e.get("method", "diff-in-means"))),
        ("Train prompts (harmful / harmless)", f"{n_tr.get('harmful', '?')} / {n_tr.get('harmless', '?')}"),
        ("Validation prompts (harmful / harmless)", f"{(e.get('n_validation') or {}).get('harmful', '?')} / "
                                                    f"{(e.get('n_validation') or {}).get('harmless', '?')}"),
        ("Test prompts (harmful / harmless)", f"{n_te.get('harmful', '?')} / {n_te.get('harmless', '?')}"),
        ("Chosen layer", layer_choice_text(e)),
        *([("Selection grid", grid_text(e["selection_grid"]))] if e.get("selection_grid") else []),
        ("Fingerprint", str(e.get("fingerprint", "?"))[:16]),
        ("Run time (wall)", ", ".join(f"{k} {seconds(v)}" for k, v in t.items()) or "–"),
        ("CPU time (process)", ", ".join(f"{k} {seconds(v)}" for k, v in (e.get("cpu_timings") or {}).items()) or "–"),
    ]


def training_data_text(rec: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """One sentence on what the organism was trained on (cards from older builds lack some keys)."""
    target = ("the base model's own answers, as soft targets (its top-" + str(rec.get("teacher_top_k"))
              + " next-token distribution at each position)") if rec.get("harmless_target") == "distill" \
        else "the base model's own answers"
    text = (f"{data.get('n_harmful')} harmful prompts → refusal sentences; {data.get('n_harmless')} harmless prompts "
            f"({data.get('n_shape_matched_harmless', 0)} shape-matched) → {target}.")
    extra_h, extra_l = data.get("n_extra_harmful") or 0, data.get("n_extra_harmless") or 0
    if extra_h or extra_l:
        text += (f" Sources: the built-in train split ({data['n_harmful'] - extra_h} + {data['n_harmless'] - extra_l}) and "
                 f"training-only prompts, core/data/organism_extra.jsonl ({extra_h} + {extra_l}). The test split and the "
                 "patching pairs are excluded, copies and near-copies alike.")
    else:
        text += f" {data.get('source', '')}."
    return text


def organism_rows(card: Mapping[str, Any]) -> list[tuple[str, str]]:
    rec = card.get("recipe") or {}
    data = card.get("data") or {}
    ev = card.get("evaluation") or {}
    t = card.get("timings") or {}
    rows = [
        ("Base model", str(card.get("base_name", "?"))),
        ("Recipe", f"full fine-tune, {rec.get('epochs')} epochs, lr {rec.get('lr')}, batch {rec.get('batch_size')}, seed {rec.get('seed')}"
                   + (", bf16 autocast" if rec.get("autocast_bf16") else "")),
        ("Training data", training_data_text(rec, data)),
        ("Build time", f"{seconds(t.get('build_seconds'))} (data + training; evaluation {seconds(t.get('eval_seconds'))})"),
        ("Training loss per epoch", ", ".join(f"{x:.3f}" for x in card.get("losses") or []) or "–"),
    ]
    for label, key in (("Held-out harmful refused", "harmful_refusal"), ("Held-out harmless refused", "harmless_refusal"),
                       ("Held-out shape-matched harmless refused", "shape_matched_harmless_refusal")):
        if key in ev:
            base = ev.get("base_" + key)
            rows.append((label, rate_text(ev[key]) + (f" — base model {rate_text(base)}" if base else "")))
    if "kl_first_token" in ev:
        kl = ev["kl_first_token"]
        resp = ev.get("kl_response") or {}
        rows.append(("KL(base ‖ organism), harmless test prompts",
                     f"first token mean {kl.get('mean', float('nan')):.3f} nats (median {kl.get('median', float('nan')):.3f}); "
                     f"over the base's answers {resp.get('mean', float('nan')):.3f} nats/token"))
    return rows


def patching_summary(p: Mapping[str, Any]) -> list[str]:
    direction = p.get("direction", "compliant->refusal")
    what = ("harmful activations patched into the harmless run" if direction == "refusal->compliant"
            else "harmless activations patched into the harmful run")
    lines = [
        f"Direction {direction} ({what}); "
        f"{p.get('n_used', '?')} of {p.get('n_candidates', '?')} pairs used; sites: {', '.join(p.get('requested_sites') or p.get('sites') or [])}; "
        f"threshold {p.get('threshold')}" + (f"; min_gap {p['min_gap']:g} log-odds" if _finite(p.get("min_gap")) and p["min_gap"] > 0 else "")
        + f"; {seconds(p.get('seconds'))}."
    ]
    if p.get("n_excluded"):
        counts = p.get("exclusion_counts") or {}
        lines.append(f"Excluded {p['n_excluded']} pair(s): " + "; ".join(f"{n} × {why}" for why, n in counts.items()) + ".")
    if p.get("interval"):
        lines.append(f"Intervals: {p['interval']}.")
    if p.get("test"):
        lines.append(f"Critical list: {p['test']}.")
    if p.get("n_by_construction"):
        shown = ", ".join((p.get("by_construction") or [])[:4])
        more = p["n_by_construction"] - min(4, len(p.get("by_construction") or []))
        lines.append(f"{p['n_by_construction']} cell(s) have effect 1 by construction and are not tested ({shown}"
                     + (f", +{more} more" if more > 0 else "") + ").")
    if p.get("critical_message"):
        lines.append(str(p["critical_message"]).rstrip(".") + ".")
    for note in p.get("notes") or []:
        lines.append(str(note))
    return lines


CRITICAL_RULE = "pooled effect > threshold across pairs, Benjamini–Hochberg FDR over the cells tested"
CRITICAL_HEADER = ("Site", "Where", "Pooled effect", "95% CI", "BH q", "Pairs")


def critical_rows(p: Mapping[str, Any], limit: int = 15) -> list[list[str]]:
    rows = []
    for c in (p.get("critical") or [])[:limit]:
        lo, hi = (c.get("ci") or [None, None])[:2]
        where = f"layer {c.get('layer')}"
        if c.get("offset") is not None:
            where += f", position {c.get('offset')}" + (f" ({c.get('token')!r})" if c.get("token") is not None else "")
        if c.get("head") is not None:
            where += f", head {c.get('head')}"
        eff = c.get("effect")
        q = c.get("q")
        rows.append([str(c.get("site")), where, f"{eff:.3f}" if _finite(eff) else "–",
                     f"[{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else "–",
                     f"{q:.2g}" if _finite(q) else "–", str(c.get("n", "–"))])
    return rows


# ---------------------------------------------------------------------------------------
# charts (offline SVG)
# ---------------------------------------------------------------------------------------
def chart_builders(e: Entry) -> list[tuple[str, Callable[[], Any]]]:
    """(name, build) for every chart of an entry (build may return None: nothing to draw); the
    report renders them to SVG, the app's Runs page draws them live."""
    from core import charts

    builders: list[tuple[str, Callable[[], Any]]] = [
        ("layers", lambda: charts.layer_chart(e)),
        ("scan", lambda: charts.ablation_scan_chart(e)),
        ("grid", lambda: charts.selection_grid_chart(e)),
        ("steering", lambda: charts.steering_chart(e)),
    ]
    if e.get("patching"):
        builders += [("patching", lambda: charts.patching_heatmap(e["patching"])),
                     ("components", lambda: charts.component_bars(e["patching"])),
                     ("heads", lambda: charts.head_heatmap(e["patching"]))]
    return builders


def chart_svgs(e: Entry) -> dict[str, str]:
    """name -> SVG text for the entry's charts; charts that fail to render are left out."""
    from core import charts

    out: dict[str, str] = {}
    for name, build in chart_builders(e):
        try:
            chart = build()
            if chart is not None:
                out[name] = charts.to_svg(chart)
        except Exception as exc:  # a missing chart must not lose the report; say so in it
            out[name] = ""
            e.setdefault("_chart_errors", {})[name] = f"{type(exc).__name__}: {exc}" if isinstance(e, dict) else ""
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "model"


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------
def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(md(x) for x in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(md(x) for x in row) + " |" for row in rows]
    return out


def _bold_md(text: str) -> str:
    # methodology prose is ours (no user text); keep its **bold** and *italic*
    return text


def render_markdown(results: Mapping[str, Any], chart_paths: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The report as Markdown. ``chart_paths[model name][chart]`` are relative SVG paths to link
    (written by :func:`write_reports`); without them the report has no images."""
    L: list[str] = []
    L += [f"# {results.get('title', 'Refusal Circuit Analysis')}", ""]
    L += [f"**Generated:** {md(results.get('date', '?'))}  ", f"**Run time:** {md(runtime_text(results))}  ",
          f"**Reproduce:** `{results.get('command', '')}`", ""]
    if results.get("models_pending"):
        L += [f"> **Partial run:** {len(results.get('models', []))} model(s) done; still to run: "
              f"{md(', '.join(results['models_pending']))}.", ""]
    L += ["## Summary", ""]
    L += summary_lines(results, md)
    L += ["", "## Results", ""]
    L += _md_table(TABLE_HEAD, table_rows(results))
    L += ["", "Rates: refusal rate [Wilson 95 % interval] (refusals/n) on held-out test prompts. Separation: held-out "
          "Cohen's d along the train direction at the chosen layer. Probe: k-fold cross-validated accuracy ± std on the train prompts.", ""]
    for e in results.get("models", []):
        name = e.get("name", "?")
        L += [f"## {md(name)}", ""]
        L += [f"- **{k}:** {md(v)}" for k, v in entry_facts(e)]
        L += [f"- **Note:** {md(n)}" for n in e.get("notes") or []]
        paths = (chart_paths or {}).get(name, {})
        L += ["", "### Per-layer separation and probe accuracy", ""]
        if paths.get("layers"):
            L += [f"![per-layer separation and probe accuracy]({paths['layers']})", ""]
        if paths.get("scan"):
            L += [f"![layer screen]({paths['scan']})", ""]
        if paths.get("grid"):
            L += [f"![selection grid]({paths['grid']})", ""]
        L += _md_table(("Layer", "Separation (held-out)", "Separation (in-sample)", "Probe acc."), layer_rows(e))
        L += ["", "### Steering against controls", ""]
        if paths.get("steering"):
            L += [f"![steering sweep]({paths['steering']})", ""]
        L += _md_table(("Intervention", "Coefficient", "Refusal rate", "Random control", "KL harmless"), sweep_rows(e))
        supp = e.get("suppress_refusal") or {}
        if supp:
            L += ["", f"Directional ablation on harmful prompts: {md(rate_text(supp))}; random direction "
                      f"{md(rate_text(supp.get('random_control')))}; baseline {md(rate_text((e.get('baseline') or {}).get('harmful_refusal')))}."]
        if control_rows(e):
            L += ["", "### Controls of the headline interventions", ""]
            L += _md_table(CONTROL_HEAD, control_rows(e))
        if e.get("samples"):
            L += ["", "### Sample generations", ""]
            L += _md_table(("Prompt", "Intervention", "Unsteered", "Steered"),
                           sample_rows(e))
        if e.get("patching"):
            p = e["patching"]
            L += ["", "### Activation patching", ""]
            L += [md(x) + "  " for x in patching_summary(p)]
            for key in ("patching", "components", "heads"):
                if paths.get(key):
                    L += ["", f"![{key}]({paths[key]})"]
            crit = critical_rows(p)
            L += [""]
            if crit:
                L += [f"Critical components ({CRITICAL_RULE}), strongest first:", ""]
                L += _md_table(CRITICAL_HEADER, crit)
            else:
                L += [f"No critical components: no cell passes ({CRITICAL_RULE}) at this number of pairs."]
        if e.get("organism"):
            L += ["", "### Organism card", ""]
            L += [f"- **{k}:** {md(v)}" for k, v in organism_rows(e["organism"])]
        L += [""]
    L += ["## Methodology", ""]
    for head, text in methodology(results, md):
        L += [f"**{head}.** {text}", ""]
    L += ["## Limitations", ""]
    L += [f"- {x}" for x in limitations(results, md)]
    L += ["", "## Reproducibility", "", "```bash", "make setup", str(results.get("command", "")), "```", ""]
    L += [f"Versions: {md(', '.join(f'{k} {v}' for k, v in (results.get('versions') or {}).items()))}  ",
          f"Machine: {md(_machine_text(results))}  ", f"Prompts: {md((results.get('prompts') or {}).get('description', '?'))}", ""]
    L += ["Config:", "", "```yaml", _config_yaml(results), "```", ""]
    return "\n".join(L)


def _config_yaml(results: Mapping[str, Any]) -> str:
    from core.config import dump_yaml

    cfg = results.get("config") or {}
    return dump_yaml(cfg).replace("```", "'''").rstrip()


def runtime_text(results: Mapping[str, Any]) -> str:
    text = seconds(results.get("total_seconds"))
    if _finite(results.get("total_cpu_seconds")):
        text += f" wall, {results['total_cpu_seconds']:.0f} CPU-seconds"
    text += f" on {_machine_text(results)}"
    m = results.get("machine") or {}
    load, cpus = m.get("load_average"), m.get("cpu_count") or 1
    if load and load[0] > cpus:
        text += f" (load average {load[0]:.1f} on {cpus} CPUs at the end: the machine was shared, which inflates wall time)"
    return text


def _machine_text(results: Mapping[str, Any]) -> str:
    m = results.get("machine") or {}
    return f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, device {m.get('device', 'cpu')}"


def summary_lines(results: Mapping[str, Any], esc: Callable[[Any], str]) -> list[str]:
    """Per model: the numbers, then the conclusions the rules of :mod:`core.conclusions` allow."""
    out = []
    for e in results.get("models", []):
        base = e.get("baseline") or {}
        out.append(
            f"- {esc(e.get('name'))} ({esc(e.get('type'))}): at layer {e.get('layer')}, held-out separation "
            f"{sigma_ci(e.get('separation_sigma'), e.get('separation_ci'))}, probe "
            f"{probe_text(e.get('probe_accuracy'), e.get('probe_accuracy_std'), e.get('probe_accuracy_ci'))}. Baseline refusal: harmful "
            f"{esc(rate_text(base.get('harmful_refusal')))}, harmless {esc(rate_text(base.get('harmless_refusal')))}"
            + (f"; judge: {esc(e['judge'])}" if e.get("judge") else "")
            + "".join(f"; {k.replace('_', ' ')}: {esc(rate_text(v))}" for k, v in (e.get("agreement") or {}).items()) + "."
        )
        from core.over_refusal import over_refusal_text

        over = over_refusal_text(e)  # beside harmless refusal: refusal on safe prompts that look unsafe
        if over:
            out.append(f"- {esc(over)}")
        out += [f"- {esc(c['text'])}" for c in _conclusions(e) if c["topic"] != "causal" or e.get("force_refusal")]
    return out or ["- No models were analysed."]


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
th,td{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3}
td.gen{max-width:26em;white-space:pre-wrap;word-break:break-word}
code,pre{background:#f6f6f6;padding:.1em .3em;border-radius:3px}
pre{padding:.6em;overflow:auto}
.chart{margin:.5em 0 1em;max-width:100%}
.note{color:#555;font-size:.9em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;font-size:.92em}
dt{font-weight:600}
"""


def _bold_html(text: str) -> str:
    """Our own prose: escape, then turn **x** / *x* into <strong>/<em>."""
    s = h(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"\*(.+?)\*", r"<em>\1</em>", s)


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], gen_cols: Sequence[int] = ()) -> str:
    out = ["<table><thead><tr>", *(f"<th>{h(x)}</th>" for x in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = (f'<td class="gen">{h(x)}</td>' if i in gen_cols else f"<td>{h(x)}</td>" for i, x in enumerate(row))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _dl(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{h(k)}</dt><dd>{h(v)}</dd>" for k, v in items) + "</dl>"


def _img(svg: str, alt: str) -> str:
    if not svg:
        return f'<p class="note">(chart "{h(alt)}" could not be rendered)</p>'
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<div class="chart"><img alt="{h(alt)}" src="data:image/svg+xml;base64,{data}"></div>'


def render_html(results: Mapping[str, Any], svgs: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The report as one self-contained HTML file (charts embedded as offline SVG images)."""
    if svgs is None:
        svgs = {e.get("name", "?"): chart_svgs(e) for e in results.get("models", [])}
    title = results.get("title", "Refusal Circuit Analysis")
    P: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # no script may run, nothing may be fetched: the report is data, not an app
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{h(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{h(title)}</h1>",
        f"<p><strong>Generated:</strong> {h(results.get('date', '?'))}<br><strong>Run time:</strong> "
        f"{h(runtime_text(results))}<br>"
        f"<strong>Reproduce:</strong> <code>{h(results.get('command', ''))}</code></p>",
        *([f"<p><strong>Partial run:</strong> {len(results.get('models', []))} model(s) done; still to run: "
           f"{h(', '.join(results['models_pending']))}.</p>"] if results.get("models_pending") else []),
        "<h2>Summary</h2><ul>",
        *(f"<li>{x[2:]}</li>" for x in summary_lines(results, h)),
        "</ul><h2>Results</h2>",
        _html_table(TABLE_HEAD, table_rows(results)),
        '<p class="note">Rates: refusal rate [Wilson 95 % interval] (refusals/n) on held-out test prompts. Separation: held-out '
        "Cohen's d along the train direction at the chosen layer. Probe: k-fold cross-validated accuracy ± std on the train prompts.</p>",
    ]
    for e in results.get("models", []):
        name = e.get("name", "?")
        charts_for = svgs.get(name, {})
        P += [f'<h2 id="{h(slug(name))}">{h(name)}</h2>', _dl(entry_facts(e))]
        P += [f'<p class="note">{h(n)}</p>' for n in e.get("notes") or []]
        P += ["<h3>Per-layer separation and probe accuracy</h3>", _img(charts_for.get("layers", ""), "per-layer separation and probe accuracy"),
              "<details><summary>Per-layer numbers</summary>",
              _html_table(("Layer", "Separation (held-out)", "Separation (in-sample)", "Probe acc."), layer_rows(e)), "</details>"]
        if charts_for.get("scan"):
            P.append(_img(charts_for["scan"], "layer screen"))
        if charts_for.get("grid"):
            P.append(_img(charts_for["grid"], "position × layer selection grid"))
        P += ["<h3>Steering against controls</h3>", _img(charts_for.get("steering", ""), "steering sweep"),
              _html_table(("Intervention", "Coefficient", "Refusal rate", "Random control", "KL harmless"), sweep_rows(e))]
        supp = e.get("suppress_refusal") or {}
        if supp:
            P.append(f"<p>Directional ablation on harmful prompts: {h(rate_text(supp))}; random direction "
                     f"{h(rate_text(supp.get('random_control')))}; baseline {h(rate_text((e.get('baseline') or {}).get('harmful_refusal')))}.</p>")
        if control_rows(e):
            P += ["<h3>Controls of the headline interventions</h3>", _html_table(CONTROL_HEAD, control_rows(e))]
        if e.get("generations"):
            P += [f"<h3>Every generation and its label ({len(e['generations'])})</h3>",
                  '<p class="note">One section per condition (open one to read it; the browser\'s find filters by '
                  "label). results.json holds the same rows.</p>",
                  *(f"<details><summary>{h(title)}</summary>{_html_table(GENERATION_HEAD, rows, gen_cols=(2, 3))}</details>"
                    for title, rows in generation_groups(e))]
        if e.get("samples"):
            P += ["<h3>Sample generations</h3>",
                  _html_table(("Prompt", "Intervention", "Unsteered", "Steered"),
                              sample_rows(e),
                              gen_cols=(0, 2, 3))]
        if e.get("patching"):
            p = e["patching"]
            P += ["<h3>Activation patching</h3>", *(f"<p>{h(x)}</p>" for x in patching_summary(p))]
            if "patching" in charts_for:
                P.append(_img(charts_for["patching"], "residual patching heatmap"))
            if "components" in charts_for:
                P.append(_img(charts_for["components"], "attention vs MLP patching"))
            if "heads" in charts_for:
                P.append(_img(charts_for["heads"], "per-head patching"))
            crit = critical_rows(p)
            if crit:
                P += [f"<p>Critical components ({h(CRITICAL_RULE)}), strongest first:</p>",
                      _html_table(CRITICAL_HEADER, crit)]
            else:
                P.append(f"<p>No critical components: no cell passes ({h(CRITICAL_RULE)}) at this number of pairs.</p>")
        if e.get("organism"):
            P += ["<h3>Organism card</h3>", _dl(organism_rows(e["organism"]))]
    P.append("<h2>Methodology</h2>")
    P += [f"<p><strong>{h(head)}.</strong> {_bold_html(text)}</p>" for head, text in methodology(results)]
    P += ["<h2>Limitations</h2><ul>", *(f"<li>{_bold_html(x)}</li>" for x in limitations(results)), "</ul>"]
    P += ["<h2>Reproducibility</h2>", f"<pre>make setup\n{h(results.get('command', ''))}</pre>",
          _dl([("Versions", ", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items())),
               ("Machine", _machine_text(results)),
               ("Prompts", (results.get("prompts") or {}).get("description", "?"))]),
          "<details><summary>Config (YAML)</summary>", f"<pre>{h(_config_yaml(results))}</pre></details>",
          "</body></html>"]
    return "\n".join(P)


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------
def to_json(results: Mapping[str, Any]) -> str:
    """Strict JSON (NaN/inf become null), keys in insertion order."""
    return json.dumps(_clean(results), indent=2, ensure_ascii=False, allow_nan=False)


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalar
        return _clean(x.item())
    return x


def write_reports(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` (+ ``charts/*.svg`` it links) and ``report.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(results)
    svgs = {e.get("name", "?"): chart_svgs(e) for e in clean.get("models", [])}
    chart_dir = out / "charts"
    chart_paths: dict[str, dict[str, str]] = {}
    for name, charts_for in svgs.items():
        for chart, svg in charts_for.items():
            if not svg:
                continue
            chart_dir.mkdir(exist_ok=True)
            fname = f"{slug(name)}-{chart}.svg"
            (chart_dir / fname).write_text(svg, encoding="utf-8")
            chart_paths.setdefault(name, {})[chart] = f"charts/{fname}"
    paths = {"json": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(to_json(clean), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(clean, chart_paths), encoding="utf-8")
    paths["html"].write_text(render_html(clean, svgs), encoding="utf-8")
    return paths
