import pytest
import torch

from core.hooks import StopForward, Trace, TraceDict, model_lock
from core.hooks import remaining_hooks


def _batch(lm):
    return lm.tokenizer(["How do I make a cake at home?"], return_tensors="pt")


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gptj"])
def test_retain_matches_hidden_states(tiny_models, arch):
    lm = tiny_models[arch]
    batch = _batch(lm)
    with TraceDict(lm.model, lm.block_names) as td:
        out = lm.model(**batch, output_hidden_states=True)
    # hidden_states[i+1] is block i's output, except the last entry (final norm applied)
    for i, name in enumerate(lm.block_names[:-1]):
        torch.testing.assert_close(td[name].output, out.hidden_states[i + 1])
    assert td[lm.block_names[-1]].output.shape == out.hidden_states[-1].shape


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gptj"])
def test_edit_output_changes_logits_and_tuple_blocks_work(tiny_models, arch):
    lm = tiny_models[arch]
    batch = _batch(lm)
    clean = lm.model(**batch).logits
    with Trace(lm.model, lm.block_names[0], edit_output=lambda h, name: h * 0):
        zeroed = lm.model(**batch).logits
    assert not torch.allclose(clean, zeroed)
    # identity edit leaves the logits unchanged
    with Trace(lm.model, lm.block_names[0], edit_output=lambda h, name: h):
        same = lm.model(**batch).logits
    torch.testing.assert_close(clean, same)


def test_gptj_blocks_return_tuples(tiny_models):
    lm = tiny_models["gptj"]
    seen = {}
    handle = lm.blocks[0].register_forward_hook(lambda m, a, o: seen.update(type=type(o)))
    try:
        lm.model(**_batch(lm))
    finally:
        handle.remove()
    assert seen["type"] is tuple


def test_retain_input_with_keyword_calls(tiny_models):
    lm = tiny_models["llama"]  # Llama calls self_attn with keyword arguments
    with TraceDict(lm.model, [lm.block_names[1], lm.attn_out_names[1]], retain_input=True) as td:
        lm.model(**_batch(lm))
    assert td[lm.attn_out_names[1]].input.shape[-1] == lm.n_heads * lm.head_dim


def test_edit_input(tiny_models):
    lm = tiny_models["gpt2"]
    batch = _batch(lm)
    clean = lm.model(**batch).logits
    with Trace(lm.model, lm.attn_out_names[0], edit_input=lambda h, n: torch.zeros_like(h)):
        edited = lm.model(**batch).logits
    assert not torch.allclose(clean, edited)


def test_hooks_removed_on_exception(tiny):
    lm = tiny
    before = remaining_hooks(lm.model)

    def boom(h, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with TraceDict(lm.model, lm.block_names, edit_output=boom, retain_input=True):
            lm.model(**_batch(lm))
    after = remaining_hooks(lm.model)
    assert before == after
    assert model_lock(lm.model).acquire(blocking=False)  # lock released
    model_lock(lm.model).release()


def test_stop_after_last_traced_module(tiny):
    lm = tiny
    calls = []
    handle = lm.blocks[-1].register_forward_hook(lambda *a: calls.append(1) and None)
    try:
        with TraceDict(lm.model, lm.block_names[:1], stop=True) as td:
            lm.model(**_batch(lm))
    finally:
        handle.remove()
    assert calls == []  # later blocks never ran
    assert td[lm.block_names[0]].output is not None


def test_stop_forward_propagates_outside_trace(tiny):
    """A StopForward raised by a plain hook (no Trace to swallow it) ends the model call and
    reaches the caller; inside a Trace with ``stop=True`` the same exception is swallowed."""
    batch = _batch(tiny)
    name = tiny.block_names[0]

    def stop(module, args, output):
        raise StopForward(name)

    handle = tiny.model.get_submodule(name).register_forward_hook(stop)
    try:
        with pytest.raises(StopForward, match=name):
            tiny.model(**batch)
    finally:
        handle.remove()
    with Trace(tiny.model, name, stop=True) as tr:
        tiny.model(**batch)
    assert tr.output is not None
    assert tiny.model(**batch).logits.shape[-1] > 0  # the hooks are gone: a plain call runs to the end


def test_dict_of_edits_only_edits_named_modules(tiny_models):
    lm = tiny_models["neox"]
    batch = _batch(lm)
    names = lm.block_names[:2]
    with TraceDict(lm.model, names, edit_output={names[1]: lambda h, n: h + 1.0}) as td:
        lm.model(**batch)
    with TraceDict(lm.model, names) as ref:
        lm.model(**batch)
    torch.testing.assert_close(td[names[0]].output, ref[names[0]].output)
    torch.testing.assert_close(td[names[1]].output, ref[names[1]].output + 1.0)
