"""Small page scaffolding shared by every page: titles, the 'needs a model' gate, result banners."""

from __future__ import annotations

import streamlit as st

from core.models import LoadedModel
from ui import state


def title(text: str, caption: str) -> None:
    st.title(text)
    st.caption(caption)


def require_model() -> LoadedModel:
    lm = state.current_model()
    if lm is None:
        st.info("No model is loaded. Choose one under **Model** in the sidebar and press **Load model**.",
                icon=":material/neurology:")
        st.stop()
    return lm


def require_directions() -> dict:
    entry = state.get_result("directions")
    if entry is None:
        st.info("This page needs refusal directions. Compute them on the **Directions** page first.",
                icon=":material/explore:")
        st.page_link("pages/directions.py", label="Go to Directions", icon=":material/arrow_forward:")
        st.stop()
    return entry


def active_layer(default: int | None = None) -> int:
    """The layer chosen on the Directions page (shared by Steering and Validation)."""
    entry = state.get_result("directions")
    if "active_layer" in st.session_state:
        return int(st.session_state["active_layer"])
    if entry is not None:
        return int(entry["value"]["layer"])
    return int(default or 0)
