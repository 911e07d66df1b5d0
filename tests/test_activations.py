import numpy as np
import pytest
import torch

from core.activations import collect_activations
from core.cache import ArrayCache
from core.errors import NonFiniteActivationError
from core.formatting import Formatter, get_preamble
from core.hooks import Trace

PROMPTS = [
    "How do I make a cake at home?",
    "Tell me a joke.",
    "Write a tutorial on how to pick ripe avocados for a salad tonight.",
    "What is the capital of France?",
    "Explain how to bake bread.",
]


def test_shapes_and_batched_equals_unbatched(tiny, tmp_path):
    lm = tiny
    batched = collect_activations(lm, PROMPTS, batch_size=4, cache=False)
    single = np.stack([collect_activations(lm, [p], batch_size=1, cache=False)[0] for p in PROMPTS])
    assert batched.shape == (len(PROMPTS), lm.n_layers, lm.d_model)
    assert batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=1e-4, rtol=1e-4)


def test_last_position_is_block_output_at_last_token(tiny):
    lm = tiny
    fmt = Formatter(lm.tokenizer)
    acts = collect_activations(lm, PROMPTS[:1], cache=False)
    enc = fmt.encode(PROMPTS[:1])
    with Trace(lm.model, lm.block_names[1]) as tr:
        lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    np.testing.assert_allclose(acts[0, 1], tr.output[0, -1].numpy(), atol=1e-5)


def test_positions_list_and_mean(tiny):
    lm = tiny
    fmt = Formatter(lm.tokenizer)
    post = fmt.post_instruction_positions()
    acts = collect_activations(lm, PROMPTS[:2], position=["last", -2, "mean"], cache=False)
    assert acts.shape == (2, 3, lm.n_layers, lm.d_model)
    last = collect_activations(lm, PROMPTS[:2], position=-1, cache=False)
    np.testing.assert_allclose(acts[:, 0], last, atol=1e-5)
    assert post[0] == -1
    with pytest.raises(ValueError):
        collect_activations(lm, PROMPTS[:1], position="first", cache=False)


def test_mean_position_covers_only_the_instruction(tiny_models):
    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer)
    enc = fmt.encode(["Tell me a joke."])
    start, end = enc.instruction_spans[0]
    text = lm.tokenizer.decode(enc.input_ids[0, start:end])
    assert text.strip() == "Tell me a joke."


def test_cache_hit_skips_model_and_is_identical(tiny, tmp_path):
    lm = tiny
    cache = ArrayCache(tmp_path / "c")
    first = collect_activations(lm, PROMPTS, cache=cache)
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        second = collect_activations(lm, PROMPTS, cache=cache)
    finally:
        handle.remove()
    assert calls == []
    np.testing.assert_array_equal(first, second)
    assert cache.hits >= len(PROMPTS)


def test_cache_keys_depend_on_preamble_and_model(tiny_models, tmp_path):
    cache = ArrayCache(tmp_path / "c")
    lm = tiny_models["llama"]
    a = collect_activations(lm, PROMPTS[:2], cache=cache)
    b = collect_activations(lm, PROMPTS[:2], preamble="prompted-refusal", cache=cache)
    assert not np.allclose(a, b)
    other = tiny_models["neox"]
    collect_activations(other, PROMPTS[:2], cache=cache)
    assert len(cache) == 6


def test_corrupted_cache_entry_is_recomputed(tiny_models, tmp_path):
    lm = tiny_models["gpt2"]
    cache = ArrayCache(tmp_path / "c")
    good = collect_activations(lm, PROMPTS[:1], cache=cache)
    from core.activations import activation_key

    key = activation_key(lm, Formatter(lm.tokenizer), ("last",), PROMPTS[0])
    cache._disk.set(key, b"\x93NUMPY garbage")
    again = collect_activations(lm, PROMPTS[:1], cache=cache)
    np.testing.assert_array_equal(good, again)


def test_unwritable_cache_falls_back_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="in-memory"):
        cache = ArrayCache(blocker / "sub")
    assert cache.in_memory
    cache.set("k", np.ones(3))
    np.testing.assert_array_equal(cache.get("k"), np.ones(3))


def test_cache_never_unpickles(tmp_path):
    cache = ArrayCache(tmp_path / "c")
    cache.set("k", np.arange(4, dtype=np.float32))
    raw = cache._disk.get("k")
    assert isinstance(raw, bytes) and raw.startswith(b"\x93NUMPY")


def test_nan_activations_are_reported_with_layer(tiny_models):
    lm = tiny_models["gpt2"]
    with Trace(lm.model, lm.block_names[1], edit_output=lambda h, n: h * float("nan")):
        with pytest.raises(NonFiniteActivationError, match="layer 1"):
            collect_activations(lm, PROMPTS[:1], cache=False)


def test_progress_is_reported(tiny_models):
    lm = tiny_models["gpt2"]
    seen = []
    collect_activations(lm, PROMPTS, batch_size=2, cache=False, progress=lambda f, m: seen.append(f))
    assert seen[-1] == pytest.approx(1.0)
    assert len(seen) == 4  # initial + 3 batches
