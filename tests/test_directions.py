"""Directions, held-out separation, probes and the layer rule on synthetic arrays (fast, exact)."""

import json

import numpy as np
import pytest

from core.directions import LayerDirections, fit_directions, projections, separation
from core.layer_choice import candidate_layers, choose_layer
from core.errors import DirectionError

L, D = 6, 16


def planted(n=40, signal=6.0, seed=0, layers_with_signal=range(L)):
    """Harmful = harmless + signal·e0 at the given layers, isotropic unit noise."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, L, D)).astype(np.float32)
    b = rng.standard_normal((n, L, D)).astype(np.float32)
    for layer in layers_with_signal:
        h[:, layer, 0] += signal
    return h, b


@pytest.mark.parametrize("method", ["diff-in-means", "pca", "probe"])
def test_planted_signal_gives_large_heldout_sigma_and_right_direction(method):
    h_tr, b_tr = planted(seed=0)
    h_te, b_te = planted(seed=1)
    dirs = fit_directions(h_tr, b_tr, h_te, b_te, method=method)
    assert dirs.raw.shape == (L, D) and dirs.unit.shape == (L, D)
    assert np.allclose(np.linalg.norm(dirs.unit, axis=1), 1, atol=1e-5)
    # raw has the diff-in-means norm whatever the method
    dim = np.linalg.norm(h_tr.mean(0) - b_tr.mean(0), axis=-1)
    assert np.allclose(np.linalg.norm(dirs.raw, axis=1), dim, rtol=1e-4)
    assert (dirs.unit[:, 0] > (0.7 if method == "probe" else 0.9)).all()
    assert (dirs.separation_sigma > 3).all()
    assert (dirs.probe_accuracy > 0.95).all()
    json.dumps(dirs.to_dict())


def test_noise_gives_chance_probe_and_small_heldout_sigma():
    h_tr, b_tr = planted(n=60, signal=0.0, seed=2)
    h_te, b_te = planted(n=60, signal=0.0, seed=3)
    dirs = fit_directions(h_tr, b_tr, h_te, b_te)
    assert abs(float(np.mean(dirs.probe_accuracy)) - 0.5) < 0.12
    assert np.abs(dirs.separation_sigma).mean() < 0.6
    # in-sample separation of pure noise is inflated: that is why it is reported separately
    assert dirs.separation_in_sample.mean() > np.abs(dirs.separation_sigma).mean()


def test_direction_depends_only_on_train_arrays():
    h_tr, b_tr = planted(seed=0)
    h_te, b_te = planted(seed=1)
    a = fit_directions(h_tr, b_tr, h_te, b_te)
    b = fit_directions(h_tr, b_tr, h_te * 3 + 7, b_te[:5] - 2)
    assert np.array_equal(a.raw, b.raw) and np.array_equal(a.mean_norm, b.mean_norm)
    assert np.array_equal(a.probe_accuracy, b.probe_accuracy)
    assert not np.allclose(a.separation_sigma, b.separation_sigma)
    # held-out separation equals Cohen's d of the test projections on the train direction
    layer = 2
    manual = separation(h_te[:, layer] @ a.unit[layer], b_te[:, layer] @ a.unit[layer])
    assert a.separation_sigma[layer] == pytest.approx(manual, rel=1e-5)
    assert np.allclose(projections(h_te, a, layer), h_te[:, layer] @ a.unit[layer], atol=1e-5)


def test_separation_is_cohens_d():
    x = np.array([3.0, 5.0]); y = np.array([0.0, 2.0])
    assert separation(x, y) == pytest.approx(3.0 / np.sqrt(2.0))


def test_cosine_and_mean_norm():
    h, b = planted(seed=4)
    dirs = fit_directions(h, b)
    assert np.allclose(np.diag(dirs.cosine), 1, atol=1e-5)
    assert np.allclose(dirs.cosine, dirs.cosine.T)
    expected = np.linalg.norm(np.concatenate([h, b]), axis=-1).mean(0)
    assert np.allclose(dirs.mean_norm, expected, rtol=1e-5)
    assert np.isnan(dirs.separation_sigma).all()  # no test split given


def test_errors_are_clear():
    h, b = planted(seed=5)
    with pytest.raises(DirectionError, match="identical"):
        fit_directions(h, h.copy())
    with pytest.raises(DirectionError, match="per class"):
        fit_directions(h[:3], b[:10], probe_folds=5)
    with pytest.raises(DirectionError, match="empty"):
        fit_directions(h, b[:0])
    with pytest.raises(DirectionError, match="method"):
        fit_directions(h, b, method="magic")
    dirs = fit_directions(h, b)
    with pytest.raises(ValueError, match="out of range"):
        dirs.direction(L)
    with pytest.raises(ValueError, match="out of range"):
        choose_layer(dirs, layer=99)


def test_zero_direction_at_one_layer_is_refused_there_only():
    h, b = planted(seed=6, layers_with_signal=[1, 2, 3, 4, 5])
    b[:, 0] = 0.0
    h[:, 0] = 0.0
    dirs = fit_directions(h, b)
    with pytest.raises(DirectionError, match="identical"):
        dirs.direction(0)
    assert dirs.direction(1).shape == (D,)


def _fake_dirs(sep):
    n = len(sep)
    z = np.zeros(n, dtype=np.float32)
    unit = np.eye(n, D, dtype=np.float32)
    return LayerDirections("diff-in-means", "last", unit, unit, z + 1, z, z, z, z,
                           np.eye(n, dtype=np.float32), (5, 5), (5, 5), separation_validation=np.asarray(sep, np.float32))


def test_choose_layer_never_reads_the_test_split():
    dirs = _fake_dirs([0, 1, 2, 3, 4, 5, 6, 5.5, 9, 10])
    before = choose_layer(dirs)
    dirs.separation_sigma = np.asarray([9, 0, 0, 0, 0, 0, 0, 0, 0, 0], np.float32)  # a different test set
    assert choose_layer(dirs) == before and before.split == "validation"
    dirs.separation_validation = None  # no validation prompts: the in-sample (train) separation decides
    assert choose_layer(dirs).split == "train"


def test_ablation_rule_refuses_effects_that_raise_refusal():
    dirs = _fake_dirs([0, 1, 2, 3, 4, 5, 6, 5.5, 9, 10])
    c = choose_layer(dirs, ablation_effect=-np.arange(1, 11, dtype=float))
    assert c.rule == "separation" and c.layer == 6 and "no candidate's ablation lowered" in c.reason


def test_separation_interval_and_probe_interval():
    h, b = planted(n=60, seed=3, layers_with_signal=[2])
    dirs = fit_directions(h[:40], b[:40], h[40:], b[40:], harmful_val=h[40:50], harmless_val=b[40:50])
    lo, hi = dirs.separation_ci[2]
    assert lo < dirs.separation_sigma[2] < hi and hi - lo > 0
    again = fit_directions(h[:40], b[:40], h[40:], b[40:])
    assert np.array_equal(again.separation_ci, dirs.separation_ci)  # seeded
    plo, phi = dirs.probe_accuracy_ci[2]
    assert plo <= dirs.probe_accuracy[2] <= phi and 0 <= plo < phi <= 1
    assert np.isfinite(dirs.separation_validation[2]) and not np.isfinite(again.separation_validation).any()
    json.dumps(dirs.to_dict())


def test_choose_layer_skips_last_fifth():
    assert candidate_layers(10) == list(range(8))
    assert candidate_layers(30) == list(range(24))
    dirs = _fake_dirs([0, 1, 2, 3, 4, 5, 6, 5.5, 9, 10])  # best separation in the skipped layers
    choice = choose_layer(dirs)
    assert choice.layer == 6 and choice.rule == "separation"
    assert choose_layer(dirs, skip_last_fraction=0.0).layer == 9
    assert choose_layer(dirs, layer=9).rule == "user"
    json.dumps(choice.to_dict())


def test_choose_layer_prefers_ablation_effect_under_kl_cap():
    dirs = _fake_dirs([0, 1, 2, 3, 4, 5, 6, 5.5, 9, 10])
    effect = np.array([0, 0, 3, 5, 1, 1, 1, 1, 9, 9], dtype=float)
    kl = np.array([0, 0, 0.05, 0.5, 0, 0, 0, 0, 0, 0], dtype=float)
    assert choose_layer(dirs, ablation_effect=effect).layer == 3
    c = choose_layer(dirs, ablation_effect=effect, kl=kl, max_kl=0.1)
    assert c.layer == 2 and c.rule == "ablation"
    # nothing qualifies -> separation
    c = choose_layer(dirs, ablation_effect=effect, kl=np.ones(10), max_kl=0.1)
    assert c.rule == "separation" and c.layer == 6
