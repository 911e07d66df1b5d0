"""Store linear weights transposed on the CPU, so small-batch matrix products take the fast path.

Why: ``nn.Linear`` keeps its weight as [out, in] and computes ``x @ W.T``. On the CPU that
reaches MKL's GEMM with a transposed right operand, and for 8–40 rows (a decode step of a
batch, a short prompt's prefill) that path is two to four times slower than the same product
with the right operand stored [in, out]. Storing each weight's data transposed (the
parameter keeps its shape [out, in]; only its strides change) makes ``W.T`` a plain
contiguous matrix, so every caller (``F.linear``, hooks, autograd) gets the fast path
without any change to a forward function. The values are the same; sums may round
differently in the last bit, as with any other GEMM kernel choice.

Only float32 on the CPU is changed: that is where it was measured (``docs/decisions.md``,
"Linear weights stored transposed"); GPUs and bf16 kernels keep the library's layout.
Tied weights (an unembedding that shares the input embedding) are changed once, in place,
and stay tied; ``save_pretrained`` writes contiguous copies, so saved files do not change.
"""

from __future__ import annotations

import torch
from torch import nn


def is_transposed(weight: torch.Tensor) -> bool:
    """True when a 2-D weight's data is stored [in, out] (column-major for its [out, in] shape)."""
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0]) and weight.shape[0] > 1


def fast_linear_layout(model: nn.Module) -> int:
    """Store every float32 CPU ``nn.Linear`` weight of ``model`` transposed, in place; returns
    how many weights changed (a weight already transposed, or shared and seen before, is
    skipped)."""
    changed = 0
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if id(weight) in seen or weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        seen.add(id(weight))
        if is_transposed(weight) or not weight.is_contiguous():
            continue
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()
        changed += 1
    return changed
