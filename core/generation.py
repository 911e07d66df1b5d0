"""Text generation with optional hook edits, batched and streamed.

Why our own decode loop instead of ``model.generate``: each forward step runs inside its own
:class:`~core.hooks.TraceDict`, so hooks exist only while the model lock is held for that step.
Two app sessions can therefore stream from the same cached model at the same time — their
steps interleave, and neither ever sees the other's edits — and an abandoned or stopped
stream leaves no hook behind. Edits apply at every position: to the whole prompt in the
prefill step and to each new token after that (the key/value cache keeps the edited past).
A row that ends its answer leaves the batch (its rows of the cache are dropped), so a batch of
short refusals and long answers costs the long answers' steps only for those rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from core import forward, threads
from core.architecture import LoadedModel
from core.formatting import Formatter
from core.hooks import EditFn, TraceDict
from core.kv_room import make_room
from core.prefill_reuse import Prefill, PrefillMemo, capturing, complete_cache, replayable_blocks, replaying
from core.progress import Progress

StopCheck = Callable[[], bool]


class PerRowEdits(Protocol):
    """Edits that differ per row of a batch (``core.mixed_batches.RowEdits``): ``select(groups)`` says
    which group each row of the next forward passes belongs to; ``edits`` are the hook edits."""

    @property
    def edits(self) -> dict[str, EditFn]: ...

    def select(self, groups: Sequence[int]) -> None: ...


def _check_groups(groups: Sequence[int] | None, row_edits: PerRowEdits | None, n: int) -> None:
    if (groups is None) != (row_edits is None):
        raise ValueError("row_edits and groups go together: give both (per-row edits) or neither")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups: one group per prompt, got {len(groups)} for {n} prompts")


def _forward_rows(lm: LoadedModel, batch: forward.Batch, row_edits: PerRowEdits, groups: Sequence[int], *,
                  use_cache: bool) -> Any:
    """:func:`core.forward.run` with per-row edits, inside the caller's trace of ``row_edits.edits``:
    the shared prefix runs once per distinct group in the batch (its key/value cache then goes to
    that group's rows), then the suffixes; rows stay selected for the decode steps that follow."""
    p, n = batch.prefix_len, batch.size
    cache = None
    if p:
        distinct = list(dict.fromkeys(groups))
        row_edits.select(distinct)
        cache = lm.model(input_ids=batch.prefix_ids.expand(len(distinct), -1), use_cache=True,
                         logits_to_keep=1).past_key_values
        cache.batch_select_indices(torch.tensor([distinct.index(g) for g in groups], device=batch.prefix_ids.device))
    suffix_mask = batch.suffix.attention_mask
    mask = torch.cat([suffix_mask.new_ones((n, p)), suffix_mask], dim=-1) if p else suffix_mask
    row_edits.select(groups)
    return lm.model(input_ids=batch.suffix.input_ids, attention_mask=mask,
                    position_ids=(suffix_mask.cumsum(-1) - 1).clamp(min=0) + p,
                    use_cache=use_cache or bool(p), logits_to_keep=1,
                    **({"past_key_values": cache} if p else {}))


@dataclass
class GenerationStep:
    """The state after one decode step: texts so far, new token ids, which rows are done."""

    texts: list[str]
    token_ids: list[list[int]]
    done: list[bool]
    step: int
    retained: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [batch, d] at the new token


def eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for value in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _next_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate_stream(
    lm: LoadedModel,
    formatter: Formatter,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    edits: dict[str, EditFn] | None = None,
    retain: Sequence[str] = (),
    stop: StopCheck | None = None,
    row_edits: PerRowEdits | None = None,
    groups: Sequence[int] | None = None,
    prefills: PrefillMemo | None = None,
) -> Iterator[GenerationStep]:
    """Yield a :class:`GenerationStep` after every decode step (greedy if ``temperature`` is 0).

    ``edits`` maps module names to edit functions (see ``core.steering``); ``retain`` names
    modules whose hidden state at the newest token is returned in each step (used to colour
    tokens by their projection on a direction). ``stop()`` returning True ends the stream.
    ``row_edits`` with ``groups`` (one group index per prompt) edit each row by its own group
    instead (see :class:`PerRowEdits`); then ``edits`` must be empty. ``prefills``: one prompt's
    unedited prefill is kept there, and an edited prefill of the same tokens reuses the blocks
    before its first edit (:mod:`core.prefill_reuse`; the same result, less arithmetic).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not instructions:
        raise ValueError("no prompts given")
    _check_groups(groups, row_edits, len(instructions))
    if row_edits is not None:
        if edits:
            raise ValueError("give edits (the same for every row) or row_edits with groups, not both")
        edits = row_edits.edits
    tok = lm.tokenizer
    # One prompt: no separate prefix pass. It would be reused by nothing, and every pass reads all
    # the weights, which at a handful of tokens costs as much as the arithmetic (docs/decisions.md).
    batch_in = forward.prepare(
        formatter, instructions, padding_side="left", device=lm.device,
        context=lm.max_positions, reserve=max_new_tokens, share_prefix=len(instructions) > 1,
    )
    p = batch_in.prefix_len
    batch = batch_in.size
    stops = eos_ids(lm)
    generator = torch.Generator().manual_seed(int(seed)) if temperature > 0 else None
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    past = None
    mask = torch.cat([batch_in.suffix.attention_mask.new_ones((batch, p)), batch_in.suffix.attention_mask], dim=-1)
    positions = (batch_in.suffix.attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -1:] + p
    input_ids = None
    names = list(dict.fromkeys([*(edits or {}), *retain]))
    active = list(range(batch))  # the rows still decoding, in the order the model's batch holds them
    for step in range(max_new_tokens):
        if stop is not None and stop():
            return
        with TraceDict(lm.model, names, retain_output=bool(retain), edit_output=edits or None) as traces:
            if past is None and row_edits is not None and groups is not None:
                out = _forward_rows(lm, batch_in, row_edits, groups, use_cache=True)  # prefill, per-row edits
            elif past is None:  # prefill: shared prefix once, then the suffixes (edits apply to both)
                out = _prefill(lm, batch_in, bool(edits), names, prefills)
            else:
                out = lm.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                    logits_to_keep=1,
                )
        # after the prefill the cache gets room for the tokens to come: each step then writes in place
        past = out.past_key_values if past is not None else make_room(out.past_key_values, max_new_tokens - 1)
        nxt = _next_tokens(out.logits[:, -1, :], temperature, generator)
        retained = {n: _by_row(traces[n].output[:, -1, :].float().cpu(), active, batch) for n in retain}
        for j, row in enumerate(active):
            token = int(nxt[j])
            if token in stops:
                done[row] = True
            else:
                generated[row].append(token)
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in generated]
        yield GenerationStep(texts, [list(g) for g in generated], list(done), step, retained)
        if all(done):
            return
        keep = [j for j, row in enumerate(active) if not done[row]]
        if len(keep) < len(active):  # finished rows leave the batch: later steps compute only the rest
            rows = torch.tensor(keep, device=nxt.device)
            past.batch_select_indices(rows)
            nxt, mask, positions = nxt[rows], mask[rows], positions[rows]
            active = [active[j] for j in keep]
            if row_edits is not None and groups is not None:
                row_edits.select([groups[r] for r in active])
        input_ids = nxt.unsqueeze(-1)
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
        positions = positions + 1


def _prefill(lm: LoadedModel, batch: forward.Batch, edited: bool, names: Sequence[str],
             prefills: PrefillMemo | None) -> Any:
    """The prefill pass (inside the caller's trace), keeping an unedited one-row prefill in
    ``prefills`` and replaying a kept one's lower blocks under edits (:mod:`core.prefill_reuse`)."""
    if prefills is None or batch.size != 1 or batch.prefix_len:
        return forward.run(lm, batch, use_cache=True)
    ids = batch.suffix.input_ids
    if not edited:
        with capturing(lm) as outputs:
            out = forward.run(lm, batch, use_cache=True)
        prefills.put(Prefill.after(ids, outputs, out.past_key_values))
        return out
    kept, n = prefills.get(ids), replayable_blocks(lm, names)
    prefills.replayed = n if kept is not None else 0
    if kept is None or n == 0:
        return forward.run(lm, batch, use_cache=True)
    with replaying(lm, kept, n):
        out = forward.run(lm, batch, use_cache=True)
    complete_cache(out.past_key_values, kept, n)
    return out


def _by_row(values: torch.Tensor, active: Sequence[int], batch: int) -> torch.Tensor:
    """``values`` of the decoding rows ``active`` ([len(active), d]) placed at their rows of the
    whole batch ([batch, d]); finished rows, which made no new token, get zeros."""
    if len(active) == batch:
        return values
    out = values.new_zeros((batch, *values.shape[1:]))
    out[torch.tensor(active)] = values
    return out


def generate(
    lm: LoadedModel,
    formatter: Formatter,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    edits: dict[str, EditFn] | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    row_edits: PerRowEdits | None = None,
    groups: Sequence[int] | None = None,
) -> list[str]:
    """Completed responses for ``instructions`` (batched; see :func:`generate_stream`, also for
    per-row edits: ``row_edits`` with one group index per prompt in ``groups``)."""
    instructions = list(instructions)
    _check_groups(groups, row_edits, len(instructions))
    results: list[str] = []

    def run(start: int, stop: int) -> list[str]:
        chunk = instructions[start:stop]
        last: GenerationStep | None = None
        row_steps, active = 0, len(chunk)  # rows computed step by step: the real work (rows leave when done)
        # The run's thread policy, if one is active (core.threads), compares thread counts per
        # row-step: per prompt, a chunk whose answers all end early looks several times faster.
        with threads.step(units=lambda: row_steps or len(chunk)):
            for last in generate_stream(
                lm, formatter, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                seed=seed + start, edits=edits, row_edits=row_edits,
                groups=None if groups is None else groups[start:stop],
            ):
                row_steps += active
                active = last.done.count(False)
        return [t.strip() for t in (last.texts if last else [""] * len(chunk))]

    for _, _, texts in forward.in_batches(len(instructions), batch_size, run, what="generation"):
        results.extend(texts)
        if progress:
            progress(len(results) / len(instructions), f"generated {len(results)}/{len(instructions)}")
    return results


@torch.inference_mode()
def next_token_logits(
    lm: LoadedModel,
    formatter: Formatter,
    instructions: Sequence[str],
    *,
    edits: dict[str, EditFn] | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    row_edits: PerRowEdits | None = None,
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """Float32 logits [n, vocab] at the first response position (one forward pass per batch,
    no generation): the input of the refusal score and the KL metric. ``row_edits`` with
    ``groups`` (one group index per prompt) edit each row by its group (:class:`PerRowEdits`)."""
    instructions = list(instructions)
    _check_groups(groups, row_edits, len(instructions))
    if row_edits is not None and edits:
        raise ValueError("give edits (the same for every row) or row_edits with groups, not both")
    out: list[torch.Tensor] = []
    prefixes: dict = {}

    def run(start: int, stop: int) -> torch.Tensor:
        batch = forward.prepare(
            formatter, instructions[start:stop], padding_side="left", device=lm.device, context=lm.max_positions
        )
        if row_edits is not None and groups is not None:
            with TraceDict(lm.model, list(row_edits.edits), retain_output=False, edit_output=row_edits.edits):
                logits = _forward_rows(lm, batch, row_edits, groups[start:stop], use_cache=False).logits[:, -1, :]
            return logits.float().cpu()
        key = tuple(batch.prefix_ids[0].tolist())
        with TraceDict(lm.model, list(edits or {}), retain_output=False, edit_output=edits or None):
            if key and key not in prefixes:
                prefixes[key] = forward.prefix_cache(lm, batch)
            logits = forward.run(lm, batch, past=prefixes.get(key)).logits[:, -1, :]
        return logits.float().cpu()

    for _, stop, logits in forward.in_batches(len(instructions), batch_size, run, what="first-token logits"):
        out.append(logits)
        if progress:
            progress(min(1.0, stop / len(instructions)), "first-token logits")
    if not out:
        raise ValueError("no prompts given")
    return torch.cat(out)
