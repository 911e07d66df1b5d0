"""This session's results in the batch runner's shape, so the Report page renders through the
same ``core.report`` functions as ``python -m core.batch`` and exports a config that reruns it.

Only assembly of what ``core`` already computed: ``core.results.model_entry`` / ``build_results``
do the work; this module picks the session's objects and the sidebar's settings.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from core.results import build_results, model_entry as batch_entry
from core.config import Config, GenerationConfig, ModelSpec, PatchingConfig, PromptsConfig, SteeringConfig
from core.layer_choice import choose_layer
from ui import state

CUSTOM_PROMPT_FILES = {
    "harmful": "prompts/harmful_train.jsonl", "harmless": "prompts/harmless_train.jsonl",
    "harmful_test": "prompts/harmful_test.jsonl", "harmless_test": "prompts/harmless_test.jsonl",
}


def _choice(dirs, default):
    """The layer the session's results refer to: validation's layer, else the selected one."""
    validation = state.get_result("validation")
    layer = validation["value"].layer if validation else st.session_state.get("active_layer", default.layer)
    return default if int(layer) == default.layer else choose_layer(dirs, layer=int(layer))


def model_entry() -> dict[str, Any] | None:
    """One model's entry (``core.results.model_entry``) from this session, or None before directions."""
    lm = state.current_model()
    directions = state.get_result("directions")
    if lm is None or directions is None:
        return None
    v = directions["value"]
    validation = state.get_result("validation")
    patching = state.get_result("patching")
    preamble = state.preamble()
    entry = batch_entry(
        name=lm.name, lm=lm, preamble=preamble.name if preamble.name in ("none", "prompted-refusal") else preamble.to_dict(),
        dirs=v["dirs"], choice=_choice(v["dirs"], v["choice"]),
        validation=validation["value"] if validation else None,
        patching=patching["value"] if patching else None,
        scan=v.get("scan"), source=lm.source, grid=v.get("grid"),
        coefficient_choice=validation.get("coefficient_choice") if validation else None,
        timings={"directions": v.get("seconds", 0.0)},
        notes=[f"Prompts: {directions['settings']['prompts']} ({directions['settings']['counts']})."],
    )
    return entry


def session_config() -> Config:
    """A batch config that reruns this session's analysis (``python -m core.batch --config``)."""
    lm = state.current_model()
    spec = state.spec()
    sets = state.prompt_sets()
    pre = state.preamble()
    directions = state.get_result("directions")
    validation = state.get_result("validation")
    patching = state.get_result("patching")
    source = lm.source if lm else state.source_string(spec)
    model = ModelSpec(name=(lm.name if lm else source).replace(" ", "-").lower()[:60], source=source,
                      preamble=pre.name if pre.name in ("none", "prompted-refusal") else pre.to_dict(),
                      dtype=spec.get("dtype", "auto"), device=spec.get("device", "auto"))
    if sets is None or sets.source.startswith("built-in"):
        n_train = len(sets.harmful_train) if sets else 48
        n_test = len(sets.harmful_test) if sets else 32
        prompts = PromptsConfig(n_train=n_train, n_test=n_test, seed=0)
    else:
        prompts = PromptsConfig(harmful=CUSTOM_PROMPT_FILES["harmful"], harmless=CUSTOM_PROMPT_FILES["harmless"],
                                harmful_test=CUSTOM_PROMPT_FILES["harmful_test"],
                                harmless_test=CUSTOM_PROMPT_FILES["harmless_test"], n_train=None, n_test=None, seed=0)
    steering_kwargs: dict[str, Any] = {}
    generation = GenerationConfig()
    if directions:
        steering_kwargs["method"] = directions["value"]["dirs"].method
        steering_kwargs["scan_prompts"] = 16 if directions["value"].get("scan") is not None else 0
    if validation:
        r = validation["value"]
        steering_kwargs.update(layer=int(r.layer), coefficients=tuple(p.coefficient for p in r.force),
                               subtract_coefficients=tuple(p.coefficient for p in r.suppress_subtract),
                               normalised=r.coefficients_normalised)
        generation = GenerationConfig(max_new_tokens=r.max_new_tokens, n_samples=len(r.samples) // 2 or 4)
    elif directions:
        steering_kwargs["layer"] = int(st.session_state.get("active_layer", directions["value"]["layer"]))
    patch_cfg = None
    if patching:
        p = patching["value"]
        patch_cfg = PatchingConfig(n_pairs=p.n_candidates, sites=tuple(p.sites), threshold=p.threshold)
    # the grid may have chosen the position: export the one the directions were fitted at
    position = directions["value"]["dirs"].position if directions else state.position()
    return Config(models=(model,), prompts=prompts, position=position, generation=generation,
                  steering=SteeringConfig(**steering_kwargs), patching=patch_cfg)


def prompt_files() -> dict[str, str]:
    """The prompt files a config for uploaded/edited prompts refers to (empty for built-in)."""
    sets = state.prompt_sets()
    if sets is None or sets.source.startswith("built-in"):
        return {}
    lists = {"harmful": sets.harmful_train, "harmless": sets.harmless_train,
             "harmful_test": sets.harmful_test, "harmless_test": sets.harmless_test}
    return {CUSTOM_PROMPT_FILES[k]: "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in v)
            for k, v in lists.items()}


def session_results() -> dict[str, Any] | None:
    """The full results dict (``core.results.build_results``) of this session."""
    entry = model_entry()
    if entry is None:
        return None
    sets = state.prompt_sets()
    results = build_results(session_config(), [entry], command="python -m core.batch --config config.yaml --out results/")
    if sets is not None:
        results["prompts"] = {"description": sets.source,
                              "counts": {"harmful_train": len(sets.harmful_train), "harmless_train": len(sets.harmless_train),
                                         "harmful_test": len(sets.harmful_test), "harmless_test": len(sets.harmless_test)}}
    steering_runs = st.session_state.get("steer_runs") or []
    if steering_runs:
        results["steering_runs"] = list(steering_runs)
    return results
