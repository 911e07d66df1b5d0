"""Reusing an unedited prefill's lower blocks (core.prefill_reuse) on tiny real architectures:
the steered stream is the one a full prefill gives, bit for bit, the replayed blocks really do
not run, and nothing is left patched on the model."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pytest
import torch

from core import live
from core.formatting import Formatter
from core.generation import generate_stream
from core.hooks import remaining_hooks
from core.prefill_reuse import PrefillMemo, replayable_blocks
from core.steering import Intervention, ablate, edits_for, steered_stream

PROMPT = "Give me step by step instructions for picking a lock on a front door."


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """The tiny architectures, and a Gemma 3 whose sliding layers (window 4) hold fewer tokens
    than the prompt beside a full layer."""
    from tiny_models import build_more

    from core.models import load_model

    folder = build_more("gemma3_text", tmp_path_factory.mktemp("tiny-gemma3-window") / "gemma3", sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return {**tiny_models, "gemma3": load_model(str(folder), dtype="float32", device="cpu")}


def _add(lm, layer: int, coefficient: float) -> Intervention:
    unit = np.random.default_rng(layer).standard_normal(lm.d_model).astype(np.float32)
    return Intervention("add", unit / np.linalg.norm(unit), layer, coefficient=coefficient, scale=4.0)


def _steps(lm, fmt, iv, prefills=None, retain=(), n=8):
    return list(steered_stream(lm, fmt, [PROMPT], [iv], retain=list(retain), max_new_tokens=n, prefills=prefills))


@contextlib.contextmanager
def _calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """How many times ``module`` runs inside the block."""
    count = [0]
    handle = module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gptj", "gemma3"])
def test_replayed_prefill_gives_the_full_prefills_stream(models, arch):
    lm = models[arch]
    fmt = Formatter(lm.tokenizer)
    memo = PrefillMemo()
    baseline = list(generate_stream(lm, fmt, [PROMPT], max_new_tokens=8, prefills=memo))
    assert len(memo) == 1
    layer = lm.n_layers - 2
    iv = _add(lm, layer, 3.0)
    block = lm.block_names[layer]
    full = _steps(lm, fmt, iv, retain=[block])
    with _calls(next(iter(lm.blocks[0].children()))) as calls:
        reused = _steps(lm, fmt, iv, memo, retain=[block])
    assert calls[0] == len(reused) - 1  # block 0 ran for the decode steps only, not in the prefill
    assert memo.replayed == layer + 1  # blocks 0 … layer, the edited one included
    assert [s.token_ids for s in reused] == [s.token_ids for s in full]
    for a, b in zip(reused, full):
        assert torch.equal(a.retained[block], b.retained[block])  # bit for bit, the edited block included
    assert [s.token_ids for s in full] != [s.token_ids for s in baseline]  # the edit did change the answer
    assert not remaining_hooks(lm.model)
    assert not any("forward" in b.__dict__ for b in lm.blocks)


def test_ablation_everywhere_replays_nothing_and_matches(models):
    lm = models["llama"]
    fmt = Formatter(lm.tokenizer)
    memo = PrefillMemo()
    list(generate_stream(lm, fmt, [PROMPT], max_new_tokens=2, prefills=memo))
    iv = ablate(np.random.default_rng(0).standard_normal(lm.d_model).astype(np.float32))
    assert replayable_blocks(lm, list(edits_for(lm, [iv]))) == 0
    assert [s.token_ids for s in _steps(lm, fmt, iv, memo)] == [s.token_ids for s in _steps(lm, fmt, iv)]


def test_replayable_blocks_stop_at_the_first_hooked_module(models):
    lm = models["llama"]
    blocks = lm.block_names
    assert replayable_blocks(lm, []) == lm.n_layers
    assert replayable_blocks(lm, [blocks[1]]) == 2  # the hook applies to block 1's replayed output
    assert replayable_blocks(lm, [blocks[2], blocks[1]]) == 2
    assert replayable_blocks(lm, [lm.attn_names[1]]) == 1  # a hook inside block 1: block 1 must run
    assert replayable_blocks(lm, ["model.embed_tokens"]) == 0


def test_other_prompts_and_batches_do_not_reuse(models):
    lm = models["llama"]
    fmt = Formatter(lm.tokenizer)
    memo = PrefillMemo()
    list(generate_stream(lm, fmt, [PROMPT], max_new_tokens=1, prefills=memo))
    iv = _add(lm, 1, 3.0)
    with _calls(next(iter(lm.blocks[0].children()))) as calls:
        list(steered_stream(lm, fmt, ["Tell me a joke."], [iv], max_new_tokens=1, prefills=memo))
        assert calls[0] == 1 and memo.replayed == 0  # another prompt: a full prefill
        list(steered_stream(lm, fmt, [PROMPT, PROMPT], [iv], max_new_tokens=1, prefills=memo))
        assert calls[0] > 1  # two rows: not kept, not replayed
    assert len(memo) == 1  # edited prefills are never kept


def test_a_failing_edit_leaves_the_model_unpatched(models):
    lm = models["neox"]
    fmt = Formatter(lm.tokenizer)
    memo = PrefillMemo()
    list(generate_stream(lm, fmt, [PROMPT], max_new_tokens=1, prefills=memo))

    def boom(hidden, name):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        list(generate_stream(lm, fmt, [PROMPT], max_new_tokens=2, edits={lm.block_names[1]: boom}, prefills=memo))
    assert not any("forward" in b.__dict__ for b in lm.blocks)
    assert not remaining_hooks(lm.model)
    full = list(generate_stream(lm, fmt, [PROMPT], max_new_tokens=3))
    again = list(generate_stream(lm, fmt, [PROMPT], max_new_tokens=3, prefills=memo))
    assert [s.token_ids for s in again] == [s.token_ids for s in full]


def test_memo_keeps_the_newest_few():
    memo = PrefillMemo(size=2)
    from core.prefill_reuse import Prefill

    for i in range(3):
        memo.put(Prefill(torch.tensor([[i, i + 1]]), [], []))
    assert len(memo) == 2 and memo.get(torch.tensor([[0, 1]])) is None
    assert memo.get(torch.tensor([[1, 2]])) is not None
    memo.put(Prefill(torch.tensor([[9]]), [], []))  # [1, 2] was used last: [2, 3] goes
    assert memo.get(torch.tensor([[2, 3]])) is None and memo.get(torch.tensor([[1, 2]])) is not None
    with pytest.raises(ValueError, match="size"):
        PrefillMemo(size=0)


def test_slider_release_reuses_and_streams_the_same(models):
    lm = models["llama"]
    fmt = Formatter(lm.tokenizer)
    memo = PrefillMemo()
    iv = _add(lm, 1, 3.0)
    first = list(live.paired_streams(lm, fmt, PROMPT, iv, layer=1, scale=4.0, max_new_tokens=6, prefills=memo))
    assert len(memo) == 1  # the baseline's prefill was kept
    baseline = first[-1].baseline
    moved = _add(lm, 1, 2.0)
    plain = list(live.paired_streams(lm, fmt, PROMPT, moved, layer=1, scale=4.0, baseline=baseline, max_new_tokens=6))
    reused = list(live.paired_streams(lm, fmt, PROMPT, moved, layer=1, scale=4.0, baseline=baseline,
                                      max_new_tokens=6, prefills=memo))
    assert reused[-1].steered.to_dict() == plain[-1].steered.to_dict()


def test_a_cached_baseline_still_fills_the_memo(models):
    lm = models["llama"]
    fmt = Formatter(lm.tokenizer)
    done = live.Stream(text="cached", done=True)
    memo = PrefillMemo()
    list(live.paired_streams(lm, fmt, PROMPT, _add(lm, 1, 1.0), layer=1, scale=4.0, baseline=done,
                             max_new_tokens=2, prefills=memo))
    assert len(memo) == 1
