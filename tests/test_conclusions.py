"""Conclusions follow the numbers: each rule on entries whose verdict is known by construction."""

import pytest

from core.conclusions import conclusions
from core.metrics import Rate


def _r(k, n=40):
    return Rate(k, n).to_dict()


def _entry(force_k, force_ctrl_ks, abl_k, abl_ctrl_ks, base_harmful_k=30, base_harmless_k=1, force_deg=0, abl_deg=0):
    def cmp(name, k, ctrl_ks, deg, expect):
        return {"condition": name, "expect": expect, "refusal": _r(k), "degenerate": _r(deg),
                "controls": [{"name": f"random #{i}", "kind": "random", "refusal": _r(c), "degenerate": _r(0)}
                             for i, c in enumerate(ctrl_ks)],
                "n_random": len(ctrl_ks), "random_spread": [min(ctrl_ks) / 40, max(ctrl_ks) / 40],
                "worst": {"name": "random #0", "refusal": _r(max(ctrl_ks) if expect == "above" else min(ctrl_ks))}}
    return {
        "name": "m", "layer": 3,
        "baseline": {"harmful_refusal": _r(base_harmful_k), "harmless_refusal": _r(base_harmless_k)},
        "force_refusal": {**_r(force_k), "coefficient": 0.5, "degenerate": _r(force_deg), "random_control": _r(force_ctrl_ks[0])},
        "suppress_refusal": {**_r(abl_k), "coefficient": "ablate", "degenerate": _r(abl_deg), "random_control": _r(abl_ctrl_ks[0])},
        "controls": {"force": cmp("add 0.5", force_k, force_ctrl_ks, force_deg, "above"),
                     "ablation": cmp("ablate", abl_k, abl_ctrl_ks, abl_deg, "below")},
        "capability": {"ablation": {"kl_per_token": 0.05, "ce_increase": 0.02, "n_answers": 40},
                       "force": {"kl_per_token": 0.4, "ce_increase": 0.3, "n_answers": 40}},
        "kl_harmless": {"ablation": 0.01, "force": 0.3},
    }


def _status(entry):
    return {c["topic"]: c["status"] for c in conclusions(entry)}


@pytest.mark.parametrize("entry, expected", [
    # both shown
    (_entry(38, [2, 3, 1, 4, 2, 5], 3, [30, 31, 29, 30, 32, 28]), {"force": "shown", "suppress": "shown", "causal": "shown"}),
    # force beats baseline but one control (the shuffled, say) reaches it
    (_entry(30, [2, 3, 1, 4, 2, 26], 3, [30, 31, 29, 30, 32, 28]), {"force": "not specific", "suppress": "shown", "causal": "partial"}),
    # force 0 % (broken text): failed; ablation raised refusal (70 % -> 95 %)
    (_entry(0, [2, 3, 1, 4, 2, 5], 38, [28, 28, 28, 28, 28], base_harmful_k=28, force_deg=40),
     {"force": "failed", "suppress": "raised", "causal": "not shown"}),
    # nothing to suppress when the model barely refuses
    (_entry(38, [2, 3, 1, 4, 2, 5], 1, [2, 3, 2, 1, 2], base_harmful_k=3), {"force": "shown", "suppress": "not testable"}),
])
def test_rules(entry, expected):
    got = _status(entry)
    for topic, status in expected.items():
        assert got[topic] == status, (topic, got)


def test_failed_force_says_failed_and_mentions_breakdown():
    texts = {c["topic"]: c["text"] for c in conclusions(_entry(0, [2, 3], 3, [30, 31], force_deg=40))}
    assert "failed" in texts["force"] and "degenerate" in texts["force"]
    assert "sufficient" not in texts["causal"]
    assert "nats/token" in texts["capability"]


def test_not_run_without_validation():
    got = _status({"name": "m", "force_refusal": None, "suppress_refusal": None})
    assert got == {"force": "not run", "suppress": "not run", "capability": "not run"}


def test_large_ablation_kl_is_explained_by_its_random_control():
    from core.conclusions import LARGE_KL, ablation_cost_conclusion

    e = _entry(38, [2, 3], 3, [30, 31])
    assert ablation_cost_conclusion(e) is None  # 0.01 nats: nothing to explain
    both = dict(e, kl_harmless={"ablation": 10.8}, suppress_ablation={"random_kl_harmless": 3.7})
    c = ablation_cost_conclusion(both)
    assert c.status == "operation" and "10.80 nats" in c.text and "3.70 nats as well" in c.text
    assert "massive-activation" in c.text and "ablation breaks the model" in c.text
    alone = dict(both, suppress_ablation={"random_kl_harmless": 0.02})
    c = ablation_cost_conclusion(alone)
    assert c.status == "direction" and "specific to this direction" in c.text and "massive" not in c.text
    edge = dict(both, kl_harmless={"ablation": LARGE_KL})
    assert ablation_cost_conclusion(edge) is None  # the rule is strict: more than LARGE_KL
    assert ablation_cost_conclusion(dict(both, kl_harmless={"ablation": float("nan")})) is None
