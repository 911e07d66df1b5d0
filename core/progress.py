"""The progress callback every long step of ``core`` accepts: ``progress(fraction, message)``.

Why one type: the batch runner prints it to stderr, the app draws it as a bar, and each step
can hand a slice of its bar to a sub-step with :func:`scaled`; declaring it once keeps the
signature the same everywhere.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[float, str], None]


def scaled(progress: Progress | None, start: float, stop: float, prefix: str = "") -> Progress | None:
    """A callback that maps 0..1 onto ``start..stop`` of ``progress`` (several steps, one bar)."""
    if progress is None:
        return None

    def update(fraction: float, message: str = "") -> None:
        progress(start + (stop - start) * float(fraction), f"{prefix}{message}")

    return update
