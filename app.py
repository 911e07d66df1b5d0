"""Refusal Circuit Explorer — the Streamlit app (``make run``).

This file sets up the page, draws the shared sidebar (so its state survives page switches)
and routes to one file per page in ``pages/``. Pages read widgets, call ``core`` and draw
charts; they compute nothing themselves.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import core  # noqa: F401  (first: it sets how torch's threads wait, which counts only before torch loads)
from ui import sidebar  # streamlit puts this file's folder on sys.path
from ui.errors import show_error

ROOT = Path(__file__).resolve().parent

st.set_page_config(page_title="Refusal Circuit Explorer", page_icon=":material/polyline:", layout="wide")

PAGES = [
    st.Page(ROOT / "pages" / "home.py", title="Overview", icon=":material/home:", default=True),
    st.Page(ROOT / "pages" / "directions.py", title="Directions", icon=":material/explore:", url_path="directions"),
    st.Page(ROOT / "pages" / "patching.py", title="Patching", icon=":material/grid_on:", url_path="patching"),
    st.Page(ROOT / "pages" / "steering.py", title="Steering (live)", icon=":material/tune:", url_path="steering"),
    st.Page(ROOT / "pages" / "validation.py", title="Validation", icon=":material/fact_check:", url_path="validation"),
    st.Page(ROOT / "pages" / "report.py", title="Report", icon=":material/description:", url_path="report"),
    st.Page(ROOT / "pages" / "runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
]

st.html("<style>[data-testid='stMainBlockContainer']{padding-top:3.2rem}</style>")  # less space above titles
page = st.navigation(PAGES, position="top")
sidebar.render()
try:
    page.run()
except Exception as exc:  # a page bug must not show a traceback or lose the session (Streamlit's rerun/stop pass through)
    show_error(f"The {page.title} page", exc)
