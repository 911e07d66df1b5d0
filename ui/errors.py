"""Every core call from a page runs inside :func:`guard`: a failure becomes ``st.error`` with a
hint, never a traceback, and the session keeps everything it had (the page simply goes on)."""

from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import streamlit as st

from core.errors import (
    BundleError,
    ConfigError,
    DirectionError,
    DirectionFileError,
    ExplorerError,
    ModelLoadError,
    NonFiniteActivationError,
    PromptFileError,
    PromptTooLongError,
)

log = logging.getLogger("refusal_explorer")

HINTS: list[tuple[type[BaseException], str]] = [
    (ModelLoadError, "Pick **Embedded SmolLM2-135M-Instruct** in the sidebar (works offline), or check the path/id. "
                     "The model that was loaded before is still in use."),
    (PromptTooLongError, "Shorten the prompt or the preamble, or lower max new tokens."),
    (PromptFileError, "Fix the file and upload it again. The prompts in use before are unchanged."),
    (NonFiniteActivationError, "Switch the sidebar's dtype to float32 and load the model again."),
    (DirectionFileError, "Load the model the file was saved for, or compute directions for this model on the Directions page."),
    (BundleError, "Open a bundle written by this tool (the Report page's Everything (.zip) or the batch runner's output)."),
    (DirectionError, "Use more prompts per class, or check that the two sets really differ."),
    (ConfigError, "Fix the named key in the config; the rest of the session is unchanged."),
    (MemoryError, "Use fewer prompts, fewer tokens or a smaller model."),
]


def hint_for(exc: BaseException) -> str:
    for kind, hint in HINTS:
        if isinstance(exc, kind):
            return hint
    if "out of memory" in str(exc).lower():
        return "Out of memory: use fewer prompts, fewer tokens, a smaller model or dtype bfloat16."
    if isinstance(exc, ValueError):
        return "Check the settings in the sidebar and on this page; nothing computed so far was lost."
    return "This looks like a bug. Your session's results are kept; the details are in the terminal running the app."


@dataclass
class Outcome:
    """What a guarded block did: ``failed`` is True if it raised (the error is already shown)."""

    failed: bool = False
    error: BaseException | None = None


def show_error(action: str, exc: BaseException) -> None:
    expected = isinstance(exc, (ExplorerError, ValueError, MemoryError))
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not expected:
        log.error("%s failed:\n%s", action, "".join(traceback.format_exception(exc)))
        message = f"{type(exc).__name__}: {message}"
    st.error(f"**{action} failed.** {message}\n\n{hint_for(exc)}", icon=":material/error:")


@contextmanager
def guard(action: str) -> Iterator[Outcome]:
    """``with guard("Computing directions") as outcome: ...`` — errors shown, never raised.

    Streamlit's own control flow (rerun/stop) derives from ``BaseException`` and passes through.
    """
    outcome = Outcome()
    try:
        yield outcome
    except Exception as exc:  # noqa: BLE001 — the whole point: nothing reaches the user as a traceback
        outcome.failed, outcome.error = True, exc
        show_error(action, exc)
