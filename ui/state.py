"""Session state in one place: the loaded model's spec, the prompt sets, the formatting, and
every result computed in this session (kept across page switches; never silently dropped).

A result is stored with the *context key* it was computed under (model fingerprint, dtype,
formatting, prompts, position). When the sidebar changes, older results stay visible and are
marked as computed under other settings, so work is never lost by touching a widget.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import streamlit as st

from core.cache import stable_hash
from core.config import PromptData
from core.formatting import Formatter, Preamble, get_preamble
from core.models import LoadedModel, load_model

SOURCES = {
    "embedded": "Embedded SmolLM2-135M-Instruct",
    "embedded-refusal": "Embedded refusal-tuned organism",
    "gemma-3-270m": "Gemma-3-270M (base, offline package)",
    "hub": "Hugging Face hub id",
    "folder": "Local model folder",
    "gguf": "GGUF file",
}
SOURCE_HELP = {
    "embedded": "The 135M-parameter chat model shipped with the app. Loads offline in under a second.",
    "embedded-refusal": "SmolLM2 fine-tuned on the built-in training prompts to refuse harmful requests "
                        "without any system prompt — a model organism whose refusal is in the weights. "
                        "Built once on first use (about 5 minutes on a 2-core CPU without bf16 units), then cached; "
                        "the app starts on it once it is built.",
    "gemma-3-270m": "Google's 270M base model (no chat template: the base template is used), installed "
                    "from pip packages by `make setup`; assembled and converted once (about a minute), then cached.",
    "hub": "Needs network access to huggingface.co (or the model already in the local HF cache).",
    "folder": "A folder saved with save_pretrained (config.json + weights + tokenizer).",
    "gguf": "A .gguf file; it is de-quantised once and cached under cache/models/.",
}
DEFAULT_SPEC = {"kind": "embedded", "path": "", "dtype": "auto", "device": "auto", "trust_remote_code": False}


def organism_built() -> bool:
    """Whether the refusal organism is already in the cache, so that loading it takes seconds,
    not its first build (minutes on a CPU without bf16 units; docs/decisions.md). Never builds;
    any failure reads as "not built" (the app then starts on the prompted preamble, which needs
    no build)."""
    try:
        from core.organism import built_organism_folder

        return built_organism_folder() is not None
    except Exception:  # noqa: BLE001  (a check that must never stop the app from starting)
        return False


def default_spec() -> dict[str, Any]:
    """The model the app starts on: the organism (refusal in the weights) when it is built,
    else the embedded chat model with the prompted-refusal preamble (no build needed)."""
    return {**DEFAULT_SPEC, "kind": "embedded-refusal" if organism_built() else "embedded"}


# the prompt sets of a session are the library's own type: train fits, validation chooses, test reports
PromptSets = PromptData


def source_string(spec: dict[str, Any]) -> str:
    """What ``core.models.load_model`` takes for a sidebar spec."""
    kind = spec["kind"]
    if kind in ("embedded", "embedded-refusal", "gemma-3-270m"):
        return kind
    return str(spec.get("path", "")).strip()


@st.cache_resource(show_spinner=False, max_entries=3)
def _model_slot(source: str, dtype: str, device: str, trust_remote_code: bool) -> dict[str, Any]:
    """A holder per (source, dtype, device), shared by every session of this server.

    The model is loaded *outside* the cached function (in :func:`cached_model`) so the load can
    drive a progress bar: Streamlit replays elements drawn inside cached functions, which a
    progress bar in the sidebar cannot survive. The slot's lock stops two sessions loading twice.
    """
    return {"lock": threading.Lock(), "lm": None}


def cached_model(source: str, dtype: str, device: str, trust_remote_code: bool = False, _progress=None) -> LoadedModel:
    """One model object per (source, dtype, device), shared by every session of this server.

    Safe to share: generation and tracing hold the model's lock per forward step and never
    leave hooks attached, so sessions cannot see each other's edits.
    """
    slot = _model_slot(source, dtype, device, bool(trust_remote_code))
    with slot["lock"]:
        if slot["lm"] is None:
            slot["lm"] = load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                    progress=_progress)
        return slot["lm"]


def spec() -> dict[str, Any]:
    if "model_spec" not in st.session_state:
        st.session_state["model_spec"] = default_spec()
    return st.session_state["model_spec"]


def current_model() -> LoadedModel | None:
    """The model loaded for this session (None before the first successful load)."""
    return st.session_state.get("_lm")


def set_model(lm: LoadedModel, new_spec: dict[str, Any]) -> None:
    st.session_state["_lm"] = lm
    st.session_state["model_spec"] = dict(new_spec)


def prompt_sets() -> PromptSets | None:
    return st.session_state.get("prompt_sets")


def preamble() -> Preamble:
    return get_preamble(st.session_state.get("preamble_value", "prompted-refusal"))


def position() -> str | int:
    return st.session_state.get("position_value", "last")


def formatter(lm: LoadedModel | None = None) -> Formatter:
    lm = lm or current_model()
    return Formatter(lm.tokenizer, preamble())


def context_key(lm: LoadedModel | None = None) -> str:
    """Identifies everything a result depends on that the sidebar controls."""
    lm = lm or current_model()
    sets = prompt_sets()
    return stable_hash(
        "ui-context-v1", lm.fingerprint if lm else None, str(lm.dtype) if lm else None,
        formatter(lm).key() if lm else None, sets.to_dict() if sets else None, position(),
    )


def context_summary(lm: LoadedModel | None = None) -> dict[str, Any]:
    """The settings a result came from, as people read them (shown beside every result)."""
    lm = lm or current_model()
    sets = prompt_sets()
    return {
        "model": lm.name if lm else None,
        "source": lm.source if lm else None,
        "fingerprint": lm.fingerprint if lm else None,
        "dtype": str(lm.dtype).replace("torch.", "") if lm else None,
        "preamble": preamble().name,
        "position": position(),
        "prompts": sets.source if sets else None,
        "counts": sets.summary() if sets else None,
    }


# -- results ------------------------------------------------------------------------------
def results() -> dict[str, dict[str, Any]]:
    return st.session_state.setdefault("results", {})


def put_result(name: str, value: Any, **extra: Any) -> dict[str, Any]:
    entry = {"value": value, "key": context_key(), "settings": context_summary(), "time": time.time(), **extra}
    results()[name] = entry
    return entry


def get_result(name: str) -> dict[str, Any] | None:
    return results().get(name)


def is_current(entry: dict[str, Any] | None) -> bool:
    return entry is not None and entry.get("key") == context_key()


def stale_note(entry: dict[str, Any]) -> None:
    """A visible note when a kept result came from other sidebar settings."""
    if not is_current(entry):
        s = entry["settings"]
        st.warning(
            f"These results were computed with other settings ({s['model']}, preamble {s['preamble']}, "
            f"position {s['position']}, {s['counts']}). They are kept; press the button to recompute.",
            icon=":material/history:",
        )
