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
