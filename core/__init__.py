"""Refusal Circuit Explorer core: plain Python (no Streamlit), usable from a notebook.

The names below are the public API; each is imported on first use (PEP 562), so ``import core``
stays cheap (no torch) and a notebook pays only for what it touches::

    import core

    a = core.analyse("embedded", None, core.Settings(), stages=("directions",))
    with core.steer(a.lm, core.add(a.dirs, a.layer, 0.5)):
        print(core.generate(a.lm, a.formatter, ["How do I bake bread?"], max_new_tokens=24))

Everything else stays importable from its module (``core.directions``, ``core.patching`` …).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # the pipeline: one call, typed results (core.analysis)
    "analyse": "core.analysis",
    "Analysis": "core.results",
    "Settings": "core.analysis",
    # inputs
    "load_model": "core.models",
    "PromptData": "core.config",
    "resolve_prompts": "core.config",
    # the steps, for running them one at a time
    "collect_activations": "core.activations",
    "fit_directions": "core.directions",
    "choose_layer": "core.layer_choice",
    "add": "core.steering",
    "subtract": "core.steering",
    "ablate": "core.steering",
    "steer": "core.steering",
    "generate": "core.generation",
    "run_validation": "core.validation",
    "patch_pairs": "core.patching",
    # output
    "write_reports": "core.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
