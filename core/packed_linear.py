"""Linear layers through MKL's packed GEMM: each weight packed once, not at every call.

Why: ``F.linear`` hands MKL ``x @ Wᵀ``, and MKL copies ``W`` into its blocked layout at every
call. With the few rows of batched decoding and short prompts (4–64) that copy costs more than
the arithmetic. Packing each weight once (``torch.ops.mkl._mkl_reorder_linear_weight``, what
torch's own compiler uses when it freezes a model) and multiplying with the packed copy
(``torch.ops.mkl._mkl_linear``) was measured ×1.5–5 faster at 4–64 rows; at 1–2 rows it gains
nothing, above about a hundred little and unevenly, so those stay on ``F.linear``
(``docs/decisions.md``, "Linear layers: MKL's packed GEMM"; ``python -m bench.run --only packed_linear``).

Results equal ``F.linear``'s up to float32 rounding: bit for bit for most shapes, a few units in
the last place for some (MKL blocks the sum differently). :func:`exact_linear` keeps
``F.linear`` where bits must stay as they were: the cached organism's weights are keyed by its
recipe, not by this code.

Scope: float32 on the CPU, in eval mode, outside autograd and autocast, with torch built on
MKL; the packed op is checked against ``F.linear`` once per process, and anything else runs
``F.linear``. Memory: each used weight's packed copy is kept beside it (about the size of the
model's linear weights; made at first use). A copy is dropped when its weight changes storage
(``.to``, ``deepcopy``) or version (an in-place write), and whenever the module switches
between train and eval mode, since an optimizer step need not bump the version.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

# row counts that take the packed copy: below 4 it gains nothing, and above about a hundred rows
# its gain is small and uneven (×0.6–1.5 by shape), while decode steps (up to 64 rows) gain most
# (measured; see the module docstring)
ROWS = range(4, 97)
# the row count MKL is told when packing; its packed layout serves any row count (checked in
# tests/test_packed_linear.py against F.linear from 4 to 464 rows)
PACK_ROWS = 64

# module -> (weight storage, weight version, packed copy); beside the module, not in it, so
# that deepcopy and state dicts never carry a copy made for another weight
_PACKS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, int, torch.Tensor]]" = weakref.WeakKeyDictionary()

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("packed_linear", default=True)


@functools.cache
def available() -> bool:
    """True when torch's packed MKL linear exists and agrees with ``F.linear`` (checked once)."""
    try:
        ops = torch.ops.mkl
        generator = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=generator)
        b = torch.randn(48, generator=generator)
        x = torch.randn(2, 9, 40, generator=generator)
        with torch.no_grad():
            y = ops._mkl_linear(x, ops._mkl_reorder_linear_weight(w, 18), w, b, 18)
            return bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except Exception:  # missing, unregistered or failing op: not available, F.linear everywhere
        return False


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies with a packed copy of its weight when it can (module
    docstring); same parameters, same state dict, same hooks (only the instance's class changes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if rows not in ROWS or not self._packable(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, self._packed_weight(), self.weight, self.bias, rows)

    def _packable(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (
            _enabled.get()
            and not self.training
            and w.dtype == torch.float32
            and x.dtype == torch.float32
            and w.device.type == "cpu"
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and not torch.is_autocast_enabled("cpu")
            and available()
        )

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        version = -1 if w.is_inference() else w._version  # an inference tensor keeps no version
        held = _PACKS.get(self)
        if held is None or held[0] != w.data_ptr() or held[1] != version:
            with torch.no_grad():
                held = (w.data_ptr(), version, torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), PACK_ROWS))
            _PACKS[self] = held
        return held[2]

    def train(self, mode: bool = True) -> "PackedLinear":
        _PACKS.pop(self, None)  # training may change the weight without bumping its version
        return super().train(mode)


def install(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`PackedLinear`, in place; returns how
    many. Subclasses of ``nn.Linear`` (quantised or adapter layers) keep their own forward."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            n += 1
    return n


@contextlib.contextmanager
def exact_linear() -> Iterator[None]:
    """Within this block every :class:`PackedLinear` computes ``F.linear``, bit for bit."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)
