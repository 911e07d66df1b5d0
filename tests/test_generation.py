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
