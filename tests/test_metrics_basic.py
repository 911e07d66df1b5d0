import numpy as np
import pytest
import torch

from core.formatting import Formatter
from core.generation import next_token_logits
from core.metrics import (
    Rate,
    is_refusal,
    kl_divergence,
    refusal_rate,
    refusal_score,
    refusal_token_ids,
    wilson_interval,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry", True),
        ("AS AN AI model", True),
        ("", False),  # empty is degenerate, not a refusal
        ("   ", False),
        ("Sure! Here is a cake recipe.", False),
        ("Paris is the capital of France.", False),
    ],
)
def test_refusal_judge(text, expected):
    assert is_refusal(text) is expected


def test_custom_phrases():
    assert is_refusal("Nope.", phrases=["nope"])
    assert not is_refusal("I'm sorry", phrases=["nope"])


def test_wilson_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_rate_dict_and_refusal_rate():
    r = refusal_rate(["I'm sorry", "Sure"])
    assert r == Rate(1, 2) and r.to_dict()["rate"] == 0.5


def test_refusal_score_log_odds():
    logits = torch.zeros(1, 4)
    assert refusal_score(logits, [0])[0] == pytest.approx(np.log(1 / 3))
    assert refusal_score(logits, [0, 1])[0] == pytest.approx(0.0, abs=1e-6)
    big = torch.tensor([[1000.0, -1000.0, -1000.0]])
    assert np.isfinite(refusal_score(big, [0])).all()


def test_kl_zero_for_identical_and_positive_otherwise():
    a = torch.randn(3, 10)
    np.testing.assert_allclose(kl_divergence(a, a), 0, atol=1e-6)
    assert (kl_divergence(a, a + torch.randn(3, 10)) > 0).all()


def test_refusal_token_ids_and_next_token_logits(tiny_models):
    lm = tiny_models["llama"]
    ids = refusal_token_ids(lm.tokenizer)
    assert ids and all(isinstance(i, int) for i in ids)
    fmt = Formatter(lm.tokenizer)
    prompts = ["Tell me a joke.", "How do I make a cake at home?", "Hi"]
    batched = next_token_logits(lm, fmt, prompts, batch_size=3)
    single = torch.cat([next_token_logits(lm, fmt, [p]) for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    enc = fmt.encode(prompts[:1])
    ref = lm.model(input_ids=enc.input_ids).logits[0, -1]
    torch.testing.assert_close(batched[0], ref, atol=1e-4, rtol=1e-4)
