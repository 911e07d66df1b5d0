"""Runs: open a finished batch run (its output folder, its bundle.zip or its results.json) and
see the table across models, each model's charts, and load a model's direction into Steering.

Opening and the table are :mod:`core.runs` (guarded readers of :mod:`core.bundle`); the charts
are :mod:`core.charts`, the same ones the batch runner's report embeds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.report import CONTROL_HEAD, control_rows, critical_rows, CRITICAL_HEADER, layer_choice_text, patching_summary
from core.runs import RUN_HEAD, baseline_text, entry_charts, open_run, open_upload, run_direction, run_facts, run_rows
from ui import page, state
from ui.direction_upload import store
from ui.errors import guard

DEFAULT_FOLDER = "results/"
KEY = "runs_opened"

page.title("Runs", "Open a batch run (`python -m core.batch --config … --out FOLDER`): the table across models, "
                   "each model's charts, and its direction for the Steering page.")

with st.container(border=True):
    how = st.segmented_control("Open", ["Output folder", "Upload a file"], default="Output folder", required=True,
                               key="runs_how")
    if how == "Output folder":
        c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
        folder = c1.text_input("Folder (or a results.json / bundle.zip path)", DEFAULT_FOLDER, key="runs_folder",
                               help="The batch runner's --out folder, relative to where the app was started. "
                                    "Its results.json is read, else its bundle.zip.")
        if c2.button("Open", key="runs_open", type="primary", width="stretch") or (
                KEY not in st.session_state and folder == DEFAULT_FOLDER and Path(DEFAULT_FOLDER).is_dir()):
            st.session_state.pop(KEY, None)
            with guard(f"Opening {folder}"):
                st.session_state[KEY] = open_run(folder)
    else:
        upload = st.file_uploader("results.json or bundle.zip (the batch runner's, or the Report page's Everything (.zip))",
                                  type=["json", "zip"], key="runs_upload",
                                  help="Read with size limits; a zip is unpacked into a temporary folder that is "
                                       "deleted at once, entries that would leave it are refused, nothing is unpickled.")
        if upload is not None and st.session_state.get("runs_upload_id") != upload.file_id:
            st.session_state.pop(KEY, None)
            st.session_state["runs_upload_id"] = upload.file_id
            with guard(f"Opening {upload.name}"):
                st.session_state[KEY] = open_upload(upload.getvalue(), upload.name)

run = st.session_state.get(KEY)
if run is None:
    st.info(f"No run is open. Run `python -m core.batch --config experiments/config.yaml --out {DEFAULT_FOLDER}` "
            "and press **Open**, or upload its results.json / bundle.zip.", icon=":material/folder_open:")
    st.stop()

st.markdown("  \n".join(f"**{k}:** {v}" for k, v in run_facts(run)))
for note in run.notes:
    st.warning(note, icon=":material/info:")
if not run.models:
    st.info("This run holds no finished model yet.", icon=":material/hourglass_empty:")
    st.stop()

st.subheader("Across models")
st.dataframe(pd.DataFrame(run_rows(run.results), columns=list(RUN_HEAD)), hide_index=True, key="runs_table")
st.caption("Separation: held-out (test prompts) Cohen's d with a bootstrap 95 % interval; rates: judge's refusal "
           "rate with Wilson 95 % interval and k/n on test prompts; α in units of the layer's mean activation norm "
           "(when the run normalised coefficients); "
           "layers are block outputs (layer i = output of block i, 0-indexed).")

lm = state.current_model()
names = [str(e.get("name", "?")) for e in run.models]
tabs = st.tabs(names)
for i, (tab, e) in enumerate(zip(tabs, run.models)):
    with tab:
        name = names[i]
        st.markdown(f"{layer_choice_text(e)}  \n{baseline_text(e)}")
        can_load = lm is not None and name in run.directions
        why = ("Load a model in the sidebar first (the direction is checked against it)." if lm is None else
               "No directions file for this model in what was opened." if name not in run.directions else
               "Checked against the loaded model's fingerprint; a direction from another model is refused.")
        if st.button("Load this direction into Steering", key=f"runs_load_{i}", icon=":material/tune:",
                     disabled=not can_load, help=why):
            loaded = False
            with guard(f"Loading {name}'s direction"):
                store(run_direction(run, name, lm), lm, f"{run.label}: {name}")
                loaded = True
            if loaded:
                st.switch_page("pages/steering.py")
        if not can_load:
            st.caption(why)
        for title, chart, error in entry_charts(e):
            st.markdown(f"**{title}**")
            if chart is None:
                st.warning(f"Chart not drawn: {error}", icon=":material/warning:")
            else:
                st.altair_chart(chart, key=f"runs_chart_{i}_{title}")
        ctrl = control_rows(e)
        if ctrl:
            st.markdown("**Controls**")
            st.dataframe(pd.DataFrame(ctrl, columns=list(CONTROL_HEAD)), hide_index=True, key=f"runs_controls_{i}")
        p = e.get("patching")
        if p:
            st.markdown("**Patching**  \n" + "  \n".join(patching_summary(p)))
            crit = critical_rows(p)
            if crit:
                st.dataframe(pd.DataFrame(crit, columns=list(CRITICAL_HEADER)), hide_index=True, key=f"runs_crit_{i}")
