"""Shared-prefix forward passes give the same numbers as plain full-sequence runs."""

import numpy as np
import pytest
import torch

from core import forward
from core.activations import collect_activations
from core.formatting import PRESETS, Formatter
from core.generation import generate, next_token_logits

PROMPTS = ["Tell me a joke.", "How do I make a cake at home?", "How do I make a bomb at home?", "Hi"]


@pytest.fixture
def no_sharing(monkeypatch):
    def disable():
        monkeypatch.setattr(forward, "MIN_SHARED_PREFIX", 10**9)
    return disable


def test_prepare_splits_common_prefix(tiny_models):
    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer, PRESETS["prompted-refusal"])
    batch = forward.prepare(fmt, PROMPTS, padding_side="left")
    full = fmt.encode(PROMPTS, padding_side="left")
    assert batch.prefix_len >= forward.MIN_SHARED_PREFIX
    for i in range(len(PROMPTS)):
        joined = batch.prefix_ids[0].tolist() + batch.suffix.input_ids[i][batch.suffix.attention_mask[i].bool()].tolist()
        assert joined == full.input_ids[i][full.attention_mask[i].bool()].tolist()
        start, end = batch.suffix.instruction_spans[i]
        assert start >= 0 and end <= batch.suffix.lengths[i]


def test_no_prefix_without_preamble(tiny_models):
    lm = tiny_models["gpt2"]
    assert forward.prepare(Formatter(lm.tokenizer), PROMPTS, padding_side="right").prefix_len == 0


def test_shared_prefix_matches_plain_runs(tiny, no_sharing):
    fmt = Formatter(tiny.tokenizer, PRESETS["prompted-refusal"])
    shared_acts = collect_activations(tiny, PROMPTS, formatter=fmt, position=["last", "mean"], cache=False)
    shared_logits = next_token_logits(tiny, fmt, PROMPTS)
    shared_text = generate(tiny, fmt, PROMPTS, max_new_tokens=5)
    no_sharing()
    assert forward.prepare(fmt, PROMPTS, padding_side="right").prefix_len == 0
    plain_acts = collect_activations(tiny, PROMPTS, formatter=fmt, position=["last", "mean"], cache=False)
    plain_logits = next_token_logits(tiny, fmt, PROMPTS)
    plain_text = generate(tiny, fmt, PROMPTS, max_new_tokens=5)
    np.testing.assert_allclose(shared_acts, plain_acts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared_logits, plain_logits, atol=1e-4, rtol=1e-4)
    assert shared_text == plain_text


def test_edits_reach_the_prefix(tiny_models):
    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer, PRESETS["prompted-refusal"])
    batch = forward.prepare(fmt, PROMPTS[:2], padding_side="left")
    seen = []
    from core.hooks import Trace

    with Trace(lm.model, lm.block_names[0], edit_output=lambda h, n: seen.append(h.shape[1]) or h):
        forward.run(lm, batch)
    assert seen[0] == batch.prefix_len and len(seen) == 2
