"""Tokenised examples, the teacher's targets, the loss and the training loop.

Why one module: these share the example layout (:class:`TokenizedExample`: prompt tokens, then
response tokens, the loss on the latter only) and together fix the organism's weights; the data
order and the RNG use here must not change, or the cached organism would no longer match its key.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from core.dtypes import cpu_has_fast_bf16
from core.errors import ExplorerError
from core.formatting import Formatter
from core.forward import forward_after_prefix
from core.frozen_stack import Split, lower_states, supports, upper_hidden
from core.organism.answers import Example
from core.organism.recipe import OrganismRecipe
from core.progress import Progress
from core.threads import AdaptiveThreads


@dataclass
class TokenizedExample:
    ids: list[int]
    n_prompt: int  # the loss covers ids[n_prompt:]
    weight: float = 1.0  # this example's weight in the batch mean
    soft: bool = False  # learn the teacher's whole distribution at each response position, not the tokens
    # the teacher's top-k next-token log-probabilities at each response position ([n_response, k]),
    # filled by :func:`add_teacher_targets` for soft examples
    teacher_ids: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None
    # with frozen lower blocks: the residual stream entering the first trained block at this
    # example's positions after the shared prefix ([len(ids) - prefix_len, d]), filled by
    # :func:`add_frozen_states`
    lower: torch.Tensor | None = None


def tokenize_examples(
    examples: Sequence[Example], formatter: Formatter, weights: dict[str, float] | None = None,
    soft: Sequence[str] = (),
) -> list[TokenizedExample]:
    """Prompt tokens exactly as the app formats them (``Formatter.encode``), then the response
    tokens and, for complete answers, the end-of-turn token, so the model learns to stop.
    Examples whose kind is in ``soft`` are marked for distillation (see :func:`response_loss`)."""
    tok = formatter.tokenizer
    eos = tok.eos_token_id
    out = []
    for ex in examples:
        prompt_ids = formatter.encode([ex.prompt]).input_ids[0].tolist()
        resp = tok(ex.response, add_special_tokens=False)["input_ids"]
        if ex.complete and eos is not None:
            resp = resp + [int(eos)]
        if not resp:
            continue
        out.append(TokenizedExample(
            prompt_ids + list(resp), len(prompt_ids), float((weights or {}).get(ex.kind, 1.0)), ex.kind in soft
        ))
    return out


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded batches for one epoch: shuffle, sort by length within windows of 8 batches (less
    padding), then shuffle the batch order. Same (seed, epoch) -> same batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    window = batch_size * 8
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: (lengths[i], i))
        batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def collate(items: Sequence[TokenizedExample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    width = max(len(t.ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    target = torch.zeros((len(items), width), dtype=torch.bool)  # position t is predicted from t-1
    for i, t in enumerate(items):
        ids[i, : len(t.ids)] = torch.tensor(t.ids)
        mask[i, : len(t.ids)] = 1
        target[i, t.n_prompt: len(t.ids)] = True
    first = min(t.n_prompt for t in items)
    return ids.to(device), mask.to(device), target.to(device), first


@torch.inference_mode()
def add_teacher_targets(
    teacher, items: Sequence[TokenizedExample], pad_id: int, top_k: int = 64, batch_size: int = 16,
    progress: Progress | None = None,
) -> None:
    """Store the ``teacher``'s top-``k`` next-token log-probabilities at every response position
    of the ``soft`` items (float32, teacher-forced on the item's own tokens), once, so training
    epochs do not rerun the teacher."""
    soft = [t for t in items if t.soft]
    device = next(teacher.parameters()).device
    for start in range(0, len(soft), batch_size):
        chunk = soft[start: start + batch_size]
        ids, mask, _, first = collate(chunk, pad_id, device)
        logp = torch.log_softmax(shared_prefix_logits(teacher, ids, mask, first)[:, :-1].float(), dim=-1)  # positions first .. end
        top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        for i, t in enumerate(chunk):
            rows = slice(t.n_prompt - first, len(t.ids) - first)
            t.teacher_logp, t.teacher_ids = top.values[i, rows].cpu(), top.indices[i, rows].cpu()
        if progress:
            progress(min(1.0, (start + len(chunk)) / len(soft)), f"teacher distributions {start + len(chunk)}/{len(soft)}")


def topk_kl(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the rest of the
    vocabulary: the exact KL of the two distributions coarsened that way, so a lower bound of
    the full KL that is tight when the top k hold nearly all the teacher's mass (they do at
    k=64 for a chat model's greedy answers). Shapes: [..., k], [..., k], [..., vocab] -> [...]."""
    s_k = student_logp.gather(-1, teacher_ids)
    p_k = teacher_logp.exp()
    rest_t = (1 - p_k.sum(-1)).clamp(min=1e-12)
    rest_s = (1 - s_k.exp().sum(-1)).clamp(min=1e-12)
    return (p_k * (teacher_logp - s_k)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())


def frozen_split(base, recipe: OrganismRecipe) -> int:
    """How many lower blocks stay frozen for this model: the recipe's count where the stack can
    be split (:func:`core.frozen_stack.supports`), else 0 (full fine-tune)."""
    if not supports(base.model):
        return 0
    return int(recipe.frozen_fraction * len(base.block_names))


@dataclass
class FrozenLower:
    """The frozen lower blocks' output for the prefix every example shares ([1, P, d]); each
    example carries its own rest (:attr:`TokenizedExample.lower`)."""

    split: Split
    prefix_len: int
    prefix: torch.Tensor


def common_prefix_len(items: Sequence[TokenizedExample]) -> int:
    """Tokens that every example starts with, short of the first response position."""
    n = min(t.n_prompt for t in items) - 1
    first = items[0].ids
    for i in range(n):
        if any(t.ids[i] != first[i] for t in items):
            return i
    return max(n, 0)


@torch.no_grad()
def pad_suffixes(chunk: Sequence[TokenizedExample], p: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples' tokens after their shared ``p``-token prefix, right-padded: ``ids, mask``."""
    width = max(len(t.ids) for t in chunk) - p
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, t in enumerate(chunk):
        ids[i, : len(t.ids) - p] = torch.tensor(t.ids[p:])
        mask[i, : len(t.ids) - p] = 1
    return ids.to(device), mask.to(device)


def add_frozen_states(
    teacher, items: Sequence[TokenizedExample], n_frozen: int, pad_id: int, top_k: int = 64, batch_size: int = 16,
    progress: Progress | None = None, threads: AdaptiveThreads | None = None,
) -> FrozenLower:
    """One no-grad pass of ``teacher`` (the base model) over every example: the frozen blocks'
    output (kept on each example: training never recomputes it) and, for ``soft`` examples,
    the teacher's top-``k`` next-token log-probabilities at the response positions (the upper
    blocks of the same pass). Batches go shortest first, so little is padded."""
    split = Split(n_frozen)
    device = next(teacher.parameters()).device
    p = common_prefix_len(items)
    prefix_ids = torch.tensor([items[0].ids[:p]], device=device)
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    prefix_state = None
    threads = threads or AdaptiveThreads()
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start: start + batch_size]]
        ids, mask = pad_suffixes(chunk, p, pad_id, device)
        with threads.step(units=int(mask.sum())):
            pre, states = lower_states(teacher, split, prefix_ids, ids, mask)
            soft = [i for i, t in enumerate(chunk) if t.soft]
            if soft:  # the unembedding only at the positions that predict a response token
                rows = torch.tensor(soft, device=device)
                hidden = upper_hidden(teacher, split, pre, states[rows], mask[rows])
                at = [hidden[j, chunk[i].n_prompt - 1 - p: len(chunk[i].ids) - 1 - p] for j, i in enumerate(soft)]
                logp = torch.log_softmax(teacher.lm_head(torch.cat(at)).float(), -1)
                top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        prefix_state = pre.float().cpu() if prefix_state is None else prefix_state
        for i, t in enumerate(chunk):
            t.lower = states[i, : len(t.ids) - p].float().cpu().clone()
        offset = 0  # the soft examples' positions, concatenated in order
        for i in soft:
            t = chunk[i]
            r = slice(offset, offset + len(t.ids) - t.n_prompt)
            offset = r.stop
            t.teacher_logp, t.teacher_ids = top.values[r].cpu().clone(), top.indices[r].cpu().clone()
        if progress:
            done = min(len(order), start + batch_size)
            progress(done / len(order), f"frozen blocks and teacher distributions {done}/{len(order)}")
    return FrozenLower(split, p, prefix_state if prefix_state is not None else torch.zeros(1, 0, 0))


def frozen_logits(
    model, items: Sequence[TokenizedExample], frozen: FrozenLower, rows: torch.Tensor, cols: torch.Tensor, device
) -> torch.Tensor:
    """Logits ([N, vocab]) at positions ``(rows, cols)`` of right-padded rows (token
    coordinates), from each example's stored lower-block states: only the upper blocks run,
    with gradients, and the unembedding only at those positions."""
    p = frozen.prefix_len
    width = max(len(t.ids) for t in items) - p
    d = items[0].lower.shape[-1]
    hidden = torch.zeros((len(items), width, d))
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        hidden[i, : len(t.ids) - p] = t.lower
        mask[i, : len(t.ids) - p] = 1
    dtype = next(model.parameters()).dtype
    out = upper_hidden(model, frozen.split, frozen.prefix.to(device, dtype), hidden.to(device, dtype), mask.to(device))
    return model.lm_head(out[rows, cols - p])


MIN_TRAIN_PREFIX = 8  # shorter shared prefixes are not worth a separate pass


def shared_prefix_logits(model, ids: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
    """Logits for positions ``first - 1`` .. end of right-padded rows, running the token prefix
    that all rows share (the chat template's system prompt: ~24 of ~50 tokens) once, not once
    per row (:func:`core.forward.forward_after_prefix`). Exact, gradients included: the prefix's
    keys and values are expanded to the batch, so autograd sums the rows' gradients into the one
    prefix pass."""
    keep = ids.shape[1] - first + 1
    same = (ids == ids[:1]).all(0) & (mask == 1).all(0)
    p = int(same.long().cumprod(0).sum())
    p = min(p, first - 1)  # logits are needed from position first - 1 on
    if p < MIN_TRAIN_PREFIX or ids.shape[0] == 1:
        return model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
    return forward_after_prefix(model, ids[:1, :p], ids[:, p:], mask[:, p:], logits_to_keep=keep, use_cache=True).logits


def response_loss(
    model, items: Sequence[TokenizedExample], pad_id: int, device, autocast: bool, first_token_weight: float = 1.0,
    frozen: FrozenLower | None = None,
) -> torch.Tensor:
    """Mean over examples of the weighted mean per-token loss on that example's response tokens
    (each example weighs its ``weight``, whatever its length, so short refusals count as much as long answers; the first
    response token, where refuse-or-answer is decided, weighs ``first_token_weight``). With
    ``frozen`` the unembedding runs only at the positions that predict a response token (it
    costs more per position than six blocks: 37 % fewer positions with 8-token answers); without,
    logits are computed from the first response position on.

    The per-token loss is the cross-entropy of the target token, or, for ``soft`` examples with
    teacher targets (:func:`add_teacher_targets`), KL(teacher ‖ model) of the next-token
    distribution (:func:`topk_kl`): the base model's answer carries more than its greedy tokens
    (how sure it was, what else it would say), and matching all of it keeps the tuned model
    close to the base where it should not change.

    ``frozen``: the examples carry the frozen lower blocks' states (:func:`add_frozen_states`)
    and only the upper blocks run."""
    ids, mask, target, first = collate(items, pad_id, device)
    rows, cols = target.nonzero(as_tuple=True)  # every response token, row by row; predicted from cols - 1
    ctx = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        if frozen:
            logits = frozen_logits(model, items, frozen, rows, cols - 1, device)
        else:
            logits = shared_prefix_logits(model, ids, mask, first)[rows, cols - first]
    logits = logits.float()
    n_prompt = torch.tensor([t.n_prompt for t in items], device=cols.device)
    tok_w = torch.where(cols == n_prompt[rows], first_token_weight, 1.0)
    per_tok = torch.nn.functional.cross_entropy(logits, ids[rows, cols], reduction="none")
    soft = torch.tensor([t.teacher_logp is not None for t in items], device=rows.device)[rows]
    if bool(soft.any()):  # teacher rows are stored per example in the same order as the positions
        with_teacher = [t for t in items if t.teacher_logp is not None]
        t_logp = torch.cat([t.teacher_logp for t in with_teacher]).to(logits.device)
        t_ids = torch.cat([t.teacher_ids for t in with_teacher]).to(logits.device)
        per_tok = per_tok.masked_scatter(soft, topk_kl(t_logp, t_ids, torch.log_softmax(logits[soft], dim=-1)))
    n = len(items)
    num = torch.zeros(n, device=per_tok.device).index_add(0, rows, per_tok * tok_w)
    den = torch.zeros(n, device=per_tok.device).index_add(0, rows, tok_w)
    per_example = num / den.clamp(min=1e-9)
    w = torch.tensor([t.weight for t in items], device=per_example.device)
    return (per_example * w).sum() / w.sum()


def _lr_at(step: int, total: int, recipe: OrganismRecipe) -> float:
    warm = max(1, int(round(total * recipe.warmup_fraction)))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    return recipe.lr * max(0.0, (total - step) / max(1, total - warm))


def use_autocast(recipe: OrganismRecipe, device) -> bool:
    """The recipe's bf16 autocast, resolved: None means only where bf16 matmuls are native."""
    if recipe.autocast_bf16 is not None:
        return bool(recipe.autocast_bf16)
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_has_fast_bf16())


def train(
    model, tokenized: Sequence[TokenizedExample], recipe: OrganismRecipe, pad_id: int,
    progress: Progress | None = None, frozen: FrozenLower | None = None, threads: AdaptiveThreads | None = None,
) -> list[float]:
    """Fine-tune in place (AdamW, warmup then linear decay, gradient clipping); returns the
    mean loss per epoch. Seeded; the data order depends only on the recipe's seed. With
    ``frozen`` only the upper blocks and the final norm train, from the stored lower states."""
    torch.manual_seed(recipe.seed)
    device = next(model.parameters()).device
    autocast = use_autocast(recipe, device)
    threads = threads or AdaptiveThreads()
    if frozen is not None:
        params = frozen.split.trainable(model)
    else:
        emb = model.get_input_embeddings().weight
        out_emb = model.get_output_embeddings()
        skip = set() if recipe.train_embeddings else {id(emb)} | ({id(out_emb.weight)} if out_emb is not None else set())
        params = [p for p in model.parameters() if id(p) not in skip]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    try:  # the fused kernel: one pass over each tensor instead of several (measured 0.03 s vs 0.09 s a step)
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    lengths = [len(t.ids) for t in tokenized]
    per_epoch = [batch_order(lengths, recipe.batch_size, recipe.seed, e) for e in range(recipe.epochs)]
    total = sum(len(b) for b in per_epoch)
    step = 0
    losses: list[float] = []
    try:
        for epoch, batches in enumerate(per_epoch):
            seen = []
            for batch in batches:
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, recipe)
                items = [tokenized[i] for i in batch]
                with threads.step(units=sum(len(t.ids) for t in items)):
                    loss = response_loss(model, items, pad_id, device, autocast, recipe.first_token_weight, frozen)
                    if not torch.isfinite(loss):
                        raise ExplorerError(f"training loss became {loss.item()} at step {step}; lower the learning rate.")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                    opt.step()
                seen.append(float(loss.detach()))
                step += 1
                if progress:
                    progress(step / total, f"epoch {epoch + 1}/{recipe.epochs}, step {step}/{total}, loss {seen[-1]:.3f}")
            losses.append(float(np.mean(seen)))
    finally:
        model.requires_grad_(False)  # back to an analysis-ready, frozen model in eval mode
        model.eval()
    return losses

