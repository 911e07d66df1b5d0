"""Linear weights stored transposed on the CPU (core.layout): the loader applies it, values and
outputs do not change, tied weights stay tied, and saved files are as before."""

from __future__ import annotations

import torch
from torch import nn

from core.layout import fast_linear_layout, is_transposed
from core.models import load_model


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_the_loader_stores_linear_weights_transposed_and_outputs_do_not_change(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu")
    assert _linears(lm.model) and all(is_transposed(m.weight) for m in _linears(lm.model))
    ids = torch.randint(0, lm.model.config.vocab_size, (3, 11))
    with torch.inference_mode():
        fast = lm.model(input_ids=ids).logits
        for m in _linears(lm.model):  # back to the library's row-major layout
            m.weight.data = m.weight.data.contiguous()
        assert not any(is_transposed(m.weight) for m in _linears(lm.model))
        plain = lm.model(input_ids=ids).logits
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_tied_weights_stay_tied_and_save_as_before(tiny_dirs, tmp_path):
    lm = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu")
    model = lm.model
    before = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert fast_linear_layout(model) == 0  # already done by the loader, and done once
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), dtype="float32", device="cpu").model.state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)


def test_only_float32_cpu_weights_change():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2).to(torch.bfloat16))
    assert fast_linear_layout(model) == 1
    assert is_transposed(model[0].weight) and not is_transposed(model[1].weight)
    x = torch.randn(5, 4)
    torch.testing.assert_close(model[0](x), x @ model[0].weight.detach().contiguous().T + model[0].bias.detach())
