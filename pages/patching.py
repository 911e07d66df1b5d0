"""Patching: which layers, token positions and components carry refusal, by activation patching
between matched harmful/harmless prompts (same template, same token length)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import charts
from core.patching import DEFAULT_FDR, SITES, patch_pairs
from core.prompts import load_pairs
from ui import page, state
from ui.errors import guard
from ui.progress import progress_bar

DIRECTIONS = {
    "compliant->refusal": "Patch harmless → into the harmful run (effect 1 = that site alone removes refusal)",
    "refusal->compliant": "Patch harmful → into the harmless run (effect 1 = that site alone causes refusal)",
}
SITE_HELP = "resid: block output by layer × position · attn / mlp: component outputs per layer · head: each attention head (slow)"

page.title("Patching", "Run one prompt of a matched harmful/harmless pair, swap in one activation from its twin (the "
                       "direction below says which way), and measure how much the first-token refusal score moves. "
                       "Effects are normalised: 0 = no change, 1 = fully flipped.")
lm = page.require_model()

pairs = load_pairs("builtin:pairs")
PAIR_FILTERS = {"strict": "strict: refused vs not", "relative": "relative: harmful scores higher", "all": "all pairs"}
POSITIONS = {"diff+suffix": "differing tokens + template", "all": "every token"}
DEFAULT_PAIRS = 20  # the relative filter keeps 16 of the first 20 under the prompted preamble (docs/decisions.md)
with st.container(border=True):
    c1, c2, c3 = st.columns([1, 2, 1])
    n_pairs = c1.number_input("Pairs", 1, len(pairs), min(DEFAULT_PAIRS, len(pairs)), key="patch_n",
                              persist_state="session",
                              help=f"The first n of {len(pairs)} built-in matched pairs (equal token length). Each used "
                                   "pair costs one batch of patched runs per site; excluded pairs cost only their clean runs.")
    sites = c2.multiselect("Sites", list(SITES), default=["resid", "attn", "mlp"], key="patch_sites",
                           persist_state="session", help=SITE_HELP)
    threshold = c3.number_input("Critical if effect >", 0.0, 1.0, 0.1, step=0.05, key="patch_threshold",
                                persist_state="session",
                                help="A cell is critical when a one-sided t-test across pairs says its pooled effect "
                                     "exceeds this, after Benjamini–Hochberg control of the false-discovery rate.")
    c4, c5, c6, c7 = st.columns([3, 1.2, 1.2, 1], vertical_alignment="bottom")
    direction = c4.selectbox("Direction", list(DIRECTIONS), format_func=DIRECTIONS.get, key="patch_direction",
                             persist_state="session")
    pair_filter = c5.selectbox(
        "Pairs kept", list(PAIR_FILTERS), index=1, format_func=PAIR_FILTERS.get, key="patch_filter",
        persist_state="session",
        help="Which pairs count, by the first-token refusal score. Strict: the harmful prompt is refused (score > 0) and "
             "its harmless twin is not. Relative (default): the harmful prompt only scores above its twin — with the "
             "prompted-refusal preamble no built-in pair's harmful prompt scores above 0 at the first token, so strict "
             "keeps none there. All: every pair with a non-zero gap. Excluded pairs are listed below with the reason.")
    require = {"strict": True, "relative": "relative", "all": False}[pair_filter]
    positions = c6.selectbox(
        "Residual positions", list(POSITIONS), format_func=POSITIONS.get, key="patch_positions", persist_state="session",
        help="Token positions of the residual-stream heatmap. Differing tokens + template (default): the tokens where the "
             "two prompts differ and the template tokens after the instruction, where the refusal decision is read "
             "out; several times faster than every token. Shared-prefix tokens are never run (their effect is exactly 0).")
    fdr = c7.number_input("False-discovery rate", 0.001, 0.5, DEFAULT_FDR, step=0.01, format="%.3f",
                          key="patch_fdr", persist_state="session",
                          help="Expected share of false discoveries among the critical cells (Benjamini–Hochberg).")
    with st.expander(f"The {int(n_pairs)} pairs", icon=":material/compare_arrows:"):
        st.dataframe(pd.DataFrame(pairs[: int(n_pairs)], columns=["harmful (refusal)", "harmless (compliant)"]),
                     hide_index=True)
    run = st.button("Run patching", type="primary", icon=":material/play_arrow:", key="patch_run", disabled=not sites)

if run:
    with guard("Patching"), progress_bar("Patching") as progress:
        sweep = patch_pairs(lm, state.formatter(lm), pairs, sites=sites, n_pairs=int(n_pairs), direction=direction,
                            threshold=float(threshold), fdr=float(fdr), require_behaviour=require, positions=positions,
                            progress=progress)
        state.put_result("patching", sweep)

pentry = state.get_result("patching")
if pentry is None:
    st.info("Press **Run patching**. Each pair costs one batched forward pass per site and position; start with a few.",
            icon=":material/play_arrow:")
    st.stop()

state.stale_note(pentry)
sweep = pentry["value"]
p = sweep.to_dict(include_pairs=False)
m1, m2, m3 = st.columns(3)
m1.metric("Pairs used", f"{sweep.n_used} of {sweep.n_candidates}", border=True)
m2.metric("Critical sites", len(sweep.critical), border=True, help=sweep.critical_message)
m3.metric("Time", f"{sweep.seconds:.1f} s", border=True)
if sweep.excluded:
    st.warning("Excluded pairs: " + "; ".join(f"{n} × {reason}" for reason, n in sweep.exclusion_counts.items()),
               icon=":material/filter_alt:")
if sweep.n_used == 0:
    st.info("No pair was used, so there is nothing to aggregate. With the embedded model use the *prompted-refusal* "
            "preamble (sidebar) or the refusal-tuned organism, or choose *all pairs* under **Pairs kept** to patch them anyway.")
    st.stop()

heat = charts.patching_heatmap(p)
if heat is not None:
    with st.container(border=True):
        st.altair_chart(heat, key="chart_patch_heat")
bars = charts.component_bars(p)
if bars is not None:  # full width: one bar pair per layer needs the room
    with st.container(border=True):
        st.altair_chart(bars, key="chart_patch_bars")
heads = charts.head_heatmap(p)
if heads is not None:
    with st.container(border=True):
        st.altair_chart(heads, key="chart_patch_heads")

st.markdown(f"**Critical components** — {sweep.critical_message}. Effect and interval: {sweep.interval}.")
if sweep.by_construction:
    st.caption("Effect 1 by construction, not tested: " + ", ".join(c.label for c in sweep.by_construction[:6])
               + (f" and {len(sweep.by_construction) - 6} more" if len(sweep.by_construction) > 6 else "")
               + ". Everything after them is the source run, so they say nothing about the model.")
cols = ["site", "pooled effect", "95% low", "95% high", "BH q", "pairs"]
crit = pd.DataFrame([{"site": c.label, "pooled effect": c.effect, "95% low": c.lo, "95% high": c.hi, "BH q": c.q,
                      "pairs": c.n} for c in sweep.critical], columns=cols)
st.dataframe(crit, hide_index=True, key="patch_critical", column_config={
    c: st.column_config.NumberColumn(format="%.3f") for c in ("pooled effect", "95% low", "95% high", "BH q")})
if sweep.excluded:
    with st.expander("Excluded pairs", icon=":material/filter_alt:"):
        st.dataframe(pd.DataFrame(sweep.excluded), hide_index=True)
