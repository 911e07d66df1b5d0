"""Control directions, and the rule that says when an effect beats all of them.

Why several controls: in d = 576 one random ablation does almost nothing, so beating a single
draw says little. An intervention is compared with

* :data:`DEFAULT_N_RANDOM` seeded random directions of the same norm (seeds ``seed``,
  ``seed + 1``, …): their spread and worst case are reported, not one draw;
* a **label-shuffled** difference in means: the train activations with their harmful/harmless
  labels permuted (seeded), same class sizes, same layer and position. It has the norm
  statistics of a real difference-in-means direction but no label information, so it controls
  for "any direction estimated this way" rather than "any direction at all".

**Specific** (:func:`is_specific`): the steered rate's Wilson 95 % interval lies entirely on
the expected side of *every* control's interval — above them for forcing refusal (lower bound
> every control's upper bound), below them for suppressing it (upper bound < every control's
lower bound). Non-overlapping intervals are a deliberately strict, readable rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from core.metrics import Rate
from core.steering import Intervention, random_like

DEFAULT_N_RANDOM = 5
SPECIFIC_RULE = {
    "above": "specific if the lower bound of its 95 % interval is above the upper bound of every control's",
    "below": "specific if the upper bound of its 95 % interval is below the lower bound of every control's",
}


def shuffled_direction(harmful: np.ndarray, harmless: np.ndarray, seed: int) -> np.ndarray:
    """Difference in means after permuting the class labels of ``harmful`` ∪ ``harmless``.

    ``harmful`` / ``harmless``: train activations at one layer, ``[n, d]`` (or ``[n, L, d]``,
    giving ``[L, d]``). Class sizes are kept; the permutation is seeded.
    """
    a, b = np.asarray(harmful, dtype=np.float64), np.asarray(harmless, dtype=np.float64)
    if len(a) < 1 or len(b) < 1:
        raise ValueError("the shuffled control needs train activations of both classes")
    pooled = np.concatenate([a, b])
    order = np.random.default_rng(seed).permutation(len(pooled))
    fake_a, fake_b = pooled[order[: len(a)]], pooled[order[len(a):]]
    return (fake_a.mean(0) - fake_b.mean(0)).astype(np.float32)


def control_interventions(iv: Intervention, seed: int, n_random: int = DEFAULT_N_RANDOM,
                          shuffled: np.ndarray | None = None) -> list[tuple[str, Intervention]]:
    """``[(name, intervention)]``: ``iv`` along each control direction, with ``iv``'s norm."""
    out = [(f"random #{i} (seed {seed + i})", random_like(iv, seed + i)) for i in range(n_random)]
    if shuffled is not None:
        vec = np.asarray(shuffled, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vec))
        if norm > 0 and np.isfinite(norm):
            out.append(("label-shuffled", replace(iv, direction=vec * (float(np.linalg.norm(iv.direction)) / norm))))
    return out


@dataclass
class ControlResult:
    """One control's outcome: refusal and degenerate rates (and first-token KL if measured)."""

    name: str
    refusal: Rate
    degenerate: Rate
    kl: float | None = None

    @property
    def kind(self) -> str:
        return "shuffled" if self.name.startswith("label-shuffled") else "random"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "refusal": self.refusal.to_dict(),
                "degenerate": self.degenerate.to_dict(), "kl": self.kl}


@dataclass
class ControlComparison:
    """An intervention's refusal rate against all its controls, with the verdict."""

    condition: str
    refusal: Rate
    degenerate: Rate
    expect: str  # "above" (forcing) or "below" (suppressing)
    controls: list[ControlResult] = field(default_factory=list)

    @property
    def specific(self) -> bool | None:
        return is_specific(self.refusal, [c.refusal for c in self.controls], self.expect)

    @property
    def worst(self) -> ControlResult | None:
        """The control closest to (or beyond) the steered rate: the one that matters."""
        if not self.controls:
            return None
        pick = max if self.expect == "above" else min
        return pick(self.controls, key=lambda c: c.refusal.rate)

    def spread(self, kind: str = "random") -> tuple[float, float] | None:
        rates = [c.refusal.rate for c in self.controls if c.kind == kind]
        return (min(rates), max(rates)) if rates else None

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        spread = self.spread("random")
        return {
            "condition": self.condition,
            "refusal": self.refusal.to_dict(),
            "degenerate": self.degenerate.to_dict(),
            "expect": self.expect,
            "rule": SPECIFIC_RULE[self.expect],
            "specific": self.specific,
            "controls": [c.to_dict() for c in self.controls],
            "n_random": sum(c.kind == "random" for c in self.controls),
            "has_shuffled": any(c.kind == "shuffled" for c in self.controls),
            "random_spread": list(spread) if spread else None,
            "worst": worst.to_dict() if worst else None,
        }


def is_specific(rate: Rate, controls: Sequence[Rate], expect: str) -> bool | None:
    """The rule of the module docstring; ``None`` when there is no control to beat."""
    if expect not in SPECIFIC_RULE:
        raise ValueError(f"expect must be 'above' or 'below', got {expect!r}")
    if not controls or rate.n == 0:
        return None
    lo, hi = rate.ci
    if expect == "above":
        return all(lo > c.ci[1] for c in controls)
    return all(hi < c.ci[0] for c in controls)


def shuffled_control(lm: Any, formatter: Any, dirs: Any, layer: int, harmful_train: Sequence[str],
                     harmless_train: Sequence[str], seed: int, batch_size: int = 16) -> np.ndarray:
    """:func:`shuffled_direction` at ``layer`` from the train prompts' activations (collected at
    the directions' position; a cache hit when the directions were just fitted on them)."""
    from core.activations import collect_activations

    acts = [collect_activations(lm, list(p), position=dirs.position, formatter=formatter, batch_size=batch_size)
            for p in (harmful_train, harmless_train)]
    return shuffled_direction(acts[0][:, layer], acts[1][:, layer], seed)
