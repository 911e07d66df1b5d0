"""App-only Altair charts (the shared ones live in ``core.charts``), in the same palette.

Chart building is presentation: these take numbers ``core`` computed and draw them.
"""

from __future__ import annotations

import html
from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd

HARMFUL = "#c0392b"
HARMLESS = "#2471a3"
CLASS_SCALE = alt.Scale(domain=["harmful", "harmless"], range=[HARMFUL, HARMLESS])
RULE = "#2c3e50"


def projection_histogram(harmful: np.ndarray, harmless: np.ndarray, layer: int, split: str = "test") -> alt.Chart:
    """Overlaid histograms of the projections of each class on the layer's unit direction."""
    df = pd.DataFrame({
        "projection": np.concatenate([harmful, harmless]).astype(float),
        "class": ["harmful"] * len(harmful) + ["harmless"] * len(harmless),
    })
    lo, hi = float(df["projection"].min()), float(df["projection"].max())
    step = max((hi - lo) / 24, 1e-6)
    bars = (
        alt.Chart(df)
        .mark_bar(opacity=0.6, binSpacing=0)
        .encode(
            x=alt.X("projection:Q", bin=alt.Bin(step=step), title=f"projection on the layer-{layer} direction"),
            y=alt.Y("count():Q", stack=None, title="prompts"),
            color=alt.Color("class:N", scale=CLASS_SCALE, title=None, legend=alt.Legend(orient="bottom")),
            tooltip=["class:N", alt.Tooltip("count():Q", title="prompts")],
        )
    )
    means = (
        alt.Chart(df)
        .mark_rule(strokeDash=[4, 3], size=2)
        .encode(x="mean(projection):Q", color=alt.Color("class:N", scale=CLASS_SCALE, legend=None),
                tooltip=["class:N", alt.Tooltip("mean(projection):Q", format=".2f", title="mean")])
    )
    return alt.layer(bars, means).properties(
        height=300, title=f"Held-out {split} prompts projected on the layer-{layer} direction"
    )


def cosine_heatmap(cosine: np.ndarray, layer: int | None = None) -> alt.Chart:
    """Cosine similarity between every pair of layers' directions (−1 … 1, diverging)."""
    n = cosine.shape[0]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    df = pd.DataFrame({"layer a": i.ravel(), "layer b": j.ravel(), "cosine": np.nan_to_num(cosine).ravel().astype(float)})
    heat = (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("layer a:O", title="layer"),
            y=alt.Y("layer b:O", title="layer", sort="descending"),
            color=alt.Color("cosine:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True), title="cosine"),
            tooltip=["layer a:O", "layer b:O", alt.Tooltip("cosine:Q", format=".3f")],
        )
    )
    layers = [heat]
    if layer is not None:
        marks = pd.DataFrame({"layer a": [layer], "layer b": [layer]})
        layers.append(alt.Chart(marks).mark_rect(fill=None, stroke=RULE, strokeWidth=2)
                      .encode(x="layer a:O", y=alt.Y("layer b:O", sort="descending")))
    return alt.layer(*layers).properties(height=300, title="Cosine similarity between layers' directions")


def token_html(pieces: Sequence[str], values: Sequence[float], limit: float | None = None) -> str:
    """The text with each token's background coloured by ``values`` (red = toward refusal,
    blue = away), escaped, with the value in a hover title."""
    if not pieces:
        return "<div class='tok-box'><em>no tokens yet</em></div>"
    vals = np.asarray(values, dtype=float)
    lim = limit if limit and limit > 0 else max(1e-6, float(np.nanmax(np.abs(vals))) if len(vals) else 1.0)
    spans = []
    for piece, v in zip(pieces, vals):
        t = max(-1.0, min(1.0, v / lim)) if np.isfinite(v) else 0.0
        rgb = (192, 57, 43) if t >= 0 else (36, 113, 163)
        alpha = 0.08 + 0.72 * abs(t)
        # newlines shown as ↵ inline: a steered model can emit hundreds of them
        text = html.escape(piece).replace("\r", "").replace("\n", "↵")
        spans.append(f"<span title='{v:+.3f}' style='background: rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f});"
                     f"border-radius:3px;padding:1px 0'>{text}</span>")
    return ("<div class='tok-box' style='line-height:1.9;font-family:ui-monospace,monospace;font-size:0.92rem;"
            "white-space:pre-wrap;border:1px solid #e3e5ef;border-radius:8px;padding:10px 12px;"
            "max-height:16em;overflow-y:auto'>"
            + "".join(spans) + "</div>")


def colour_legend(limit: float) -> str:
    return (
        "<div style='display:flex;align-items:center;gap:8px;font-size:0.8rem;color:#555'>"
        f"<span>−{limit:.2f}</span><span style='display:inline-block;width:160px;height:10px;border-radius:5px;"
        "background:linear-gradient(90deg, rgba(36,113,163,0.8), rgba(255,255,255,0.1), rgba(192,57,43,0.8))'></span>"
        f"<span>+{limit:.2f}</span><span>projection on the refusal direction (× mean norm)</span></div>"
    )


def kl_chart(points: Sequence[dict], ablation: dict | None = None) -> alt.Chart:
    """KL(clean ‖ steered) on harmless prompts per force coefficient, direction vs random control."""
    rows = []
    for p in points:
        rows.append({"coefficient": p["coefficient"], "series": "refusal direction", "kl": p.get("kl")})
        rows.append({"coefficient": p["coefficient"], "series": "random direction (control)", "kl": p.get("random_kl")})
    df = pd.DataFrame(rows, columns=["coefficient", "series", "kl"]).dropna()
    colour = alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom"),
                       scale=alt.Scale(domain=["refusal direction", "random direction (control)"], range=[HARMFUL, "#7f8c8d"]))
    layers = [alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("coefficient:Q", title="coefficient α (× mean norm)"),
        y=alt.Y("kl:Q", title="KL on harmless (nats)"),
        color=colour,
        tooltip=["series:N", "coefficient:Q", alt.Tooltip("kl:Q", format=".4f")],
    )]
    if ablation and ablation.get("kl_harmless") is not None:
        adf = pd.DataFrame({"kl": [ablation["kl_harmless"]], "label": [f"ablation KL {ablation['kl_harmless']:.3f}"]})
        layers.append(alt.Chart(adf).mark_rule(strokeDash=[4, 3], color=RULE).encode(y="kl:Q", tooltip=["label:N"]))
    return alt.layer(*layers).properties(height=220, title="Side effects: first-token KL on harmless prompts")
