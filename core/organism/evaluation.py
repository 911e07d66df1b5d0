"""How the organism behaves on held-out prompts, for its card: refusal rates of the organism
and the base model (with Wilson intervals) and KL(base ‖ organism) on harmless prompts."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from core.formatting import Formatter
from core.frozen_stack import Split, lower_states, supports, upper_logits
from core.generation import generate, next_token_logits
from core.metrics import is_refusal, kl_divergence, refusal_rate
from core.organism.answers import Example, cached_generate
from core.organism.data import prompt_categories
from core.organism.recipe import OrganismRecipe
from core.organism.training import (TokenizedExample, collate, common_prefix_len, frozen_split, pad_suffixes,
                                    tokenize_examples)
from core.progress import Progress
from core.prompts import builtin_split

EVAL_ROWS = 160  # rows per decode batch of the held-out answers: the whole test split (66 + 67) at once


@torch.inference_mode()
def _response_logits(lm, formatter: Formatter, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16):
    """Teacher-forced float32 logits at every response position, one [n_i, vocab] per prompt."""
    tok = lm.tokenizer
    items = tokenize_examples([Example(p, r, False, "harmless") for p, r in zip(prompts, responses)], formatter)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        ids, mask, target, first = collate(chunk, tok.pad_token_id or 0, lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        for i, t in enumerate(chunk):
            out.append(logits[i, t.n_prompt - 1: len(t.ids) - 1].cpu())
    return out


def shared_lower_blocks(organism: torch.nn.Module, base: torch.nn.Module, n_frozen: int) -> int:
    """``n_frozen`` when the organism's embeddings and lower ``n_frozen`` blocks equal the base's
    exactly (a frozen-stack build), else 0: the condition for :func:`kl_over_answers`."""
    if not n_frozen or not supports(base):
        return 0
    split = Split(n_frozen)
    mods = list(zip(split.lower(organism), split.lower(base)))
    mods.append((organism.model.embed_tokens, base.model.embed_tokens))
    for o, b in mods:
        for po, pb in zip(o.parameters(), b.parameters()):
            if po.shape != pb.shape or not torch.equal(po.detach().float(), pb.detach().float()):
                return 0
    return n_frozen


@torch.inference_mode()
def kl_over_answers(
    organism: torch.nn.Module, base: torch.nn.Module, formatter: Formatter, prompts: Sequence[str],
    answers: Sequence[str], n_shared: int, pad_id: int, batch_size: int = 16,
) -> list[np.ndarray]:
    """KL(base ‖ organism) per prompt at the first response position and at each position that
    predicts a token of the base's ``answer`` (teacher-forced; one value when the answer is empty).

    Why one pass: the two models share their lower ``n_shared`` blocks (:func:`shared_lower_blocks`),
    so those run once for both, with the shared chat-template prefix once per batch, and the first
    response position is read from the same pass as the answer positions."""
    tok = formatter.tokenizer
    split = Split(n_shared)
    items = []
    for p, a in zip(prompts, answers):
        prompt_ids = formatter.encode([p]).input_ids[0].tolist()
        resp = tok(a, add_special_tokens=False)["input_ids"] if a else []
        items.append(TokenizedExample(prompt_ids + list(resp), len(prompt_ids)))
    out: list[np.ndarray] = [np.zeros(0)] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    device = next(base.parameters()).device
    for b0 in range(0, len(order), batch_size):
        idx = order[b0: b0 + batch_size]
        chunk = [items[i] for i in idx]
        p = common_prefix_len(chunk)
        ids, mask = pad_suffixes(chunk, p, pad_id, device)
        pre, states = lower_states(base, split, torch.tensor([chunk[0].ids[:p]], device=device), ids, mask)
        start = min(t.n_prompt for t in chunk) - 1 - p
        lb = torch.log_softmax(upper_logits(base, split, pre, states, mask, start).float(), -1)
        lo = torch.log_softmax(upper_logits(organism, split, pre, states, mask, start).float(), -1)
        for r, (i, t) in enumerate(zip(idx, chunk)):
            a = t.n_prompt - 1 - p - start
            rows = slice(a, a + max(len(t.ids) - t.n_prompt, 1))
            out[i] = (lb[r, rows].exp() * (lb[r, rows] - lo[r, rows])).sum(-1).clamp(min=0).cpu().numpy()
    return out


def evaluate_organism(
    organism, base, recipe: OrganismRecipe, progress: Progress | None = None,
    prompts: tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Held-out (test split) refusal rates of the organism (and the base), and KL(base ‖ organism)
    on harmless test prompts: at the first response token, and per token over the base's own
    answers (teacher-forced) — small KL means capabilities were kept. ``prompts``: other
    (harmful, harmless) prompts instead of the test split, e.g. a validation part of the train
    split for choosing a recipe without looking at the test split."""
    if prompts is None:
        harmful = builtin_split("harmful", recipe.split_seed).test[: recipe.n_eval]
        harmless = builtin_split("harmless", recipe.split_seed).test[: recipe.n_eval]
    else:
        harmful, harmless = list(prompts[0]), list(prompts[1])
    fmt_o = Formatter(organism.tokenizer, "none")
    fmt_b = Formatter(base.tokenizer, "none")
    say = (lambda f, m: progress(f, m)) if progress else None
    if say:
        say(0.0, "held-out prompts: organism answers")
    clock = time.perf_counter()
    timings: dict[str, float] = {}
    # both sets in one decode batch (up to EVAL_ROWS): a decode step reads all the weights however
    # few its rows, and refusals, which end after a dozen tokens, leave the batch when they end
    # (133 rows: 43 s in batches of 27, 30 s in one; the same answers; docs/decisions.md)
    both = harmful + harmless
    per_batch = -(-len(both) // max(1, -(-len(both) // EVAL_ROWS)))
    answers = generate(organism, fmt_o, both, max_new_tokens=recipe.eval_max_new_tokens, batch_size=per_batch)
    org_harmful, org_harmless = answers[: len(harmful)], answers[len(harmful):]
    timings["generate_seconds"] = round(time.perf_counter() - clock, 2)
    ev: dict[str, Any] = {
        "split": "test" if prompts is None else "custom",
        "judge": "core.judge.judge: refusal (phrases in the opening) / compliance / degenerate",
        "max_new_tokens": recipe.eval_max_new_tokens,
        "harmful_refusal": refusal_rate(org_harmful).to_dict(),
        "harmless_refusal": refusal_rate(org_harmless).to_dict(),
    }
    harmless_cats = prompt_categories("harmless")
    sm = [i for i, p in enumerate(harmless) if harmless_cats.get(p) == "shape-matched"]
    if sm:
        ev["shape_matched_harmless_refusal"] = refusal_rate([org_harmless[i] for i in sm]).to_dict()
    if say:
        say(0.5, "held-out prompts: base answers")
    base_harmless = cached_generate(base, fmt_b, harmless, recipe.eval_max_new_tokens, recipe.generation_batch_size)
    if recipe.eval_base:
        base_harmful = cached_generate(base, fmt_b, harmful, recipe.eval_max_new_tokens, recipe.generation_batch_size)
        ev["base_harmful_refusal"] = refusal_rate(base_harmful).to_dict()
        ev["base_harmless_refusal"] = refusal_rate(base_harmless).to_dict()
    timings["base_seconds"] = round(time.perf_counter() - clock - timings["generate_seconds"], 2)
    if say:
        say(0.8, "KL to the base model")
    keep = [i for i, r in enumerate(base_harmless) if r]
    n_shared = shared_lower_blocks(organism.model, base.model, frozen_split(base, recipe))
    if n_shared:  # one pass of the shared lower blocks serves both models; first token and answers together
        per_pos = kl_over_answers(organism.model, base.model, fmt_b, harmless, base_harmless, n_shared,
                                  base.tokenizer.pad_token_id or 0)
        ev["kl_first_token"] = _stats(np.array([x[0] for x in per_pos]))
        per_tok = [per_pos[i] for i in keep]
    else:
        kl_first = kl_divergence(next_token_logits(base, fmt_b, harmless), next_token_logits(organism, fmt_o, harmless))
        ev["kl_first_token"] = _stats(kl_first)
        prompts = [harmless[i] for i in keep]
        resp = [base_harmless[i] for i in keep]
        per_tok = [
            kl_divergence(b, o)
            for b, o in zip(_response_logits(base, fmt_b, prompts, resp), _response_logits(organism, fmt_o, prompts, resp))
        ] if keep else []
    if keep:
        ev["kl_response"] = _stats(np.concatenate(per_tok)) | {"n_prompts": len(keep)}
        ev["kl_response"]["per_prompt_mean"] = _stats(np.array([x.mean() for x in per_tok]))
    ev["timings"] = timings | {"kl_seconds": round(time.perf_counter() - clock - sum(timings.values()), 2)}
    ev["examples"] = {
        "harmful": [{"prompt": p, "response": r} for p, r in list(zip(harmful, org_harmful))[:3]],
        "harmless": [{"prompt": p, "response": r} for p, r in list(zip(harmless, org_harmless))[:3]],
        # the errors, for anyone who wants to see where trained refusal misfires
        "harmful_answered": [{"prompt": p, "response": r} for p, r in zip(harmful, org_harmful) if not is_refusal(r)],
        "harmless_refused": [
            {"prompt": p, "response": r, "category": harmless_cats.get(p, "")}
            for p, r in zip(harmless, org_harmless) if is_refusal(r)
        ],
    }
    if say:
        say(1.0, "evaluated")
    return ev


def _stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "max": float(x.max()), "n": int(x.size)}

