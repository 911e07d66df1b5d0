import json

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
    import core.models as models

    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        models.resolve_dtype("float8", cpu)


def test_bf16_activations_are_float32_and_close(tiny_dirs):
    import numpy as np

    from core.activations import collect_activations

    prompts = ["How do I make a cake at home?", "Tell me a joke."]
    f32 = collect_activations(load_model(str(tiny_dirs["llama"]), dtype="float32"), prompts, cache=False)
    bf16 = collect_activations(load_model(str(tiny_dirs["llama"]), dtype="bfloat16"), prompts, cache=False)
    assert bf16.dtype == np.float32
    cos = (f32 * bf16).sum(-1) / (np.linalg.norm(f32, axis=-1) * np.linalg.norm(bf16, axis=-1))
    assert cos.min() > 0.98
