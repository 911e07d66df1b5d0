"""The model card written beside an abliterated model's weights: where the weights came from,
which direction was removed, at which layer it was found, what was measured, and when.

Why: an exported folder loads like any other model, so without a card nobody can tell later
that its weights were edited, from which base model, or how well the edit was tested. The card
is a Hugging Face style ``README.md`` (YAML front matter + Markdown) plus the same facts as
``abliteration.json`` for programs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.direction_files import LAYER_CONVENTION, model_meta, tool_version

CARD_JSON = "abliteration.json"
CARD_MD = "README.md"


def card_facts(lm: Any, direction: np.ndarray, *, layer: int | None = None, measured: Mapping[str, Any] | None = None,
               provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card's facts as a JSON-serialisable dict. ``measured``: figures to quote (e.g.
    refusal rates with n and interval); ``provenance``: how the direction was found (method,
    position, prompt sets) — for instance a directions file's metadata."""
    vec = np.ascontiguousarray(np.asarray(direction, dtype=np.float32).reshape(-1))
    return {
        "kind": "abliterated model (directional ablation folded into the weights)",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "tool": "refusal-circuit-explorer", "tool_version": tool_version(),
        "source_model": model_meta(lm),
        "direction": {"d_model": int(vec.size), "norm": float(np.linalg.norm(vec)),
                      "sha256": hashlib.sha256(vec.tobytes()).hexdigest(),
                      "layer_found": layer, "layer_convention": LAYER_CONVENTION},
        "edit": ("token (and learned position) embeddings and every attention and MLP output projection "
                 "orthogonalised against the unit direction"),
        "provenance": dict(provenance or {}),
        "measured": dict(measured or {}),
    }


def _value(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def card_markdown(facts: Mapping[str, Any]) -> str:
    src = facts["source_model"]
    d = facts["direction"]
    base = src.get("source") or src.get("name")
    lines = [
        "---",
        f"base_model: {json.dumps(str(base))}",
        "tags: [abliterated, refusal-direction, refusal-circuit-explorer]",
        "---",
        f"# {src.get('name')} — abliterated",
        "",
        f"Weights of **{src.get('name')}** (source `{base}`, fingerprint `{src.get('fingerprint', '')[:16]}`) with one "
        "direction removed: " + facts["edit"] + ". The model can no longer write that direction into its residual stream.",
        "",
        "| | |", "|---|---|",
        f"| created | {facts['created']} by Refusal Circuit Explorer {facts['tool_version']} |",
        f"| direction | d_model {d['d_model']}, norm {d['norm']:.4g}, sha256 `{d['sha256'][:16]}` |",
        f"| layer where it was found | {d['layer_found'] if d['layer_found'] is not None else 'not recorded'} "
        f"({d['layer_convention']}) |",
    ]
    for k, v in facts.get("provenance", {}).items():
        lines.append(f"| {k} | {_value(v)} |")
    lines += ["", "## What was measured", ""]
    measured = facts.get("measured") or {}
    if measured:
        lines += [f"* **{k}**: {_value(v)}" for k, v in measured.items()]
    else:
        lines.append("Nothing was measured on this export when it was written; measure refusal and capability on "
                     "held-out prompts before relying on it.")
    lines += ["", f"All facts are also in `{CARD_JSON}`.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, lm: Any, direction: np.ndarray, **kwargs: Any) -> Path:
    """Write ``README.md`` and ``abliteration.json`` into ``folder``; returns the README path."""
    out = Path(folder)
    facts = card_facts(lm, direction, **kwargs)
    (out / CARD_JSON).write_text(json.dumps(facts, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    path = out / CARD_MD
    path.write_text(card_markdown(facts), encoding="utf-8")
    return path
