"""The fast per-layer ablation screen (no generation) that feeds :func:`core.layer_choice.choose_layer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from core.directions import LayerDirections
from core.layer_choice import candidate_layers
from core.formatting import Formatter
from core.generation import next_token_logits
from core.metrics import finite_or_none as _f, kl_divergence, refusal_score, refusal_token_ids
from core.models import LoadedModel
from core.steering import ablate, edits_for
from core.progress import Progress


class _Steps:
    """Progress in equal steps, with a message per step."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = max(total, 1), 0, progress

    def __call__(self, message: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(min(1.0, self.done / self.total), message)


@dataclass
class LayerScan:
    """Per-layer effect of ablating that layer's direction, from first-token logits only."""

    layers: list[int]
    baseline_score: float  # mean refusal score (log-odds) on harmful prompts, unsteered
    ablated_score: np.ndarray  # [L] NaN where not scanned
    ablation_effect: np.ndarray  # [L] baseline − ablated (larger = ablation removes more refusal)
    kl: np.ndarray  # [L] mean KL on harmless prompts under that ablation
    n_harmful: int
    n_harmless: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "baseline_score": _f(self.baseline_score),
            "ablated_score": [_f(x) for x in self.ablated_score],
            "ablation_effect": [_f(x) for x in self.ablation_effect],
            "kl": [_f(x) for x in self.kl],
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
        }


def scan_layers(
    lm: LoadedModel,
    formatter: Formatter,
    dirs: LayerDirections,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    skip_last_fraction: float = 0.2,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> LayerScan:
    """For each candidate layer, ablate its direction everywhere and measure the drop of the
    refusal score on ``harmful`` and the KL on ``harmless`` (one forward pass each; no
    generation). Feed ``ablation_effect`` and ``kl`` to :func:`core.layer_choice.choose_layer`.
    Use prompts the direction was *not* fitted on if you can (e.g. a slice of the test split)."""
    harmful, harmless = list(harmful), list(harmless)
    if not harmful or not harmless:
        raise ValueError("the layer scan needs harmful and harmless prompts")
    todo = [lm.check_layer(i) for i in layers] if layers is not None else candidate_layers(dirs.n_layers, skip_last_fraction)
    ids = refusal_token_ids(lm.tokenizer)
    step = _Steps(2 + 2 * len(todo), progress)
    base = float(np.mean(refusal_score(next_token_logits(lm, formatter, harmful, batch_size=batch_size), ids)))
    step("baseline refusal score")
    clean = next_token_logits(lm, formatter, harmless, batch_size=batch_size)
    step("clean harmless logits")
    n = dirs.n_layers
    ablated, kls = np.full(n, np.nan), np.full(n, np.nan)
    for layer in todo:
        try:
            iv = ablate(dirs, layer)
        except ValueError:  # no direction at this layer
            step(f"layer {layer} skipped")
            step(f"layer {layer} skipped")
            continue
        edits = edits_for(lm, [iv])
        ablated[layer] = float(np.mean(refusal_score(next_token_logits(lm, formatter, harmful, edits=edits, batch_size=batch_size), ids)))
        step(f"layer {layer}: refusal score")
        kls[layer] = float(np.mean(kl_divergence(clean, next_token_logits(lm, formatter, harmless, edits=edits, batch_size=batch_size))))
        step(f"layer {layer}: KL")
    return LayerScan(todo, base, ablated, base - ablated, kls, len(harmful), len(harmless))
