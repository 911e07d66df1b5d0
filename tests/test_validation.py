"""Validation end to end on a tiny model, and the headline-coefficient rule."""

import json

import numpy as np
import pytest

from core.layer_choice import choose_layer
from core.metrics import Rate
from core.validation import SteerPoint, choose_force_coefficient, run_validation, scan_layers

from test_steering import HARMFUL, HARMLESS, tiny_dirs_for


def _pt(c, k, n=10):
    return SteerPoint(c, Rate(k, n), Rate(0, n), 0.0, 0.0)


def test_force_coefficient_rule():
    assert choose_force_coefficient([_pt(1.0, 10), _pt(0.25, 3), _pt(0.5, 9)]) == 0.5
    assert choose_force_coefficient([_pt(0.25, 3), _pt(0.5, 7), _pt(1.0, 7)]) == 0.5
    assert choose_force_coefficient([]) is None


def test_run_validation_end_to_end(tiny_models):
    lm = tiny_models["llama"]
    fmt, dirs = tiny_dirs_for(lm)
    calls = []
    from core.activations import collect_activations
    from core.controls import shuffled_direction

    acts_h = collect_activations(lm, HARMFUL, formatter=fmt, cache=False)
    acts_b = collect_activations(lm, HARMLESS, formatter=fmt, cache=False)
    shuffled = shuffled_direction(acts_h[:, 1], acts_b[:, 1], seed=3)
    res = run_validation(lm, fmt, dirs, 1, HARMFUL, HARMLESS, coefficients=(0.5, 4.0), subtract_coefficients=(1.0,),
                         max_new_tokens=4, seed=3, n_samples=2, progress=lambda f, m: calls.append((f, m)),
                         n_random_controls=5, shuffled=shuffled)
    d = res.to_dict()
    json.dumps(d)
    # every generation is kept with its prompt, condition and label
    gens = d["generations"]
    assert {g["label"] for g in gens} <= {"refusal", "compliance", "degenerate"}
    conditions = {g["condition"] for g in gens}
    assert {"baseline", "ablate", "add 0.5", "add 4", "subtract 1"} <= conditions
    assert sum(g["condition"] == "baseline" for g in gens) == 8
    # five random controls and the shuffled one for both headline interventions, rates split by label
    for key, expect in (("ablation", "below"), ("force", "above")):
        c = d["controls"][key]
        assert c["n_random"] == 5 and c["has_shuffled"] and c["expect"] == expect and len(c["controls"]) == 6
        assert c["specific"] in (True, False) and c["worst"]["name"] in [x["name"] for x in c["controls"]]
        for ctrl in c["controls"]:
            assert sum(g["condition"] == f"{c['condition']} {ctrl['name']}" for g in gens) == 4 or ctrl["name"].startswith("random #0")
    labels = [g["label"] for g in gens if g["condition"] == "ablate"]
    assert d["suppress_ablation"]["rate"]["k"] == labels.count("refusal")
    assert d["suppress_ablation"]["degenerate"]["k"] == labels.count("degenerate")
    # capability cost over whole answers, beside first-token KL
    for key in ("ablation", "force", "random ablation", "random force"):
        assert d["capability"][key]["kl_per_token"] >= 0
    assert d["kl_harmless"]["force_per_token"] == d["capability"]["force"]["kl_per_token"]
    assert d["layer"] == 1 and d["n_harmful"] == 4 and d["n_harmless"] == 4 and d["seed"] == 3
    assert [p["coefficient"] for p in d["force"]] == [0.5, 4.0]
    assert d["force_refusal"]["coefficient"] in (0.5, 4.0)
    for key in ("rate", "ci", "random_control_rate", "coefficient"):
        assert key in d["force_refusal"] and key in d["suppress_refusal"]
    assert d["suppress_refusal"]["coefficient"] == "ablate"
    assert d["baseline"]["harmful_refusal"]["n"] == 4
    lo, hi = d["baseline"]["harmless_refusal"]["ci"]
    assert 0 <= lo <= d["baseline"]["harmless_refusal"]["rate"] <= hi <= 1
    assert d["kl_harmless"]["ablation"] >= 0 and d["kl_harmless"]["force"] >= 0
    assert len(d["suppress_subtract"]) == 1 and len(d["samples"]) == 4
    # a big push moves the next-token distribution more than a small one
    assert d["force"][1]["kl"] > d["force"][0]["kl"]
    assert calls and calls[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in calls)


def test_layer_scan_feeds_choose_layer(tiny_models):
    lm = tiny_models["neox"]
    fmt, dirs = tiny_dirs_for(lm)
    scan = scan_layers(lm, fmt, dirs, HARMFUL, HARMLESS, skip_last_fraction=0.0)
    assert scan.layers == [0, 1, 2]
    assert np.isfinite(scan.ablation_effect).all() and (scan.kl >= 0).all()
    json.dumps(scan.to_dict())
    choice = choose_layer(dirs, ablation_effect=scan.ablation_effect, kl=scan.kl, max_kl=np.inf, skip_last_fraction=0.0)
    assert choice.rule == "ablation" and choice.layer == int(np.nanargmax(scan.ablation_effect))


@pytest.mark.slow
def test_ablation_lowers_prompted_refusal_on_embedded_model(embedded):
    """The real check, kept small: a direction fitted on 12+12 train prompts, at the layer the
    default rule picks, ablated everywhere, removes prompted refusal from harmful requests that the
    unsteered model refuses."""
    from core.activations import collect_activations
    from core.directions import fit_directions
    from core.formatting import PRESETS, Formatter
    from core.metrics import is_refusal, refusal_rate
    from core.prompts import builtin_split
    from core.steering import ablate, steered_generate

    fmt = Formatter(embedded.tokenizer, PRESETS["prompted-refusal"])
    h, b = builtin_split("harmful", 0), builtin_split("harmless", 0)
    acts_h = collect_activations(embedded, h.train[:12], formatter=fmt)
    acts_b = collect_activations(embedded, b.train[:12], formatter=fmt)
    dirs = fit_directions(acts_h, acts_b, probe_folds=3)
    layer = choose_layer(dirs).layer
    prompts = h.test[:12]
    base = steered_generate(embedded, fmt, prompts, [], max_new_tokens=8)
    refused = [p for p, out in zip(prompts, base) if is_refusal(out)]
    assert len(refused) >= 2, f"the preset should make the model refuse some clear harmful requests, got {refusal_rate(base)}"
    ablated = refusal_rate(steered_generate(embedded, fmt, refused, [ablate(dirs, layer)], max_new_tokens=8))
    assert ablated.successes < len(refused), f"layer {layer}: ablation left {ablated} of the prompts refused at baseline"


def test_validation_with_an_llm_judge_reports_agreement(tiny_models):
    """A pluggable judge: a tiny chat model labels every answer; the substring label is kept beside it."""
    from core.llm_judge import LLMJudge

    lm = tiny_models["llama"]
    fmt, dirs = tiny_dirs_for(lm)
    judge = LLMJudge(tiny_models["neox"])
    res = run_validation(lm, fmt, dirs, 1, HARMFUL, HARMLESS, coefficients=(0.5,), subtract_coefficients=(),
                         max_new_tokens=3, seed=1, judge=judge, judge_name=judge.name, n_random_controls=2,
                         capability=False)
    d = res.to_dict()
    assert d["judge"].startswith("llm:")
    assert all(g["label"] in ("refusal", "compliance", "degenerate") and "substring_label" in g for g in d["generations"])
    agree = d["agreement"]
    assert agree["judge_vs_substring"]["n"] == len(d["generations"]) and agree["judge_vs_score"]["n"] == 8
    labels = [g["label"] for g in d["generations"] if g["condition"] == "ablate"]
    assert d["suppress_ablation"]["rate"]["k"] == labels.count("refusal")


def test_mixed_batches_give_the_same_validation(tiny_models):
    """Rows of all conditions sharing batches (each under its own intervention) give exactly the
    per-condition answers, labels and rates (fp32, greedy), and every condition is reported once,
    with all its labels, as soon as it is done."""
    from core.formatting import Formatter, get_preamble

    lm = tiny_models["llama"]
    _, dirs = tiny_dirs_for(lm)
    fmt = Formatter(lm.tokenizer, get_preamble("prompted-refusal"))  # a shared prefix: the per-group prefix path
    shuffled = np.random.default_rng(0).standard_normal(lm.d_model).astype(np.float32)
    runs = {}
    for mixed in (False, True):
        heard = []
        res = run_validation(lm, fmt, dirs, 1, HARMFUL, HARMLESS, coefficients=(0.5, 4.0), subtract_coefficients=(1.0,),
                             max_new_tokens=5, seed=2, n_random_controls=3, shuffled=shuffled, capability=False,
                             mixed_batches=mixed, mixed_batch_size=9, batch_size=3,
                             on_condition=lambda c, k, labels: heard.append((c, k, labels)))
        runs[mixed] = (res.to_dict(), heard)
    (old, heard_old), (new, heard_new) = runs[False], runs[True]
    assert len({g["generation"] for g in new["generations"]}) > 1  # the conditions differ, so the test can fail
    assert new["generations"] == old["generations"]
    for key in ("baseline", "controls", "agreement", "samples"):
        assert new[key] == old[key], key
    for key in ("force", "suppress_subtract"):  # rates exactly; first-token KL up to batch-composition rounding
        for a, b in zip(new[key], old[key], strict=True):
            assert a["rate"] == b["rate"] and a["random_rate"] == b["random_rate"]
            assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-6)
    for key in ("rate", "random_rate", "degenerate", "random_degenerate"):
        assert new["suppress_ablation"][key] == old["suppress_ablation"][key]
    assert new["suppress_ablation"]["kl_harmless"] == pytest.approx(old["suppress_ablation"]["kl_harmless"], rel=1e-3, abs=1e-6)
    assert sorted(heard_new, key=str) == sorted(heard_old, key=str)
    assert len(heard_new) == len({(c, k) for c, k, _ in heard_new}) == len({(g["condition"], g["prompts"]) for g in new["generations"]})
