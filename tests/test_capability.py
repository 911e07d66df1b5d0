"""Teacher-forced capability cost on tiny models, checked against a plain forward pass."""

import numpy as np
import pytest
import torch

from core.capability import answer_costs
from core.formatting import Formatter
from core.generation import generate
from core.steering import add, edits_for

from test_steering import HARMLESS, tiny_dirs_for


def test_answer_cost_matches_a_plain_forward_and_grows_with_the_push(tiny):
    fmt, dirs = tiny_dirs_for(tiny)
    answers = generate(tiny, fmt, HARMLESS, max_new_tokens=6)
    costs = answer_costs(tiny, fmt, HARMLESS, answers, {
        "none": None, "small": edits_for(tiny, [add(dirs, 1, 0.5)]), "big": edits_for(tiny, [add(dirs, 1, 8.0)]),
    }, batch_size=3)
    assert costs["none"].kl == pytest.approx(0.0, abs=1e-5)
    assert costs["none"].ce == pytest.approx(costs["none"].ce_clean, abs=1e-5)
    assert costs["big"].kl > costs["small"].kl > 0
    # the clean cross-entropy equals the unbatched, unpadded computation
    nll, n = 0.0, 0
    for prompt, answer in zip(HARMLESS, answers):
        ans = tiny.tokenizer(answer, add_special_tokens=False)["input_ids"][:64]
        if not ans:
            continue
        enc = fmt.encode([prompt])
        ids = torch.tensor([enc.input_ids[0, : enc.lengths[0]].tolist() + ans])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0].float(), -1)
        p = enc.lengths[0]
        nll -= float(sum(logp[p - 1 + j, t] for j, t in enumerate(ans)))
        n += len(ans)
    assert costs["none"].n_tokens == n
    assert costs["none"].ce_clean == pytest.approx(nll / n, rel=1e-3, abs=1e-4)
    d = costs["big"].to_dict()
    assert d["ce_increase"] == pytest.approx(d["ce"] - d["ce_clean"]) and np.isfinite(d["kl_per_token"])


def test_answer_cost_with_a_shared_preamble_matches_a_plain_forward(tiny_models):
    """With a preamble the shared prompt prefix runs once per batch; the numbers stay those of
    full, unshared forward passes (edits included: they apply to the prefix too)."""
    from core import forward
    from core.formatting import get_preamble
    from core.hooks import TraceDict

    lm = tiny_models["llama"]
    _, dirs = tiny_dirs_for(lm)
    fmt = Formatter(lm.tokenizer, get_preamble("prompted-refusal"))
    assert forward.prepare(fmt, HARMLESS, padding_side="left").prefix_len > 0
    answers = generate(lm, fmt, HARMLESS, max_new_tokens=5)
    edits = edits_for(lm, [add(dirs, 1, 2.0)])
    costs = answer_costs(lm, fmt, HARMLESS, answers, {"add": edits}, batch_size=3)
    nll, nll_add, n = 0.0, 0.0, 0
    for prompt, answer in zip(HARMLESS, answers):
        ans = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ans:
            continue
        enc = fmt.encode([prompt])
        p = enc.lengths[0]
        ids = torch.tensor([enc.input_ids[0, :p].tolist() + ans])
        for key, e in (("clean", None), ("add", edits)):
            with torch.no_grad(), TraceDict(lm.model, list(e or {}), retain_output=False, edit_output=e):
                logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
            total = -float(sum(logp[p - 1 + j, t] for j, t in enumerate(ans)))
            nll, nll_add = (nll + total, nll_add) if key == "clean" else (nll, nll_add + total)
        n += len(ans)
    assert n > 0 and costs["add"].n_tokens == n
    assert costs["add"].ce_clean == pytest.approx(nll / n, rel=1e-4, abs=1e-5)
    assert costs["add"].ce == pytest.approx(nll_add / n, rel=1e-4, abs=1e-5)
    assert abs(costs["add"].ce - costs["add"].ce_clean) > 1e-3  # the edit matters, so the check can fail
