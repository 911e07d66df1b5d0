"""Linear layers on a few dozen rows, computed in the layout the CPU's BLAS does fast.

Why: ``F.linear`` asks BLAS for ``x @ Wᵀ``. With torch's MKL in float32 that product is two to
three times slower than it need be when ``x`` has about 12 to 56 rows, and equal or better
outside that range. Those row counts are exactly what batched generation feeds every layer:
each decode step of a batch of 16–64 prompts (fewer as answers end), and short prompts'
prefills. Computing ``(W @ xᵀ)ᵀ`` instead hands BLAS the weight as it is stored: the same
product and no extra memory; the result is then copied row-major (a few hundred kilobytes),
because attention kernels and ``view`` calls downstream need the layout ``F.linear`` gives.
Measured in ``docs/decisions.md`` ("Linear layers on a few rows"), re-measured by
``python -m bench.run --only narrow_linear``.

Scope: float32 weights on the CPU, outside autograd and autocast, when switched on (the
default). Training keeps ``F.linear``; :func:`exact_linear` switches the layout off where
numbers must stay bit-identical to those computed before this module existed (the cached
organism's weights are keyed by its recipe, not by this code).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

ROWS = range(12, 57)  # row counts that take the transposed product (measured; see the module docstring)

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("narrow_linear", default=True)


class NarrowLinear(nn.Linear):
    """An ``nn.Linear`` whose forward takes the transposed product on :data:`ROWS` rows; same
    parameters, same state dict, same hooks (only the class of the instance changes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows not in ROWS or not _takes_narrow_path(self.weight, x):
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, x.shape[-1]).t()).t().contiguous()  # row-major, as F.linear's
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], y.shape[-1])


def _takes_narrow_path(weight: torch.Tensor, x: torch.Tensor) -> bool:
    return (
        _enabled.get()
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    )


def install(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`NarrowLinear`, in place; returns how
    many. Subclasses of ``nn.Linear`` (quantised or adapter layers) keep their own forward."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = NarrowLinear
            n += 1
    return n


@contextlib.contextmanager
def exact_linear() -> Iterator[None]:
    """Within this block every :class:`NarrowLinear` computes ``F.linear`` exactly as before."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)
