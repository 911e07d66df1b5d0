"""Rows of different conditions in one batch, each row under its own interventions.

Why: validation generates the same test prompts under many conditions (baseline, the
direction, its random and shuffled controls, a coefficient sweep). Decode steps on a CPU cost
far less per row in large batches, so all (condition, prompt) rows go through shared batches
instead of one condition at a time (docs/decisions.md, "Validation in mixed batches").

:class:`RowEdits` turns a list of conditions (each a list of :class:`~core.steering.Intervention`)
into one vectorised edit per module; :mod:`core.generation` tells it, before every forward
pass, which condition each row belongs to. Each row gets what :func:`core.steering.edits_for`
gives it alone, up to batch-composition rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from core.formatting import Formatter
from core.generation import generate, next_token_logits
from core.hooks import EditFn
from core.models import LoadedModel
from core.steering import Intervention, edit_sites, edit_vector


class RowEdits:
    """Per-row edits for a batch whose rows belong to ``groups`` (one list of interventions per
    group; an empty list = unsteered rows).

    Each module of the union of the groups' modules gets one edit. Per "slot" (the k-th
    intervention of a row's group that touches the module, so edits on one module still compose
    in list order) it holds a per-group added vector ``[G, d]`` and a per-group ablated unit
    vector ``[G, d]`` with its strength; a group without an edit there has zeros, which leave its
    rows' hidden states bit-for-bit unchanged. :meth:`select` says which group each row of the
    next forward passes belongs to."""

    def __init__(self, lm: LoadedModel, groups: Sequence[Sequence[Intervention]]) -> None:
        if not groups:
            raise ValueError("groups: give at least one list of interventions (an empty list = unsteered rows)")
        self.n_groups = len(groups)
        zero = np.zeros(lm.d_model, np.float32)
        slots: dict[str, list[list[Intervention | None]]] = {}  # module -> slot -> group -> intervention
        for g, ivs in enumerate(groups):
            for name, indices in edit_sites(lm, ivs).items():
                per_slot = slots.setdefault(name, [])
                for k, i in enumerate(indices):
                    while len(per_slot) <= k:
                        per_slot.append([None] * len(groups))
                    per_slot[k][g] = ivs[i]
        self._slots: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]]] = {}
        for name, per_slot in slots.items():
            built = []
            for ivs_k in per_slot:
                adds = [iv is not None and iv.kind != "ablate" for iv in ivs_k]
                abls = [iv is not None and iv.kind == "ablate" for iv in ivs_k]
                add_m = torch.from_numpy(np.stack([edit_vector(iv) if a else zero for iv, a in zip(ivs_k, adds)]))
                abl_m = torch.from_numpy(np.stack([edit_vector(iv) if a else zero for iv, a in zip(ivs_k, abls)]))
                strength = torch.tensor([iv.coefficient if a else 0.0 for iv, a in zip(ivs_k, abls)], dtype=torch.float32)
                built.append((add_m if any(adds) else None, abl_m if any(abls) else None, strength))
            self._slots[name] = built
        self._rows: torch.Tensor | None = None
        self._memo: dict[tuple, torch.Tensor] = {}

    def select(self, groups: Sequence[int]) -> None:
        """Row ``i`` of the next forward passes belongs to group ``groups[i]``."""
        rows = torch.as_tensor(list(groups), dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_groups):
            raise ValueError(f"groups: every row's group must be in 0…{self.n_groups - 1}")
        self._rows = rows
        self._memo.clear()

    def _take(self, key: tuple, table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = self._memo.get(key)
        if t is None:
            assert self._rows is not None
            t = self._memo[key] = table[self._rows].to(device=like.device, dtype=like.dtype)
        return t

    def _edit(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        if self._rows is not None and hidden.shape[0] == 1 < len(self._rows):
            hidden = hidden.expand(len(self._rows), *hidden.shape[1:])  # shared by all rows (GPT-2's position embedding)
        if self._rows is None or hidden.shape[0] != len(self._rows):
            raise RuntimeError(f"{name}: RowEdits.select() was not called for this batch of {hidden.shape[0]} rows")
        for k, (add_m, abl_m, strength) in enumerate(self._slots[name]):
            if add_m is not None:
                hidden = hidden + self._take((name, k, "add", hidden.dtype), add_m, hidden).unsqueeze(-2)
            if abl_m is not None:
                # as in the single-intervention edit: the projection in float32 at least
                h32 = hidden.float()
                u = self._take((name, k, "abl", h32.dtype), abl_m, h32).unsqueeze(-2)  # [B, 1, d]
                s = self._take((name, k, "s", h32.dtype), strength, h32).view(-1, *([1] * (h32.dim() - 1)))
                coeff = (h32 * u).sum(-1, keepdim=True)
                hidden = (h32 - s * coeff * u).to(hidden.dtype)
        return hidden

    @property
    def edits(self) -> dict[str, EditFn]:
        """``{module name: edit fn}`` for :mod:`core.hooks`, acting per row as :meth:`select` says."""
        return {name: self._edit for name in self._slots}


def mixed_generate(lm: LoadedModel, formatter: Formatter, prompts: Sequence[str], conditions: Sequence[Sequence[Intervention]],
                   groups: Sequence[int], **generate_kwargs) -> list[str]:
    """Generations for ``prompts[i]`` under ``conditions[groups[i]]``, rows of different conditions
    sharing decode batches (:class:`RowEdits`); each row equals :func:`core.steering.steered_generate` of it
    alone up to batch-composition rounding."""
    return generate(lm, formatter, prompts, row_edits=RowEdits(lm, conditions), groups=groups, **generate_kwargs)


def mixed_logits(lm: LoadedModel, formatter: Formatter, prompts: Sequence[str], conditions: Sequence[Sequence[Intervention]],
                 groups: Sequence[int], **kwargs) -> torch.Tensor:
    """First-response-token logits ``[n, vocab]`` of ``prompts[i]`` under ``conditions[groups[i]]``."""
    return next_token_logits(lm, formatter, prompts, row_edits=RowEdits(lm, conditions), groups=groups, **kwargs)


@dataclass
class Condition:
    """One generation condition: a name, which prompts (a key of the caller's prompt sets), and
    its interventions (none = the baseline)."""

    name: str
    kind: str
    interventions: list[Intervention]


def generate_conditions(lm: LoadedModel, formatter: Formatter, conditions: Sequence[Condition],
                        prompts_of: dict[str, list[str]], finish: Callable[[Condition, list[str]], None], *,
                        max_new_tokens: int, batch_size: int) -> None:
    """Generate every (condition, prompt) row in shared batches of ``batch_size``, in condition
    order; ``finish(condition, answers)`` runs as soon as all of a condition's rows are done."""
    rows = [(p, g) for g, cond in enumerate(conditions) for p in prompts_of[cond.kind]]
    row_edits = RowEdits(lm, [cond.interventions for cond in conditions])
    ends = np.cumsum([len(prompts_of[cond.kind]) for cond in conditions])
    answers: list[str] = []
    done = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        answers += generate(lm, formatter, [p for p, _ in chunk], row_edits=row_edits, groups=[g for _, g in chunk],
                            max_new_tokens=max_new_tokens, batch_size=batch_size)
        while done < len(conditions) and ends[done] <= len(answers):
            finish(conditions[done], answers[(ends[done - 1] if done else 0):ends[done]])
            done += 1
