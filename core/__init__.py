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
import os
from typing import Any

# Torch's OpenMP threads (GNU OpenMP) spin briefly after a parallel op and then sleep. On a
# virtual machine a sleeping thread can take up to a millisecond to wake, so every small
# parallel op (a norm or an add over a decode step's rows) could cost that much: in such spells
# a slider release took 0.4-2.9 s instead of 0.4-0.6 s (docs/decisions.md, "Threads: OpenMP
# workers spin before they sleep"). A longer spin (~10 ms at most, then they sleep) keeps them
# awake between the ops of a pass. It must be set before torch loads, so it is set here, when
# ``core`` is imported first (app, batch runner, tests); a value already set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000000")

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
