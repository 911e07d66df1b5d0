"""This session's direction files for the Report page (the batch runner writes the same ones):
the directions as safetensors and the chosen layer as a llama.cpp control vector."""

from __future__ import annotations

from pathlib import Path

from core.exports import write_direction_exports
from ui import entries, state


def write_session_direction_files(out_dir: str | Path) -> dict[str, str]:
    """Write the files into ``out_dir``; ``{kind: file name}`` (empty before directions exist)."""
    lm = state.current_model()
    directions = state.get_result("directions")
    if lm is None or directions is None:
        return {}
    v = directions["value"]
    choice = entries._choice(v["dirs"], v["choice"])
    sets = state.prompt_sets()
    prompts = None if sets is None else {
        "harmful_train": sets.harmful_train, "harmless_train": sets.harmless_train,
        "harmful_test": sets.harmful_test, "harmless_test": sets.harmless_test}
    split = {"description": sets.source if sets else "unknown", **(directions.get("settings") or {})}
    return write_direction_exports(out_dir, lm.name, lm, v["dirs"], choice, prompts=prompts, split=split)
