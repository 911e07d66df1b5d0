"""The Steering page's "load a saved direction": a directions file (written by the Report page
or the batch runner) instead of computing directions in this session.

The file is read by :func:`core.direction_files.load_directions`, which refuses a file saved for
another model; the loaded directions are kept under their own result name, so the Directions,
Validation and Report pages keep using what this session computed.
"""

from __future__ import annotations

import streamlit as st

from core.direction_files import SavedDirections, load_directions
from core.models import LoadedModel
from ui import state
from ui.errors import guard

RESULT = "loaded_directions"


def store(saved: SavedDirections, lm: LoadedModel, label: str) -> dict:
    """Keep loaded directions as the Steering page's direction (also used by the Runs page)."""
    choice = saved.choice
    entry = state.put_result(RESULT, {"dirs": saved.dirs, "choice": choice, "layer": choice.layer,
                                      "fingerprint": lm.fingerprint, "file": label, "meta": saved.meta})
    st.session_state["steer_layer"] = choice.layer
    st.session_state["steer_use_loaded"] = True
    return entry


def loaded_directions(lm: LoadedModel, have_computed: bool) -> dict | None:
    """Draw the uploader; the loaded directions' result entry if the user steers with them."""
    entry = state.get_result(RESULT)
    if entry is not None and entry["value"]["fingerprint"] != lm.fingerprint:
        state.results().pop(RESULT, None)  # another model is loaded now: the file no longer applies
        entry = None
    with st.expander("Load a saved direction (.safetensors)", expanded=not have_computed and entry is None,
                     icon=":material/upload_file:"):
        upload = st.file_uploader("Directions file written by the Report page or the batch runner",
                                  type=["safetensors"], key="steer_dir_upload")
        if upload is not None and st.session_state.get("steer_dir_file") != upload.file_id:
            with guard("Loading the directions file"):
                saved = load_directions(upload.getvalue(), model=lm, name=upload.name)
                entry = store(saved, lm, upload.name)
                st.session_state["steer_dir_file"] = upload.file_id
        if entry is None:
            return None
        v = entry["value"]
        st.caption(f"**{v['file']}**: {v['dirs'].method}, position {v['dirs'].position}, {v['dirs'].n_layers} layers, "
                   f"chosen layer {v['layer']}; saved {v['meta'].get('created', '?')} by version {v['meta'].get('tool_version', '?')}.")
        use = st.toggle("Steer with the loaded direction", value=True, key="steer_use_loaded",
                        disabled=not have_computed, help="Off: use the directions computed on the Directions page.")
    return entry if use or not have_computed else None
