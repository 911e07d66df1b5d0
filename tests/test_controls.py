"""Control directions and the specificity rule."""

import numpy as np
import pytest

from core.controls import ControlComparison, ControlResult, control_interventions, is_specific, shuffled_direction
from core.metrics import Rate
from core.steering import Intervention


def test_specific_rule_needs_every_interval_cleared():
    assert is_specific(Rate(38, 40), [Rate(2, 40), Rate(5, 40)], "above") is True
    assert is_specific(Rate(38, 40), [Rate(2, 40), Rate(30, 40)], "above") is False  # one control overlaps
    assert is_specific(Rate(2, 40), [Rate(38, 40), Rate(36, 40)], "below") is True
    assert is_specific(Rate(20, 40), [Rate(38, 40)], "below") is True  # 50 % [35–65] vs 95 % [84–99]
    assert is_specific(Rate(20, 40), [Rate(28, 40)], "below") is False  # 70 % [55–82] overlaps
    assert is_specific(Rate(20, 40), [], "above") is None
    with pytest.raises(ValueError):
        is_specific(Rate(1, 2), [Rate(1, 2)], "sideways")


def test_control_interventions_have_equal_norm_and_distinct_seeds():
    iv = Intervention("add", np.arange(1, 9, dtype=np.float32), 1, 0.5, 10.0)
    shuffled = np.ones(8, dtype=np.float32) * 100
    ctrls = control_interventions(iv, seed=3, n_random=5, shuffled=shuffled)
    assert len(ctrls) == 6 and ctrls[-1][0] == "label-shuffled"
    norms = [np.linalg.norm(c.direction) for _, c in ctrls]
    np.testing.assert_allclose(norms, np.linalg.norm(iv.direction), rtol=1e-5)
    dirs = np.stack([c.direction for _, c in ctrls[:5]])
    assert np.linalg.matrix_rank(dirs) == 5
    assert all(c.kind == iv.kind and c.layer == iv.layer and c.coefficient == iv.coefficient for _, c in ctrls)


def test_shuffled_direction_is_seeded_and_loses_the_label_signal():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)) + 5.0 * np.eye(16)[0]
    b = rng.normal(size=(200, 16))
    real = a.mean(0) - b.mean(0)
    s1, s2 = shuffled_direction(a, b, 7), shuffled_direction(a, b, 7)
    np.testing.assert_array_equal(s1, s2)
    assert abs(s1[0]) < 0.3 * abs(real[0])
    assert not np.array_equal(s1, shuffled_direction(a, b, 8))


def test_comparison_worst_case_and_spread():
    ctrls = [ControlResult(f"random #{i}", Rate(k, 40), Rate(0, 40)) for i, k in enumerate([1, 6, 3])]
    ctrls.append(ControlResult("label-shuffled", Rate(9, 40), Rate(0, 40)))
    cmp = ControlComparison("add 0.5", Rate(30, 40), Rate(2, 40), "above", ctrls)
    d = cmp.to_dict()
    assert d["worst"]["name"] == "label-shuffled" and d["random_spread"] == [1 / 40, 6 / 40]
    assert d["n_random"] == 3 and d["has_shuffled"] and d["specific"] is True
