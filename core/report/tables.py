"""The report's tables and fact lists, as rows of plain text (the renderers escape them).

The first table is the seed report's table done properly (:data:`SEED_HEAD`): one row per model
with its type, the chosen position and layer and the split that chose them, held-out separation
and probe accuracy with intervals, baseline refusal with n, both steering effects next to their
controls, the capability cost and the critical components from patching.
"""

from __future__ import annotations

from typing import Any, Mapping

from core.metrics import finite
from core.report.numbers import coef_text, nats, probe_text, rate_text, sigma, sigma_ci

Entry = Mapping[str, Any]


# ---------------------------------------------------------------------------------------
# cells of the table across models
# ---------------------------------------------------------------------------------------
def model_kind(e: Entry) -> str:
    """instruct / prompted / organism / base: what kind of refusal the model has, if any."""
    kind = str(e.get("type") or "")
    preamble = e.get("preamble")
    if "organism" in kind or e.get("source") == "embedded-refusal":
        return "organism"
    if preamble not in (None, "none", "") or "in-context refusal" in kind:
        return "prompted" + (" base" if kind.startswith("base") else "")
    if kind.startswith("chat"):
        return "instruct"
    if kind.startswith("base"):
        return "base"
    return kind or "?"


_SPLIT = {"validation": "validation", "train": "train", "test": "TEST", "user": "set by the user",
          "none": "fixed", "none (not chosen)": "fixed"}


def _split(rec: Mapping[str, Any] | None) -> str:
    split = (rec or {}).get("split")
    return _SPLIT.get(str(split), str(split)) if split is not None else "?"


def position_layer_text(e: Entry) -> str:
    """``position -2 ('assistant'), layer 8 — on validation``; the two splits apart when they differ."""
    prov = e.get("provenance") or {}
    pos, lay = prov.get("position") or {}, prov.get("layer") or {}
    token = pos.get("token")
    position = f"position {pos.get('value', e.get('position', '?'))}" + (f" ({token!r})" if token is not None else "")
    layer = f"layer {e.get('layer', '–')}"
    winner = (e.get("selection_grid") or {}).get("winner") or {}
    fallback = "; grid fallback: nothing passed its filters" if winner and not winner.get("found") else ""
    if not prov:
        return f"{position}, {layer} ({e.get('layer_split') or '?'}){fallback}"
    if _split(pos) == _split(lay):
        return f"{position}, {layer} — {_split(lay)}{fallback}"
    return f"{position} ({_split(pos)}), {layer} ({_split(lay)}){fallback}"


def separation_text(e: Entry) -> str:
    return f"{sigma_ci(e.get('separation_sigma'), e.get('separation_ci'))} (in-sample {sigma(e.get('separation_in_sample'))})"


def entry_probe_text(e: Entry) -> str:
    return probe_text(e.get("probe_accuracy"), e.get("probe_accuracy_std"), e.get("probe_accuracy_ci"))


def _control(e: Entry, key: str) -> Mapping[str, Any]:
    return (e.get("controls") or {}).get(key) or {}


def controls_cell(e: Entry, key: str) -> str:
    """The controls of one headline intervention (``force`` or ``ablation``): the worst of the
    random directions (highest refusal for forcing, lowest for suppressing), the label-shuffled
    direction, and the verdict."""
    c = _control(e, key)
    single = (e.get("force_refusal" if key == "force" else "suppress_refusal") or {}).get("random_control")
    if not c:
        return f"random {rate_text(single)}" if single else "–"
    randoms = [x for x in c.get("controls") or [] if x.get("kind", "random") == "random"]
    shuffled = [x for x in c.get("controls") or [] if x.get("kind") == "shuffled"]
    parts = []
    if randoms:
        pick = max if c.get("expect", "above" if key == "force" else "below") == "above" else min
        worst = pick(randoms, key=lambda x: (x.get("refusal") or {}).get("rate") or 0.0)
        parts.append(f"worst of {len(randoms)} random {rate_text(worst.get('refusal'))}")
    if shuffled:
        parts.append(f"label-shuffled {rate_text(shuffled[0].get('refusal'))}")
    verdict = {True: "specific", False: "not specific"}.get(c.get("specific"))
    return "; ".join(parts) + (f" — {verdict}" if verdict else "") if parts else "–"


def ablation_kl(e: Entry) -> tuple[float | None, float | None]:
    """First-token KL on harmless prompts under ablation of the direction and of a random one."""
    kl = (e.get("kl_harmless") or {}).get("ablation")
    rnd = (e.get("suppress_ablation") or {}).get("random_kl_harmless")
    return (kl if finite(kl) else None, rnd if finite(rnd) else None)


def cost_cell(e: Entry) -> str:
    """Ablation's cost on harmless prompts: first-token KL and KL per answer token, each with
    the random direction's beside it."""
    kl, rnd = ablation_kl(e)
    if kl is None:
        return "–"
    text = nats(kl) + (f" (random {rnd:.3f})" if rnd is not None else "")
    cap = e.get("capability") or {}
    per, per_rnd = (cap.get("ablation") or {}).get("kl_per_token"), (cap.get("random ablation") or {}).get("kl_per_token")
    if finite(per):
        text += f"; {per:.3f} nats/token over answers" + (f" (random {per_rnd:.3f})" if finite(per_rnd) else "")
    return text


def critical_text(e: Entry, limit: int = 3) -> str:
    """The critical patching components in a few words: how many, and the strongest."""
    p = e.get("patching")
    if not p:
        return "patching not run"
    crit = p.get("critical") or []
    if not crit:
        return f"none ({p.get('n_used', '?')} pairs)"
    top = []
    for c in crit[:limit]:
        where = f"{c.get('site')} L{c.get('layer')}" + (f" pos {c.get('offset')}" if c.get("offset") is not None else "") \
            + (f" h{c.get('head')}" if c.get("head") is not None else "")
        eff = c.get("effect")
        top.append(f"{where} ({eff:.2f})" if isinstance(eff, (int, float)) else where)
    more = f", +{len(crit) - limit} more" if len(crit) > limit else ""
    return f"{len(crit)}: " + ", ".join(top) + more + f" ({p.get('n_used', '?')} pairs)"


def controls_text(e: Entry) -> str:
    """Whether the headline force and ablation beat every control (``core.controls``' verdicts)."""
    parts = []
    for key, label in (("force", "force"), ("ablation", "ablation")):
        c = _control(e, key)
        if c:
            verdict = {True: "specific", False: "not specific"}.get(c.get("specific"), "–")
            parts.append(f"{label}: {verdict} ({len(c.get('controls') or [])} controls)")
    return "; ".join(parts) or "–"


def force_text(e: Entry) -> str:
    force = e.get("force_refusal") or {}
    return f"{rate_text(force)} at {coef_text(force.get('coefficient'))}" if force else "–"


def suppress_text(e: Entry) -> str:
    supp = e.get("suppress_refusal") or {}
    return rate_text(supp) if supp else "–"


def _baseline(e: Entry, key: str) -> str:
    return rate_text((e.get("baseline") or {}).get(key))


SEED_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("Model", lambda e: str(e.get("name", "?"))),
    ("Type", model_kind),
    ("Position, layer — chosen on", position_layer_text),
    ("Separation (held-out)", separation_text),
    ("Probe acc.", entry_probe_text),
    ("Baseline refusal: harmful", lambda e: _baseline(e, "harmful_refusal")),
    ("Baseline refusal: harmless", lambda e: _baseline(e, "harmless_refusal")),
    ("Force refusal (harmless, +α·v)", force_text),
    ("Controls (force): worst random, label-shuffled", lambda e: controls_cell(e, "force")),
    ("Suppress refusal (harmful, ablation)", suppress_text),
    ("Controls (suppress): worst random, label-shuffled", lambda e: controls_cell(e, "ablation")),
    ("KL harmless (ablation)", cost_cell),
    ("Critical components (patching)", critical_text),
)
SEED_HEAD = tuple(head for head, _ in SEED_COLUMNS)


def seed_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """The opening table of the report: one row per model, columns :data:`SEED_HEAD`."""
    return [[cell(e) for _, cell in SEED_COLUMNS] for e in results.get("models", [])]


# The shorter table of the Runs page (which adds its own position, verdict and patching columns).
TABLE_HEAD = (
    "Model", "Type", "Layer", "Separation (held-out)", "Probe acc.", "Baseline refusal: harmful",
    "Baseline refusal: harmless", "Force refusal (harmless, +α·v)", "Random control (force)",
    "Suppress refusal (harmful, ablation)", "Random control (suppress)", "KL harmless (ablation)",
)


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """One plain-text row per model, columns :data:`TABLE_HEAD`."""
    rows = []
    for e in results.get("models", []):
        force = e.get("force_refusal") or {}
        supp = e.get("suppress_refusal") or {}
        kl, _ = ablation_kl(e)
        rows.append([
            str(e.get("name", "?")), str(e.get("type", "?")), str(e.get("layer", "–")), separation_text(e),
            entry_probe_text(e), _baseline(e, "harmful_refusal"), _baseline(e, "harmless_refusal"), force_text(e),
            rate_text(force.get("random_control")) if force else "–", suppress_text(e),
            rate_text(supp.get("random_control")) if supp else "–", nats(kl),
        ])
    return rows


# ---------------------------------------------------------------------------------------
# per-model tables
# ---------------------------------------------------------------------------------------
CONTROL_HEAD = ("Intervention", "Direction", "Refusal", "Degenerate", "Verdict")


def control_rows(e: Entry) -> list[list[str]]:
    """One row per control of each headline intervention: the numbers behind "specific"."""
    rows = []
    for key, label in (("force", "force (harmless)"), ("ablation", "ablation (harmful)")):
        c = _control(e, key)
        if not c:
            continue
        verdict = {True: "specific", False: "not specific", None: "–"}[c.get("specific")]
        rows.append([label, f"{c.get('condition')} (the direction)", rate_text(c.get("refusal")), rate_text(c.get("degenerate")), verdict])
        for ctrl in c.get("controls") or []:
            rows.append([label, ctrl.get("name", "?"), rate_text(ctrl.get("refusal")), rate_text(ctrl.get("degenerate")), ""])
    return rows


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


LAYER_HEAD = ("Layer", "Separation (held-out)", "Separation (in-sample)", "Probe acc.")


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


SWEEP_HEAD = ("Intervention", "Coefficient", "Refusal rate", "Random control", "KL harmless")


def sweep_rows(e: Entry) -> list[list[str]]:
    rows = []
    for label, key in (("force (harmless, +α·v)", "force_sweep"), ("suppress (harmful, −α·v)", "suppress_sweep")):
        for p in e.get(key) or []:
            kl = p.get("kl")
            rows.append([label, coef_text(p.get("coefficient")), rate_text(p.get("rate")), rate_text(p.get("random_rate")),
                         f"{kl:.3f}" if finite(kl) else "–"])
    return rows


SAMPLE_HEAD = ("Prompt", "Intervention", "Unsteered", "Steered")


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
        rows.append([str(c.get("site")), where, f"{eff:.3f}" if finite(eff) else "–",
                     f"[{lo:.3f}, {hi:.3f}]" if finite(lo) and finite(hi) else "–",
                     f"{q:.2g}" if finite(q) else "–", str(c.get("n", "–"))])
    return rows
