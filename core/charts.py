"""Altair chart builders shared by the report and the app (``st.altair_chart(chart)``).

Why here and not in the pages: the offline HTML report and the Streamlit pages must show the
same picture of the same numbers. Every builder takes the plain-data results of
:func:`core.results.model_entry` (or the patching result dict), never tensors, and returns an
Altair chart; :func:`to_svg` renders one offline with vl-convert (no network, no CDN).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import altair as alt
import pandas as pd

from core.metrics import finite_or_none as _num

DIRECTION = "refusal direction"
RANDOM = "random direction (control)"
PALETTE = {DIRECTION: "#c0392b", RANDOM: "#7f8c8d"}
WIDTH = 320
HEIGHT = 200


def _chosen_rule(layer: int | None) -> alt.Chart | None:
    if layer is None:
        return None
    return (
        alt.Chart(pd.DataFrame({"layer": [layer], "label": [f"chosen layer {layer}"]}))
        .mark_rule(color="#2c3e50", strokeDash=[4, 3])
        .encode(x="layer:Q", tooltip=["label:N"])
    )


def layer_chart(entry: Mapping[str, Any]) -> alt.Chart:
    """Per-layer held-out separation (in-sample dashed) and probe accuracy ± std, chosen layer marked."""
    layers = entry.get("layers") or []
    chosen = entry.get("layer")
    rows = []
    for row in layers:
        rows.append({"layer": row["layer"], "kind": "held-out (test prompts)", "sigma": row.get("separation_sigma")})
        if row.get("separation_in_sample") is not None:
            rows.append({"layer": row["layer"], "kind": "in-sample (train prompts)", "sigma": row["separation_in_sample"]})
    sep = pd.DataFrame(rows, columns=["layer", "kind", "sigma"])
    x = alt.X("layer:Q", title="layer (block output)", scale=alt.Scale(nice=False),
              axis=alt.Axis(tickMinStep=1, format="d"))
    sep_lines = (
        alt.Chart(sep)
        .mark_line(point=alt.OverlayMarkDef(size=18))
        .encode(
            x=x,
            y=alt.Y("sigma:Q", title="separation (σ)"),
            color=alt.Color("kind:N", title=None, scale=alt.Scale(range=["#c0392b", "#e6b0aa"]),
                            legend=alt.Legend(orient="bottom")),
            strokeDash=alt.StrokeDash("kind:N", legend=None, scale=alt.Scale(range=[[1, 0], [4, 3]])),
            tooltip=["layer:Q", "kind:N", alt.Tooltip("sigma:Q", format=".2f")],
        )
        .properties(width=WIDTH, height=HEIGHT, title="Separation of harmful vs harmless along the direction")
    )
    probe = pd.DataFrame(
        [{"layer": r["layer"], "acc": r.get("probe_accuracy"),
          "lo": max(0.0, (r.get("probe_accuracy") or 0) - (r.get("probe_accuracy_std") or 0)),
          "hi": min(1.0, (r.get("probe_accuracy") or 0) + (r.get("probe_accuracy_std") or 0))} for r in layers],
        columns=["layer", "acc", "lo", "hi"],
    )
    band = alt.Chart(probe).mark_area(opacity=0.25, color="#2471a3").encode(
        x=x, y=alt.Y("lo:Q", title="probe accuracy", scale=alt.Scale(domain=[0.0, 1.0]), axis=alt.Axis(format="%")), y2="hi:Q")
    line = (
        alt.Chart(probe)
        .mark_line(point=alt.OverlayMarkDef(size=18), color="#2471a3")
        .encode(x=x, y=alt.Y("acc:Q", scale=alt.Scale(domain=[0.0, 1.0])),
                tooltip=["layer:Q", alt.Tooltip("acc:Q", format=".1%")])
    )
    left = [sep_lines]
    right = [band, line]
    rule = _chosen_rule(chosen)
    if rule is not None:
        left.append(rule)
        right.append(rule)
    probe_panel = alt.layer(*right).properties(width=WIDTH, height=HEIGHT, title="Linear probe accuracy (k-fold CV, ± std)")
    return alt.hconcat(alt.layer(*left), probe_panel).resolve_scale(color="independent")


def _sweep_rows(points: Sequence[Mapping[str, Any]], panel: str) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        for series, key in ((DIRECTION, "rate"), (RANDOM, "random_rate")):
            r = p.get(key)
            if not r:
                continue
            lo, hi = r.get("ci", [None, None])
            rows.append({"panel": panel, "coefficient": p["coefficient"], "series": series, "rate": r["rate"],
                         "lo": lo, "hi": hi, "k": r.get("k"), "n": r.get("n")})
    return rows


def _hline(rate: float, label: str, color: str, side: str) -> list[alt.Chart]:
    df = pd.DataFrame({"rate": [rate], "label": [label]})
    rule = alt.Chart(df).mark_rule(strokeDash=[4, 3], color=color).encode(y="rate:Q", tooltip=["label:N"])
    text = alt.Chart(df).mark_text(align=side, dx=3 if side == "left" else -3, dy=-6, fontSize=10, color=color).encode(
        y="rate:Q", text="label:N", x=alt.value(2 if side == "left" else WIDTH - 2))
    return [rule, text]


def steering_chart(entry: Mapping[str, Any]) -> alt.Chart:
    """Refusal rate vs coefficient with Wilson 95 % bands, next to the random-direction control:
    forcing (harmless prompts, +α·v) and suppressing (harmful prompts, −α·v); the unsteered
    baseline and (for suppression) directional ablation are drawn as horizontal rules."""
    force_title = "Force: harmless prompts, +α·v"
    suppress_title = "Suppress: harmful prompts, −α·v"
    base = entry.get("baseline") or {}
    panels = []
    for title, points, base_key, extra in (
        (force_title, entry.get("force_sweep") or [], "harmless_refusal", None),
        (suppress_title, entry.get("suppress_sweep") or [], "harmful_refusal", entry.get("suppress_refusal")),
    ):
        df = pd.DataFrame(_sweep_rows(points, title), columns=["panel", "coefficient", "series", "rate", "lo", "hi", "k", "n"])
        color = alt.Color("series:N", title=None, scale=alt.Scale(domain=list(PALETTE), range=list(PALETTE.values())),
                          legend=alt.Legend(orient="bottom"))
        x = alt.X("coefficient:Q", title="coefficient α" + (" (× mean activation norm)" if entry.get("normalised", True) else ""))
        y = alt.Y("rate:Q", title="refusal rate", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"))
        layers = [
            alt.Chart(df).mark_area(opacity=0.2).encode(x=x, y=alt.Y("lo:Q", scale=alt.Scale(domain=[0, 1])), y2="hi:Q", color=color),
            alt.Chart(df).mark_line(point=True).encode(
                x=x, y=y, color=color,
                tooltip=["series:N", "coefficient:Q", alt.Tooltip("rate:Q", format=".0%"), "k:Q", "n:Q",
                         alt.Tooltip("lo:Q", format=".0%", title="95% low"), alt.Tooltip("hi:Q", format=".0%", title="95% high")]),
        ]
        b = base.get(base_key)
        if b:  # the unsteered rate, labelled on the left
            layers += _hline(b["rate"], f"baseline {100 * b['rate']:.0f}%", "#2c3e50", "left")
        if extra and extra.get("rate") is not None and extra.get("coefficient") in ("ablate", "ablation"):
            layers += _hline(extra["rate"], f"directional ablation {100 * extra['rate']:.0f}%", "#8e44ad", "right")
        panels.append(alt.layer(*layers).properties(width=WIDTH, height=HEIGHT, title=title))
    return alt.hconcat(*panels)


def _site(patching: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    sites = patching.get("sites")
    return sites.get(name) if isinstance(sites, Mapping) else None


def patching_heatmap(patching: Mapping[str, Any], max_positions: int = 48) -> alt.Chart | None:
    """Residual-stream patching effect by layer × token position (diverging, centred at 0).

    Positions are offsets from the last prompt token (aligned across pairs, see
    ``core.patching.aggregate``) labelled with the token where every pair has the same one."""
    resid = _site(patching, "resid")
    if not resid or not resid.get("mean") or not isinstance(resid["mean"][0], list):
        return None
    mean = resid["mean"]
    width = len(mean[0])
    offsets = list(resid.get("offsets") or range(-width, 0))
    labels = list(resid.get("labels") or [str(o) for o in offsets])
    start = max(0, width - max_positions)
    # positions where the pairs disagree on the token are labelled by their offset alone
    names = [str(offsets[j]) if str(labels[j]).startswith("pos ") else f"{offsets[j]} {labels[j]!r}"[:24] for j in range(width)]
    rows = []
    for layer, row in enumerate(mean):
        for j in range(start, width):
            rows.append({"layer": layer, "token": names[j], "offset": offsets[j], "effect": _num(row[j]),
                         "lo": _num(resid["lo"][layer][j]) if resid.get("lo") else None,
                         "hi": _num(resid["hi"][layer][j]) if resid.get("hi") else None})
    df = pd.DataFrame(rows)
    finite = df["effect"].dropna().abs()
    lim = max(0.05, float(finite.max()) if len(finite) else 1.0)
    flipped = "refusing" if patching.get("direction") == "refusal->compliant" else "compliant"
    title = f"Residual-stream patching effect (0 = none, 1 = fully {flipped})"
    if start:
        title += f"; last {width - start} positions"
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("token:N", sort=names[start:], title="token (offset from the last prompt token)",
                    axis=alt.Axis(labelAngle=-60, labelLimit=110)),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=alt.Color("effect:Q", title="effect",
                            scale=alt.Scale(scheme="redblue", domain=[-lim, lim], domainMid=0, reverse=True)),
            tooltip=["layer:O", "token:N", alt.Tooltip("effect:Q", format=".3f"),
                     alt.Tooltip("lo:Q", format=".3f", title="95% low"), alt.Tooltip("hi:Q", format=".3f", title="95% high")],
        )
        .properties(width=max(WIDTH, 15 * (width - start)), height=max(HEIGHT, 10 * len(mean)), title=title)
    )


def component_bars(patching: Mapping[str, Any]) -> alt.Chart | None:
    """Attention-output vs MLP-output patching effect per layer (all positions at once), with
    95 % interval whiskers."""
    rows = []
    for site, label in (("attn", "attention output"), ("mlp", "MLP output")):
        s = _site(patching, site)
        if not s or not s.get("mean") or isinstance(s["mean"][0], list):
            continue  # absent, or by position (shown per cell elsewhere)
        for layer, m in enumerate(s["mean"]):
            rows.append({"layer": layer, "component": label, "effect": _num(m),
                         "lo": _num(s["lo"][layer]) if s.get("lo") else None,
                         "hi": _num(s["hi"][layer]) if s.get("hi") else None})
    if not rows:
        return None
    df = pd.DataFrame(rows)
    # the axis follows the effects, not the whiskers: a Fieller interval can be unbounded when a
    # pair's gap is near zero, and would flatten every bar; whiskers are clipped to the axis
    effects = df["effect"].dropna()
    top = max(1.0, float(effects.max()) if len(effects) else 1.0) * 1.1
    bottom = min(-0.1, float(effects.min()) * 1.1 if len(effects) else -0.1)
    df["lo"] = df["lo"].clip(lower=bottom, upper=top)
    df["hi"] = df["hi"].clip(lower=bottom, upper=top)
    color = alt.Color("component:N", title=None, scale=alt.Scale(range=["#2471a3", "#d68910"]),
                      legend=alt.Legend(orient="bottom"))
    y = alt.Y("effect:Q", title="patching effect", scale=alt.Scale(domain=[bottom, top], clamp=True))
    bars = alt.Chart(df).mark_bar(clip=True).encode(
        x=alt.X("layer:O"), xOffset="component:N", y=y, color=color,
        tooltip=["layer:O", "component:N", alt.Tooltip("effect:Q", format=".3f"),
                 alt.Tooltip("lo:Q", format=".3f", title="95% low"), alt.Tooltip("hi:Q", format=".3f", title="95% high")])
    whiskers = alt.Chart(df).mark_rule(color="#333", clip=True).encode(x="layer:O", xOffset="component:N", y="lo:Q",
                                                                        y2="hi:Q")
    n_layers = df["layer"].nunique()
    return alt.layer(bars, whiskers).properties(width=max(WIDTH, 18 * n_layers), height=HEIGHT,
                                                title="Attention vs MLP output patching by layer (95% CI)")


def head_heatmap(patching: Mapping[str, Any]) -> alt.Chart | None:
    """Per-head patching effect (layer × head), diverging around 0."""
    s = _site(patching, "head")
    if not s or not s.get("mean"):
        return None
    rows = [{"layer": layer, "head": head, "effect": _num(v)}
            for layer, row in enumerate(s["mean"]) for head, v in enumerate(row)]
    df = pd.DataFrame(rows)
    finite = df["effect"].dropna().abs()
    lim = max(0.05, float(finite.max()) if len(finite) else 1.0)
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("head:O"), y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("effect:Q", scale=alt.Scale(scheme="redblue", domain=[-lim, lim], domainMid=0, reverse=True)),
        tooltip=["layer:O", "head:O", alt.Tooltip("effect:Q", format=".3f")],
    ).properties(title="Per-head patching effect")


def ablation_scan_chart(entry: Mapping[str, Any]) -> alt.Chart | None:
    """The layer screen behind ``layer: auto``: drop of the harmful refusal score when each
    layer's direction is ablated, and the KL on harmless prompts (first response token)."""
    scan = entry.get("layer_scan")
    if not scan:
        return None
    rows = [{"layer": i, "ablation effect (log-odds drop)": _num(scan["ablation_effect"][i]), "KL harmless (nats)": _num(scan["kl"][i])}
            for i in scan.get("layers", [])]
    df = pd.DataFrame(rows).melt("layer", var_name="measure", value_name="value")
    chart = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("layer:Q", scale=alt.Scale(nice=False)), y=alt.Y("value:Q", title=None),
        color=alt.Color("measure:N", title=None, legend=alt.Legend(orient="bottom")),
        tooltip=["layer:Q", "measure:N", alt.Tooltip("value:Q", format=".3f")])
    layers = [chart]
    rule = _chosen_rule(entry.get("layer"))
    if rule is not None:
        layers.append(rule)
    return alt.layer(*layers).properties(width=WIDTH, height=HEIGHT, title="Layer screen: ablating each layer's direction")


GRID_PANELS = (("bypass", "bypass: harmful refusal score, ablated (lower = better)", "blues", True),
               ("induce", "induce: harmless refusal score, added (> 0 needed)", "reds", False),
               ("kl", "KL on harmless, ablated (≤ max needed)", "greys", False))


def selection_grid_chart(entry: Mapping[str, Any]) -> alt.Chart | None:
    """The position × layer candidate grid (block-input layers, validation prompts): one heatmap
    per score, excluded layers left blank, the winner ringed."""
    g = entry.get("selection_grid")
    if not g:
        return None
    w = g.get("winner") or {}
    labels = [f"{p} {t!r}" for p, t in zip(g["positions"], g.get("position_tokens") or [""] * len(g["positions"]))]
    panels = []
    for key, title, scheme, reverse in GRID_PANELS:
        rows = [{"layer": layer, "position": labels[pi], "value": _num(g[key][pi][li]),
                 "excluded": bool(g["excluded"][li])}
                for pi in range(len(labels)) for li, layer in enumerate(g["layers"])]
        df = pd.DataFrame(rows)
        if df["value"].isna().all():  # e.g. nothing was ablated because no candidate induced refusal
            continue
        base = alt.Chart(df).encode(
            x=alt.X("layer:O", title="layer (block input)"), y=alt.Y("position:N", sort=labels, title=None))
        heat = base.mark_rect().encode(
            color=alt.Color("value:Q", title=None, scale=alt.Scale(scheme=scheme, reverse=reverse),
                            legend=alt.Legend(orient="bottom", gradientLength=120)),
            tooltip=["position:N", "layer:O", alt.Tooltip("value:Q", format=".3f"), "excluded:N"])
        layers = [heat]
        if w:
            mark = pd.DataFrame({"layer": [w["layer"]], "position": [labels[g["positions"].index(w["position"])]],
                                 "label": ["winner" if w.get("found") else "fallback (nothing passed the filters)"]})
            layers.append(alt.Chart(mark).mark_point(shape="square", size=260, filled=False, color="#f1c40f", strokeWidth=3)
                          .encode(x="layer:O", y=alt.Y("position:N", sort=labels), tooltip=["label:N"]))
        panels.append(alt.layer(*layers).properties(width=WIDTH, height=max(60, 22 * len(labels)), title=title))
    missing = [key for key, *_ in GRID_PANELS if all(_num(v) is None for row in g[key] for v in row)]
    # one short line each, so the title never runs past a narrow chart
    head = ["Selection grid on validation prompts"]
    if not w.get("found", True):
        head.append("no candidate passed the filters; the fallback is marked")
    if missing:
        head.append(f"{' and '.join(missing)} not scored: only candidates with induce > 0 are ablated")
    return alt.vconcat(*panels).resolve_scale(color="independent").properties(
        title=alt.TitleParams(head if len(head) > 1 else head[0], anchor="start"))


def to_svg(chart: alt.TopLevelMixin) -> str:
    """Render a chart to SVG offline (vl-convert bundles Vega; nothing is fetched)."""
    import vl_convert as vlc

    return vlc.vegalite_to_svg(chart.to_dict())
