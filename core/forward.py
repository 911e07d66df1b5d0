"""Batched forward passes that compute a shared prompt prefix only once.

Why: with a preamble (system prompt + demonstrations) every formatted prompt starts with the
same ~250 tokens and differs only in its last ~30. Running that prefix once and expanding its
key/value cache to the batch makes prefill several times cheaper on a CPU, and the results are
the same up to floating-point rounding (tests check this against plain runs).

:func:`prepare` tokenises a batch and splits it into the common token prefix (capped at the
start of the earliest instruction, so pooling over the instruction never needs prefix states)
and the padded suffixes; :func:`run` performs the forward pass, returning the model output for
the suffix tokens. Hooks placed by the caller see the prefix pass too (so edits apply at every
position); :func:`run` reports which pass is which through ``on_pass`` for callers that retain.

:func:`forward_after_prefix` is the trick itself, on token ids and any causal LM: the organism's
training loss uses it too (with gradients). ``core.frozen_stack.run_layers`` does the same on
hidden states through a slice of blocks, which a model-level call cannot reach.
"""

from __future__ import annotations

import copy
import gc
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from core.architecture import LoadedModel
from core.errors import BatchMemoryError
from core.formatting import Encoded, Formatter

MIN_SHARED_PREFIX = 24  # below this, a separate prefix pass is not worth its overhead


@dataclass
class Batch:
    """A tokenised batch split into a shared prefix ([1, P], maybe empty) and padded suffixes."""

    prefix_ids: torch.Tensor  # [1, P]
    suffix: Encoded  # input ids/mask of the suffixes; lengths and spans are relative to the suffix

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.shape[1])

    @property
    def size(self) -> int:
        return int(self.suffix.input_ids.shape[0])


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return n


def prepare(
    formatter: Formatter,
    instructions: Sequence[str],
    *,
    padding_side: str,
    device: Any = None,
    share_prefix: bool = True,
    context: int | None = None,
    reserve: int = 0,
) -> Batch:
    """Tokenise ``instructions`` and split off the prefix they all share (see module doc).

    ``context`` (the model's ``max_positions``) and ``reserve`` (tokens still to generate)
    make over-long prompts fail with :class:`~core.errors.PromptTooLongError` before any
    forward pass (see :meth:`Formatter.encode`).
    """
    full = formatter.encode(instructions, padding_side="right", context=context, reserve=reserve)
    rows = [full.input_ids[i, : full.lengths[i]].tolist() for i in range(len(instructions))]
    p = 0
    if share_prefix:
        p = min(_common_prefix_len(rows), min(s for s, _ in full.instruction_spans))
        p = min(p, min(full.lengths) - 1)  # at least one suffix token per prompt
        if p < MIN_SHARED_PREFIX:
            p = 0
    suffixes = [r[p:] for r in rows]
    width = max(len(s) for s in suffixes)
    pad = formatter.tokenizer.pad_token_id if formatter.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    prefix = torch.tensor([rows[0][:p]], dtype=torch.long)
    if device is not None:
        ids, mask, prefix = ids.to(device), mask.to(device), prefix.to(device)
    spans = [(a - p, b - p) for a, b in full.instruction_spans]
    suffix = Encoded(ids, mask, [len(s) for s in suffixes], spans, padding_side)
    return Batch(prefix, suffix)


def prefix_cache(lm: LoadedModel, batch: Batch) -> Any | None:
    """The key/value cache of the shared prefix (batch 1), or None if there is no prefix."""
    if batch.prefix_len == 0:
        return None
    return _prefix_pass(lm.model, batch.prefix_ids)


def _prefix_pass(model: nn.Module, prefix_ids: torch.Tensor) -> Any:
    return model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1).past_key_values


def forward_after_prefix(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    suffix_ids: torch.Tensor,
    suffix_mask: torch.Tensor,
    *,
    past: Any | None = None,
    use_cache: bool = False,
    logits_to_keep: int = 1,
    on_pass: Callable[[str], None] | None = None,
) -> Any:
    """The model output for the ``suffix_ids`` rows ([n, S], padded as ``suffix_mask`` says) as if
    each row were preceded by ``prefix_ids`` ([1, P]; P may be 0: a plain pass).

    The prefix runs once at batch size 1 (unless its key/value cache ``past`` is given, which is
    copied and left untouched), its cache is repeated for the rows, and the suffix attends to
    prefix + suffix with positions that continue after the prefix. Exact up to floating-point
    rounding; gradients flow from every row into the one prefix pass."""
    p = int(prefix_ids.shape[1])
    n = int(suffix_ids.shape[0])
    cache = None
    if p:
        if past is None:
            if on_pass:
                on_pass("prefix")
            cache = _prefix_pass(model, prefix_ids)  # fresh: nobody else holds it, no copy needed
        else:
            cache = copy.deepcopy(past)
        if n > 1:
            cache.batch_repeat_interleave(n)
    if on_pass:
        on_pass("suffix")
    mask = torch.cat([suffix_mask.new_ones((n, p)), suffix_mask], dim=-1) if p else suffix_mask
    positions = (suffix_mask.cumsum(-1) - 1).clamp(min=0) + p
    kwargs: dict[str, Any] = {"past_key_values": cache} if p else {}
    return model(
        input_ids=suffix_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=use_cache or bool(p),
        logits_to_keep=logits_to_keep,
        **kwargs,
    )


def run(
    lm: LoadedModel,
    batch: Batch,
    *,
    past: Any | None = None,
    use_cache: bool = False,
    logits_to_keep: int = 1,
    on_pass: Callable[[str], None] | None = None,
) -> Any:
    """Forward the suffixes on top of the shared prefix (computed here unless ``past`` is given).

    Returns the model output for the suffix positions. ``past`` is left untouched (it is copied
    before being expanded), so one prefix cache can serve many batches.
    """
    suffix = batch.suffix
    return forward_after_prefix(
        lm.model, batch.prefix_ids, suffix.input_ids, suffix.attention_mask,
        past=past, use_cache=use_cache, logits_to_keep=logits_to_keep, on_pass=on_pass,
    )


# ---------------------------------------------------------------------------------------
# out-of-memory: retry with smaller batches
# ---------------------------------------------------------------------------------------
R = TypeVar("R")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocation failures (``torch.OutOfMemoryError`` or a RuntimeError
    whose message says "out of memory")."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_batches(
    n: int, batch_size: int, fn: Callable[[int, int], R], *, what: str = "batch"
) -> Iterator[tuple[int, int, R]]:
    """Run ``fn(start, stop)`` over ``range(n)`` in chunks of ``batch_size``, yielding
    ``(start, stop, result)``. Why: one batch too large for the accelerator should not end a
    long run. On out-of-memory the failing chunk is retried with half the batch size (and the
    smaller size kept for the rest), down to 1; then :class:`BatchMemoryError` says what to do.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    size = int(batch_size)
    start = 0
    while start < n:
        stop = min(n, start + size)
        try:
            result = fn(start, stop)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            del exc  # its traceback holds the batch's tensors
            _free_memory()
            if stop - start <= 1:
                raise BatchMemoryError(
                    f"out of memory during {what} even with batch size 1 ({reason}); use a smaller dtype "
                    "(bfloat16), shorter prompts or fewer new tokens, or run on a machine with more memory."
                ) from None
            size = max(1, (stop - start) // 2)
            warnings.warn(
                f"out of memory during {what} with batch size {stop - start}; retrying with {size}.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        yield start, stop, result
        start = stop
