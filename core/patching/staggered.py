"""Patched runs that join the forward pass at their own block.

Why: a patch at layer ``L`` leaves every block below ``L`` exactly as in the base run, so a
patched run only needs blocks ``L..N-1``, started from the base run's residual stream. Running
each layer's rows as their own model call would multiply the calls (each call reads every
weight of its blocks), so one pass runs the blocks in order and the batch *grows*: rows are
sorted by the block they join at, and at block ``ℓ`` the rows that join there are appended
(their input is the base run's input to ``ℓ``). Arithmetic then follows the triangle of
(layer, block) pairs that a patch actually changes, about half of a full pass per row on
average, in as many calls as before.

This runs the decoder's blocks one by one, below the model's own forward, so it is limited to
decoders whose layout it knows (:func:`stack`): Llama-style (``llama``, ``mistral``, ``qwen2``,
``qwen3``) and Gemma 3 (per-layer sliding/full masks and rotary tables, soft-capped logits).
Other models run full passes. The engine checks every pair against the plain run with an
unpatched control row and falls back to full passes if they disagree.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Sequence

import torch
from torch import nn

KNOWN = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})


def stack(model: nn.Module, block_modules: Sequence[nn.Module]) -> nn.Module | None:
    """The decoder (``model.model``) whose blocks :func:`run` can drive one by one, or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if getattr(model.config, "model_type", None) not in KNOWN or not isinstance(layers, nn.ModuleList):
        return None
    if not all(hasattr(inner, a) for a in ("embed_tokens", "norm", "rotary_emb")) or not hasattr(model, "lm_head"):
        return None
    return inner if list(block_modules) == list(layers) else None


def _masks_and_rotary(inner: nn.Module, types: list[str], probe: torch.Tensor, cache: Any,
                      positions: torch.Tensor) -> tuple[dict, dict]:
    """Per layer type: the attention mask and the rotary tables, built once for a batch of one
    (both broadcast over the batch)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    masks, rotary = {}, {}
    for kind in set(types):
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        masks[kind] = make(config=inner.config, inputs_embeds=probe, attention_mask=None, past_key_values=cache,
                           position_ids=positions)
        if inner.config.model_type == "gemma3_text":
            rotary[kind] = inner.rotary_emb(probe, positions, kind)
        else:
            rotary[kind] = inner.rotary_emb(probe, position_ids=positions)
    return masks, rotary


def run(model: nn.Module, inner: nn.Module, joins: Sequence[int], block_input: Callable[[int], torch.Tensor],
        cache: Any, positions: torch.Tensor) -> torch.Tensor:
    """Last-position logits ``[n, vocab]`` of ``n`` rows, row ``r`` joining at block ``joins[r]``
    (ascending) with ``block_input(ℓ)`` (``[q, d]``, the base run's input to block ``ℓ`` at the
    computed positions) as its hidden state. ``cache`` holds the positions before them, its
    layer ``ℓ`` already repeated to the number of rows active at ``ℓ``; ``positions`` is ``[1, q]``.
    Hooks on the blocks and their modules fire as in a normal forward pass."""
    if list(joins) != sorted(joins):
        raise ValueError("rows must be sorted by the block they join at")
    layers = list(inner.layers)
    types = list(getattr(inner.config, "layer_types", None) or ["full_attention"] * len(layers))
    first = joins[0]
    entry = block_input(first).unsqueeze(0)  # [1, q, d]: the first rows' input, and the masks' probe
    masks, rotary = _masks_and_rotary(inner, types[first:], entry, cache, positions)
    h: torch.Tensor | None = None
    for ell in range(first, len(layers)):
        active = bisect.bisect_right(joins, ell)
        joined = 0 if h is None else h.shape[0]
        if active > joined:
            new = (entry if ell == first else block_input(ell).unsqueeze(0)).expand(active - joined, -1, -1)
            h = new if h is None else torch.cat([h, new])
        kind = types[ell]
        out = layers[ell](h, attention_mask=masks[kind], position_embeddings=rotary[kind], position_ids=positions,
                          past_key_values=cache, use_cache=True)
        h = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(inner.norm(h[:, -1:, :]))[:, -1, :]  # type: ignore[index]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def active_counts(joins: Sequence[int], n_layers: int) -> list[int]:
    """Rows active at each block (0 below the first join): the batch size of each cache layer."""
    return [bisect.bisect_right(joins, ell) for ell in range(n_layers)]
