"""Core functions report ``progress(fraction, message)``; this turns that into ``st.progress``."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import streamlit as st

Progress = Callable[[float, str], None]


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


def scaled(progress: Progress | None, start: float, stop: float, prefix: str = "") -> Progress | None:
    """A callback that maps 0..1 onto ``start..stop`` of ``progress`` (several steps, one bar)."""
    if progress is None:
        return None

    def update(fraction: float, message: str = "") -> None:
        progress(start + (stop - start) * float(fraction), f"{prefix}{message}")

    return update
