"""Re-running only the upper blocks from a cached clean run (for the selection grid's induce score).

Why: adding a direction at the input of block ``l`` leaves the residual stream below ``l``
unchanged. The grid adds each candidate direction at its own layer; rerunning the whole model
per candidate repeats the identical lower blocks every time. Here the clean hidden states at the
input of each needed block are computed once (one forward pass per prompt batch), and each
candidate runs only blocks ``l`` … end from them, with the shared prompt prefix (preamble and
system prompt) run once per batch, and only the last position's logits computed.

The result equals a hook that adds the vector to block ``l − 1``'s output (at every position,
the prefix included) during a full forward pass, up to floating-point rounding (a test checks
this). Supported: the Llama-style stacks :func:`core.frozen_stack.supports` accepts; other
models keep the hook path (:func:`supported` says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from core import forward
from core.frozen_stack import run_layers, supports

ROWS = 64  # prompts per batch: the prefix runs once per batch, so larger batches share it more


def supported(lm: Any) -> bool:
    """True when the blocks can be run one slice at a time (Llama-style, blocks at ``model.layers``)."""
    if not supports(lm.model):
        return False
    return list(lm.block_names) == [f"model.layers.{i}" for i in range(len(lm.model.model.layers))]


@dataclass
class _Batch:
    mask: torch.Tensor  # [b, S] suffix attention mask (right-padded)
    last: torch.Tensor  # [b] index of each row's last real suffix token
    prefix: dict[int, torch.Tensor]  # block index -> its input for the shared prefix [1, P, d]
    suffix: dict[int, torch.Tensor]  # block index -> its input for the suffixes [b, S, d]


class CleanRun:
    """The clean residual stream at the input of chosen blocks for a list of prompts, and the
    clean first-response-token logits."""

    def __init__(self, lm: Any, formatter: Any, prompts: Sequence[str], layers: Iterable[int], *, rows: int = ROWS):
        if not supported(lm):
            raise ValueError(f"{lm.name}: the cached clean run needs a Llama-style model")
        self.lm = lm
        self.layers = sorted({int(l) for l in layers})
        if any(not 0 <= l < lm.n_layers for l in self.layers):
            raise ValueError(f"block indices must be in 0…{lm.n_layers - 1}, got {self.layers}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        self.batches: list[_Batch] = []
        logits = []
        for start in range(0, len(prompts), max(1, rows)):
            batch, out = self._clean(formatter, prompts[start:start + rows])
            self.batches.append(batch)
            logits.append(out)
        self.logits = torch.cat(logits)  # [n, vocab] float32

    @torch.no_grad()
    def _clean(self, formatter: Any, prompts: list[str]) -> tuple[_Batch, torch.Tensor]:
        lm = self.lm
        inner = lm.model.model
        b = forward.prepare(formatter, prompts, padding_side="right", device=lm.device, context=lm.max_positions)
        mask = b.suffix.attention_mask
        last = torch.tensor(b.suffix.lengths, device=mask.device) - 1
        h_p, h_s = inner.embed_tokens(b.prefix_ids), inner.embed_tokens(b.suffix.input_ids)
        keep_p, keep_s = {}, {}
        with lm.lock:
            for i, block in enumerate(inner.layers):
                if i in self.layers:
                    keep_p[i], keep_s[i] = h_p, h_s
                h_p, h_s = run_layers(lm.model, [block], h_p, h_s, mask)
        return _Batch(mask, last, keep_p, keep_s), self._logits(h_s, last)

    def _logits(self, final: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding at each row's last token only."""
        model = self.lm.model
        h = final[torch.arange(final.shape[0], device=final.device), last]
        return model.lm_head(model.model.norm(h)).float().cpu()

    @torch.no_grad()
    def logits_with_added(self, layer: int, vector: np.ndarray | torch.Tensor) -> torch.Tensor:
        """First-response-token logits ``[n, vocab]`` with ``vector`` added to the input of block
        ``layer`` (every position), running blocks ``layer`` … end only."""
        if layer not in self.layers:
            raise ValueError(f"block {layer} was not cached (cached: {self.layers})")
        lm = self.lm
        blocks = list(lm.model.model.layers)[layer:]
        out = []
        with lm.lock:
            for b in self.batches:
                v = torch.as_tensor(np.asarray(vector, dtype=np.float32)).to(device=b.suffix[layer].device,
                                                                             dtype=b.suffix[layer].dtype)
                _, h = run_layers(lm.model, blocks, b.prefix[layer] + v, b.suffix[layer] + v, b.mask)
                out.append(self._logits(h, b.last))
        return torch.cat(out)
