"""Directions: per-layer refusal directions with held-out separation, probe accuracy,
projection histograms and the layer-by-layer cosine structure."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from core import charts
from core.activations import collect_activations
from core.directions import METHODS, choose_layer, fit_directions, projections
from core.validation import scan_layers
from ui import charts as ui_charts
from ui import entries, page, state
from ui.errors import guard
from ui.progress import progress_bar, scaled

SCAN_PROMPTS = 16  # per class, as core.config.SteeringConfig.scan_prompts

page.title("Directions", "Where in the network do harmful and harmless prompts separate? One direction per layer, "
                         "fitted on the train prompts and measured on held-out test prompts.")
lm = page.require_model()
sets = state.prompt_sets()

c1, c2, c3 = st.columns([2, 2, 1.4], vertical_alignment="bottom")
method = c1.selectbox("Method", METHODS, key="dir_method", persist_state="session",
                      help="diff-in-means (Arditi et al.), first principal direction of the differences, or a "
                           "logistic-regression probe's weight vector.")
rule = c2.selectbox("Choose the layer by", ["held-out separation (fast)", "ablation scan (slower)"],
                    key="dir_rule", persist_state="session",
                    help="Ablation scan: for each candidate layer, ablate its direction and measure how much the "
                         "first-token refusal score on 16 harmful train prompts drops (KL on harmless ≤ 0.1).")
compute = c3.button("Compute directions", type="primary", icon=":material/play_arrow:", key="dir_compute",
                    width="stretch")
st.caption(f"{sets.source}: {sets.counts()} · preamble **{state.preamble().name}** · position **{state.position()}**")

if compute:
    with guard("Computing directions") as outcome, progress_bar("Computing directions") as progress:
        started = time.perf_counter()
        fmt = state.formatter(lm)
        position = state.position()
        groups = [("harmful train", sets.harmful_train), ("harmless train", sets.harmless_train),
                  ("harmful test", sets.harmful_test), ("harmless test", sets.harmless_test)]
        acts = {}
        for i, (name, prompts) in enumerate(groups):
            acts[name] = collect_activations(lm, prompts, position=position, formatter=fmt,
                                             progress=scaled(progress, 0.7 * i / 4, 0.7 * (i + 1) / 4, f"{name}: "))
        progress(0.72, "fitting directions and cross-validating probes")
        dirs = fit_directions(acts["harmful train"], acts["harmless train"], acts["harmful test"], acts["harmless test"],
                              method=method, position=position)
        scan = None
        if rule.startswith("ablation"):
            # like the batch runner: the screen uses train prompts, the test prompts stay untouched
            scan = scan_layers(lm, fmt, dirs, sets.harmful_train[:SCAN_PROMPTS], sets.harmless_train[:SCAN_PROMPTS],
                               progress=scaled(progress, 0.75, 1.0, "ablation scan: "))
            choice = choose_layer(dirs, ablation_effect=scan.ablation_effect, kl=scan.kl)
        else:
            choice = choose_layer(dirs)
        state.put_result("directions", {
            "dirs": dirs, "choice": choice, "layer": choice.layer, "scan": scan,
            "test_acts": {"harmful": acts["harmful test"], "harmless": acts["harmless test"]},
            "seconds": time.perf_counter() - started,
        })
        st.session_state["active_layer"] = choice.layer
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
                  help="Used by the histogram below and as the default on the Steering and Validation pages.")
st.session_state["active_layer"] = int(layer)

m1, m2, m3, m4 = st.columns(4)
sep = dirs.separation_sigma[layer]
m1.metric("Chosen layer (rule)", f"{choice.layer}", help=choice.reason)
m2.metric(f"Held-out separation @ {layer}", f"{sep:.2f} σ" if np.isfinite(sep) else "n/a",
          delta=f"in-sample {dirs.separation_in_sample[layer]:.2f} σ", delta_color="off",
          help="(mean harmful − mean harmless projection) / pooled std, on test prompts the direction never saw.")
m3.metric(f"Probe accuracy @ {layer}", f"{dirs.probe_accuracy[layer]:.1%}",
          delta=f"± {dirs.probe_accuracy_std[layer]:.1%} ({dirs.probe_folds}-fold CV)", delta_color="off")
m4.metric("Prompts (train / test)", f"{sum(dirs.n_train)} / {sum(dirs.n_test)}",
          delta=f"computed in {value['seconds']:.1f} s", delta_color="off")
st.caption(f"Layer rule: {choice.reason}.")

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

if value.get("scan") is not None:
    scan_chart = charts.ablation_scan_chart(ent)
    if scan_chart is not None:
        with st.container(border=True):
            st.altair_chart(scan_chart, key="chart_scan")

with st.expander("The numbers per layer", icon=":material/table:"):
    d = dirs.to_dict()
    table = pd.DataFrame({
        "layer": range(n_layers),
        "held-out σ": d["separation_sigma"],
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
        "in-sample σ": st.column_config.NumberColumn(format="%.2f"),
        "mean norm": st.column_config.NumberColumn(format="%.1f"),
        "direction norm": st.column_config.NumberColumn(format="%.2f"),
    })
