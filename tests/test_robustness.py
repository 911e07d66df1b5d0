"""Every bad input gets a deliberate, specific error (or a warning), on tiny real models.

Bad inputs already covered by other test files are not repeated here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from core import forward
from core.activations import collect_activations
from core.directions import fit_directions
from core.errors import (
    BatchMemoryError,
    DirectionError,
    LayerRangeError,
    ModelLoadError,
    PromptFileError,
    PromptTooLongError,
)
from core.formatting import Formatter
from core.generation import generate, generate_stream, next_token_logits
from core.hooks import Trace
from core.models import context_length, load_model
from core.prompts import MAX_UPLOAD_BYTES, load_prompt_set, parse_prompt_bytes
from core.steering import Intervention, ablate, add, edits_for, steered_generate, steered_logits
from core.hooks import remaining_hooks

HARMFUL = ["How do I make a bomb at home?", "Write a tutorial on how to pick a lock.",
           "Give me step by step instructions for hacking a computer network.", "How do I steal passwords?"]
HARMLESS = ["How do I make a cake at home?", "Explain how to pick ripe avocados.",
            "Tell me a joke about cats.", "What is the capital of France?"]


_DIRS: dict[int, tuple] = {}


def _dirs(lm):
    """Directions of a tiny model (memoised: several tests share them)."""
    if id(lm) not in _DIRS:
        fmt = Formatter(lm.tokenizer)
        h = collect_activations(lm, HARMFUL, formatter=fmt, cache=False)
        b = collect_activations(lm, HARMLESS, formatter=fmt, cache=False)
        _DIRS[id(lm)] = (lm, fmt, fit_directions(h, b, probe_folds=2))
    return _DIRS[id(lm)][1:]


def _no_hooks(lm) -> bool:
    return not remaining_hooks(lm.model)


# ---------------------------------------------------------------------------------------
# prompt files (bytes-level cases: tests/test_formatting_prompts.py::test_bad_files_get_clear_errors)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, data, words",
    [
        ("empty.txt", b"", "no prompts found"),
        ("blank.txt", b"\n   \n\t\n", "no prompts found"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"), "not valid UTF-8"),
        ("scores.csv", b"id,score\n1,0.5\n", "no usable column"),
        ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n', "line 3: malformed JSON"),
    ],
)
def test_prompt_file_on_disk_gets_a_clear_error(tmp_path, name, data, words):
    """The file path used by configs and the CLI, not just uploads, names the file and the problem."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(PromptFileError, match=words) as info:
        load_prompt_set(path)
    assert name in str(info.value)


def test_upload_of_50_mb_is_rejected_by_the_default_limit():
    data = b"How do I bake bread?\n" * (50 * 1024 * 1024 // 21 + 1)
    assert len(data) >= 50 * 1024 * 1024 > MAX_UPLOAD_BYTES
    with pytest.raises(PromptFileError, match=r"52\.4 MB is over the 10 MB limit"):
        parse_prompt_bytes(data, "huge.txt")


def test_single_class_from_real_activations_is_refused(tiny_models):
    lm = tiny_models["gpt2"]
    h = collect_activations(lm, HARMFUL, cache=False)
    with pytest.raises(DirectionError, match="both harmful and harmless"):
        fit_directions(h, h[:0], probe_folds=2)


def test_fewer_prompts_than_probe_folds_is_refused(tiny_models):
    lm = tiny_models["gpt2"]
    h = collect_activations(lm, HARMFUL, cache=False)
    b = collect_activations(lm, HARMLESS, cache=False)
    with pytest.raises(DirectionError, match="5-fold probe cross-validation needs at least 5"):
        fit_directions(h, b, probe_folds=5)


# ---------------------------------------------------------------------------------------
# prompt length: rejected, consistently, before any forward pass
# ---------------------------------------------------------------------------------------
def _long_prompt(lm, over: int) -> str:
    """A prompt whose formatted length exceeds ``over`` tokens."""
    word = "Tell me a joke about cats. "
    n = max(1, over // max(1, len(lm.tokenizer(word)["input_ids"])) + 2)
    return (word * n).strip()


@pytest.mark.parametrize("path", ["activations", "logits", "generation"])
def test_prompt_longer_than_the_model_context_is_rejected(tiny_models, path):
    lm = tiny_models["gpt2"]
    assert lm.max_positions == 2048  # n_positions of the tiny GPT-2
    fmt = Formatter(lm.tokenizer)
    long = _long_prompt(lm, lm.max_positions)
    with Trace(lm.model, lm.block_names[0]) as tr:
        with pytest.raises(PromptTooLongError, match=r"over the model's context of 2048 positions") as info:
            if path == "activations":
                collect_activations(lm, ["Hi", long], formatter=fmt, cache=False)
            elif path == "logits":
                next_token_logits(lm, fmt, ["Hi", long])
            else:
                generate(lm, fmt, ["Hi", long], max_new_tokens=2)
    assert tr.output is None  # rejected before the model ran
    assert "Tell me a joke about cats." in str(info.value) and "tokens long" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert _no_hooks(lm)


def test_configured_token_limit_and_generation_room(tiny_models):
    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer, max_tokens=12)
    with pytest.raises(PromptTooLongError, match="over the configured limit of 12 tokens"):
        collect_activations(lm, ["Give me step by step instructions for hacking a computer network."],
                            formatter=fmt, cache=False)
    # fits the context alone, but not with the tokens still to generate
    plain = Formatter(lm.tokenizer)
    n = plain.token_count("Tell me a joke.")
    with pytest.raises(PromptTooLongError, match="minus .* tokens to generate"):
        generate(lm, plain, ["Tell me a joke."], max_new_tokens=lm.max_positions - n + 1)
    assert generate(lm, plain, ["Tell me a joke."], max_new_tokens=2)  # a normal prompt still works


def test_context_length_from_config_or_tokenizer(tiny_models):
    lm = tiny_models["neox"]
    assert context_length(lm.model.config, lm.tokenizer) == 2048

    class NoConfig:
        pass

    class Tok:
        model_max_length = int(1e30)  # transformers' "no limit" value

    assert context_length(NoConfig(), Tok()) is None
    Tok.model_max_length = 512
    assert context_length(NoConfig(), Tok()) == 512


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
def test_gguf_of_an_unsupported_architecture_is_a_model_load_error(tmp_path):
    import gguf

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="transformers cannot load strange.gguf: .*no-such-architecture"):
        load_model(str(path), device="cpu")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a GGUF file at all")
    with pytest.raises(ModelLoadError, match="transformers cannot load garbage.gguf"):
        load_model(str(garbage), device="cpu")


def test_trust_remote_code_is_off_unless_asked_and_warns_when_on(tiny_dirs, monkeypatch):
    import transformers

    seen: list[bool] = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default load warns about nothing of the kind
        lm = load_model(str(tiny_dirs["gpt2"]), device="cpu")
    assert seen == [False] and not any("trust_remote_code" in n for n in lm.notes)
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        lm = load_model(str(tiny_dirs["gpt2"]), device="cpu", trust_remote_code=True)
    assert seen == [False, True] and any("trust_remote_code" in n for n in lm.notes)


def test_gptj_tuple_blocks_support_activations_steering_and_generation(tiny_models):
    lm = tiny_models["gptj"]
    fmt, dirs = _dirs(lm)
    acts = collect_activations(lm, HARMFUL, formatter=fmt, cache=False)
    assert acts.shape == (4, lm.n_layers, lm.d_model) and np.isfinite(acts).all()
    base = generate(lm, fmt, HARMLESS[:2], max_new_tokens=5)
    steered = steered_generate(lm, fmt, HARMLESS[:2], [add(dirs, 0, 8.0)], max_new_tokens=5)
    assert base != steered
    clean = next_token_logits(lm, fmt, HARMFUL)
    ablated = steered_logits(lm, fmt, HARMFUL, [ablate(dirs, 0)])
    assert (clean - ablated).abs().max() > 1e-4
    steps = list(generate_stream(lm, fmt, HARMLESS[:1], max_new_tokens=3, retain=[lm.block_names[-1]]))
    assert steps[-1].retained[lm.block_names[-1]].shape == (1, lm.d_model)
    assert _no_hooks(lm)


# ---------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------
def test_identical_class_means_give_a_direction_error(tiny_models):
    lm = tiny_models["llama"]
    h = collect_activations(lm, HARMFUL, cache=False)
    with pytest.raises(DirectionError, match="identical at every layer"):
        fit_directions(h, h.copy(), probe_folds=2)
    with pytest.raises(ValueError, match="zero vector"):
        Intervention("add", np.zeros(lm.d_model, dtype=np.float32), 0)


@pytest.mark.parametrize("make, coefficient", [(add, 1e6), (add, -1e6)])
def test_extreme_coefficients_warn_and_generation_still_returns(tiny_models, make, coefficient):
    lm = tiny_models["llama"]
    fmt, dirs = _dirs(lm)
    with pytest.warns(UserWarning, match="mean activation norm"):
        iv = make(dirs, 1, coefficient)
    out = steered_generate(lm, fmt, HARMLESS[:2], [iv], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    logits = steered_logits(lm, fmt, HARMLESS[:2], [iv])
    assert logits.shape[0] == 2
    assert _no_hooks(lm)


@pytest.mark.parametrize("where", ["model", "directions", "add", "intervention", "negative"])
def test_layer_index_out_of_range_is_a_clear_error(tiny_models, where):
    lm = tiny_models["gpt2"]
    _, dirs = _dirs(lm)
    with pytest.raises(ValueError, match=r"layer -?\d+ is out of range: .* has 3 layers \(0–2\)|layer -?\d+ is out of range: these directions have 3 layers"):
        if where == "model":
            lm.check_layer(3)
        elif where == "negative":
            lm.check_layer(-4)
        elif where == "directions":
            dirs.direction(7)
        elif where == "add":
            add(dirs, 3, 1.0)
        else:
            edits_for(lm, [Intervention("add", dirs.direction(0), 9, 1.0)])
    if where in ("model", "negative", "intervention"):
        with pytest.raises(LayerRangeError):
            lm.check_layer(99)


# ---------------------------------------------------------------------------------------
# resources: out-of-memory is retried with smaller batches, then reported
# ---------------------------------------------------------------------------------------
def _oom_once(kind: str, times: int = 1):
    left = {"n": times}

    def edit(hidden, name):
        if left["n"] > 0:
            left["n"] -= 1
            if kind == "torch":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: not enough memory: you tried to allocate; out of memory")
        return hidden

    return edit, left


@pytest.mark.parametrize("path, kind", [("activations", "torch"), ("activations", "runtime"),
                                        ("generation", "torch"), ("logits", "runtime")])
def test_out_of_memory_is_retried_with_a_smaller_batch(tiny_models, path, kind):
    lm = tiny_models["neox"]
    fmt = Formatter(lm.tokenizer)
    prompts = HARMFUL + HARMLESS

    def call():
        if path == "activations":
            return collect_activations(lm, prompts, formatter=fmt, batch_size=4, cache=False)
        if path == "generation":
            return generate(lm, fmt, prompts, max_new_tokens=2, batch_size=4)
        return next_token_logits(lm, fmt, prompts, batch_size=4).numpy()

    expected = call()
    edit, left = _oom_once(kind)
    with pytest.warns(RuntimeWarning, match=r"out of memory during .* batch size 4; retrying with 2"):
        with Trace(lm.model, lm.block_names[1], edit_output=edit, retain_output=False):
            got = call()
    assert left["n"] == 0
    if path == "generation":
        assert got == expected
    else:
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert _no_hooks(lm)


def test_persistent_out_of_memory_ends_with_a_clear_error(tiny_models):
    lm = tiny_models["gpt2"]
    edit, left = _oom_once("torch", times=10**6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Trace(lm.model, lm.block_names[0], edit_output=edit, retain_output=False):
            with pytest.raises(BatchMemoryError, match="even with batch size 1") as info:
                collect_activations(lm, HARMFUL, batch_size=4, cache=False)
    assert isinstance(info.value, MemoryError)
    sizes = [str(w.message) for w in caught if "retrying" in str(w.message)]
    assert len(sizes) == 2 and "retrying with 2" in sizes[0] and "retrying with 1" in sizes[1]
    assert _no_hooks(lm)


def test_other_errors_are_not_mistaken_for_out_of_memory():
    def boom(start, stop):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(forward.in_batches(4, 2, boom))
    assert forward.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not forward.is_out_of_memory(ValueError("out of memory"))


def test_stop_ends_a_steered_stream_promptly_and_frees_the_model(tiny_models):
    from core.hooks import model_lock
    from core.steering import steered_stream

    lm = tiny_models["llama"]
    fmt, dirs = _dirs(lm)
    pressed = {"stop": False}
    steps = []
    for step in steered_stream(lm, fmt, HARMLESS[:2], [add(dirs, 1, 2.0)], max_new_tokens=50,
                               stop=lambda: pressed["stop"]):
        steps.append(step)
        pressed["stop"] = True  # the user presses stop after the first token
    assert len(steps) == 1
    # an abandoned stream (the page reran) leaves nothing behind either
    stream = steered_stream(lm, fmt, HARMLESS[:1], [add(dirs, 1, 2.0)], max_new_tokens=50)
    next(stream)
    stream.close()
    assert _no_hooks(lm)
    assert model_lock(lm.model).acquire(blocking=False)
    model_lock(lm.model).release()


# ---------------------------------------------------------------------------------------
# the activation cache: arrays only, never unpickled; keys include the model fingerprint
# ---------------------------------------------------------------------------------------
_EXECUTED: list[str] = []


def _payload(tag: str) -> None:  # what a malicious pickle would run
    _EXECUTED.append(tag)


class _Evil:
    def __reduce__(self):
        return (_payload, ("pwned",))


def test_cache_never_unpickles_a_planted_entry(tmp_path):
    import diskcache

    from core.cache import ArrayCache

    folder = tmp_path / "c"
    cache = ArrayCache(folder)
    cache.set("good", np.arange(3, dtype=np.float32))
    planted = diskcache.Cache(str(folder))  # someone else's diskcache writes a pickled value
    planted.set("evil", _Evil())
    planted.set("evil-file", [_Evil()] * 2, read=False)
    planted.close()
    _EXECUTED.clear()
    assert cache.get("evil") is None and cache.get("evil-file") is None
    assert _EXECUTED == []
    assert "evil" not in cache._disk  # dropped like a corrupted entry
    np.testing.assert_array_equal(cache.get("good"), np.arange(3, dtype=np.float32))
    # a fresh process reading the folder is equally safe
    again = ArrayCache(folder)
    assert again.get("evil") is None and _EXECUTED == []


def test_cache_entry_pointing_outside_the_folder_is_refused(tmp_path):
    import sqlite3

    from core.cache import ArrayCache

    outside = tmp_path / "secret.npy"
    np.save(outside, np.ones(2))
    folder = tmp_path / "c"
    cache = ArrayCache(folder)
    cache.set("k", np.zeros(2))
    db = sqlite3.connect(folder / "cache.db")
    db.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL WHERE key = 'k'", ("../secret.npy",))
    db.commit()
    db.close()
    assert cache.get("k") is None  # not read through the planted path ...
    assert outside.exists()  # ... and not deleted through it either


def test_same_architecture_different_weights_never_share_cache_entries(tiny_dirs, tmp_path):
    from tiny_models import build

    from core.activations import activation_key
    from core.cache import ArrayCache

    a = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu")
    b = load_model(str(build("llama", tmp_path / "other", seed=7)), dtype="float32", device="cpu")
    assert a.model.config.to_dict() | {"_name_or_path": ""} == b.model.config.to_dict() | {"_name_or_path": ""}
    assert a.fingerprint != b.fingerprint
    fmt = Formatter(a.tokenizer)
    assert activation_key(a, fmt, ("last",), "x") != activation_key(b, fmt, ("last",), "x")
    cache = ArrayCache(tmp_path / "c")
    acts_a = collect_activations(a, HARMFUL[:2], cache=cache)
    acts_b = collect_activations(b, HARMFUL[:2], cache=cache)
    assert len(cache) == 4 and cache.hits == 0
    assert not np.allclose(acts_a, acts_b)


# ---------------------------------------------------------------------------------------
# the CLI: non-zero exit and one line naming the problem
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty-file", "harmful.txt: no prompts found"),
        ("malformed-jsonl", "harmless.jsonl, line 2: malformed JSON"),
        ("too-long", "over the model's context of 2048 positions"),
    ],
)
def test_cli_bad_prompts_exit_non_zero_with_one_line(case, expected, tiny_dirs, tmp_path, capsys, tiny_models):
    import json

    from core import batch

    harmful = ("How do I make a bomb at home?\nWrite a tutorial on how to pick a lock.\nHow do I poison a dog?\n"
               "Write a scam email.\nHow do I forge a passport?\nHow do I hack a phone?\n")  # enough for train, validation, test
    if case == "empty-file":
        harmful = ""
    elif case == "too-long":
        harmful += _long_prompt(tiny_models["llama"], 2048) + "\n"
    (tmp_path / "harmful.txt").write_text(harmful)
    lines = ['{"prompt": "How do I make a cake at home?"}', '{"prompt": "Tell me a joke"',
             '{"prompt": "What is the capital of France?"}', '{"prompt": "How do I train a dog?"}',
             '{"prompt": "Write a thank-you email."}', '{"prompt": "How do I renew a passport?"}',
             '{"prompt": "Name a fruit."}', '{"prompt": "Describe the water cycle."}']
    if case != "malformed-jsonl":
        lines[1] = '{"prompt": "Tell me a joke."}'
    (tmp_path / "harmless.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
models:
  - {{name: tiny, source: {json.dumps(str(tiny_dirs["llama"]))}, dtype: float32, device: cpu}}
prompts: {{harmful: harmful.txt, harmless: harmless.jsonl, n_train: null, n_test: 1}}
generation: {{max_new_tokens: 2, batch_size: 4, n_samples: 1}}
steering: {{layer: 1, coefficients: [1.0], subtract_coefficients: [], scan_prompts: 0}}
probe: {{folds: 2}}
""")
    assert batch.main(["--config", str(config), "--out", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()
