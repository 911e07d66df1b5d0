"""Choosing the layer to steer: a rule over the per-layer statistics of
:class:`core.directions.LayerDirections`, recorded with the split it read (validation, never test).

The grid of :mod:`core.selection` is the batch runner's and the app's default; this module holds
the simpler rules (a given layer, an ablation screen, the best validation separation) and the
record every rule produces (:class:`LayerChoice`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.directions import LayerDirections, _or_nan

@dataclass
class LayerChoice:
    layer: int
    rule: str  # "grid" | "ablation" | "separation" | "user"
    reason: str
    split: str = "validation"  # the prompts the choice was made on: "validation" | "train" | "user"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "rule": self.rule, "reason": self.reason, "split": self.split}


# the last layers are never chosen by a default rule (the grid and the separation rule alike): an
# edit there acts on the next token's logits almost directly (Arditi et al. exclude the last 20 %)
DEFAULT_SKIP_LAST_FRACTION = 0.2


def candidate_layers(n_layers: int, skip_last_fraction: float = DEFAULT_SKIP_LAST_FRACTION) -> list[int]:
    """Layers the default rule may pick: all but the last ``floor(L × fraction)`` (at least one)."""
    if not 0 <= skip_last_fraction < 1:
        raise ValueError("skip_last_fraction must be in [0, 1)")
    n_skip = int(np.floor(n_layers * skip_last_fraction + 1e-9))
    return list(range(max(1, n_layers - n_skip)))


def choose_layer(
    dirs: LayerDirections,
    *,
    skip_last_fraction: float = DEFAULT_SKIP_LAST_FRACTION,
    ablation_effect: np.ndarray | None = None,
    kl: np.ndarray | None = None,
    max_kl: float = 0.1,
    layer: int | None = None,
    split: str = "validation",
) -> LayerChoice:
    """The layer to steer at, by a fixed documented rule (``layer=`` overrides it).

    The test split never enters: ``ablation_effect``/``kl`` must come from validation prompts
    (``split`` says which prompts they came from, for the record), and the separation used is
    the validation separation (the in-sample one when no validation prompts were given).

    1. Only the first ``L − floor(0.2·L)`` layers are candidates: directions in the last
       layers separate well but mostly encode the output token, and ablating or adding them
       steers poorly (Arditi et al. 2024 make the same exclusion).
    2. If ``ablation_effect`` is given (``[L]``, how much ablating each layer's direction lowers
       harmful refusal — larger is better; NaN = not measured), pick the candidate with the
       largest *positive* effect among those whose KL on harmless prompts (``kl``, ``[L]``, if
       given) is ≤ ``max_kl``; ties go to the better validation separation.
    3. Otherwise (or if no candidate lowers refusal within the KL cap; the reason says so) pick
       the candidate with the best validation separation.
    """
    n = dirs.n_layers
    if layer is not None:
        i = dirs.check_layer(layer)
        return LayerChoice(i, "user", f"layer {i} chosen by the user", "user")
    cands = candidate_layers(n, skip_last_fraction)
    sep = _or_nan(dirs.separation_validation, n).astype(np.float64)
    which, sep_split = "validation", "validation"
    if not np.isfinite(sep[cands]).any():
        sep, which, sep_split = np.asarray(dirs.separation_in_sample, dtype=np.float64), "in-sample (train)", "train"
    sep_key = np.where(np.isfinite(sep), sep, -np.inf)
    skipped = f"the last {n - len(cands)} of {n} layers skipped"

    note = ""
    if ablation_effect is not None:
        effect = np.asarray(ablation_effect, dtype=np.float64)
        if effect.shape != (n,):
            raise ValueError(f"ablation_effect must have one value per layer ({n}), got shape {effect.shape}")
        ok = [i for i in cands if np.isfinite(effect[i]) and effect[i] > 0]
        if kl is not None:
            kl_arr = np.asarray(kl, dtype=np.float64)
            if kl_arr.shape != (n,):
                raise ValueError(f"kl must have one value per layer ({n}), got shape {kl_arr.shape}")
            ok = [i for i in ok if np.isfinite(kl_arr[i]) and kl_arr[i] <= max_kl]
        if ok:
            best = max(ok, key=lambda i: (effect[i], sep_key[i]))
            kl_note = f", KL {kl_arr[best]:.3g} ≤ {max_kl}" if kl is not None else ""
            return LayerChoice(best, "ablation", f"largest ablation effect on harmful refusal on {split} prompts "
                                                 f"({effect[best]:.3g}{kl_note}); {skipped}", split)
        measured = effect[[i for i in cands if np.isfinite(effect[i])]]
        note = ("no candidate's ablation lowered the refusal score; " if measured.size and (measured <= 0).all()
                else "no layer met the ablation/KL criterion; ")
    best = max(cands, key=lambda i: sep_key[i])
    return LayerChoice(best, "separation", f"{note}best {which} separation ({sep[best]:.2f}σ); {skipped}", sep_split)
