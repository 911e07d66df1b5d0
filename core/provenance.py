"""Provenance: for every chosen quantity (token position, layer, force coefficient), the value,
the rule that chose it and the prompt split it was chosen on.

Why a record and not prose: the report's methodology paragraph is generated from these records
(:func:`methodology`), so it cannot claim that test prompts played no part when one did. A
quantity chosen on test prompts is recorded as such, and the paragraph says the figures that
depend on it are optimistic.
"""

from __future__ import annotations

from typing import Any


def provenance(*, position: Any, choice: Any, grid: Any = None,
               coefficient: Any = None, force_coefficient: float | None = None,
               force_rule: str | None = None) -> dict[str, dict[str, Any]]:
    """``{"position" | "layer" | "force_coefficient": {"value", "rule", "split"}}`` for results.json
    and the report's methodology paragraph (:func:`methodology`)."""
    g = grid.to_dict() if hasattr(grid, "to_dict") else grid
    c = coefficient.to_dict() if hasattr(coefficient, "to_dict") else coefficient
    layer = int(choice) if isinstance(choice, int) else int(getattr(choice, "layer", choice))
    rule = getattr(choice, "rule", "user")
    out: dict[str, dict[str, Any]] = {}
    if g is not None:
        w = g["winner"]
        grid_rule = f"{w['rule']} ({'the rule found a candidate' if w['found'] else 'nothing passed the filters: fallback'})"
        out["position"] = {"value": w["position"], "token": w.get("position_token"), "rule": grid_rule, "split": "validation"}
    else:
        out["position"] = {"value": position, "rule": "fixed by the settings (not chosen)", "split": "none"}
    if g is not None and rule == "grid":
        out["layer"] = {"value": layer, "input_layer": g["winner"]["layer"], "rule": out["position"]["rule"],
                        "split": "validation", "convention": "block output index (the grid's block-input layer − 1)"}
    else:
        out["layer"] = {"value": layer, "rule": getattr(choice, "reason", "given"),
                        "split": getattr(choice, "split", "user")}
    if c is not None:
        out["force_coefficient"] = {"value": c["coefficient"], "rule": c["rule"], "split": c["split"]}
    elif force_coefficient is not None:
        out["force_coefficient"] = {"value": force_coefficient, "rule": force_rule or "?", "split": "test"}
    return out


def methodology(prov: dict[str, dict[str, Any]]) -> str:
    """One paragraph, generated from the provenance records, that says how each number was chosen."""
    if not prov:
        return ""
    names = {"position": "token position", "layer": "layer", "force_coefficient": "force coefficient"}
    parts = []
    for key in ("position", "layer", "force_coefficient"):
        rec = prov.get(key)
        if not rec:
            continue
        value = rec.get("value")
        if rec.get("input_layer") is not None:
            value = f"{value}, the input of block {rec['input_layer']}"
        split = rec.get("split")
        if split in ("user", "none"):
            parts.append(f"the {names[key]} ({value}) was {'set by the user' if split == 'user' else 'fixed by the settings'}")
            continue
        where = "ON TEST PROMPTS" if split == "test" else f"on {split} prompts"
        parts.append(f"the {names[key]} ({value}) was chosen {where} by the rule: {rec.get('rule')}")
    test_used = any((r or {}).get("split") == "test" for r in prov.values())
    tail = ("Test prompts only produced the reported figures." if not test_used else
            "A quantity was chosen on the test prompts, so the figures that depend on it are optimistic.")
    text = "; ".join(parts)
    return (text[:1].upper() + text[1:] + ". " if text else "") + tail
