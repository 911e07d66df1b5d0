"""The patching engine: clean runs that retain activations, and patched runs batched as rows
of one forward pass, each starting from the base run's key/value cache where it can.

Below its patched layer a patched run equals the base run, so on decoders whose blocks
:mod:`core.patching.staggered` can drive, each row also joins the pass at its own block, from the
base run's residual stream there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from core.formatting import Formatter
from core.hooks import TraceDict
from core.metrics import refusal_score
from core.models import LoadedModel
import core.patching.staggered as staggered
from core.patching.sites import PatchingError, Progress, _module_name

CACHE_BUDGET_MB = 256.0  # key/value cache copied per forward pass (rows × prompt length)


@dataclass
class _Run:
    """One clean run: token ids, score, retained activations ([T, d] per module name)."""

    ids: torch.Tensor  # [1, T]
    score: float
    acts: dict[str, torch.Tensor]
    cache: Any = None
    blocks: list[torch.Tensor] | None = None  # block outputs [T, d] (base run, when the staggered runner applies)



@dataclass
class _Patch:
    """A resolved patch: one batch row. ``cell`` indexes the effects array it fills."""

    site: str
    layer: int
    cell: tuple
    base_pos: list[int]
    src_pos: list[int]
    heads: tuple[int, ...] | None = None



def _stack(lm: LoadedModel) -> nn.Module | None:
    """The decoder whose blocks the staggered runner can drive (None: full passes)."""
    return staggered.stack(lm.model, [lm.module(n) for n in lm.block_names])


@torch.inference_mode()
def _clean_run(lm: LoadedModel, ids: torch.Tensor, ref_ids: Sequence[int], retain_out: list[str],
               retain_in: list[str], keep_cache: bool) -> _Run:
    keep_blocks = keep_cache and _stack(lm) is not None
    names = list(dict.fromkeys(retain_out + (lm.block_names if keep_blocks else [])))
    with TraceDict(lm.model, names, retain_output=True) as out_tr, \
            TraceDict(lm.model, retain_in, retain_output=False, retain_input=True) as in_tr:
        res = lm.model(input_ids=ids, use_cache=keep_cache, logits_to_keep=1)
    acts = {n: out_tr[n].output[0].clone() for n in retain_out}
    acts.update({n: in_tr[n].input[0].clone() for n in retain_in})
    blocks = [out_tr[n].output[0].clone() for n in lm.block_names] if keep_blocks else None
    score = float(refusal_score(res.logits[:, -1, :], ref_ids)[0])
    return _Run(ids, score, acts, res.past_key_values if keep_cache else None, blocks)


def _clean_runs(lm: LoadedModel, formatter: Formatter, refusal_prompt: str, compliant_prompt: str,
                sites: Sequence[str], ref_ids: Sequence[int], direction: str, keep_cache: bool) -> tuple[_Run, _Run]:
    """(refusal run, compliant run): the source run retains every site, the base run its cache."""
    retain_out = [_module_name(lm, s, i) for s in sites if s != "head" for i in range(lm.n_layers)]
    retain_in = [lm.attn_out_names[i] for i in range(lm.n_layers)] if "head" in sites else []
    runs = []
    for prompt, source_when in ((refusal_prompt, "refusal->compliant"), (compliant_prompt, "compliant->refusal")):
        ids = formatter.encode([prompt], device=lm.device, context=lm.max_positions).input_ids
        is_source = source_when == direction
        runs.append(_clean_run(lm, ids, ref_ids, retain_out if is_source else [],
                               retain_in if is_source else [], keep_cache=keep_cache and not is_source))
    return runs[0], runs[1]


def _make_edits(lm: LoadedModel, rows: list[_Patch], start: int, source: _Run, offset: int = 0) -> tuple[dict, dict]:
    """Edit functions that write each row's source activation into that row's site only (row
    ``r`` of ``rows`` is batch row ``offset + r``)."""
    per_module: dict[tuple[str, bool], list] = {}
    hd = lm.head_dim
    for r, p in enumerate(rows, start=offset):
        name = _module_name(lm, p.site, p.layer)
        src = source.acts[name][p.src_pos]
        pos = torch.tensor([q - start for q in p.base_pos], dtype=torch.long, device=src.device)
        if p.site == "head" and p.heads is not None:
            cols = torch.cat([torch.arange(h * hd, (h + 1) * hd, device=src.device) for h in p.heads])
            index: tuple = (r, pos.unsqueeze(1), cols.unsqueeze(0))
            src = src[:, cols]
        else:
            index = (r, pos)
        per_module.setdefault((name, p.site == "head"), []).append((index, src))

    def make(patches):
        def edit(hidden: torch.Tensor, _name: str) -> torch.Tensor:
            hidden = hidden.clone()  # never write into a tensor the model may still read
            for index, src in patches:
                hidden[index] = src.to(hidden.dtype)
            return hidden
        return edit

    out_edits = {n: make(v) for (n, is_in), v in per_module.items() if not is_in}
    in_edits = {n: make(v) for (n, is_in), v in per_module.items() if is_in}
    return out_edits, in_edits


def _joins(rows: list[_Patch], control: bool) -> list[int]:
    """The block each batch row joins at, in :func:`_patched_scores`' staggered order."""
    layers = sorted(p.layer for p in rows)
    return ([layers[0] if layers else 0] if control else []) + layers


@torch.inference_mode()
def _patched_scores(lm: LoadedModel, base: _Run, source: _Run, rows: list[_Patch], start: int,
                    ref_ids: Sequence[int], control: bool = False, stagger: bool = False) -> np.ndarray:
    """Refusal scores of the base run with each row's patch, in one forward pass.

    ``start > 0`` starts from the base run's key/value cache cropped to ``start`` (every patch in
    ``rows`` leaves the positions before ``start`` untouched). ``stagger`` (needs the base run's
    block outputs) lets each row join at its patched block (:mod:`core.patching.staggered`).
    ``control`` adds an unpatched row (joining at the first block any row joins at).
    """
    n = len(rows) + (1 if control else 0)
    T = base.ids.shape[1]
    inner = _stack(lm) if stagger and base.blocks is not None else None
    cache = None
    if start > 0:
        cache = copy.deepcopy(base.cache)
        cache.crop(start - T)  # negative = tokens to remove (the one spelling old and new transformers share)
    pos_ids = torch.arange(start, T, device=base.ids.device).unsqueeze(0)
    if inner is not None:
        order = sorted(range(len(rows)), key=lambda i: rows[i].layer)
        joins = _joins(rows, control)
        if cache is not None:
            for layer, k in zip(cache.layers, staggered.active_counts(joins, lm.n_layers)):
                if k > 1:  # blocks below the first join do not run: their cache is never read
                    layer.batch_repeat_interleave(k)
        blocks = base.blocks

        def block_input(ell: int) -> torch.Tensor:
            return blocks[ell - 1][start:] if ell > 0 else inner.embed_tokens(base.ids[0, start:])  # type: ignore[index]

        out_edits, in_edits = _make_edits(lm, [rows[i] for i in order], start, source, offset=int(control))
        with TraceDict(lm.model, list(out_edits), retain_output=False, edit_output=out_edits), \
                TraceDict(lm.model, list(in_edits), retain_output=False, edit_input=in_edits):
            logits = staggered.run(lm.model, inner, joins, block_input, cache, pos_ids)
        scores = refusal_score(logits, ref_ids)
        out = np.empty(n)
        out[np.array(order, dtype=int)] = scores[int(control):]
        if control:
            out[-1] = scores[0]
        return out
    kwargs: dict[str, Any] = {}
    if cache is not None:
        if n > 1:
            cache.batch_repeat_interleave(n)
        kwargs["past_key_values"] = cache
    out_edits, in_edits = _make_edits(lm, rows, start, source)
    with TraceDict(lm.model, list(out_edits), retain_output=False, edit_output=out_edits), \
            TraceDict(lm.model, list(in_edits), retain_output=False, edit_input=in_edits):
        logits = lm.model(input_ids=base.ids[:, start:].expand(n, -1), position_ids=pos_ids.expand(n, -1),
                          use_cache=start > 0, logits_to_keep=1, **kwargs).logits[:, -1, :]
    return refusal_score(logits, ref_ids)


@dataclass
class _Execution:
    scores: np.ndarray
    n_forward: int
    used_cache: bool
    notes: list[str]
    n_tokens: int = 0  # token positions computed by the patched forward passes (rows × width)
    n_block_tokens: int = 0  # token positions × blocks computed (the staggered runner lowers it)


def _kv_bytes_per_token(cache: Any, T: int) -> float:
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / max(T, 1)


def _execute(lm: LoadedModel, base: _Run, source: _Run, rows: list[_Patch], ref_ids: Sequence[int], *,
             prefix_cache: bool, token_budget: int, max_rows: int, progress: Progress | None,
             cache_budget_mb: float = CACHE_BUDGET_MB) -> _Execution:
    """Run every patch as a batch row. Rows are grouped by the first position they change; each
    group starts from the cached prefix before it and is split into chunks of at most
    ``token_budget`` tokens (rows × computed positions), ``max_rows`` rows and
    ``cache_budget_mb`` of copied key/value cache. With ``prefix_cache`` on a decoder the
    staggered runner knows, each row also joins at its patched block."""
    if token_budget < 1 or max_rows < 1:
        raise PatchingError("token_budget and max_rows must be at least 1")
    use_cache = prefix_cache and base.cache is not None
    T = base.ids.shape[1]
    kv_token = _kv_bytes_per_token(base.cache, T) if use_cache else 0.0
    stagger = use_cache and base.blocks is not None
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(rows):
        groups.setdefault(min(p.base_pos) if use_cache else 0, []).append(i)
    scores = np.full(len(rows), np.nan)
    notes: list[str] = []
    L = lm.n_layers
    n_forward, n_tokens, n_block, done, checked = 0, 0, 0, 0, not use_cache
    for start in sorted(groups):
        idx = groups[start]
        size = max(1, min(max_rows, token_budget // max(1, T - start)))
        if use_cache and start > 0 and kv_token > 0:
            size = max(1, min(size, int(cache_budget_mb * 2**20 // (kv_token * T))))
        for c in range(0, len(idx), size):
            chunk_idx = idx[c: c + size]
            chunk = [rows[i] for i in chunk_idx]
            s, st = (start, stagger) if use_cache else (0, False)
            control = not checked and (s > 0 or st)
            out = _patched_scores(lm, base, source, chunk, s, ref_ids, control, stagger=st)
            n_forward += 1
            n_tokens += (len(chunk) + control) * (T - s)
            joins = _joins(chunk, control) if st else [0] * (len(chunk) + control)
            n_block += (T - s) * sum(L - j for j in joins)
            if control:
                checked = True
                ctrl = float(out[-1])
                out = out[:-1]
                if abs(ctrl - base.score) > 1e-3 + 1e-3 * abs(base.score):
                    notes.append(
                        f"the key/value-cache and staggered-block shortcut disagreed with the plain run (score {ctrl:.4f} vs "
                        f"{base.score:.4f}); this pair was patched with full forward passes instead"
                    )
                    use_cache = False
                    out = _patched_scores(lm, base, source, chunk, 0, ref_ids)
                    n_forward += 1
                    n_tokens += len(chunk) * T
                    n_block += len(chunk) * T * L
            scores[chunk_idx] = out
            done += len(chunk)
            if progress:
                progress(done / len(rows), f"patched {done}/{len(rows)} runs")
    return _Execution(scores, n_forward, use_cache, notes, n_tokens, n_block)
