"""Residual-stream activations at every block output, batched and cached on disk.

``collect_activations(lm, prompts)`` returns float32 ``[n_prompts, n_layers, d_model]`` (or
``[n_prompts, n_positions, n_layers, d_model]`` when several positions are asked for). Layer
``i`` is the output of block ``i`` — the residual stream *after* that block (note that in
transformers 5 the last ``hidden_states`` entry is the final-norm output, not this).

Positions:

* ``"last"`` (default) — the last prompt token, where the response is about to start;
* a negative int ``-k`` — the k-th token from the end (``post_instruction_positions`` of the
  formatter lists the template tokens after the instruction);
* ``"mean"`` — the mean over the instruction's own tokens;
* a list of the above — stacked on a positions axis.

Speed: prompts are sorted by length so batches carry little padding; a prefix shared by every
prompt (the preamble) is run once and its key/value cache reused (``core.forward``); batches
are right-padded and the forward pass stops after the last block, skipping the final norm and
the unembedding. Each prompt's activations are a separate cache entry
(keyed by model fingerprint, dtype, formatting, position and prompt), so growing a prompt set
only computes the new prompts, and a full cache hit never runs the model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core import forward
from core.cache import ArrayCache, default_cache, stable_hash
from core.errors import NonFiniteActivationError
from core.formatting import Formatter, Preamble, get_preamble
from core.hooks import TraceDict
from core.models import LoadedModel
from core.progress import Progress

Position = str | int

DEFAULT_BATCH_SIZE = 16
_CACHE_VERSION = "acts-v1"


def make_formatter(lm: LoadedModel, preamble: str | Preamble | dict | None = None, formatter: Formatter | None = None) -> Formatter:
    """The formatter to use: the one given, else the model's default with ``preamble``."""
    if formatter is not None:
        return formatter
    return Formatter(lm.tokenizer, get_preamble(preamble))


def _validate_position(position: Position) -> None:
    if position in ("last", "mean"):
        return
    if isinstance(position, int) and not isinstance(position, bool) and position < 0:
        return
    raise ValueError(f"unknown position {position!r}: use 'last', 'mean' or a negative int like -2")


def activation_key(lm: LoadedModel, formatter: Formatter | str, position: Position | tuple, prompt: str) -> str:
    """Cache key of one prompt's activations; ``formatter`` may be its precomputed ``key()``."""
    fmt_key = formatter if isinstance(formatter, str) else formatter.key()
    return stable_hash(_CACHE_VERSION, lm.fingerprint, str(lm.dtype), fmt_key, position, prompt)


def _pool(hidden: torch.Tensor, row: int, offset: int, length: int, span: tuple[int, int], position: Position) -> torch.Tensor:
    """One prompt's [d_model] vector at ``position`` from a padded [batch, seq, d] hidden state."""
    if position == "last":
        return hidden[row, offset + length - 1]
    if position == "mean":
        return hidden[row, offset + span[0]: offset + span[1]].mean(0)
    index = length + int(position)
    if index < 0:
        raise ValueError(f"position {position} is before the start of a {length}-token prompt")
    return hidden[row, offset + index]


@torch.inference_mode()
def _run_batch(
    lm: LoadedModel, formatter: Formatter, prompts: Sequence[str], positions: list[Position], prefixes: dict
) -> np.ndarray:
    """[batch, n_positions, n_layers, d_model] float32 for one batch of prompts."""
    batch = forward.prepare(formatter, prompts, padding_side="right", device=lm.device, context=lm.max_positions)
    key = tuple(batch.prefix_ids[0].tolist())
    with lm.lock:  # the prefix pass must not overlap another session's edits
        if key and key not in prefixes:
            prefixes[key] = forward.prefix_cache(lm, batch)
        with TraceDict(lm.model, lm.block_names, stop=True) as traces:
            forward.run(lm, batch, past=prefixes.get(key))
    enc = batch.suffix
    out = np.empty((len(prompts), len(positions), lm.n_layers, lm.d_model), dtype=np.float32)
    offsets = enc.offsets()
    for layer, name in enumerate(lm.block_names):
        hidden = traces[name].output
        for row in range(len(prompts)):
            for p, position in enumerate(positions):
                vec = _pool(hidden, row, offsets[row], enc.lengths[row], enc.instruction_spans[row], position)
                out[row, p, layer] = vec.float().cpu().numpy()
    # checked on what is kept, once: a per-layer check of the whole hidden state cost ~4 % of the
    # pass (bench.peers); a NaN anywhere before a kept position reaches it through attention
    bad = ~np.isfinite(out).all(axis=(0, 1, 3))
    if bad.any():
        layer = int(np.argmax(bad))
        raise NonFiniteActivationError(
            f"NaN or inf in the output of layer {layer} ({lm.block_names[layer]}) with dtype {lm.dtype}; "
            "try dtype float32 (fp16 overflows on some models)."
        )
    return out


def collect_activations(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    position: Position | Sequence[Position] = "last",
    preamble: str | Preamble | dict | None = None,
    formatter: Formatter | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    cache: ArrayCache | None | bool = True,
) -> np.ndarray:
    """Block-output activations for ``prompts`` (see the module docstring for shapes).

    ``cache=True`` uses the shared disk cache, ``False``/``None`` disables caching, or pass an
    :class:`~core.cache.ArrayCache`. ``progress(fraction, message)`` is called per batch.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    many = isinstance(position, (list, tuple))
    positions: list[Position] = list(position) if many else [position]
    if not positions:
        raise ValueError("no positions given")
    for p in positions:
        _validate_position(p)
    fmt = make_formatter(lm, preamble, formatter)
    store: ArrayCache | None = default_cache() if cache is True else (cache if isinstance(cache, ArrayCache) else None)

    result: list[np.ndarray | None] = [None] * len(prompts)
    fmt_key = fmt.key()  # hashes the template and preamble: once per call, not once per prompt
    keys = [activation_key(lm, fmt_key, tuple(positions), p) for p in prompts]
    if store is not None:
        for i, key in enumerate(keys):
            hit = store.get(key)
            if hit is not None and hit.shape == (len(positions), lm.n_layers, lm.d_model):
                result[i] = hit
    todo = [i for i, r in enumerate(result) if r is None]
    # longest first: similar lengths share a batch (little padding); the largest batch runs first
    todo.sort(key=lambda i: -len(prompts[i]))
    done = len(prompts) - len(todo)
    prefixes: dict = {}  # shared-prefix key/value caches, reused across batches
    if progress:
        progress(done / len(prompts), f"{done} of {len(prompts)} prompts cached")
    def run(start: int, stop: int) -> np.ndarray:
        return _run_batch(lm, fmt, [prompts[i] for i in todo[start:stop]], positions, prefixes)

    for start, stop, acts in forward.in_batches(len(todo), batch_size, run, what="activation collection"):
        idx = todo[start:stop]
        for row, i in enumerate(idx):
            result[i] = acts[row]
            if store is not None:
                store.set(keys[i], acts[row])
        done += len(idx)
        if progress:
            progress(done / len(prompts), f"activations: {done}/{len(prompts)} prompts")
    stacked = np.stack(result).astype(np.float32, copy=False)
    return stacked if many else stacked[:, 0]
