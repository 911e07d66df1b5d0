import json
import warnings

import pytest

from core.errors import PromptFileError
from core.formatting import PRESETS, Formatter, Preamble
from core.prompts import (
    DuplicatePromptsWarning,
    builtin_split,
    load_pairs,
    load_prompt_set,
    parse_prompt_bytes,
    split_prompts,
)


def test_chat_template_used_when_present(tiny_models):
    fmt = Formatter(tiny_models["llama"].tokenizer)
    text = fmt.format("Hi there")
    assert text.endswith("<|im_start|>assistant\n") and "Hi there" in text


def test_base_template_without_chat_template(tiny_models):
    fmt = Formatter(tiny_models["gpt2"].tokenizer)
    assert fmt.format("Hi there") == "Question: Hi there\nAnswer:"
    fmt2 = Formatter(tiny_models["gpt2"].tokenizer, base_template="Q: {prompt}\nA:")
    assert fmt2.format("x") == "Q: x\nA:"
    with pytest.raises(ValueError, match="{prompt}"):
        Formatter(tiny_models["gpt2"].tokenizer, base_template="no slot")


def test_preamble_demonstrations_come_first(tiny_models):
    for arch in ("llama", "gpt2"):
        fmt = Formatter(tiny_models[arch].tokenizer, PRESETS["prompted-refusal"])
        text = fmt.format("Final question?")
        first_demo = PRESETS["prompted-refusal"].demonstrations[0][0]
        assert text.index(first_demo) < text.index("Final question?")
        assert "I'm sorry" in text


def test_custom_preamble_changes_key(tiny_models):
    tok = tiny_models["llama"].tokenizer
    a = Formatter(tok).key()
    b = Formatter(tok, Preamble("custom", "Be terse.")).key()
    assert a != b and a == Formatter(tok).key()


def test_builtin_sets_sizes_and_split_is_deterministic():
    harmful = load_prompt_set("builtin:harmful")
    harmless = load_prompt_set("builtin:harmless")
    assert len(harmful) >= 160 and len(harmless) >= 160
    s1, s2 = builtin_split("harmful", seed=0), builtin_split("harmful", seed=0)
    assert s1 == s2
    assert not set(s1.train) & set(s1.test)
    assert builtin_split("harmful", seed=1).test != s1.test
    assert len(load_pairs()) >= 40


def test_builtin_pairs_have_equal_token_length(embedded_tokenizer):
    fmt = Formatter(embedded_tokenizer)
    for harmful, harmless in load_pairs():
        assert fmt.token_count(harmful) == fmt.token_count(harmless), (harmful, harmless)


def test_txt_csv_jsonl(tmp_path):
    assert parse_prompt_bytes(b"a\n\nb\n", "x.txt") == ["a", "b"]
    assert parse_prompt_bytes(b"id,prompt\n1,hello\n2,world\n", "x.csv") == ["hello", "world"]
    assert parse_prompt_bytes(b'{"prompt": "a"}\n"b"\n', "x.jsonl") == ["a", "b"]
    p = tmp_path / "p.txt"
    p.write_text("one\ntwo\n")
    assert load_prompt_set(p) == ["one", "two"]


@pytest.mark.parametrize(
    "data, name, message",
    [
        (b"", "e.txt", "no prompts"),
        (b"\n  \n\n", "blank.txt", "no prompts"),
        (b"\xff\xfe\x00bad", "bad.txt", "UTF-8"),
        (b"id,score\n1,2\n", "x.csv", "no usable column"),
        (b'{"prompt": "a"}\n{broken\n', "x.jsonl", "line 2"),
        (b'{"text": "a"}\n', "x.jsonl", "line 1"),
        (b"a", "x.docx", "unsupported"),
    ],
)
def test_bad_files_get_clear_errors(data, name, message):
    with pytest.raises(PromptFileError, match=message):
        parse_prompt_bytes(data, name)


def test_size_limit():
    with pytest.raises(PromptFileError, match="limit"):
        parse_prompt_bytes(b"a\n" * 100, "big.txt", max_bytes=50)


def test_duplicates_dropped_with_warning():
    with pytest.warns(DuplicatePromptsWarning, match="1 duplicate"):
        assert parse_prompt_bytes(b"a\nA\nb\n", "d.txt") == ["a", "b"]


def test_split_prompts_validates():
    with pytest.raises(ValueError):
        split_prompts(["a", "b"], test_fraction=0)
