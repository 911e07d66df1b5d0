"""The plain-data ``entry`` dict that ``core.charts`` and ``core.report`` draw, built from this
session's results. Prefers ``core.batch.model_entry`` (the batch runner's own builder, so the
app and the CLI report the same numbers); the fallback below only renames keys."""

from __future__ import annotations

from typing import Any

from ui import state


def _layers(d: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("separation_sigma", "separation_in_sample", "probe_accuracy", "probe_accuracy_std", "mean_norm", "direction_norm")
    return [{"layer": i, **{k: d[k][i] for k in keys if k in d}} for i in range(d["n_layers"])]


def model_entry() -> dict[str, Any]:
    """One model's results in the batch runner's shape (whatever this session has computed)."""
    lm = state.current_model()
    directions = state.get_result("directions")
    validation = state.get_result("validation")
    patching = state.get_result("patching")
    entry: dict[str, Any] = {"model": lm.summary() if lm else None, "settings": state.context_summary(lm) if lm else None}
    if directions:
        v = directions["value"]
        d = v["dirs"].to_dict()
        entry.update(directions=d, layers=_layers(d), layer=v["layer"], layer_choice=v["choice"].to_dict(),
                     normalised=True)
    if validation:
        r = validation["value"].to_dict()
        entry.update(
            validation=r,
            baseline=r["baseline"],
            force_sweep=r["force"],
            suppress_sweep=r["suppress_subtract"],
            force_refusal=r["force_refusal"],
            suppress_refusal=r["suppress_refusal"],
            kl_harmless=r["kl_harmless"],
            samples=r["samples"],
            normalised=r["coefficients_normalised"],
        )
    if patching:
        value = patching["value"]
        entry["patching"] = value.to_dict() if hasattr(value, "to_dict") else value
    return entry
