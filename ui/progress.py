"""Core functions report ``progress(fraction, message)``; this turns that into ``st.progress``."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from core.progress import Progress, scaled  # noqa: F401  (scaled: pages import it from here)


@contextmanager
def progress_bar(label: str, container=None) -> Iterator[Progress]:
    """A progress bar that core code can drive; it disappears when the block ends."""
    where = container if container is not None else st
    slot = where.empty()
    bar = slot.progress(0.0, text=label)
    started = time.perf_counter()

    def update(fraction: float, message: str = "") -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        elapsed = time.perf_counter() - started
        text = f"{label} — {message}" if message else label
        bar.progress(fraction, text=f"{text} ({elapsed:.0f} s)")

    try:
        yield update
    finally:
        slot.empty()
