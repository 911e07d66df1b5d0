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
    benjamini_hochberg,
    bh_adjust,
    fixed_effect,
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


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_staggered_runner_matches_plain_runs(tmp_path, arch):
    """On decoders the staggered runner knows, each patched run joins at its own block from the
    base run's residual stream:
    fewer block computations, the same scores as plain full forward passes."""
    from core.models import load_model
    from tiny_models import build_more

    lm = load_model(str(build_more(arch, tmp_path / arch, n_layers=12)), dtype="float32", device="cpu")
    if arch == "gemma3_text":
        lm.model.config.final_logit_softcapping = 5.0  # Gemma 2 style: the runner must apply it too
    f = Formatter(lm.tokenizer)
    kw = dict(sites=("resid", "attn", "mlp", "head"), by_position=("resid",), refusal_ids=SOME_IDS)
    fast = patch_pair(lm, f, REF, COMP, **kw)
    slow = patch_pair(lm, f, REF, COMP, prefix_cache=False, **kw)
    assert fast.used_prefix_cache and not fast.notes
    assert fast.n_block_tokens < 0.6 * fast.n_tokens * lm.n_layers  # each row joins at its own block
    assert slow.n_block_tokens == slow.n_tokens * lm.n_layers
    for site in fast.sites:
        np.testing.assert_allclose(fast.scores[site], slow.scores[site], atol=2e-4, equal_nan=True)


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
    sweep = patch_pairs(tiny, fmt, pairs, sites=("resid", "attn", "mlp", "head"), refusal_ids=ids, min_gap=0)
    # expected reasons from the clean scores alone
    for e in sweep.excluded:
        expected = EXCLUDE_NOT_REFUSING if e["m_refusal"] <= 0 else EXCLUDE_COMPLIANT_REFUSES
        assert e["reason"] == expected
    assert sweep.n_candidates == 4 and sweep.n_used == 2 and sweep.n_excluded == 2
    assert sweep.exclusion_counts == {EXCLUDE_NOT_REFUSING: 1, EXCLUDE_COMPLIANT_REFUSES: 1}
    for p in sweep.pairs:
        assert p.m_refusal > 0 > p.m_compliant
    # two identical used pairs: zero variance, so every measured cell above the threshold is
    # critical -- but the last block's output at the last position (effect 1 by construction) is not
    st = sweep.sites["resid"]
    L = tiny.n_layers
    assert st.mean.shape == (L, len(st.offsets)) and st.offsets[-1] == -1
    assert st.n[-1, -1] == 2
    np.testing.assert_allclose(st.mean[L - 1, -1], 1.0, atol=1e-3)
    assert st.fixed[L - 1, -1] == 1.0 and st.by_construction.sum() == 1 and np.isnan(st.p[L - 1, -1])
    assert (st.fixed[L - 1, :-1] == 0).all() and not st.tested[L - 1].any()  # nothing reads them
    assert not any(c.site == "resid" and c.layer == L - 1 for c in sweep.critical)
    assert [c.label for c in sweep.by_construction] == [st.cell((L - 1, len(st.offsets) - 1)).label]
    measured = st.tested & (st.mean > sweep.threshold + 1e-6)
    assert measured.any()  # earlier layers at the last position carry the difference too
    assert sum(c.site == "resid" for c in sweep.critical) == measured.sum()
    assert sweep.critical == sorted(sweep.critical, key=lambda c: -c.effect)
    assert all(c.q is not None and c.q <= sweep.fdr for c in sweep.critical)
    assert "Benjamini" in sweep.critical_message and "by construction" in sweep.critical_message
    assert sweep.sites["attn"].mean.shape == (tiny.n_layers,)
    assert sweep.sites["head"].mean.shape == (tiny.n_layers, tiny.n_heads)
    d = json.loads(json.dumps(sweep.to_dict(), allow_nan=False))
    assert d["critical_message"] and d["n_used"] == 2 and d["pairs"][0]["top"]["resid"][0]["effect"] >= 0.999
    assert d["n_by_construction"] == 1 and d["n_tested"] == sweep.n_tested > 0 and "Benjamini" in d["test"]
    full = json.loads(json.dumps(sweep.to_dict(include_pairs=True), allow_nan=False))
    assert len(full["pairs"][0]["effects"]["resid"]) == tiny.n_layers
    # n_pairs limits the candidates; require_behaviour=False keeps every pair
    kept = patch_pairs(tiny, fmt, pairs, sites=("attn",), n_pairs=3, refusal_ids=ids, require_behaviour=False)
    assert kept.n_candidates == 3 and kept.n_used == 2 and kept.exclusion_counts == {
        "refusal and compliant scores are equal": 1}
    gap = abs(sweep.pairs[0].gap)
    strict = patch_pairs(tiny, fmt, pairs[:1], sites=("attn",), refusal_ids=ids, min_gap=gap * 1.01)
    assert strict.n_used == 0 and strict.exclusion_counts == {"score gap below min_gap": 1}
    assert patch_pairs(tiny, fmt, pairs[:1], sites=("attn",), refusal_ids=ids, min_gap=gap * 0.99).n_used == 1
    rel = patch_pairs(tiny, fmt, pairs, sites=("attn",), refusal_ids=ids, require_behaviour="relative", min_gap=0)
    assert rel.n_used == 2 and rel.exclusion_counts == {"refusal run does not score above the compliant run": 2}


def test_pooled_effect_interval_and_empty_critical(tiny, fmt):
    sweep = patch_pairs(tiny, fmt, PAIRS, sites=("attn",), refusal_ids=SOME_IDS, require_behaviour=False,
                        threshold=1e9)
    assert sweep.n_used == 3 and sweep.critical == []
    assert "no site qualifies" in sweep.critical_message
    st = sweep.sites["attn"]
    # pooled = Σ sign(gap)·(patched − base) / Σ|gap|, from the raw scores
    delta = np.stack([(p.scores["attn"] - p.m_base) * np.sign(p.gap) for p in sweep.pairs])
    gaps = np.abs([p.gap for p in sweep.pairs])
    np.testing.assert_allclose(st.mean, delta.sum(0) / gaps.sum(), rtol=1e-9)
    # Fieller's interval: its ends are where the two-sided t-test of |gap|·(effect − θ) = 0 sits at 5 %
    from scipy import stats

    eff = np.stack([p.effects["attn"] for p in sweep.pairs])
    for j in np.flatnonzero(np.isfinite(st.lo)):
        for theta in (st.lo[j], st.hi[j]):
            d = gaps * (eff[:, j] - theta)
            assert stats.ttest_1samp(d, 0.0).pvalue == pytest.approx(0.05, abs=1e-6)
        assert st.lo[j] <= st.mean[j] <= st.hi[j]
    stats_, crit, msg = aggregate([], threshold=0.1)
    assert stats_ == {} and crit == [] and "no pairs" in msg
    json.dumps(sweep.to_dict(), allow_nan=False)


def test_pooled_effect_resists_tiny_gaps():
    """One pair with a tiny gap and a modest score change must not dominate the pooled effect."""
    from core.patching import pooled_effect

    effects = np.array([[0.2], [0.25], [0.15], [0.22], [0.18], [0.3], [0.2], [30.0]])  # last: δ = 0.3, gap 0.01
    gaps = np.array([2.0, 3.0, 2.5, 2.0, 2.2, 3.0, 2.4, 0.01])
    pooled, lo, hi, n, p = pooled_effect(effects, gaps, 0.1)
    assert n[0] == 8 and pooled[0] == pytest.approx(4.041 / 17.11)  # a plain mean would say 3.94
    assert 0.1 < lo[0] < pooled[0] < hi[0] < 0.35 and p[0] < 0.01
    few = pooled_effect(effects[[0, 7]], gaps[[0, 7]], 0.1)
    assert np.isnan(few[1][0]) and np.isnan(few[2][0])  # two pairs, gaps 2 and 0.01: unbounded, said as NaN
    same = pooled_effect(effects[:3], np.ones(3), 0.0)
    np.testing.assert_allclose(same[0], effects[:3].mean(0))  # equal gaps: the plain mean
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * effects[:3].std(0, ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(same[2] - same[0], half, rtol=1e-9)  # ... and the t-interval


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


def test_benjamini_hochberg_on_known_p_values():
    from scipy import stats

    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, np.nan])  # NaN: not in the family (m = 5)
    # sorted 0.005 0.01 0.03 0.04 0.5 vs k/m·0.05 = 0.01 0.02 0.03 0.04 0.05: the first four
    np.testing.assert_array_equal(benjamini_hochberg(p, 0.05), [True, True, True, True, False, False])
    np.testing.assert_allclose(bh_adjust(p), [0.025, 0.05, 0.05, 0.025, 0.5, np.nan])
    # step-up: 0.03 misses its own bound (0.025) but is rejected because 0.04 ≤ 0.05
    np.testing.assert_array_equal(benjamini_hochberg(np.array([0.03, 0.04]), 0.05), [True, True])
    np.testing.assert_array_equal(benjamini_hochberg(np.array([0.03, 0.06]), 0.05), [False, False])
    assert not benjamini_hochberg(np.full(3, np.nan), 0.05).any()
    rng = np.random.default_rng(0)
    many = rng.uniform(size=(7, 9)) ** 3
    np.testing.assert_allclose(bh_adjust(many), stats.false_discovery_control(many.ravel()).reshape(7, 9))


def test_one_sided_t_test_matches_scipy():
    from scipy import stats

    from core.patching import t_test_greater

    x = np.random.default_rng(1).normal(0.3, 0.2, size=(6, 4))
    x[0, 1] = np.nan
    for j in range(4):
        col = x[:, j][np.isfinite(x[:, j])]
        expected = stats.ttest_1samp(col, 0.1, alternative="greater").pvalue
        assert t_test_greater(x, 0.1)[j] == pytest.approx(expected, rel=1e-9)
    assert np.isnan(t_test_greater(x[:1], 0.1)).all()  # one pair: no test
    np.testing.assert_array_equal(t_test_greater(np.array([[0.5, 0.0], [0.5, 0.0]]), 0.1), [0.0, 1.0])


def test_fixed_effect_rules():
    kw = dict(n_layers=4, T=10, shared_prefix=3, equal_length=True)
    assert fixed_effect("resid", 3, [9], **kw) == 1.0  # last block, last position
    assert fixed_effect("resid", 3, [5], **kw) == 0.0  # last block, a position nothing reads
    assert fixed_effect("mlp", 3, [5], **kw) == 0.0 and fixed_effect("attn", 3, [9], **kw) is None
    assert fixed_effect("resid", 2, [9], **kw) is None  # the next block still reads other positions
    assert fixed_effect("resid", 1, list(range(3, 10)), **kw) == 1.0  # a whole layer
    assert fixed_effect("resid", 1, list(range(3, 10)), **{**kw, "equal_length": False}) is None
    assert fixed_effect("resid", 1, [0, 2], **kw) == 0.0  # inside the shared prefix
    assert fixed_effect("head", 1, list(range(3, 10)), **kw) is None


def test_fixed_cells_match_the_measurement(tiny, fmt):
    """What fixed_effect claims holds on a real model: 1 cells give the source score, 0 cells the base."""
    r = patch_pair(tiny, fmt, REF, COMP, sites=("resid", "attn", "mlp"), by_position=True, refusal_ids=SOME_IDS)
    L, T = r.effects["resid"].shape
    for site in r.sites:
        fixed = r.fixed[site]
        known = np.isfinite(fixed) & np.isfinite(r.effects[site])
        np.testing.assert_allclose(r.effects[site][known], fixed[known], atol=1e-3)
        assert np.isnan(fixed[: L - 1, T - 1]).all()  # measured, not assumed
    assert r.fixed["resid"][L - 1, T - 1] == 1.0 and np.isnan(r.fixed["attn"][L - 1, T - 1])
    layer = patch_pair(tiny, fmt, REF, COMP, sites=("resid", "mlp"), by_position=False, refusal_ids=SOME_IDS)
    assert (layer.fixed["resid"] == 1.0).all() and np.isnan(layer.fixed["mlp"]).all()
    out = run_patches(tiny, fmt, REF, COMP, [Patch("resid", L - 1, (-1,)), Patch("resid", 0, (-1,))],
                      refusal_ids=SOME_IDS)
    assert out["fixed"][0] == 1.0 and np.isnan(out["fixed"][1])


def test_report_wording_follows_direction(tiny, fmt):
    from core.report import patching_summary

    ids = _behaviour_ids(tiny, fmt, REF, COMP)
    for direction, words in (("compliant->refusal", "harmless activations patched into the harmful run"),
                             ("refusal->compliant", "harmful activations patched into the harmless run")):
        sweep = patch_pairs(tiny, fmt, [(REF, COMP)] * 2, sites=("resid",), refusal_ids=ids, min_gap=0,
                            direction=direction)
        text = " ".join(patching_summary(sweep.to_dict()))
        assert words in text and "Benjamini" in text and "by construction" in text
