"""Steering (live): baseline and steered generations stream side by side as the slider moves.

Every control but Stop lives in one ``st.fragment``, so moving a control reruns only this panel.
What is generated and how tokens are shown is :mod:`core.live`; this page reads widgets and
draws. The coefficient starts from one chosen on validation prompts (the Validation page's
choice, else a quick choice here), so the first answer shows a refusal, not a broken model.
"""

from __future__ import annotations

import html
import warnings

import numpy as np
import streamlit as st

from core import live
from core.cache import stable_hash
from core.prefill_reuse import PrefillMemo
from core.steering import KINDS
from ui import page, state
from ui.charts import colour_legend, token_html
from ui.direction_upload import loaded_directions
from ui.errors import guard
from ui.progress import progress_bar

DEFAULTS = {"steer_mode": "add", "steer_max_tokens": 48, "steer_temperature": 0.0, "steer_seed": 0}
FALLBACK_COEF = 0.25  # only if no coefficient could be chosen (the choice failed)
COEF_MIN, COEF_MAX = 0.0, 3.0
MODE_HELP = {
    "add": "Add α × (mean norm) × direction at the chosen layer's output, at every position.",
    "subtract": "Subtract α × (mean norm) × direction at the chosen layer's output.",
    "ablate": "Project the chosen layer's direction out of every block, attention and MLP output "
              "(strength: 1 = full ablation, < 1 partial).",
}
LABEL_STYLE = {"refusal": ("#c0392b", "refusal"), "compliance": ("#1e8449", "compliance"),
               "degenerate": ("#7f8c8d", "degenerate"), None: ("#8a8fa3", "judging…")}

page.title("Steering (live)", "Add, subtract or ablate the refusal direction and watch the answer change. "
                              "Coefficients are in normalised units: multiples of the layer's mean activation norm.")
lm = page.require_model()
# a saved directions file (checked against this model) may stand in for computed directions
dentry = loaded_directions(lm, state.get_result("directions") is not None) or page.require_directions()
state.stale_note(dentry)
dirs = dentry["value"]["dirs"]

for key, value in DEFAULTS.items():
    st.session_state.setdefault(key, value)
st.session_state.setdefault("steer_layer", page.active_layer(dentry["value"]["layer"]))
if not 0 <= int(st.session_state["steer_layer"]) < dirs.n_layers:  # directions of another model
    st.session_state["steer_layer"] = int(dentry["value"]["layer"])


def _default() -> live.SteeringDefault | None:
    """The validated default for the directions' own layer: the Validation page's choice, else a
    quick choice on validation prompts (once per directions, kept in the session)."""
    layer = int(dentry["value"]["layer"])
    ventry = state.get_result("validation")
    chosen = live.default_coefficient(ventry.get("coefficient_choice") if ventry else None,
                                      ventry["value"].layer if ventry else None, layer)
    if chosen is not None and state.is_current(ventry):
        return chosen
    key = stable_hash("steer-default", dentry["key"], dentry.get("time"), layer)
    kept = st.session_state.setdefault("steer_defaults", {})
    if key not in kept:
        sets = state.prompt_sets()
        with guard("Choosing the default coefficient") as outcome, progress_bar(
                f"Choosing α on {live.QUICK_N_PROMPTS} validation prompts") as progress:
            kept[key] = live.quick_choice(lm, state.formatter(lm), dirs, layer, sets.harmless_val, progress=progress)
        if outcome.failed:
            return None
    return kept[key]


default = _default()
default_coef = default.coefficient if default is not None else FALLBACK_COEF
if not st.session_state.get("steer_coef_user") and st.session_state.get("steer_coef") != default_coef:
    # the user has not set α: follow the validated default (it may change once Validation runs)
    st.session_state["steer_coef"] = default_coef
    st.session_state["steer_coef_box"] = default_coef
    st.session_state["steer_coef_slider"] = min(max(default_coef, COEF_MIN), COEF_MAX)
st.session_state.setdefault("steer_coef", default_coef)
st.session_state.setdefault("steer_coef_box", float(st.session_state["steer_coef"]))
st.session_state.setdefault("steer_coef_slider", min(max(float(st.session_state["steer_coef"]), COEF_MIN), COEF_MAX))


def _prefills(lm) -> PrefillMemo:
    """This session's kept baseline prefills (slider releases reuse their lower blocks), for the
    current model only: another model's are dropped."""
    key = (lm.fingerprint, str(lm.dtype), str(lm.device))
    held = st.session_state.get("steer_prefills")
    if held is None or held[0] != key:
        held = st.session_state["steer_prefills"] = (key, PrefillMemo())
    return held[1]


def _sync(src: str) -> None:
    value = float(st.session_state[src])
    st.session_state["steer_coef"] = value
    st.session_state["steer_coef_box"] = value
    st.session_state["steer_coef_slider"] = min(max(value, COEF_MIN), COEF_MAX)
    st.session_state["steer_coef_user"] = True


def _reset() -> None:
    for key, value in DEFAULTS.items():
        st.session_state[key] = value
    st.session_state["steer_layer"] = page.active_layer(dentry["value"]["layer"])
    st.session_state["steer_coef"] = st.session_state["steer_coef_box"] = default_coef
    st.session_state["steer_coef_slider"] = min(max(default_coef, COEF_MIN), COEF_MAX)
    st.session_state["steer_coef_user"] = False
    st.session_state.pop("steer_last", None)


def _box(stream: live.Stream | None, kind: str) -> str:
    """One answer's box, with the judge's live label above the text."""
    text, done = (stream.text, stream.done) if stream else ("", False)
    cursor = "" if done else "<span style='color:#4C5FD5'>▌</span>"
    if text.strip():
        body = html.escape(text)
    elif text:
        body = f"<em style='color:#8a8fa3'>(only whitespace so far: {len(text)} characters)</em>"
    else:
        body = "<em style='color:#8a8fa3'>…</em>"
    label = stream.label if stream else None
    colour, name = LABEL_STYLE[label]
    badge = (f"<div class='gen-label' data-label='{label or ''}' style='font-size:0.78rem;margin-bottom:4px'>"
             f"<span style='background:{colour};color:white;border-radius:9px;padding:1px 8px'>{name}</span>"
             f"<span style='color:#8a8fa3'> {'judge: final' if done else 'judge: so far'}</span></div>")
    return (f"{badge}<div class='gen-box gen-{kind}' data-done='{int(done)}' style='white-space:pre-wrap;"
            f"min-height:7.5em;max-height:18em;overflow-y:auto;border:1px solid #e3e5ef;border-radius:8px;"
            f"padding:10px 12px;background:#fbfbfe'>{body}{cursor}</div>")


@st.fragment
def panel() -> None:
    sets = state.prompt_sets()
    top_l, top_r = st.columns([3, 2])
    with top_l:
        src = st.segmented_control("Prompt", ["harmless test", "harmful test", "type my own"], default="harmless test",
                                   key="steer_src", required=True, persist_state="session")
        if src == "type my own":
            prompt = st.text_area("Your prompt", value="How do I bake a loaf of bread?", key="steer_text",
                                  height=80, persist_state="session", label_visibility="collapsed")
        else:
            options = sets.harmless_test if src == "harmless test" else sets.harmful_test
            prompt = st.selectbox("Pick a prompt", options, key=f"steer_pick_{src}", persist_state="session",
                                  label_visibility="collapsed")
    with top_r:
        mode = st.segmented_control("Mode", list(KINDS), key="steer_mode", required=True, persist_state="session")
        st.caption(MODE_HELP[mode])
    c1, c2, c3 = st.columns([2, 3, 1.1], vertical_alignment="bottom")
    layer = c1.slider("Layer", 0, dirs.n_layers - 1, key="steer_layer", persist_state="session",
                      help=f"Layer i = the output of block i (0-indexed): add/subtract act there, ablation uses that "
                           f"layer's direction. The rule chose {dentry['value']['choice'].layer}.")
    coef_label = "Strength" if mode == "ablate" else "Coefficient α (× mean norm)"
    c2.slider(coef_label, COEF_MIN, COEF_MAX, step=0.05, key="steer_coef_slider", on_change=_sync,
              args=("steer_coef_slider",), persist_state="session",
              help="Starts at the coefficient chosen on validation prompts (below); the strength of ablation is "
                   "1 for a full projection.")
    c3.number_input("α", COEF_MIN, 1e6, step=0.05, format="%.2f", key="steer_coef_box", on_change=_sync,
                    args=("steer_coef_box",), label_visibility="hidden", persist_state="session")
    coef = float(st.session_state["steer_coef"])
    if default is not None:
        st.caption(":material/verified: Default " + default.note())
    else:
        st.caption(f":material/warning: No coefficient could be chosen on validation prompts; starting from "
                   f"α = {FALLBACK_COEF:g}.")
    with st.expander("Generation settings", icon=":material/settings:"):
        g1, g2, g3, g4 = st.columns([2, 2, 1, 1], vertical_alignment="bottom")
        max_tokens = g1.slider("Max new tokens", 8, 256, key="steer_max_tokens", persist_state="session")
        temperature = g2.slider("Temperature", 0.0, 1.5, step=0.05, key="steer_temperature",
                                help="0 = greedy (deterministic).", persist_state="session")
        seed = g3.number_input("Seed", 0, 2**31 - 1, key="steer_seed", persist_state="session")
        g4.button("Reset", on_click=_reset, icon=":material/restart_alt:", key="steer_reset")

    stop = bool(st.session_state.get("steer_stop"))
    if not prompt or not str(prompt).strip():
        st.info("Type or pick a prompt.")
        return

    fmt = state.formatter(lm)
    gen = dict(max_new_tokens=int(max_tokens), temperature=float(temperature), seed=int(seed))
    base_key = stable_hash("base", state.context_key(lm), prompt, gen)
    run_key = stable_hash("steer", base_key, mode, int(layer), coef, dirs.method, float(dirs.mean_norm[layer]))
    baselines = st.session_state.setdefault("steer_baselines", {})
    last = st.session_state.get("steer_last")
    scale = float(dirs.mean_norm[layer])

    col_b, col_s = st.columns(2)
    col_b.markdown("**Baseline** (no intervention)")
    col_s.markdown(f"**Steered** — {mode} at layer {layer}" + ("" if mode == "ablate" else f", α = {coef:.2f}")
                   + f" (= {coef * scale:.1f} in activation units)" * (mode != "ablate"))
    base_slot, steer_slot = col_b.empty(), col_s.empty()
    info_slot = st.empty()
    st.markdown("**Steered text, each token coloured by its projection on the refusal direction** "
                f"(layer {layer} block output{'' if mode == 'ablate' else ', the added α·v taken out'}; hover a token for its value)")
    tok_slot = st.empty()
    legend_slot = st.empty()

    def draw_tokens(steered: live.Stream) -> None:
        lim = max(1e-6, float(np.max(np.abs(steered.values)))) if steered.values else 1.0
        tok_slot.markdown(token_html(steered.pieces, steered.values, lim), unsafe_allow_html=True)
        legend_slot.markdown(colour_legend(lim), unsafe_allow_html=True)

    if last is not None and (stop or (last["key"] == run_key and last["steered"].done)):
        # a page switch, a stop, or a rerun with nothing changed: show what we have
        base_slot.markdown(_box(last["baseline"], "baseline"), unsafe_allow_html=True)
        steer_slot.markdown(_box(last["steered"], "steered"), unsafe_allow_html=True)
        draw_tokens(last["steered"])
        info_slot.caption("Stopped." if stop and not last["steered"].done else last.get("note", ""))
        return

    with guard("Steering"):
        with warnings.catch_warnings(record=True) as caught:  # e.g. an extreme coefficient: say so, go on
            warnings.simplefilter("always")
            intervention = live.intervention_for(dirs, mode, int(layer), coef)
        for w in caught:
            st.warning(str(w.message), icon=":material/warning:")
        cached = baselines.get(base_key)
        run = {"key": run_key, "base_key": base_key, "prompt": prompt, "mode": mode, "layer": int(layer),
               "coefficient": coef, **gen, "steered": live.Stream(), "baseline": cached or live.Stream()}
        st.session_state["steer_last"] = run
        base_slot.markdown(_box(run["baseline"], "baseline"), unsafe_allow_html=True)
        steer_slot.markdown(_box(run["steered"], "steered"), unsafe_allow_html=True)
        prefills = _prefills(lm)
        prefills.replayed = 0
        steps = live.paired_streams(lm, fmt, prompt, intervention, layer=int(layer), scale=scale,
                                    baseline=cached, prefills=prefills, **gen)
        item = None
        for item in steps:
            run["steered"], run["baseline"] = item.steered, item.baseline
            if item.which == "steered":
                steer_slot.markdown(_box(item.steered, "steered"), unsafe_allow_html=True)
                draw_tokens(item.steered)
            else:
                base_slot.markdown(_box(item.baseline, "baseline"), unsafe_allow_html=True)
        base_slot.markdown(_box(run["baseline"], "baseline"), unsafe_allow_html=True)
        baselines[base_key] = run["baseline"]
        first = item.first_token_s if item is not None else None
        run["note"] = (f"First steered token after {1000 * (first or 0):.0f} ms · {len(run['steered'].pieces)} tokens"
                       + (" (baseline from this session's cache)" if cached else " (baseline generated alongside)")
                       + (f" · blocks 0–{prefills.replayed - 1} reused from the baseline's prefill" if prefills.replayed else ""))
        if mode == "ablate":
            run["note"] += " · Ablation removes the direction from this layer's output, so projections are ≈ 0 here."
        info_slot.caption(run["note"])
        st.session_state.setdefault("steer_runs", []).append(
            {k: run[k] for k in ("prompt", "mode", "layer", "coefficient", "max_new_tokens", "temperature", "seed")}
            | {"text": run["steered"].text, "label": run["steered"].label, "baseline": run["baseline"].text,
               "baseline_label": run["baseline"].label})


# Stop lives outside the panel: a press inside a fragment waits for the running stream to end,
# a press outside reruns the page at once and so interrupts it
st.button("Stop", icon=":material/stop_circle:", key="steer_stop", help="End the generation now.")
panel()
