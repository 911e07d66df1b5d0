"""Directions: per-layer refusal directions with held-out separation, probe accuracy,
projection histograms and the layer-by-layer cosine structure. The position and layer are
chosen on validation prompts (the candidate grid of core.selection); test prompts only report."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from core import charts
from core.analysis import Settings, analyse
from core.config import SelectionConfig, SteeringConfig
from core.directions import METHODS, projections
from ui import charts as ui_charts
from ui import entries, page, state
from ui.errors import guard
from ui.progress import progress_bar

GRID = "candidate grid on validation (Arditi et al.)"
SEPARATION = "validation separation (fast)"
DEFAULTS = SelectionConfig()  # the batch runner's grid, so both choose alike

page.title("Directions", "Where in the network do harmful and harmless prompts separate? One direction per layer, "
                         "fitted on train prompts, chosen on validation prompts, measured on held-out test prompts.")
lm = page.require_model()
sets = state.prompt_sets()

c1, c2, c3 = st.columns([2, 2, 1.4], vertical_alignment="bottom")
method = c1.selectbox("Method", METHODS, key="dir_method", persist_state="session",
                      help="diff-in-means (Arditi et al.), first principal direction of the differences, or a "
                           "logistic-regression probe's weight vector.")
rule = c2.selectbox("Choose position & layer by", [GRID, SEPARATION], key="dir_rule", persist_state="session",
                    help="Grid: every post-instruction token position × layer is scored on validation prompts — refusal "
                         "with the direction ablated (bypass), refusal induced by adding it, KL on harmless prompts; the "
                         "lowest bypass with induce > 0 and KL ≤ 0.1 wins, the last 20 % of layers excluded. Separation: "
                         "the sidebar's position, the layer whose direction best separates the validation prompts.")
compute = c3.button("Compute directions", type="primary", icon=":material/play_arrow:", key="dir_compute",
                    width="stretch")
st.caption(f"{sets.source}: {sets.summary()} · preamble **{state.preamble().name}** · position "
           f"**{'chosen by the grid' if rule == GRID else state.position()}**")
if rule == GRID:
    with st.expander("Grid size", icon=":material/grid_on:"):
        g1, g2, g3 = st.columns(3)
        grid_positions = g1.number_input("positions (0 = all)", 0, 12, DEFAULTS.positions, key="dir_grid_positions",
                                         help="Post-instruction tokens to try, counted from the last. The defaults keep the "
                                              "grid to about a minute on a 2-core CPU; each extra candidate (position × layer) "
                                              "adds 1–2 s on the embedded model, ~8 s where it induces refusal.")
        grid_stride = g2.number_input("layer stride", 1, 8, DEFAULTS.layer_stride, key="dir_grid_stride",
                                      help="Score every k-th layer (2 halves the time).")
        grid_n = g3.number_input("validation prompts / class", 2, 128, DEFAULTS.n_prompts, key="dir_grid_n")

if compute:
    with guard("Computing directions") as outcome, progress_bar("Computing directions") as progress:
        # the batch runner's first stage, with this page's method, position rule and grid size
        selection = (replace(DEFAULTS, positions=int(grid_positions), layer_stride=int(grid_stride), n_prompts=int(grid_n))
                     if rule == GRID else replace(DEFAULTS, enabled=False))
        settings = Settings(preamble=state.preamble(), position=state.position(), selection=selection,
                            steering=SteeringConfig(method=method, scan_prompts=0))
        found = analyse(lm, sets, settings, progress=progress, stages=("directions",))
        state.put_result("directions", {
            "dirs": found.dirs, "choice": found.choice, "layer": found.layer, "scan": None, "grid": found.grid,
            "test_acts": found.test_activations, "seconds": found.timings["total"],
        })
        st.session_state["active_layer"] = found.layer
        st.session_state.pop("dir_layer", None)

entry = state.get_result("directions")
if entry is None:
    st.info("Press **Compute directions** to collect activations at every layer and fit the directions. "
            "Activations are cached on disk per prompt, so a second run with the same settings is quick.",
            icon=":material/play_arrow:")
    st.stop()

state.stale_note(entry)
value = entry["value"]
dirs, choice = value["dirs"], value["choice"]
n_layers = dirs.n_layers

layer = st.slider("Selected layer", 0, n_layers - 1, value=page.active_layer(choice.layer), key="dir_layer",
                  help="Layer i = the residual stream at the output of block i (0-indexed). Used by the histogram below "
                       "and as the default on the Steering and Validation pages.")
st.session_state["active_layer"] = int(layer)

m1, m2, m3, m4 = st.columns(4)
sep = dirs.separation_sigma[layer]
sep_ci = dirs.separation_ci[layer] if dirs.separation_ci is not None else (np.nan, np.nan)
acc_ci = dirs.probe_accuracy_ci[layer] if dirs.probe_accuracy_ci is not None else (np.nan, np.nan)
m1.metric("Chosen layer (rule)", f"{choice.layer}", help=choice.reason)
m2.metric(f"Held-out separation @ {layer}", f"{sep:.2f} σ" if np.isfinite(sep) else "n/a",
          delta=(f"95 % [{sep_ci[0]:.2f}, {sep_ci[1]:.2f}] · " if np.isfinite(sep_ci).all() else "")
          + f"in-sample {dirs.separation_in_sample[layer]:.2f} σ", delta_color="off",
          help="(mean harmful − mean harmless projection) / pooled std, on test prompts the direction never saw; the "
               "interval is a seeded bootstrap over test prompts.")
m3.metric(f"Probe accuracy @ {layer}", f"{dirs.probe_accuracy[layer]:.1%}",
          delta=f"± {dirs.probe_accuracy_std[layer]:.1%} ({dirs.probe_folds}-fold CV)"
          + (f" · 95 % [{acc_ci[0]:.0%}, {acc_ci[1]:.0%}]" if np.isfinite(acc_ci).all() else ""), delta_color="off")
m4.metric("Prompts (train / val / test)", f"{sum(dirs.n_train)} / {sum(dirs.n_validation)} / {sum(dirs.n_test)}",
          delta=f"computed in {value['seconds']:.1f} s", delta_color="off")
st.caption(f"Position {dirs.position}, layer rule ({choice.split} prompts): {choice.reason}.")
grid = value.get("grid")
if grid is not None and not grid.winner.found:
    st.warning(f"No candidate passed the grid's filters: {grid.winner.reason}. The marked cell is the fallback "
               f"({grid.winner.rule}); do not read it as a direction that controls refusal.", icon=":material/warning:")

with st.container(border=True):
    ent = entries.model_entry()
    ent["layer"] = layer
    st.altair_chart(charts.layer_chart(ent), key="chart_layers")

left, right = st.columns(2)
with left, st.container(border=True):
    proj_h = projections(value["test_acts"]["harmful"], dirs, layer)
    proj_b = projections(value["test_acts"]["harmless"], dirs, layer)
    st.altair_chart(ui_charts.projection_histogram(proj_h, proj_b, layer), width="stretch", key="chart_hist")
with right, st.container(border=True):
    st.altair_chart(ui_charts.cosine_heatmap(dirs.cosine, layer), width="stretch", key="chart_cosine")

if grid is not None:
    grid_chart = charts.selection_grid_chart({"selection_grid": grid.to_dict()})
    with st.container(border=True):
        st.caption(f"Position × layer grid on {grid.n_harmful} + {grid.n_harmless} validation prompts "
                   f"({grid.seconds:.0f} s). Layers are block *inputs* here (block output = input − 1); "
                   f"winner: position {grid.position}, input of block {grid.layer}.")
        st.altair_chart(grid_chart, key="chart_grid")

with st.expander("The numbers per layer", icon=":material/table:"):
    d = dirs.to_dict()
    table = pd.DataFrame({
        "layer": range(n_layers),
        "held-out σ": d["separation_sigma"],
        "σ 95 % low": [ci[0] for ci in d["separation_ci"]],
        "σ 95 % high": [ci[1] for ci in d["separation_ci"]],
        "validation σ": d["separation_validation"],
        "in-sample σ": d["separation_in_sample"],
        "probe acc": d["probe_accuracy"],
        "probe ± std": d["probe_accuracy_std"],
        "mean norm": d["mean_norm"],
        "direction norm": d["direction_norm"],
    })
    st.dataframe(table, hide_index=True, key="dir_table", column_config={
        "probe acc": st.column_config.NumberColumn(format="percent"),
        "probe ± std": st.column_config.NumberColumn(format="percent"),
        "held-out σ": st.column_config.NumberColumn(format="%.2f"),
        "σ 95 % low": st.column_config.NumberColumn(format="%.2f"),
        "σ 95 % high": st.column_config.NumberColumn(format="%.2f"),
        "validation σ": st.column_config.NumberColumn(format="%.2f"),
        "in-sample σ": st.column_config.NumberColumn(format="%.2f"),
        "mean norm": st.column_config.NumberColumn(format="%.1f"),
        "direction norm": st.column_config.NumberColumn(format="%.2f"),
    })
