"""Abliterated export: exact (logits equal runtime ablation) on every architecture it allows,
refused with the reason elsewhere. Tiny real architectures, loaded through the real loader."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.abliteration import EXACT, refusal_reason
from core.errors import AbliterationError, ExplorerError
from core.formatting import Formatter
from core.generation import next_token_logits
from core.models import load_model
from core.steering import ablate, export_abliterated, steered_logits
from test_steering import HARMFUL, HARMLESS, tiny_dirs_for
from tiny_models import build, build_more

# model_type -> how tests/tiny_models.py builds it
ARCH_BUILDERS = {"gpt2": (build, "gpt2"), "gpt_neox": (build, "neox"), "llama": (build, "llama"),
                 "gptj": (build, "gptj"), "mistral": (build_more, "mistral"), "qwen2": (build_more, "qwen2")}


def test_every_exact_architecture_is_tested():
    assert set(ARCH_BUILDERS) == set(EXACT)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("abliteration-models")
    cache: dict[str, object] = {}

    def get(model_type: str):
        if model_type not in cache:
            fn, arch = ARCH_BUILDERS.get(model_type, (build_more, model_type))
            cache[model_type] = load_model(str(fn(arch, root / arch)), dtype="float32", device="cpu")
        return cache[model_type]
    return get


@pytest.mark.parametrize("model_type", sorted(ARCH_BUILDERS))
def test_export_equals_runtime_ablation(built, model_type, tmp_path):
    lm = built(model_type)
    assert lm.model.config.model_type == model_type
    fmt, dirs = tiny_dirs_for(lm)
    v = dirs.direction(1)
    prompts = HARMFUL + HARMLESS
    runtime = steered_logits(lm, fmt, prompts, [ablate(v)])
    clean = next_token_logits(lm, fmt, prompts)
    exported = load_model(str(export_abliterated(lm, v, tmp_path / "abliterated")), dtype="float32", device="cpu")
    out = next_token_logits(exported, Formatter(exported.tokenizer), prompts)
    assert (runtime - clean).abs().max() > 1e-3  # the ablation does something: the test can fail
    assert torch.allclose(out, runtime, atol=2e-3 * max(1.0, runtime.abs().max().item()))
    assert torch.allclose(next_token_logits(lm, fmt, prompts), clean)  # the original is untouched


def test_gemma3_is_refused_with_the_reason(built, tmp_path, monkeypatch):
    lm = built("gemma3_text")
    fmt, dirs = tiny_dirs_for(lm)
    v = dirs.direction(1)
    with pytest.raises(AbliterationError, match="Gemma 3 normalises after o_proj") as err:
        export_abliterated(lm, v, tmp_path / "out")
    assert "use runtime ablation" in str(err.value) and isinstance(err.value, ExplorerError)
    assert not (tmp_path / "out").exists()  # refused before writing anything
    # the refusal is needed: forced through, orthogonalised weights do not match runtime ablation
    monkeypatch.setitem(EXACT, "gemma3_text", "Gemma 3")
    from core.steering import abliterate_model

    forced = dataclasses.replace(lm, model=abliterate_model(lm, v), fingerprint=lm.fingerprint + "-forced")
    out = next_token_logits(forced, fmt, HARMFUL + HARMLESS)
    runtime = steered_logits(lm, fmt, HARMFUL + HARMLESS, [ablate(v)])
    assert (out - runtime).abs().max() > 1e-2 * max(1.0, runtime.abs().max().item())


def test_refusal_reasons():
    assert refusal_reason("llama") is None and refusal_reason("gpt2") is None
    assert "embeddings" in refusal_reason("bloom") and "o_proj" in refusal_reason("gemma2")
    assert "'falcon' is not one where the export was checked" in refusal_reason("falcon")
