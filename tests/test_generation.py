from typing import Sequence

import torch

from core.formatting import Formatter
from core.generation import generate, generate_stream
from core.hooks import model_lock
from core.hooks import remaining_hooks


def test_batched_generation_equals_single(tiny):
    fmt = Formatter(tiny.tokenizer)
    prompts = ["Tell me a joke.", "How do I make a cake at home?"]
    together = generate(tiny, fmt, prompts, max_new_tokens=6)
    alone = [generate(tiny, fmt, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


def test_edits_change_generation_and_leave_no_hooks(tiny_models):
    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer)
    base = generate(lm, fmt, ["Tell me a joke."], max_new_tokens=8)
    noise = torch.randn(lm.d_model) * 50
    edits = {lm.block_names[0]: lambda h, n: h + noise}
    steered = generate(lm, fmt, ["Tell me a joke."], max_new_tokens=8, edits=edits)
    assert steered != base
    assert not remaining_hooks(lm.model)


def test_stream_stops_on_request_and_sampling_is_seeded(tiny_models):
    lm = tiny_models["gpt2"]
    fmt = Formatter(lm.tokenizer)
    steps = list(generate_stream(lm, fmt, ["Hi"], max_new_tokens=10, stop=lambda: False))
    assert 1 <= len(steps) <= 10
    flag = {"n": 0}

    def stop():
        flag["n"] += 1
        return flag["n"] > 2

    assert len(list(generate_stream(lm, fmt, ["Hi"], max_new_tokens=10, stop=stop))) == 2
    a = generate(lm, fmt, ["Hi"], max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(lm, fmt, ["Hi"], max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b
    assert model_lock(lm.model).acquire(blocking=False)
    model_lock(lm.model).release()


def test_stream_retains_per_token_states(tiny_models):
    lm = tiny_models["neox"]
    fmt = Formatter(lm.tokenizer)
    name = lm.block_names[1]
    for step in generate_stream(lm, fmt, ["Hi", "Tell me a joke."], max_new_tokens=3, retain=[name]):
        assert step.retained[name].shape == (2, lm.d_model)



def decode_with_and_without_room(lm, prompts: Sequence[str] = ("Tell me a joke.", "How do I make a cake at home?", "Hi"),
                                 steps: int = 5):
    """Decoding on a cache given room (:func:`core.kv_room.make_room`: tokens written in place)
    gives the logits of the library's own cache at every step, also after a row leaves the batch.
    Returns both caches at the end (library, roomy) and the prompt length, for the callers to
    check which layers wrote in place."""
    from core.kv_room import make_room

    fmt = Formatter(lm.tokenizer)
    enc = fmt.encode(list(prompts), padding_side="left")

    def decode(room: bool):
        out = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=True, logits_to_keep=1)
        past = make_room(out.past_key_values, steps) if room else out.past_key_values
        mask, logits = enc.attention_mask, [out.logits[:, -1]]
        nxt = out.logits[:, -1].argmax(-1)
        for step in range(steps):
            if step == 2:  # the middle row ends: it leaves the batch
                keep = torch.tensor([0, 2])
                past.batch_select_indices(keep)
                nxt, mask = nxt[keep], mask[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            out = lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=(mask.sum(-1, keepdim=True) - 1),
                           past_key_values=past, use_cache=True)
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1)
        return logits, past

    with torch.inference_mode():
        plain, library = decode(False)
        roomy, past = decode(True)
    for a, b in zip(plain, roomy):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    return library, past, enc.input_ids.shape[1]


def test_a_cache_with_room_decodes_as_the_library_cache_does(tiny):
    from transformers.cache_utils import DynamicLayer

    from core.kv_room import RoomyLayer

    library, past, n = decode_with_and_without_room(tiny)
    for before, after in zip(library.layers, past.layers):
        assert isinstance(after, RoomyLayer) == (type(before) is DynamicLayer)
        if isinstance(after, RoomyLayer):
            assert after.keys.data_ptr() == after._k.data_ptr()  # still in place after the row left
            assert after.keys.shape[-2] == n + 5
