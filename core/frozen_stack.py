"""Fine-tune only a decoder's upper blocks, from lower-block states computed once.

Why: a full fine-tune runs forward and backward through every block at every step. With the
lower ``n_frozen`` blocks frozen, their output for a training example never changes, so it is
computed once, in the same no-grad pass that yields the teacher's distributions, and every
training step runs only the upper blocks (forward and backward) and the unembedding at the
answer positions. On the embedded model (30 blocks) freezing half of them halves the training
arithmetic and removes the lower half of the backward pass.

The token prefix that every example shares (the chat template's system prompt) is run once:
once in the no-grad pass, and once per training step through the upper blocks, its keys and
values expanded to the batch, so gradients from all rows flow into that one prefix pass.

Supported: Llama-style decoders (``model.model`` with ``embed_tokens``, ``layers``, ``norm``,
``rotary_emb``, one causal mask for all layers; the embedded model and its tiny test twin).
:func:`supports` says whether a model qualifies; other models train in full.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports(model: nn.Module) -> bool:
    """True when :func:`run_layers` can run this model's blocks one by one."""
    inner = getattr(model, "model", None)
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return kind in LLAMA_LIKE and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


def run_layers(
    model: nn.Module, layers: Sequence[nn.Module], prefix: torch.Tensor, suffix: torch.Tensor, suffix_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layers`` (consecutive blocks of ``model``) on a shared ``prefix`` ([1, P, d]; P may
    be 0) and right-padded ``suffix`` rows ([b, S, d], ``suffix_mask`` [b, S]). Returns the
    blocks' outputs for the prefix ([1, P, d]) and the suffixes ([b, S, d]).

    The prefix runs once with a key/value cache that is then expanded to the batch; the blocks'
    cache indices are renumbered from 0 for the call (and restored), so any slice of the stack
    works with a cache sized for that slice.

    Why this is not :func:`core.forward.forward_after_prefix` (the same trick on token ids): that
    one calls the whole model, and this runs a slice of blocks on hidden states, below the
    model's forward (no embedding, no final norm, its own causal mask and rotary embedding). It
    is also the computation that fixes the embedded organism's weights (its frozen and trained
    halves), so its operations and their order stay exactly as they are: the cached organism is
    keyed by its recipe, not by this code, and must stay bit-identical."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    config = copy.copy(inner.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[: len(layers)]
    attns = [layer.self_attn for layer in layers]
    saved = [a.layer_idx for a in attns]
    for i, a in enumerate(attns):
        a.layer_idx = i

    def forward(h: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        causal = create_causal_mask(
            config=config, inputs_embeds=h, attention_mask=mask, past_key_values=cache, position_ids=positions
        )
        rope = inner.rotary_emb(h, position_ids=positions)
        for layer in layers:
            h = layer(h, attention_mask=causal, position_embeddings=rope, position_ids=positions,
                      past_key_values=cache, use_cache=cache is not None)
            h = h[0] if isinstance(h, tuple) else h
        return h

    try:
        b, s = suffix_mask.shape
        p = prefix.shape[1]
        cache = None
        prefix_out = prefix
        if p:
            cache = DynamicCache(config=config)
            ones = torch.ones((1, p), dtype=suffix_mask.dtype, device=suffix_mask.device)
            prefix_out = forward(prefix, ones, torch.arange(p, device=prefix.device)[None], cache)
            cache.batch_repeat_interleave(b)
        positions = (p + torch.arange(s, device=suffix.device))[None].expand(b, -1)
        mask = torch.cat([torch.ones((b, p), dtype=suffix_mask.dtype, device=suffix_mask.device), suffix_mask], 1)
        return prefix_out, forward(suffix, mask, positions, cache)
    finally:
        for a, i in zip(attns, saved):
            a.layer_idx = i


@dataclass
class Split:
    """Where a model's stack is cut: blocks ``[0, n_frozen)`` frozen, the rest trained."""

    n_frozen: int

    def lower(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)[: self.n_frozen]

    def upper(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)[self.n_frozen:]

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The upper blocks' and the final norm's parameters (embeddings stay frozen)."""
        return [p for m in self.upper(model) + [model.model.norm] for p in m.parameters()]


@torch.no_grad()
def lower_states(
    model: nn.Module, split: Split, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of block ``split.n_frozen`` (the residual stream there) for the prefix and
    the suffix rows: embeddings through the frozen blocks."""
    embed = model.model.embed_tokens
    return run_layers(model, split.lower(model), embed(prefix_ids), embed(suffix_ids), suffix_mask)


def upper_hidden(
    model: nn.Module, split: Split, prefix: torch.Tensor, suffix: torch.Tensor, suffix_mask: torch.Tensor
) -> torch.Tensor:
    """The final-normed residual stream at the suffix positions ([b, S, d]) from the frozen
    blocks' states: the upper blocks and the final norm, no unembedding. Why separate: the
    unembedding (576 x 49152 on the embedded model) costs more per position than six blocks,
    so callers apply it only at the positions whose logits they need."""
    _, out = run_layers(model, split.upper(model), prefix, suffix, suffix_mask)
    return model.model.norm(out)


def upper_logits(
    model: nn.Module, split: Split, prefix: torch.Tensor, suffix: torch.Tensor, suffix_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Logits at suffix positions ``start`` .. end from the frozen blocks' states (the upper
    blocks, the final norm and the unembedding, the latter only where logits are needed)."""
    return model.lm_head(upper_hidden(model, split, prefix, suffix, suffix_mask)[:, start:])
