"""Steering (live): baseline and steered generations stream side by side as the slider moves.

Everything interactive lives in one ``st.fragment``, so moving a control reruns only this panel.
Generation goes through ``core.generation`` / ``core.steering``: hooks exist only inside each
forward step (under the model's lock), so two browser tabs steering the same cached model at
once never see each other's edits, and an interrupted stream leaves nothing attached.
"""

from __future__ import annotations

import html
import time
import warnings

import numpy as np
import streamlit as st

from core.cache import stable_hash
from core.generation import generate_stream
from core.steering import KINDS, ablate, add, steered_stream, subtract
from ui import page, state
from ui.charts import colour_legend, token_html
from ui.direction_upload import loaded_directions
from ui.errors import guard

DEFAULTS = {"steer_mode": "add", "steer_coef": 0.5, "steer_max_tokens": 48, "steer_temperature": 0.0, "steer_seed": 0}
COEF_MIN, COEF_MAX = 0.0, 3.0
MODE_HELP = {
    "add": "Add α × (mean norm) × direction at the chosen layer's output, at every position.",
    "subtract": "Subtract α × (mean norm) × direction at the chosen layer's output.",
    "ablate": "Project the chosen layer's direction out of every block, attention and MLP output "
              "(strength: 1 = full ablation, < 1 partial).",
}

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
st.session_state.setdefault("steer_coef_box", float(st.session_state["steer_coef"]))
st.session_state.setdefault("steer_coef_slider", min(max(float(st.session_state["steer_coef"]), COEF_MIN), COEF_MAX))


def _sync(src: str) -> None:
    value = float(st.session_state[src])
    st.session_state["steer_coef"] = value
    st.session_state["steer_coef_box"] = value
    st.session_state["steer_coef_slider"] = min(max(value, COEF_MIN), COEF_MAX)


def _reset() -> None:
    for key, value in DEFAULTS.items():
        st.session_state[key] = value
    st.session_state["steer_layer"] = page.active_layer(dentry["value"]["layer"])
    st.session_state["steer_coef_box"] = st.session_state["steer_coef_slider"] = DEFAULTS["steer_coef"]
    st.session_state.pop("steer_last", None)


def _box(text: str, done: bool, kind: str, muted: bool = False) -> str:
    cursor = "" if done else "<span style='color:#4C5FD5'>▌</span>"
    colour = "#8a8fa3" if muted else "inherit"
    if text.strip():
        body = html.escape(text)
    elif text:
        body = f"<em style='color:#8a8fa3'>(only whitespace so far: {len(text)} characters)</em>"
    else:
        body = "<em style='color:#8a8fa3'>…</em>"
    return (f"<div class='gen-box gen-{kind}' data-done='{int(done)}' style='white-space:pre-wrap;min-height:7.5em;"
            f"max-height:18em;overflow-y:auto;border:1px solid #e3e5ef;border-radius:8px;"
            f"padding:10px 12px;background:#fbfbfe;color:{colour}'>{body}{cursor}</div>")


def _append_piece(pieces: list[str], new: str) -> None:
    """Add the newest token's text so that ``"".join(pieces) == new`` (decode differences keep
    spaces right; when a byte-level token completes a character, earlier pieces are trimmed)."""
    prev = "".join(pieces)
    common = 0
    for a, b in zip(prev, new):
        if a != b:
            break
        common += 1
    excess = len(prev) - common
    for i in range(len(pieces) - 1, -1, -1):
        if excess <= 0:
            break
        cut = min(excess, len(pieces[i]))
        pieces[i] = pieces[i][: len(pieces[i]) - cut]
        excess -= cut
    pieces.append(new[common:])


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
              args=("steer_coef_slider",), persist_state="session")
    c3.number_input("α", COEF_MIN, 1e6, step=0.05, format="%.2f", key="steer_coef_box", on_change=_sync,
                    args=("steer_coef_box",), label_visibility="hidden", persist_state="session")
    coef = float(st.session_state["steer_coef"])
    with st.expander("Generation settings", icon=":material/settings:"):
        g1, g2, g3, g4 = st.columns([2, 2, 1, 1], vertical_alignment="bottom")
        max_tokens = g1.slider("Max new tokens", 8, 256, key="steer_max_tokens", persist_state="session")
        temperature = g2.slider("Temperature", 0.0, 1.5, step=0.05, key="steer_temperature",
                                help="0 = greedy (deterministic).", persist_state="session")
        seed = g3.number_input("Seed", 0, 2**31 - 1, key="steer_seed", persist_state="session")
        g4.button("Reset", on_click=_reset, icon=":material/restart_alt:", key="steer_reset")

    stop = st.button("Stop", icon=":material/stop_circle:", key="steer_stop", help="End the generation now.")
    if not prompt or not str(prompt).strip():
        st.info("Type or pick a prompt.")
        return

    fmt = state.formatter(lm)
    context = state.context_key(lm)
    gen = dict(max_new_tokens=int(max_tokens), temperature=float(temperature), seed=int(seed))
    base_key = stable_hash("base", context, prompt, gen)
    run_key = stable_hash("steer", base_key, mode, int(layer), coef, dirs.method, float(dirs.mean_norm[layer]))
    baselines = st.session_state.setdefault("steer_baselines", {})
    last = st.session_state.get("steer_last")

    col_b, col_s = st.columns(2)
    col_b.markdown("**Baseline** (no intervention)")
    col_s.markdown(f"**Steered** — {mode} at layer {layer}" + ("" if mode == "ablate" else f", α = {coef:.2f}")
                   + f" (= {coef * float(dirs.mean_norm[layer]):.1f} in activation units)" * (mode != "ablate"))
    base_slot, steer_slot = col_b.empty(), col_s.empty()
    info_slot = st.empty()
    st.markdown("**Steered text, each token coloured by its projection on the refusal direction** "
                f"(layer {layer} block output{'' if mode == 'ablate' else ', the added α·v taken out'}; hover a token for its value)")
    tok_slot = st.empty()
    legend_slot = st.empty()

    def draw(run: dict, baseline: dict | None) -> None:
        base_slot.markdown(_box(baseline["text"] if baseline else "", bool(baseline and baseline["done"]), "baseline"),
                           unsafe_allow_html=True)
        steer_slot.markdown(_box(run["text"], run["done"], "steered"), unsafe_allow_html=True)
        lim = max(1e-6, float(np.max(np.abs(run["values"])))) if run["values"] else 1.0
        tok_slot.markdown(token_html(run["pieces"], run["values"], lim), unsafe_allow_html=True)
        legend_slot.markdown(colour_legend(lim), unsafe_allow_html=True)

    if last is not None and (stop or (last["key"] == run_key and last["done"])):
        # a page switch, a stop, or a rerun with nothing changed: show what we have
        draw(last, baselines.get(last["base_key"]) or last.get("baseline"))
        note = "Stopped." if stop and not last["done"] else last.get("note", "")
        info_slot.caption(note)
        return

    with guard("Steering"):
        with warnings.catch_warnings(record=True) as caught:  # e.g. an extreme coefficient: say so, go on
            warnings.simplefilter("always")
            if mode == "add":
                interventions = [add(dirs, int(layer), coef)]
            elif mode == "subtract":
                interventions = [subtract(dirs, int(layer), coef)]
            else:
                interventions = [ablate(dirs, int(layer), strength=coef)]
        for w in caught:
            st.warning(str(w.message), icon=":material/warning:")
        unit = dirs.direction(int(layer))
        scale = float(dirs.mean_norm[layer])
        block = lm.block_names[int(layer)]
        offset = interventions[0].magnitude if mode != "ablate" else 0.0
        run = {"key": run_key, "base_key": base_key, "text": "", "pieces": [], "values": [], "done": False,
               "prompt": prompt, "mode": mode, "layer": int(layer), "coefficient": coef, **gen}
        st.session_state["steer_last"] = run
        baseline = baselines.get(base_key)
        base_iter = None
        generated_baseline = baseline is None or not baseline["done"]
        if generated_baseline:
            baseline = {"text": "", "done": False}
            base_iter = generate_stream(lm, fmt, [prompt], **gen)
        run["baseline"] = baseline
        started = time.perf_counter()
        first_token = None
        steps = 0
        draw(run, baseline)
        for step in steered_stream(lm, fmt, [prompt], interventions, retain=[block], **gen):
            steps += 1
            if step.token_ids[0] and len(step.token_ids[0]) > len(run["pieces"]):
                vec = step.retained[block][0].numpy()
                _append_piece(run["pieces"], step.texts[0])
                # display only: projection in mean-norm units, minus the edit's own (exactly known)
                # contribution, so colours show what the model writes, not the constant we added
                run["values"].append((float(vec @ unit) - offset) / scale)
            run["text"] = step.texts[0]
            run["done"] = step.done[0]
            if first_token is None:
                first_token = time.perf_counter() - started
            if base_iter is not None:
                b = next(base_iter, None)
                if b is None:
                    baseline["done"] = True
                    base_iter = None
                else:
                    baseline["text"], baseline["done"] = b.texts[0], b.done[0]
            draw(run, baseline)
        while base_iter is not None:  # the steered answer ended first
            b = next(base_iter, None)
            if b is None:
                break
            baseline["text"], baseline["done"] = b.texts[0], b.done[0]
            draw(run, baseline)
        baseline["done"] = True
        baselines[base_key] = baseline
        run["done"] = True
        elapsed = time.perf_counter() - started
        run["note"] = (f"First steered token after {1000 * (first_token or 0):.0f} ms · {steps} steps in {elapsed:.1f} s"
                       + (" (baseline generated alongside)" if generated_baseline else " (baseline from this session's cache)"))
        if mode == "ablate":
            run["note"] += " · Ablation removes the direction from this layer's output, so projections are ≈ 0 here."
        draw(run, baseline)
        info_slot.caption(run["note"])
        st.session_state.setdefault("steer_runs", []).append(
            {k: run[k] for k in ("prompt", "mode", "layer", "coefficient", "max_new_tokens", "temperature", "seed", "text")}
            | {"baseline": baseline["text"]}
        )


panel()
