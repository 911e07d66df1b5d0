"""Overview: what the tool is and what to do first."""

from __future__ import annotations

import streamlit as st

from core.metrics import Rate
from ui import state

# Held-out test split, greedy answers judged refusal by core.judge: harmful refused, harmless
# refused. The organism's come from its card when it is built (else the default recipe's card as
# measured, README "The refusal organism"); the prompted preset's are in core/formatting.py.
ORGANISM_TEST = (Rate(60, 66), Rate(11, 67))
PROMPTED_TEST = (Rate(41, 66), Rate(19, 67))


def organism_test_rates() -> tuple[Rate, Rate]:
    """The built organism's own card figures, or the documented ones when it is not built."""
    try:
        from core.organism import built_organism_folder, load_card

        folder = built_organism_folder()
        if folder is not None:
            ev = load_card(folder).evaluation
            return (Rate(ev["harmful_refusal"]["k"], ev["harmful_refusal"]["n"]),
                    Rate(ev["harmless_refusal"]["k"], ev["harmless_refusal"]["n"]))
    except Exception:  # noqa: BLE001  (the overview must render whatever the cache holds)
        pass
    return ORGANISM_TEST

st.title("Refusal Circuit Explorer")
st.markdown(
    "Find where a chat model decides to **refuse**, check that the finding is real, and steer it live. "
    "Everything runs locally on the model chosen in the sidebar; every rate is shown with its sample size "
    "and a 95 % interval, and every direction with the layer, position and prompt split it came from."
)

lm = state.current_model()
sets = state.prompt_sets()
c1, c2, c3 = st.columns(3)
cards = [
    (c1, ":material/neurology:", "Model", lm.name if lm else "not loaded",
     f"{lm.n_layers} layers · d={lm.d_model} · {str(lm.dtype).replace('torch.', '')}" if lm else "choose one in the sidebar"),
    (c2, ":material/list:", "Prompts", sets.summary() if sets else "—", sets.source if sets else ""),
    (c3, ":material/tune:", "Preamble · position", f"{state.preamble().name} · {state.position()}",
     "change them in the sidebar"),
]
for col, icon, label, value, note in cards:
    with col.container(border=True):
        st.caption(f"{icon} {label}")
        st.markdown(f"**{value}**")
        st.caption(note)

organism_on = lm is not None and lm.source == "embedded-refusal"
if lm is not None and lm.source in ("embedded", "embedded-refusal"):
    organism_rates = organism_test_rates()
    figures = (f"on the held-out test prompts the organism refused {organism_rates[0]} of harmful and "
               f"{organism_rates[1]} of harmless prompts, where the prompted preamble refused {PROMPTED_TEST[0]} and "
               f"{PROMPTED_TEST[1]}")
    if organism_on:
        why = (f"**Why this model:** the app starts on the refusal-tuned organism because its refusal is trained into "
               f"its weights and far more selective than the prompted preamble's — {figures}. It is already built on "
               f"this machine, so it loads in seconds.")
    else:
        why = (f"**Why this setup:** the refusal-tuned organism's refusal is trained into its weights and far more "
               f"selective — {figures} — but its first build takes a few minutes on a CPU without bf16 units, so the "
               f"app starts on the prompted preamble. Choose *Embedded refusal-tuned organism* in the sidebar to build "
               f"it once; from then on the app starts on it.")
    st.info(why, icon=":material/science:")

st.subheader("What to do first")
steps = [
    ("pages/directions.py", ":material/explore:", "1 · Directions",
     "Press **Compute directions**: one refusal direction per layer, with held-out separation and probe accuracy."),
    ("pages/steering.py", ":material/tune:", "2 · Steering (live)",
     "Pick a prompt, move the coefficient slider and watch baseline and steered answers stream side by side."),
    ("pages/validation.py", ":material/fact_check:", "3 · Validation",
     "Force and suppress refusal across a coefficient sweep, against random directions of the same norm and a "
     "label-shuffled one."),
    ("pages/patching.py", ":material/grid_on:", "4 · Patching",
     "Patch activations between matched harmful/harmless prompts to see which layers and components carry refusal."),
    ("pages/report.py", ":material/description:", "5 · Report",
     "Download everything computed in this session: Markdown, offline HTML, JSON, and a config for the batch runner."),
    ("pages/runs.py", ":material/folder_open:", "6 · Runs",
     "Open a batch run (its output folder, bundle.zip or results.json): the table across models and each model's charts."),
]
for path, icon, label, text in steps:
    with st.container(border=True):
        a, b = st.columns([1, 3], vertical_alignment="center")
        a.page_link(path, label=label, icon=icon)
        b.markdown(text)

with st.expander("What is being measured", icon=":material/school:"):
    st.markdown(
        "- **Refusal direction** — the difference between the mean residual-stream activation on harmful and on "
        "harmless prompts at one layer and token position (Arditi et al., 2024).\n"
        "- **Separation (σ)** — how far apart the two classes' projections on that direction are, in pooled "
        "standard deviations, measured on *held-out* prompts (the in-sample number is shown too, and is inflated).\n"
        "- **Steering** — adding the direction (× the layer's mean activation norm) should make harmless prompts "
        "refused; ablating it everywhere should stop refusals. A random direction of equal norm is the control.\n"
        "- **The default model** is a 135M-parameter chat model that hardly refuses on its own; the "
        "*prompted-refusal* preamble (system prompt + demonstrations) makes it refuse, and the *refusal-tuned "
        "organism* has refusal trained into its weights."
    )
