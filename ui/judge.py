"""The sidebar's judge choice: the substring judge (default) or a chat model as LLM judge.

Only widgets and session state here; the judge itself is :mod:`core.judge` / :mod:`core.llm_judge`.
"""

from __future__ import annotations

import streamlit as st

CHOICES = {"substring": "substring (phrases in the opening; default)", "llm": "LLM judge (a chat model labels each answer)"}


def judge_section() -> None:
    kind = st.selectbox("Refusal judge", list(CHOICES), format_func=CHOICES.get, key="sb_judge",
                        help="How each generation is labelled refusal / compliance / degenerate. Degenerate (empty, "
                             "looping, no words) is decided by rule either way.")
    if kind == "llm":
        source = st.text_input("Judge model", value="embedded", key="sb_judge_model",
                               help="Any model source the loader accepts: embedded, a hub id, a folder, a .gguf. "
                                    "A larger instruct model judges better; it runs on the sidebar's device.")
        st.session_state["judge_value"] = f"llm:{source.strip()}" if source.strip() else "substring"
    else:
        st.session_state["judge_value"] = "substring"


def judge_spec() -> str:
    """``substring`` or ``llm:<source>`` (the same string a batch config's ``judge:`` takes)."""
    return st.session_state.get("judge_value", "substring")
