"""Reuse an unedited prefill's lower blocks when only a later edit changes.

Why: on the Steering page every slider release reruns the prompt's prefill under the new edit,
and with the prompted-refusal preamble that prompt is ~190 tokens, the largest part of the
wait for the first steered token. An edit at block ``L``'s output changes nothing that blocks
``0 … L`` compute: their outputs and their keys and values are those of the unedited prefill of
the same tokens. So the unedited prefill (the baseline's, which the page runs anyway) is kept
(:class:`Prefill`, in a small :class:`PrefillMemo`), and a later edited prefill of the same
tokens *replays* those blocks — each returns its kept output, the edit hook still applies to
block ``L``'s — and computes only the blocks after them; their keys and values are then taken
from the kept prefill (:func:`complete_cache`). Same shapes, same operations for the blocks
that run, so the result is the one a full prefill gives, bit for bit (``tests/test_prefill_reuse.py``).

Only one-row prefills without a shared-prefix pass are kept or replayed (the page's case).
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from core.architecture import LoadedModel
from core.hooks import get_hidden, replace_hidden

# each kept prefill holds every block's output and every layer's keys and values: ~21 MB for a
# 190-token prompt on the embedded model
MEMO_SIZE = 4


@dataclass
class Prefill:
    """An unedited prefill of one row: its token ids, each block's output as the block returned
    it, and the cache's layers right after the prefill (before any decode step wrote to them)."""

    ids: torch.Tensor  # [1, T]
    outputs: list[Any]
    layers: list[Any]

    @classmethod
    def after(cls, ids: torch.Tensor, outputs: list[Any], cache: Any) -> "Prefill":
        """The prefill that just gave ``outputs`` and ``cache``. The cache's layer objects are
        copied (shallow): decoding on goes on updating them (a sliding-window layer keeps
        reassigning its keys and counts its tokens), and the copies keep the state of now."""
        return cls(ids.detach().cpu().clone(), outputs, [copy.copy(layer) for layer in cache.layers])


class PrefillMemo:
    """The last few unedited prefills, newest last (a bounded LRU keyed by token ids). One per
    model: a memo must not be shared between models (it does not know which model made a prefill)."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size!r}")
        self.size = size
        self._items: OrderedDict[tuple[int, ...], Prefill] = OrderedDict()
        self.replayed = 0  # blocks the last edited prefill replayed (0: it ran in full), for the page's note

    @staticmethod
    def _key(ids: torch.Tensor) -> tuple[int, ...]:
        return tuple(int(i) for i in ids.reshape(-1).tolist())

    def get(self, ids: torch.Tensor) -> Prefill | None:
        key = self._key(ids)
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, prefill: Prefill) -> None:
        key = self._key(prefill.ids)
        self._items[key] = prefill
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def replayable_blocks(lm: LoadedModel, names: Sequence[str]) -> int:
    """How many leading blocks compute the same with hooks on ``names`` as without: blocks up to
    and including the first block whose *output* is hooked (its hook applies to the replayed
    output), short of any block with a hooked submodule. A hooked module outside every block
    (an embedding, say) allows none."""
    limit = lm.n_layers
    for name in names:
        for i, block in enumerate(lm.block_names):
            if name == block:
                limit = min(limit, i + 1)
                break
            if name.startswith(block + "."):
                limit = min(limit, i)
                break
        else:
            return 0
    return limit


@contextlib.contextmanager
def capturing(lm: LoadedModel) -> Iterator[list[Any]]:
    """Record each block's output, as returned, into the yielded list (block order). The
    caller holds the model's lock (inside a trace)."""
    outputs: list[Any] = [None] * lm.n_layers
    handles = []
    for i, block in enumerate(lm.blocks):
        def keep(_module, _args, output, i=i):
            outputs[i] = output
        handles.append(block.register_forward_hook(keep))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaying(lm: LoadedModel, prefill: Prefill, n_blocks: int) -> Iterator[None]:
    """Blocks ``0 … n_blocks - 1`` return ``prefill``'s outputs instead of computing (hooks on
    them still run). The last one returns a copy: an edit hook may change it in place. The
    caller holds the model's lock (inside a trace)."""
    blocks = lm.blocks[:n_blocks]
    try:
        for i, block in enumerate(blocks):
            out = prefill.outputs[i]
            if i == n_blocks - 1:
                def replay(*_args, _out=out, **_kwargs):
                    return replace_hidden(_out, get_hidden(_out).clone())
            else:
                def replay(*_args, _out=out, **_kwargs):
                    return _out
            block.forward = replay
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def complete_cache(cache: Any, prefill: Prefill, n_blocks: int) -> Any:
    """Put ``prefill``'s keys and values into the first ``n_blocks`` layers of ``cache`` (the
    replayed blocks wrote none). Shallow copies: a decode step never writes into the kept
    tensors (``core.kv_room`` copies them into its own buffers). Returns ``cache``."""
    for i in range(n_blocks):
        cache.layers[i] = copy.copy(prefill.layers[i])
    return cache
