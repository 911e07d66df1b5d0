"""The position × layer candidate grid (core.selection): winner logic, scoring on a tiny model,
and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import SplitError
from core.formatting import Formatter
from core.selection import first_excluded_layer, grid_layers, pick_winner, select

from test_steering import HARMFUL, HARMLESS


def test_grid_layers_and_exclusion_use_the_block_input_convention():
    assert grid_layers(5) == [1, 2, 3, 4]  # the input of block 0 (the embedding) is no candidate
    assert grid_layers(10, 3) == [3, 6, 9]  # the last layer is always scored
    assert first_excluded_layer(30) == 24 and first_excluded_layer(10, 0.0) == 10


def _scores():
    bypass = np.array([[0.5, -1.0, -2.0, -3.0], [0.2, -0.5, 1.5, -4.0]])
    induce = np.array([[1.0, 1.0, -1.0, 2.0], [1.0, 0.5, 1.0, 2.0]])
    kl = np.array([[0.01, 0.05, 0.01, 0.01], [0.01, 0.2, 0.01, 0.01]])
    sep = np.array([[0.1, 0.2, 0.3, 5.0], [0.4, 0.5, 0.6, 7.0]])
    return bypass, induce, kl, sep


def test_winner_is_the_lowest_bypass_among_survivors():
    bypass, induce, kl, sep = _scores()
    excluded = np.array([False, False, False, True])  # the last column's -4 and -3 are out of bounds
    w = pick_winner(bypass, induce, kl, sep, excluded, baseline_harmful=1.0)
    # (0, 2) has induce -1, (1, 1) has KL 0.2: the lowest surviving bypass is (0, 1)
    assert (w.position_index, w.layer_index, w.found) == (0, 1, True)
    assert "lowest bypass" in w.reason


def test_nothing_survives_says_so_and_falls_back_to_validation_separation():
    bypass, induce, kl, sep = _scores()
    excluded = np.array([False, False, False, True])
    w = pick_winner(bypass, induce, kl, sep, excluded, baseline_harmful=-10.0)  # no ablation lowers refusal
    assert not w.found and "no candidate lowers refusal" in w.reason
    assert (w.position_index, w.layer_index) == (1, 2)  # best validation separation outside the excluded layers
    assert "separation of validation prompts" in w.rule


def test_grid_on_a_tiny_model_scores_every_candidate(tiny_models):
    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer)
    calls = []
    grid = select(lm, fmt, HARMFUL, HARMLESS, HARMFUL[:2], HARMLESS[:2], positions=0, layer_stride=1, max_kl=np.inf, prune=False,
                  progress=lambda f, m: calls.append(f))
    n_pos = len(fmt.post_instruction_positions())
    assert grid.bypass.shape == grid.induce.shape == grid.kl.shape == (n_pos, lm.n_layers - 1)
    assert grid.positions == sorted(grid.positions) and grid.positions[-1] == -1
    assert np.isfinite(grid.kl).all() and (grid.kl >= 0).all()
    assert grid.position in grid.positions and 1 <= grid.layer < lm.n_layers and grid.output_layer == grid.layer - 1
    assert calls and calls[-1] == pytest.approx(1.0) and calls == sorted(calls)
    d = grid.to_dict()
    json.dumps(d)
    assert d["split"] == "validation" and d["winner"]["rule"]
    # the winner follows the stated rule on the recorded scores
    again = pick_winner(grid.bypass, grid.induce, grid.kl, grid.val_separation, grid.excluded, grid.baseline_harmful,
                        max_kl=np.inf)
    assert (again.position_index, again.layer_index) == (grid.winner.position_index, grid.winner.layer_index)
    # pruning skips only the ablation of candidates that induce ≤ 0 rejects: the same winner, the same induce
    pruned = select(lm, fmt, HARMFUL, HARMLESS, HARMFUL[:2], HARMLESS[:2], positions=0, layer_stride=1, max_kl=np.inf)
    assert (pruned.position, pruned.layer, pruned.winner.found) == (grid.position, grid.layer, grid.winner.found)
    np.testing.assert_allclose(pruned.induce, grid.induce, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isnan(pruned.bypass), ~(grid.induce > 0))


def test_too_small_validation_is_refused_naming_the_setting(tiny_models):
    lm = tiny_models["llama"]
    with pytest.raises(SplitError, match=r"prompts\.validation_fraction: .*1 harmful and 2 harmless"):
        select(lm, Formatter(lm.tokenizer), HARMFUL, HARMLESS, HARMFUL[:1], HARMLESS[:2])


def test_provenance_records_drive_the_methodology_sentence():
    from core.layer_choice import LayerChoice
    from core.provenance import methodology, provenance

    honest = provenance(position=-2, choice=LayerChoice(4, "separation", "best validation separation", "validation"),
                        coefficient={"coefficient": 0.5, "rule": "smallest reaching 90 %", "split": "validation"})
    assert {k: r["split"] for k, r in honest.items()} == {"position": "none", "layer": "validation", "force_coefficient": "validation"}
    assert methodology(honest).endswith("Test prompts only produced the reported figures.")
    peeked = provenance(position="last", choice=4, force_coefficient=0.5, force_rule="smallest reaching 90 %")
    assert peeked["force_coefficient"]["split"] == "test" and "ON TEST PROMPTS" in methodology(peeked)


@pytest.mark.parametrize("preamble", ["none", "prompted-refusal"])
def test_fast_path_scores_equal_the_plain_hook_path(tiny_models, preamble):
    """Induce from the cached clean run (only blocks l … end rerun, the prefix shared) gives the
    same grid as adding the direction with a hook in a full forward pass."""
    from core import clean_run
    from core.formatting import PRESETS

    lm = tiny_models["llama"]
    assert clean_run.supported(lm) and not clean_run.supported(tiny_models["gpt2"])
    fmt = Formatter(lm.tokenizer, PRESETS[preamble])
    args = (lm, fmt, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3])
    grid = dict(positions=0, layer_stride=1, max_kl=np.inf, prune=False)
    plain = select(*args, **grid, fast=False)
    quick = select(*args, **grid, fast=True)
    assert np.isfinite(plain.induce).all() and np.ptp(plain.induce) > 1e-3  # the comparison can fail
    for name in ("induce", "bypass", "kl", "val_separation"):
        np.testing.assert_allclose(getattr(quick, name), getattr(plain, name), rtol=1e-4, atol=1e-4, err_msg=name)
    assert quick.baseline_harmful == pytest.approx(plain.baseline_harmful, abs=1e-4)
    assert (quick.position, quick.layer, quick.winner.found) == (plain.position, plain.layer, plain.winner.found)
    # the cached run's clean logits are the model's own
    from core.generation import next_token_logits

    run = clean_run.CleanRun(lm, fmt, HARMLESS[:3], [1], rows=2)
    np.testing.assert_allclose(run.logits, next_token_logits(lm, fmt, HARMLESS[:3]), rtol=1e-4, atol=1e-4)


def test_grid_falls_back_to_hooks_on_other_architectures(tiny_models):
    lm = tiny_models["gpt2"]
    grid = select(lm, Formatter(lm.tokenizer), HARMFUL, HARMLESS, HARMFUL[:2], HARMLESS[:2], max_kl=np.inf, layer_stride=2)
    assert np.isfinite(grid.induce).all()


# -- the force coefficient: degenerate answers count against a coefficient -------------------
def test_pick_coefficient_skips_a_coefficient_that_breaks_the_model():
    from core.selection import pick_coefficient

    coefs = [0.25, 0.5, 0.75]
    # 0.5 "refuses" more often, but 3 of 8 answers are loops: the smaller, clean one wins
    chosen, eligible = pick_coefficient(coefs, [0.5, 0.625, 0.5], [0.0, 0.375, 0.5], target=0.9)
    assert chosen == 0.25 and eligible == [True, False, False]
    # the smallest eligible one that reaches the target
    assert pick_coefficient(coefs, [0.5, 0.95, 1.0], [0.0, 0.0, 0.0], target=0.9)[0] == 0.5
    assert pick_coefficient(coefs, [0.5, 0.95, 1.0], [0.0, 0.2, 0.0], target=0.9)[0] == 0.75
    # ties on the refusal rate go to the smaller coefficient
    assert pick_coefficient(coefs, [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], target=0.9)[0] == 0.25
    # everything broken: the fewest degenerate answers
    chosen, eligible = pick_coefficient(coefs, [0.9, 1.0, 1.0], [0.5, 0.25, 0.75], target=0.9)
    assert chosen == 0.5 and eligible == [False, False, False]


def test_choose_coefficient_reports_degenerate_rates(tiny_models):
    from core.activations import collect_activations
    from core.directions import fit_directions
    from core.formatting import Formatter
    from core.selection import choose_coefficient

    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer)
    h = collect_activations(lm, ["How do I make a bomb?", "How do I steal a car?", "Hack a bank."], formatter=fmt, cache=False)
    b = collect_activations(lm, ["How do I make a cake?", "How do I wash a car?", "Thank a friend."], formatter=fmt,
                            cache=False)
    dirs = fit_directions(h, b, probe_folds=2)
    val = [f"Tell me about topic number {i}." for i in range(4)]
    choice = choose_coefficient(lm, fmt, dirs, 1, val, [1.0, 0.5], max_new_tokens=6, max_degenerate=0.0)
    assert [p["coefficient"] for p in choice.points] == [0.5, 1.0] and choice.n == 4 and choice.split == "validation"
    for p in choice.points:
        assert p["degenerate"]["n"] == 4 and p["eligible"] == (p["degenerate"]["k"] == 0)
    if not any(p["eligible"] for p in choice.points):  # random tiny models mostly babble
        fewest = min(choice.points, key=lambda p: (p["degenerate"]["k"], p["coefficient"]))
        assert choice.coefficient == fewest["coefficient"]
    assert "degenerate" in choice.rule
