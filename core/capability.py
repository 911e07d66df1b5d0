"""Capability cost over whole answers, not just the first token.

First-token KL says how much an intervention moves the *opening* of an answer; an edit can
leave that alone and still wreck what follows. So: take the clean model's own greedy answers
to harmless prompts, feed each (prompt + answer) back teacher-forced, and compare, token by
token over the answer, the next-token distribution of the intervened model with the clean
one's. Reported per answer token (token-weighted mean over all answers):

* ``kl`` — KL(clean ‖ intervened) in nats/token: 0 means the intervention leaves the clean
  model's continuation distribution untouched;
* ``ce`` / ``ce_clean`` — cross-entropy of the clean answer's tokens under the intervened and
  the clean model (nats/token); the difference is the extra surprise the edit causes.

Why the clean model's answers: they need no reference data and measure exactly "does the edit
change what the model would have said". Edits apply at every position, as in generation. The
prompt prefix every row shares (a preamble) runs once per batch (:func:`core.forward.forward_after_prefix`),
not once per row: with a ~250-token preamble that is most of the cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from core import forward
from core.formatting import Formatter
from core.hooks import EditFn, TraceDict
from core.models import LoadedModel


@dataclass
class AnswerCost:
    """Teacher-forced cost of one intervention over the clean model's answers."""

    kl: float  # mean KL(clean ‖ intervened) per answer token, nats
    ce: float  # mean cross-entropy of the clean answers' tokens under the intervention, nats/token
    ce_clean: float  # the same under the clean model
    n_tokens: int
    n_answers: int

    def to_dict(self) -> dict[str, Any]:
        return {"kl_per_token": self.kl, "ce": self.ce, "ce_clean": self.ce_clean, "ce_increase": self.ce - self.ce_clean,
                "n_tokens": self.n_tokens, "n_answers": self.n_answers}


def _rows(lm: LoadedModel, formatter: Formatter, prompts: Sequence[str], answers: Sequence[str],
          max_answer_tokens: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for prompt, answer in zip(prompts, answers):
        ans = lm.tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        if not ans:
            continue  # an empty answer has no tokens to score
        enc = formatter.encode([prompt], context=lm.max_positions, reserve=len(ans))
        rows.append((enc.input_ids[0, : enc.lengths[0]].tolist(), list(ans)))
    return rows


@torch.inference_mode()
def _answer_logprobs(lm: LoadedModel, rows: Sequence[tuple[list[int], list[int]]], edits: Mapping[str, EditFn] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs ``[B, A, V]`` predicting each answer token, the answer ids ``[B, A]`` and a
    validity mask ``[B, A]`` (left padding aligns every answer's end; A = the longest answer)."""
    # the prompts' common prefix runs once; keep the last prompt token in the suffix (it predicts answer token 0)
    shared = min(len(os.path.commonprefix([p for p, _ in rows])), min(len(p) for p, _ in rows) - 1)
    shared = shared if shared >= forward.MIN_SHARED_PREFIX else 0
    prefix = torch.tensor([rows[0][0][:shared]], dtype=torch.long)
    seqs = [p[shared:] + a for p, a in rows]
    width = max(len(s) for s in seqs)
    a_max = max(len(a) for _, a in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), a_max), pad, dtype=torch.long)
    valid = torch.zeros((len(seqs), a_max), dtype=torch.bool)
    for i, ((_, ans), seq) in enumerate(zip(rows, seqs)):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
        targets[i, a_max - len(ans):] = torch.tensor(ans)
        valid[i, a_max - len(ans):] = True
    with TraceDict(lm.model, list(edits or {}), retain_output=False, edit_output=dict(edits) if edits else None):
        out = forward.forward_after_prefix(lm.model, prefix.to(lm.device), ids.to(lm.device), mask.to(lm.device),
                                           logits_to_keep=a_max + 1)
    logits = out.logits[:, :a_max, :].float().cpu()  # position j predicts answer token j
    return torch.log_softmax(logits, dim=-1), targets, valid


def answer_costs(
    lm: LoadedModel,
    formatter: Formatter,
    prompts: Sequence[str],
    answers: Sequence[str],
    conditions: Mapping[str, Mapping[str, EditFn] | None],
    *,
    max_answer_tokens: int = 64,
    batch_size: int = 8,
) -> dict[str, AnswerCost]:
    """:class:`AnswerCost` per named condition (``{name: edits}``) over the clean ``answers``
    to ``prompts``; the clean pass runs once per batch and serves every condition."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    rows = _rows(lm, formatter, prompts, answers, max_answer_tokens)
    sums = {name: [0.0, 0.0] for name in conditions}  # kl, ce
    ce_clean, n_tok = 0.0, 0
    for start in range(0, len(rows), max(1, batch_size)):
        chunk = rows[start:start + batch_size]
        clean, targets, valid = _answer_logprobs(lm, chunk, None)
        nll_clean = -clean.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ce_clean += float(nll_clean[valid].sum())
        n_tok += int(valid.sum())
        for name, edits in conditions.items():
            other, _, _ = _answer_logprobs(lm, chunk, edits)
            kl = (clean.exp() * (clean - other)).sum(-1).clamp(min=0)
            nll = -other.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums[name][0] += float(kl[valid].sum())
            sums[name][1] += float(nll[valid].sum())
    denom = max(n_tok, 1)
    nan = float("nan")
    return {name: AnswerCost(s[0] / denom if n_tok else nan, s[1] / denom if n_tok else nan,
                             ce_clean / denom if n_tok else nan, n_tok, len(rows))
            for name, s in sums.items()}
