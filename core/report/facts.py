"""A model's facts (source, splits, chosen layer, timings), its organism card and its patching
summary: label/value pairs and sentences, as plain text (the renderers escape them)."""

from __future__ import annotations

from typing import Any, Mapping

from core.metrics import finite
from core.report.numbers import rate_text, seconds

Entry = Mapping[str, Any]


def patching_summary(p: Mapping[str, Any]) -> list[str]:
    direction = p.get("direction", "compliant->refusal")
    what = ("harmful activations patched into the harmless run" if direction == "refusal->compliant"
            else "harmless activations patched into the harmful run")
    lines = [
        f"Direction {direction} ({what}); "
        f"{p.get('n_used', '?')} of {p.get('n_candidates', '?')} pairs used; sites: {', '.join(p.get('requested_sites') or p.get('sites') or [])}; "
        f"threshold {p.get('threshold')}" + (f"; min_gap {p['min_gap']:g} log-odds" if finite(p.get("min_gap")) and p["min_gap"] > 0 else "")
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


# ---------------------------------------------------------------------------------------
# fact lists
# ---------------------------------------------------------------------------------------
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
    n_va = e.get("n_validation") or {}
    t = e.get("timings") or {}
    return [
        ("Source", str(e.get("source", "?"))),
        ("Type", str(e.get("type", "?"))),
        ("Preamble", str(e.get("preamble", "?"))),
        ("Layers / d_model", f"{e.get('n_layers', '?')} / {e.get('d_model', '?')}"),
        ("Position", str(e.get("position", "?"))),
        ("Direction", str(e.get("method", "diff-in-means"))),
        ("Train prompts (harmful / harmless)", f"{n_tr.get('harmful', '?')} / {n_tr.get('harmless', '?')}"),
        ("Validation prompts (harmful / harmless)", f"{n_va.get('harmful', '?')} / {n_va.get('harmless', '?')}"),
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
