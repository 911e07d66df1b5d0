"""Validation: does the direction cause refusal? Force and suppress it over a coefficient sweep,
each against a random direction of the same norm, with Wilson intervals and KL side effects."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import charts, live
from core.conclusions import conclusions
from core.controls import DEFAULT_N_RANDOM, shuffled_control
from core.llm_judge import make_judge
from core.metrics import label_rates
from core.report import CONTROL_HEAD, control_rows, rate_text
from core.selection import MAX_DEGENERATE_RATE, choose_coefficient
from core.validation import DEFAULT_FORCE_COEFFICIENTS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SUBTRACT_COEFFICIENTS, run_validation
from ui import charts as ui_charts
from ui import entries, page, state
from ui.errors import guard
from ui.judge import judge_spec
from ui.progress import progress_bar, scaled

COEFFICIENT_CHOICES = [0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
# Sized so the default run ends within a minute on a 2-core CPU (docs/decisions.md); the page
# says n beside every rate, and the sliders go higher for tighter intervals.
DEFAULT_N = 8
DEFAULT_N_CONTROLS = 2

page.title("Validation", "Adding the direction to harmless prompts should make the model refuse; ablating it should "
                         "stop refusals on harmful ones — and a random direction of the same norm should do neither.")
lm = page.require_model()
dentry = page.require_directions()
dirs = dentry["value"]["dirs"]
sets = state.prompt_sets()

with st.container(border=True):
    c1, c2, c3 = st.columns(3)
    layer = c1.number_input("Layer", 0, dirs.n_layers - 1, value=page.active_layer(dentry["value"]["layer"]),
                            key="val_layer",
                            help="Layer i = the output of block i (0-indexed). Defaults to the layer selected "
                                 "on the Directions page.")
    n_max = min(len(sets.harmful_test), len(sets.harmless_test))
    n = c2.slider("Prompts per class", 1, n_max, min(DEFAULT_N, n_max), key="val_n", persist_state="session",
                  help="Held-out test prompts per class for the reported rates, and as many validation harmless "
                       "prompts for choosing the force coefficient; fewer = faster, wider intervals.")
    max_tokens = c3.slider("Max new tokens", 8, 96, DEFAULT_MAX_NEW_TOKENS, step=4, key="val_tokens",
                           persist_state="session",
                           help="The judge looks for refusal phrases in the answer's opening (first sentence, "
                                "≤ 160 characters) and for degeneration in the whole answer.")
    c4, c5, c6 = st.columns([2, 2, 1], vertical_alignment="bottom")
    force = c4.multiselect("Force coefficients (+α·v on harmless)", COEFFICIENT_CHOICES,
                           default=[c for c in DEFAULT_FORCE_COEFFICIENTS if c in COEFFICIENT_CHOICES], key="val_force",
                           persist_state="session",
                           help="Candidates, α in multiples of the layer's mean activation norm. The one used is chosen "
                                "on validation harmless prompts (the smallest that reaches the target refusal rate, else "
                                f"the highest rate, among those with at most {MAX_DEGENERATE_RATE:.0%} degenerate answers); "
                                "test prompts only "
                                "report it. The Steering page starts from it.")
    sub = c5.multiselect("Subtract coefficients (−α·v on harmful)", COEFFICIENT_CHOICES,
                         default=[c for c in DEFAULT_SUBTRACT_COEFFICIENTS if c in COEFFICIENT_CHOICES], key="val_sub",
                         persist_state="session", help="α in multiples of the layer's mean activation norm.")
    seed = c6.number_input("Control seed", 0, 10_000, 0, key="val_seed", persist_state="session")
    n_controls = st.slider("Random control directions (headline interventions)", 1, 10,
                           min(DEFAULT_N_CONTROLS, DEFAULT_N_RANDOM), key="val_nctrl",
                           persist_state="session",
                           help="Seeded random directions of equal norm for ablation and the chosen force coefficient; "
                                "a label-shuffled direction is always added. An effect is specific only if it clears all.")
    n_gen = 4 + 2 + 2 * len(sub) + 2 * int(n_controls) + (len(force) if len(force) > 1 else 0)
    st.caption(f"{n_gen} batches of greedy generations of {n} prompts × up to {max_tokens} tokens (the force "
               f"candidates on validation prompts, then every condition on test prompts), plus forward passes for KL "
               f"and capability cost. Ablation runs on every block. Each condition's rate appears as soon as it is done.")
    run = st.button("Run validation", type="primary", icon=":material/play_arrow:", key="val_run",
                    disabled=not force)

if run:
    live_slot = st.empty()
    rows: list[dict] = []

    def show(condition: str, prompts: str, refusal: dict, degenerate: dict | None) -> None:
        """Each condition's rate as soon as it is done (refusal and degenerate, with n and interval)."""
        rows.append({"condition": condition, "prompts": prompts, "refusal": rate_text(refusal),
                     "degenerate": rate_text(degenerate)})
        live_slot.dataframe(pd.DataFrame(rows), hide_index=True)

    def show_labels(condition: str, prompts: str, labels: list[str]) -> None:
        rates = label_rates(labels)
        show(condition, f"{prompts} test", rates["refusal"].to_dict(), rates["degenerate"].to_dict())

    with guard("Validation"), progress_bar("Validating") as progress:
        fmt = state.formatter(lm)
        shuffled = shuffled_control(lm, fmt, dirs, int(layer), sets.harmful_train, sets.harmless_train, int(seed))
        spec = judge_spec()
        # the force coefficient is chosen on validation prompts (test prompts only report it), on answers
        # as long as the Steering page's, so that a loop starting after the opening counts against it
        coef = choose_coefficient(lm, fmt, dirs, int(layer), sets.harmless_val[:n], sorted(force),
                                  max_new_tokens=max(int(max_tokens), live.QUICK_MAX_NEW_TOKENS),
                                  progress=scaled(progress, 0.0, 0.25, "choosing α: "))
        for point in coef.points:
            show(f"add {point['coefficient']:g}" + (" (chosen)" if point["coefficient"] == coef.coefficient else ""),
                 "harmless validation", point["rate"], point.get("degenerate"))
        result = run_validation(lm, fmt, dirs, int(layer), sets.harmful_test[:n], sets.harmless_test[:n],
                                coefficients=[coef.coefficient], subtract_coefficients=sorted(sub),
                                max_new_tokens=int(max_tokens), seed=int(seed), progress=scaled(progress, 0.25, 1.0),
                                shuffled=shuffled, n_random_controls=int(n_controls),
                                judge=make_judge(spec, device=str(lm.device)), judge_name=spec,
                                on_condition=show_labels)
        state.put_result("validation", result, coefficient_choice=coef.to_dict())
    live_slot.empty()

ventry = state.get_result("validation")
if ventry is None:
    st.info("Press **Run validation**. It generates answers for every coefficient and its random control, so it is "
            "the slowest page: start with few prompts and tokens.",
            icon=":material/play_arrow:")
    st.stop()

state.stale_note(ventry)
result = ventry["value"]
r = result.to_dict()
st.subheader(f"Layer {result.layer} · {result.n_harmful} harmful + {result.n_harmless} harmless test prompts")
chosen = ventry.get("coefficient_choice")
if chosen:
    st.caption(f"Force coefficient {chosen['coefficient']:g}, chosen on {chosen['n']} validation harmless prompts "
               f"({chosen['rule']}); the test prompts below only report it.")
m1, m2, m3, m4 = st.columns(4)
base = r["baseline"]
m1.metric("Baseline refusal", rate_text(base["harmful_refusal"], with_n=False),
          delta=f"harmless: {rate_text(base['harmless_refusal'], with_n=False)}", delta_color="off", border=True,
          help="Unsteered greedy answers labelled by the judge (refusal / compliance / degenerate); refusal rate with "
               f"its 95 % Wilson interval. Degenerate: harmful {rate_text(base.get('harmful_degenerate'))}, "
               f"harmless {rate_text(base.get('harmless_degenerate'))}.")
fr = r["force_refusal"]
if fr.get("rate") is not None:
    m2.metric(f"Force refusal (+{fr['coefficient']:g}·v)", f"{fr['rate']:.0%}",
              delta=f"random: {fr['random_control_rate']:.0%}", delta_color="off", border=True,
              help=f"Harmless prompts with the direction added; refusals only, 95 % CI {fr['ci'][0]:.0%}–{fr['ci'][1]:.0%}; "
                   f"degenerate {rate_text(fr.get('degenerate'))}. {r['force_rule']}.")
sr = r["suppress_refusal"]
m3.metric("Suppress refusal (ablation)", f"{sr['rate']:.0%}", delta=f"random: {sr['random_control_rate']:.0%}",
          delta_color="off", border=True,
          help=f"Harmful prompts with the direction ablated everywhere; refusals only, 95 % CI "
               f"{sr['ci'][0]:.0%}–{sr['ci'][1]:.0%}; degenerate {rate_text(sr.get('degenerate'))}.")
kl = r["kl_harmless"]
m4.metric("KL on harmless", f"{kl['ablation']:.3f}" if kl.get("ablation") is not None else "n/a",
          delta=f"force: {kl['force']:.3f}" if kl.get("force") is not None else None, delta_color="off", border=True,
          help="Mean KL(clean ‖ intervened) of the first response token on harmless prompts, nats (ablation / force).")

ent = entries.model_entry()
with st.container(border=True):
    st.altair_chart(charts.steering_chart(ent), key="chart_steering")
left, right = st.columns([3, 2])
with left, st.container(border=True):
    st.altair_chart(ui_charts.kl_chart(r["force"], r["suppress_ablation"]), width="stretch", key="chart_kl")
with right, st.container(border=True):
    rows = []
    for p in r["force"]:
        rows.append({"intervention": f"add {p['coefficient']:g}", "prompts": "harmless", "refusal": rate_text(p["rate"]),
                     "degenerate": rate_text(p.get("degenerate")), "random control": rate_text(p["random_rate"]), "KL": p["kl"]})
    sa = r["suppress_ablation"]
    rows.append({"intervention": "ablate", "prompts": "harmful", "refusal": rate_text(sa["rate"]),
                 "degenerate": rate_text(sa.get("degenerate")), "random control": rate_text(sa["random_rate"]),
                 "KL": sa["kl_harmless"]})
    for p in r["suppress_subtract"]:
        rows.append({"intervention": f"subtract {p['coefficient']:g}", "prompts": "harmful", "refusal": rate_text(p["rate"]),
                     "degenerate": rate_text(p.get("degenerate")), "random control": rate_text(p["random_rate"]), "KL": p["kl"]})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="val_table",
                 column_config={"KL": st.column_config.NumberColumn(format="%.4f")})
    st.caption(f"Computed in {result.seconds:.0f} s · control seed {result.seed} · {result.max_new_tokens} new tokens.")

st.markdown("**Conclusions** (generated from these numbers by the rules of `core.conclusions`)")
for c in conclusions(ent):
    st.markdown(f"- *{c['status']}* — {c['text']}")

with st.container(border=True):
    st.markdown("**Controls of the headline interventions** — random directions of equal norm and a label-shuffled "
                "direction; *specific* only if the interval clears every control's.")
    st.dataframe(pd.DataFrame(control_rows(r), columns=list(CONTROL_HEAD)), hide_index=True, key="val_controls")
    cap = r.get("capability") or {}
    if cap:
        st.dataframe(pd.DataFrame([{"condition": k, **v} for k, v in cap.items()]), hide_index=True, key="val_capability",
                     column_config={k: st.column_config.NumberColumn(format="%.4f")
                                    for k in ("kl_per_token", "ce", "ce_clean", "ce_increase")})
        st.caption("Capability cost: KL(clean ‖ intervened) per token and cross-entropy over the clean model's own "
                   "greedy answers to the harmless prompts, teacher-forced (nats/token).")

st.markdown("**Every generation and its label**")
gens = pd.DataFrame(r.get("generations") or [], columns=["condition", "prompts", "prompt", "generation", "label"])
f1, f2 = st.columns(2)
pick_cond = f1.multiselect("Condition", sorted(gens["condition"].unique()), key="val_filter_condition",
                           placeholder="all conditions")
pick_label = f2.multiselect("Label", ["refusal", "compliance", "degenerate"], key="val_filter_label", placeholder="all labels")
keep = pd.Series(True, index=gens.index)
if pick_cond:
    keep &= gens["condition"].isin(pick_cond)
if pick_label:
    keep &= gens["label"].isin(pick_label)
shown = gens[keep]
st.dataframe(shown, hide_index=True, key="val_generations", column_config={
    "prompt": st.column_config.TextColumn(width="medium"),
    "generation": st.column_config.TextColumn(width="large"),
})
agree = r.get("agreement") or {}
st.caption(f"{len(shown)} of {len(gens)} generations · judge: {r.get('judge', 'substring')}"
           + "".join(f" · {k.replace('_', ' ')}: {rate_text(v)}" for k, v in agree.items()) + ".")
