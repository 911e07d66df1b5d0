"""The direction files an analysis leaves behind (the batch runner writes them beside
``results.json``; the Report page offers the same bytes as downloads).

* ``directions-<model>.safetensors`` — every layer's direction and the chosen layer, with
  provenance (:mod:`core.direction_files`);
* ``control-vector-<model>.gguf`` — the chosen layer's direction as a llama.cpp control vector
  (:mod:`core.control_vectors`), unless the chosen layer is 0, which llama.cpp cannot apply.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from core.control_vectors import write_control_vector
from core.direction_files import save_directions
from core.directions import LayerDirections
from core.layer_choice import LayerChoice


def file_slug(name: str) -> str:
    """A file-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")[:80] or "model"


def write_direction_exports(
    out_dir: str | Path,
    name: str,
    lm: Any,
    dirs: LayerDirections,
    choice: LayerChoice | int,
    *,
    prompts: Any = None,
    split: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write the files above into ``out_dir``; returns ``{kind: file name}`` (relative, for
    ``results.json``) plus ``control_vector_note`` when no control vector could be written."""
    out = Path(out_dir)
    slug = file_slug(name)
    layer = int(choice) if isinstance(choice, int) else int(choice.layer)
    files: dict[str, str] = {}
    path = save_directions(out / f"directions-{slug}.safetensors", dirs, model=lm, choice=choice,
                           prompts=prompts, split=split)
    files["directions"] = path.name
    if layer >= 1:
        cv = write_control_vector(out / f"control-vector-{slug}.gguf", dirs, layer, model=lm)
        files["control_vector"] = cv.name
    else:
        files["control_vector_note"] = "chosen layer 0: llama.cpp cannot apply a control vector there"
    return files
