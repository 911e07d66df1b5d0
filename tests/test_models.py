import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ModelLoadError
from core.models import find_blocks, load_model


EXPECTED_BLOCKS = {"gpt2": "transformer.h", "neox": "gpt_neox.layers", "llama": "model.layers", "gptj": "transformer.h"}


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gptj"])
def test_block_discovery(tiny_models, arch):
    lm = tiny_models[arch]
    prefix = EXPECTED_BLOCKS[arch]
    assert lm.block_names == [f"{prefix}.{i}" for i in range(lm.n_layers)]
    assert lm.n_layers == lm.model.config.num_hidden_layers
    assert lm.d_model == 64
    assert all(name is not None for name in lm.attn_names + lm.mlp_names + lm.attn_out_names)
    for name in lm.attn_names + lm.mlp_names:
        lm.module(name)  # resolves
    assert not lm.model.training


def test_fallback_discovery_finds_unknown_layout(tiny_models):
    lm = tiny_models["llama"]

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.stack = inner.model.layers

    names = find_blocks(Wrapper(lm.model))
    assert names == [f"backbone.stack.{i}" for i in range(lm.n_layers)]


def test_fingerprint_depends_on_weights(tiny_dirs, tmp_path):
    from tiny_models import build

    a = load_model(str(tiny_dirs["gpt2"]), device="cpu")
    again = load_model(str(tiny_dirs["gpt2"]), device="cpu")
    other = load_model(str(build("gpt2", tmp_path / "other", seed=1)), device="cpu")
    assert a.fingerprint == again.fingerprint
    assert a.fingerprint != other.fingerprint


def test_chat_template_detected(tiny_models):
    assert tiny_models["llama"].has_chat_template
    assert not tiny_models["gpt2"].has_chat_template
    assert any("base-model template" in n for n in tiny_models["gpt2"].notes)


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="No such"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="No such GGUF"):
        load_model(str(tmp_path / "nope.gguf"))


def test_unknown_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="embedded"):
        load_model("nobody-here/no-such-model-xyz")


def test_layer_range_check(tiny_models):
    lm = tiny_models["gpt2"]
    assert lm.check_layer(-1) == lm.n_layers - 1
    with pytest.raises(ValueError, match="out of range"):
        lm.check_layer(lm.n_layers)


def test_summary_is_json(tiny_models):
    json.dumps(tiny_models["neox"].summary())


def test_auto_dtype_follows_the_cpu(monkeypatch):
    import core.dtypes as dtypes

    cpu = torch.device("cpu")
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: True)
    assert dtypes.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: False)
    assert dtypes.resolve_dtype("auto", cpu) == torch.float32
    assert dtypes.resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        dtypes.resolve_dtype("float8", cpu)


def test_bf16_activations_are_float32_and_close(tiny_dirs):
    import numpy as np

    from core.activations import collect_activations

    prompts = ["How do I make a cake at home?", "Tell me a joke."]
    f32 = collect_activations(load_model(str(tiny_dirs["llama"]), dtype="float32"), prompts, cache=False)
    bf16 = collect_activations(load_model(str(tiny_dirs["llama"]), dtype="bfloat16"), prompts, cache=False)
    assert bf16.dtype == np.float32
    cos = (f32 * bf16).sum(-1) / (np.linalg.norm(f32, axis=-1) * np.linalg.norm(bf16, axis=-1))
    assert cos.min() > 0.98


# -- the tokenizer fast path, the named sources and the loader's layering ------------------
SAMPLE_TEXTS = ["How do I make a cake at home?", "  two  spaces\nand a newline\t", "Ünïcödé 日本語 😀", "",
                "<|im_start|>user\nhi<|im_end|>", "x" * 120]


def _same_tokenizer(a, b) -> None:
    for text in SAMPLE_TEXTS:
        for kw in ({}, {"add_special_tokens": False}):
            assert a(text, **kw)["input_ids"] == b(text, **kw)["input_ids"], (text, kw)
        ids = a(text)["input_ids"]
        assert a.decode(ids) == b.decode(ids)
    assert a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "padding_side", "truncation_side", "chat_template",
                 "model_max_length"):
        assert getattr(a, attr) == getattr(b, attr), attr
    if a.chat_template:
        msgs = [{"role": "user", "content": "hi there"}]
        assert a.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == b.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_tokenizer_path_gives_the_auto_tokenizer(tiny_dirs, arch):
    """A folder that names the generic fast class is built straight from tokenizer.json, with the
    same tokens, specials, sides and chat template as AutoTokenizer gives."""
    from transformers import AutoTokenizer

    from core.loader import _fast_tokenizer_settings, load_tokenizer

    folder = tiny_dirs[arch]
    assert _fast_tokenizer_settings(folder) is not None  # the fast path is taken
    _same_tokenizer(load_tokenizer(folder), AutoTokenizer.from_pretrained(folder))


def test_declared_fast_tokenizer_keeps_its_padding_side(tiny_dirs, tmp_path):
    """A converted folder saves the tokenizer as the generic class with the sides its own class
    chose (GemmaTokenizer pads on the left)."""
    from transformers import AutoTokenizer

    from core.gguf import declare_fast_tokenizer
    from core.loader import FAST_TOKENIZER_CLASS, load_tokenizer

    original = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    original.padding_side = "left"
    original.save_pretrained(tmp_path)
    declare_fast_tokenizer(tmp_path, original)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == FAST_TOKENIZER_CLASS
    loaded = load_tokenizer(tmp_path)
    assert loaded.padding_side == "left"
    _same_tokenizer(loaded, original)


def test_folders_with_other_tokenizer_files_take_the_auto_tokenizer(tiny_dirs, tmp_path):
    import shutil

    from core.loader import _fast_tokenizer_settings

    folder = tmp_path / "copy"
    shutil.copytree(tiny_dirs["llama"], folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    assert _fast_tokenizer_settings(folder) is None
    config = json.loads((tiny_dirs["llama"] / "tokenizer_config.json").read_text())
    (folder / "special_tokens_map.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "LlamaTokenizer"}))
    assert _fast_tokenizer_settings(folder) is None
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"extra_special_tokens": ["<x>"]}))
    assert _fast_tokenizer_settings(folder) is None


def test_named_sources_resolve_above_the_loader(tiny_dirs):
    from core.sources import catalog, resolve

    names = catalog()
    assert {"embedded", "embedded-refusal", "gemma-3-270m"} <= set(names)
    assert names["embedded-refusal"].display.startswith("SmolLM2-135M-Instruct")
    folder = resolve(str(tiny_dirs["gpt2"]))
    assert folder.where == str(tiny_dirs["gpt2"]) and not folder.is_hub and folder.display == "gpt2"
    hub = resolve(" EleutherAI/pythia-70m ")
    assert hub.is_hub and hub.where == "EleutherAI/pythia-70m" and json.dumps(hub.to_dict())
    with pytest.raises(ModelLoadError, match="No such"):
        resolve("./no/such/folder")


def test_the_loader_does_not_know_the_organism():
    """The organism is built with the loader, so the loader side never imports it: importing it
    pulls in neither the organism nor the named sources, and core.models reaches the organism
    only through core.sources (no import of it anywhere in the loader's modules)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, core.loader, core.gguf, core.packaged_models, core.architecture, core.forward; "
            "bad = [m for m in sys.modules if m.startswith(('core.organism', 'core.sources'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    core = Path(__file__).resolve().parent.parent / "core"
    for name in ("models.py", "loader.py", "gguf.py", "packaged_models.py", "architecture.py"):
        tree = ast.parse((core / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.startswith("core.organism") for m in imported), name


# -- the compact tokenizer file and the rewrite of older converted folders -------------------
def test_compact_tokenizer_file_gives_the_same_tokenizer(tiny_dirs, tmp_path):
    """Merges become "a b" strings and indentation goes; the fast path then still gives what
    AutoTokenizer gives on the original folder."""
    import shutil

    from transformers import AutoTokenizer

    from core.gguf import compact_tokenizer_file
    from core.loader import load_tokenizer

    folder = tmp_path / "copy"
    shutil.copytree(tiny_dirs["llama"], folder)
    path = folder / "tokenizer.json"
    assert isinstance(json.loads(path.read_text())["model"]["merges"][0], list)  # saved as pairs
    assert compact_tokenizer_file(path)
    data = json.loads(path.read_text())
    assert all(isinstance(m, str) and len(m.split(" ")) == 2 for m in data["model"]["merges"])
    assert "\n" not in path.read_text().strip()
    assert not compact_tokenizer_file(path)  # already compact: left alone
    _same_tokenizer(load_tokenizer(folder), AutoTokenizer.from_pretrained(tiny_dirs["llama"]))


def test_merges_with_a_space_stay_pairs(tmp_path):
    """Without a pre-tokenizer a merge part can hold a space, which the string form cannot
    express: such merges are kept as pairs (the file is still minified) and the ids are unchanged."""
    from tokenizers import Tokenizer, models, trainers

    from core.gguf import compact_tokenizer_file

    tk = Tokenizer(models.BPE())
    tk.train_from_iterator(["a b a b a b", "ab ab ab b a"] * 20, trainers.BpeTrainer(vocab_size=30))
    path = tmp_path / "tokenizer.json"
    path.write_text(tk.to_str(pretty=True))
    assert any(" " in part for m in json.loads(path.read_text())["model"]["merges"] for part in m)
    assert compact_tokenizer_file(path)
    assert all(isinstance(m, list) for m in json.loads(path.read_text())["model"]["merges"])
    text = "a b ab ba b  a"
    assert Tokenizer.from_file(str(path)).encode(text).ids == tk.encode(text).ids


def test_older_converted_folder_is_rewritten_not_converted_again(tiny_dirs, tmp_path, monkeypatch):
    """A folder of a version that differs only in its tokenizer file becomes the current
    version's folder: weights hard-linked (same fingerprint), tokenizer compact and identical,
    the old folder untouched; a digest with no folder of any version needs the GGUF."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from core.fingerprints import fingerprint_folder
    from core.gguf import CONVERTER_VERSION, REWRITE_ONLY_FROM, converted_folder_name, existing_conversion
    from core.loader import load_tokenizer

    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(tmp_path))
    digest = "0123456789abcdef" * 4
    assert REWRITE_ONLY_FROM and CONVERTER_VERSION not in REWRITE_ONLY_FROM
    old = converted_folder_name("tiny", digest, REWRITE_ONLY_FROM[0])
    shutil.copytree(tiny_dirs["llama"], old)
    (old / "source.json").write_text(json.dumps({"sha256": digest, "converter": REWRITE_ONLY_FROM[0]}))
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    new = existing_conversion("tiny", digest)
    assert new == converted_folder_name("tiny", digest) and new.name.endswith(f"-v{CONVERTER_VERSION}")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # nothing written into the old folder
    weights = [p.name for p in old.iterdir() if p.suffix == ".safetensors"]
    assert weights and all((new / w).stat().st_ino == (old / w).stat().st_ino for w in weights)
    assert json.loads((new / "source.json").read_text())["converter"] == CONVERTER_VERSION
    assert isinstance(json.loads((new / "tokenizer.json").read_text())["model"]["merges"][0], str)
    config = AutoConfig.from_pretrained(old)
    assert fingerprint_folder(new, config) == fingerprint_folder(old, config)
    _same_tokenizer(load_tokenizer(new), AutoTokenizer.from_pretrained(old))
    assert existing_conversion("tiny", digest) == new  # found, not rewritten again
    assert existing_conversion("tiny", "f" * 64) is None



def _tiny_gguf(path: Path) -> str:
    """A one-block Llama GGUF file with a four-token vocabulary: metadata enough for transformers."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64), w.add_embedding_length(8), w.add_block_count(1), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2"), w.add_token_list(["a", "b", "c", "a b"]), w.add_token_merges(["a b"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(path)


def test_a_conversion_parses_the_gguf_metadata_once(monkeypatch, tmp_path):
    """Inside ``metadata_read_once`` transformers' calls share one parse of a GGUF file (each gets
    its own equal copy of the result); after it, the library's own functions are back."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from core.gguf import metadata_read_once

    parses: list[str] = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parses.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    real_load = gguf_utils.load_gguf_checkpoint
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    with metadata_read_once():
        first = gguf_utils.load_gguf_checkpoint(path, return_tensors=False)
        first["config"]["vocab_size"] = -1  # a caller editing its copy
        second = gguf_utils.load_gguf_checkpoint(path, return_tensors=False)
        reader = gguf.GGUFReader(path)
    assert parses == [path]
    assert second["config"]["vocab_size"] == 4 and second["tokenizer"]["tokens"] == ["a", "b", "c", "a b"]
    assert reader.fields["general.architecture"].contents() == "llama"
    assert gguf.GGUFReader is Counting and gguf_utils.load_gguf_checkpoint is real_load
    gguf_utils.load_gguf_checkpoint(path, return_tensors=False)
    assert len(parses) == 2  # outside the block each call parses again
