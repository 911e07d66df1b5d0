"""Activation patching on tiny real-architecture models (GPT-2, GPT-NeoX, Llama) and one
embedded-model sanity check. No timing asserts (see bench/bench_patching.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.formatting import Formatter
from core.generation import next_token_logits
from core.metrics import refusal_score
from core.patching import (
    EXCLUDE_COMPLIANT_REFUSES,
    EXCLUDE_NOT_REFUSING,
    Patch,
    PatchingError,
    aggregate,
    patch_pair,
    patch_pairs,
    run_patches,
)

# equal token length under the tiny tokenizers (checked in the fixture below)
REF = "How do I make a bomb at home?"
COMP = "How do I make a bread at home?"
PAIRS = [
    (REF, COMP),
    ("How do I make a lock at home?", "How do I make a joke at home?"),
    ("Tell me how to hack a computer network", "Tell me how to hack a computer tutorial"),
]
SOME_IDS = [5, 17, 42, 99]  # arbitrary "refusal" tokens for random models


@pytest.fixture
def fmt(tiny):
    f = Formatter(tiny.tokenizer)
    assert f.token_count(REF) == f.token_count(COMP)
    return f


def _all_sites(lm):
    return ("resid", "attn", "mlp", "head")


def test_self_patch_changes_nothing(tiny, fmt):
    """Patching any site with the base run's own activations leaves the score unchanged."""
    for cache in (True, False):
        r = patch_pair(tiny, fmt, REF, REF, sites=_all_sites(tiny), refusal_ids=SOME_IDS,
                       skip_shared_prefix=False, prefix_cache=cache)
        for site in r.sites:
            assert r.computed[site].all()
            np.testing.assert_allclose(r.scores[site], r.m_refusal, atol=1e-4)


def test_effect_zero_in_shared_prefix_and_one_at_last_layer(tiny, fmt):
    r = patch_pair(tiny, fmt, REF, COMP, sites=("resid", "attn", "mlp"), refusal_ids=SOME_IDS,
                   skip_shared_prefix=False)
    L, T = r.effects["resid"].shape
    assert T == len(r.tokens) == fmt.token_count(REF)
    assert abs(r.gap) > 1e-3
    # positions before the first differing token: identical activations, effect 0 (here run)
    np.testing.assert_allclose(r.effects["resid"][:, : r.shared_prefix], 0.0, atol=1e-3)
    # the last block's output at the last position decides the logits: effect exactly 1
    np.testing.assert_allclose(r.effects["resid"][L - 1, T - 1], 1.0, atol=1e-3)
    np.testing.assert_allclose(r.scores["resid"][L - 1, T - 1], r.m_compliant, atol=1e-4)
    # ... and earlier positions of the last block cannot reach the last position any more
    np.testing.assert_allclose(r.effects["resid"][L - 1, : T - 1], 0.0, atol=1e-3)


def test_last_layer_every_position_gives_compliant_logits(tiny, fmt):
    """Residual stream of the last layer at every position = the compliant run (effect 1)."""
    L = tiny.n_layers
    r = patch_pair(tiny, fmt, REF, COMP, sites=("resid",), by_position=False, refusal_ids=SOME_IDS)
    np.testing.assert_allclose(r.effects["resid"], 1.0, atol=1e-3)  # every layer, by construction
    logits = next_token_logits(tiny, fmt, [COMP])
    out = run_patches(tiny, fmt, REF, COMP, [Patch("resid", L - 1)], refusal_ids=SOME_IDS)
    np.testing.assert_allclose(out["scores"][0], refusal_score(logits, SOME_IDS)[0], atol=1e-4)
    np.testing.assert_allclose(out["effects"][0], 1.0, atol=1e-3)


def test_batched_equals_one_at_a_time(tiny, fmt):
    kw = dict(sites=_all_sites(tiny), by_position=True, refusal_ids=SOME_IDS)
    fast = patch_pair(tiny, fmt, REF, COMP, **kw)
    slow = patch_pair(tiny, fmt, REF, COMP, prefix_cache=False, max_rows=1, **kw)
    assert fast.used_prefix_cache and not slow.used_prefix_cache
    assert fast.n_forward < slow.n_forward and fast.n_tokens < slow.n_tokens
    for site in fast.sites:
        assert fast.effects[site].shape == slow.effects[site].shape
        np.testing.assert_array_equal(fast.computed[site], slow.computed[site])
        np.testing.assert_allclose(fast.scores[site], slow.scores[site], atol=2e-4, equal_nan=True)
    # the shared-prefix shortcut: exact zeros, not run
    assert not fast.computed["resid"][:, : fast.shared_prefix].any()
    assert (fast.effects["resid"][:, : fast.shared_prefix] == 0).all()
    assert fast.computed["resid"][:, fast.shared_prefix:].all()


def test_all_heads_equal_attention_output(tiny, fmt):
    """Heads are slices of the output projection's input: all of them = the attention output."""
    L = tiny.n_layers
    patches = [Patch("head", layer) for layer in range(L)] + [Patch("attn", layer) for layer in range(L)]
    out = run_patches(tiny, fmt, REF, COMP, patches, refusal_ids=SOME_IDS)
    np.testing.assert_allclose(out["scores"][:L], out["scores"][L:], atol=1e-4)
    # and the single-head sweep is not trivially the same for every head
    r = patch_pair(tiny, fmt, REF, COMP, sites=("head", "attn"), by_position=False, refusal_ids=SOME_IDS)
    assert r.effects["head"].shape == (L, tiny.n_heads)
    assert np.ptp(r.effects["head"]) > 1e-3
    np.testing.assert_allclose(r.scores["attn"], out["scores"][L:], atol=1e-4)


def test_reverse_direction(tiny, fmt):
    r = patch_pair(tiny, fmt, REF, COMP, sites=("resid",), direction="refusal->compliant", refusal_ids=SOME_IDS)
    L, T = r.effects["resid"].shape
    assert r.m_base == r.m_compliant and r.m_source == r.m_refusal
    np.testing.assert_allclose(r.scores["resid"][L - 1, T - 1], r.m_refusal, atol=1e-4)
    assert patch_pair(tiny, fmt, REF, COMP, sites="resid", direction="noise", refusal_ids=SOME_IDS).direction == "refusal->compliant"
    with pytest.raises(PatchingError):
        patch_pair(tiny, fmt, REF, COMP, direction="sideways")
    with pytest.raises(PatchingError):
        patch_pair(tiny, fmt, REF, COMP, sites=("neurons",))


def test_positions_option(tiny, fmt):
    r = patch_pair(tiny, fmt, REF, COMP, sites="resid", positions="diff+suffix", refusal_ids=SOME_IDS)
    ran = r.computed["resid"].any(0)
    T = len(r.tokens)
    assert ran[T - 1] and ran[r.shared_prefix]
    assert ran.sum() < T - r.shared_prefix + 1
    r2 = patch_pair(tiny, fmt, REF, COMP, sites="resid", positions=[-1], refusal_ids=SOME_IDS)
    assert np.isfinite(r2.effects["resid"][:, -1]).all() and np.isnan(r2.effects["resid"][:, :-1]).all()


def test_unequal_lengths_align_on_suffix(tiny):
    fmt = Formatter(tiny.tokenizer)
    a, b = "How do I make a bomb at home?", "How do I make a cake at home?"
    assert fmt.token_count(a) != fmt.token_count(b)
    r = patch_pair(tiny, fmt, a, b, sites=("resid", "attn"), by_position=("resid",), refusal_ids=SOME_IDS)
    assert r.alignment == "suffix" and r.notes and "unequal token lengths" in r.notes[0]
    eff = r.effects["resid"]
    assert np.isnan(eff).any()  # unaligned instruction positions
    np.testing.assert_allclose(eff[-1, -1], 1.0, atol=1e-3)
    assert np.isfinite(r.effects["attn"]).all()


def _behaviour_ids(lm, fmt, refusing: str, complying: str) -> list[int]:
    """Token ids that make ``refusing`` score > 0 and ``complying`` < 0 on a random model."""
    logits = next_token_logits(lm, fmt, [refusing, complying])
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs[0] - probs[1], descending=True)
    for k in range(1, logits.shape[1]):
        ids = order[:k].tolist()
        s = refusal_score(logits, ids)
        if s[0] > 0.01 and s[1] < -0.01:
            return ids
    pytest.fail("could not find token ids separating the two prompts")


def test_exclusions_and_aggregate(tiny, fmt):
    ids = _behaviour_ids(tiny, fmt, REF, COMP)
    pairs = [(REF, COMP), (COMP, REF), (REF, REF), (REF, COMP)]
    sweep = patch_pairs(tiny, fmt, pairs, sites=("resid", "attn", "mlp", "head"), refusal_ids=ids)
    # expected reasons from the clean scores alone
    for e in sweep.excluded:
        expected = EXCLUDE_NOT_REFUSING if e["m_refusal"] <= 0 else EXCLUDE_COMPLIANT_REFUSES
        assert e["reason"] == expected
    assert sweep.n_candidates == 4 and sweep.n_used == 2 and sweep.n_excluded == 2
    assert sweep.exclusion_counts == {EXCLUDE_NOT_REFUSING: 1, EXCLUDE_COMPLIANT_REFUSES: 1}
    for p in sweep.pairs:
        assert p.m_refusal > 0 > p.m_compliant
    # two identical used pairs: zero variance, so cells with effect 1 are critical
    st = sweep.sites["resid"]
    assert st.mean.shape == (tiny.n_layers, len(st.offsets)) and st.offsets[-1] == -1
    assert st.n[-1, -1] == 2
    assert any(c.site == "resid" and c.layer == tiny.n_layers - 1 and c.offset == -1 for c in sweep.critical)
    assert sweep.critical == sorted(sweep.critical, key=lambda c: -c.effect)
    assert all(c.lo > sweep.threshold for c in sweep.critical)
    assert sweep.sites["attn"].mean.shape == (tiny.n_layers,)
    assert sweep.sites["head"].mean.shape == (tiny.n_layers, tiny.n_heads)
    d = json.loads(json.dumps(sweep.to_dict(), allow_nan=False))
    assert d["critical_message"] and d["n_used"] == 2 and d["pairs"][0]["top"]["resid"][0]["effect"] >= 0.999
    full = json.loads(json.dumps(sweep.to_dict(include_pairs=True), allow_nan=False))
    assert len(full["pairs"][0]["effects"]["resid"]) == tiny.n_layers
    # n_pairs limits the candidates; require_behaviour=False keeps every pair
    kept = patch_pairs(tiny, fmt, pairs, sites=("attn",), n_pairs=3, refusal_ids=ids, require_behaviour=False)
    assert kept.n_candidates == 3 and kept.n_used == 2 and kept.exclusion_counts == {
        "refusal and compliant scores are equal": 1}
    gap = abs(sweep.pairs[0].gap)
    strict = patch_pairs(tiny, fmt, pairs[:1], sites=("attn",), refusal_ids=ids, min_gap=gap * 1.01)
    assert strict.n_used == 0 and strict.exclusion_counts == {"score gap below min_gap": 1}
    rel = patch_pairs(tiny, fmt, pairs, sites=("attn",), refusal_ids=ids, require_behaviour="relative")
    assert rel.n_used == 2 and rel.exclusion_counts == {"refusal run does not score above the compliant run": 2}


def test_interval_and_empty_critical(tiny, fmt):
    sweep = patch_pairs(tiny, fmt, PAIRS, sites=("attn",), refusal_ids=SOME_IDS, require_behaviour=False,
                        threshold=1e9)
    assert sweep.n_used == 3 and sweep.critical == []
    assert "no site qualifies" in sweep.critical_message
    st = sweep.sites["attn"]
    eff = np.stack([p.effects["attn"] for p in sweep.pairs])
    np.testing.assert_allclose(st.mean, eff.mean(0))
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * eff.std(0, ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(st.hi - st.mean, half, rtol=1e-9)
    stats_, crit, msg = aggregate([], threshold=0.1)
    assert stats_ == {} and crit == [] and "no pairs" in msg
    json.dumps(sweep.to_dict(), allow_nan=False)


@pytest.mark.slow
def test_embedded_real_pair(embedded):
    """SmolLM2 with the prompted-refusal preset, one built-in pair, residual stream by position.
    Structural checks only: they hold whatever the preset makes the model say."""
    from core.formatting import PRESETS
    from core.prompts import load_pairs

    fmt = Formatter(embedded.tokenizer, PRESETS["prompted-refusal"])
    harmful, harmless = load_pairs()[0]
    r = patch_pair(embedded, fmt, harmful, harmless, sites=("resid",), positions="all")
    L, T = r.effects["resid"].shape
    assert L == 30 and T == fmt.token_count(harmful)
    assert r.used_prefix_cache and not r.notes  # the cache shortcut agreed with the plain run
    assert 100 < r.shared_prefix < T  # preamble and template are shared: exact zeros, not run
    assert (r.effects["resid"][:, : r.shared_prefix] == 0).all()
    assert r.computed["resid"][:, r.shared_prefix:].all()
    assert abs(r.gap) > 1e-3
    # the last block's output at the last token decides the first response token
    np.testing.assert_allclose(r.scores["resid"][L - 1, T - 1], r.m_compliant, atol=1e-3)
    # the last block at earlier positions cannot reach the last token any more
    np.testing.assert_allclose(r.scores["resid"][L - 1, : T - 1], r.m_refusal, atol=1e-3)
    json.dumps(r.to_dict(), allow_nan=False)
