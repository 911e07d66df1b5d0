"""The shared sidebar: model, prompt sets, formatting, position, and a status line.

Rendered by ``app.py`` on every run, so its state survives page switches. Loading a model is
explicit (a button), except on the very first visit, when the embedded model loads by itself.
"""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import streamlit as st
import torch

from core.cache import default_cache
from core.formatting import PRESETS, Preamble, get_preamble
from core.prompts import MIN_VALIDATION, builtin_three_way, parse_prompt_bytes, split_prompts, take, three_way

from ui import state
from ui.errors import guard
from ui.progress import progress_bar

DTYPES = ["auto", "float32", "bfloat16", "float16"]
DEFAULT_N_TRAIN = 48
DEFAULT_N_TEST = 32
UPLOAD_TYPES = ["txt", "csv", "jsonl"]


def _devices() -> list[str]:
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


# -- model ----------------------------------------------------------------------------------
def load(new_spec: dict[str, Any], where) -> bool:
    """Load ``new_spec`` (cached per source/dtype/device) with a progress bar; False on failure."""
    source = state.source_string(new_spec)
    with guard("Loading the model") as outcome, where:
        if not source:
            raise ValueError("Enter a hub id or a path first.")
        with progress_bar(f"Loading {source}", where) as progress:
            lm = state.cached_model(source, new_spec["dtype"], new_spec["device"],
                                    bool(new_spec.get("trust_remote_code")), _progress=progress)
        state.set_model(lm, new_spec)
    return not outcome.failed


def model_section() -> None:
    current = state.spec()
    kinds = list(state.SOURCES)
    kind = st.selectbox("Model", kinds, index=kinds.index(current["kind"]), format_func=state.SOURCES.get,
                        key="sb_kind", help="Which model to analyse.")
    st.caption(state.SOURCE_HELP[kind])
    path = ""
    trust = False
    if kind == "hub":
        path = st.text_input("Hub id", value=current["path"] if current["kind"] == "hub" else "",
                             placeholder="e.g. Qwen/Qwen2.5-0.5B-Instruct", key="sb_hub")
    elif kind == "folder":
        path = st.text_input("Folder", value=current["path"] if current["kind"] == "folder" else "",
                             placeholder="/path/to/model", key="sb_folder")
    elif kind == "gguf":
        path = st.text_input("GGUF path", value=current["path"] if current["kind"] == "gguf" else "",
                             placeholder="/path/to/model.gguf", key="sb_gguf")
    if kind in ("hub", "folder"):
        trust = st.checkbox("Allow the model's own code (trust_remote_code)", value=False, key="sb_trust",
                            help="Runs Python code shipped with the model. Only for sources you trust.")
        if trust:
            st.warning("trust_remote_code runs code from the model's files on this machine.", icon=":material/warning:")
    c1, c2 = st.columns(2)
    dtype = c1.selectbox("dtype", DTYPES, index=DTYPES.index(current.get("dtype", "auto")), key="sb_dtype",
                         help="auto = bfloat16 on CPUs with native bf16 units (faster; statistics are still "
                              "accumulated in float32), else float32; bfloat16 (or float16) on GPUs. "
                              "float32 for bit-level reproducibility.")
    devices = _devices()
    device = c2.selectbox("device", devices,
                          index=devices.index(current["device"]) if current.get("device") in devices else 0,
                          key="sb_device")
    new_spec = {"kind": kind, "path": path, "dtype": dtype, "device": device, "trust_remote_code": trust}
    status = st.container()
    if state.current_model() is None and not st.session_state.get("_autoload_tried"):
        st.session_state["_autoload_tried"] = True  # first visit: load the default without asking
        load(state.spec(), status)
    loaded = state.current_model()
    changed = loaded is None or new_spec != state.spec()
    if st.button("Load model", type="primary" if changed else "secondary", key="sb_load",
                 icon=":material/download:", width="stretch"):
        load(new_spec, status)
    elif changed and loaded is not None:
        st.caption("Settings changed — press **Load model** to switch.")


# -- prompts ----------------------------------------------------------------------------------
def _builtin_sets(n_train: int, n_test: int) -> state.PromptSets:
    # validation: the default share of the canonical train split (as a batch config's prompts.validation_fraction)
    h, b = builtin_three_way("harmful"), builtin_three_way("harmless")
    n_train = min(n_train, len(h.train), len(b.train))
    return state.PromptSets(take(h.train, n_train), take(b.train, n_train), take(h.test, n_test), take(b.test, n_test),
                            description=f"built-in ({n_train} train + {n_test} test per class)",
                            harmful_val=h.validation, harmless_val=b.validation)


def _parse_upload(upload) -> tuple[list[str], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = parse_prompt_bytes(upload.getvalue(), upload.name)
    return prompts, [str(w.message) for w in caught]


def _uploaded_sets() -> state.PromptSets | None:
    st.caption("One prompt per line (.txt), a `prompt` column (.csv) or `{\"prompt\": …}` lines (.jsonl). "
               "Each set is split 70/30 into train and test; a quarter of train becomes validation.")
    files = {
        "harmful": st.file_uploader("Harmful prompts", type=UPLOAD_TYPES, key="sb_up_harmful"),
        "harmless": st.file_uploader("Harmless prompts", type=UPLOAD_TYPES, key="sb_up_harmless"),
    }
    if not any(files.values()):
        st.info("Upload at least one file; until then the current prompts stay in use.", icon=":material/upload:")
        return None
    splits, notes, names = {}, [], []
    for label, upload in files.items():
        if upload is None:
            splits[label] = builtin_three_way(label)
            notes.append(f"No {label} file: using the built-in {label} set.")
            names.append(f"built-in {label}")
            continue
        with guard(f"Reading {upload.name}") as outcome:
            prompts, warns = _parse_upload(upload)
            if len(prompts) < 8:
                raise ValueError(f"{upload.name}: only {len(prompts)} prompt(s); at least 8 per class are needed "
                                 "(some to train on, some to choose the layer with, some held out).")
            splits[label] = three_way(split_prompts(prompts, 0.3, seed=0), seed=0, setting="validation share",
                                      label=f"{upload.name} train")
            notes.extend(warns)
            names.append(upload.name)
        if outcome.failed:
            return None
    for note in notes:
        st.caption(note)
    h, b = splits["harmful"], splits["harmless"]
    return state.PromptSets(h.train, b.train, h.test, b.test, description="uploaded: " + " + ".join(names), notes=notes,
                            harmful_val=h.validation, harmless_val=b.validation)


def _edited_sets() -> state.PromptSets | None:
    base = st.session_state.get("_edit_base")
    if base is None:
        current = state.prompt_sets() or _builtin_sets(DEFAULT_N_TRAIN, DEFAULT_N_TEST)
        rows = [(c, s, p) for c, s, items in (
            ("harmful", "train", current.harmful_train), ("harmless", "train", current.harmless_train),
            ("harmful", "validation", current.harmful_val), ("harmless", "validation", current.harmless_val),
            ("harmful", "test", current.harmful_test), ("harmless", "test", current.harmless_test),
        ) for p in items]
        base = pd.DataFrame(rows, columns=["class", "split", "prompt"])
        st.session_state["_edit_base"] = base
    st.caption("Edit, add or delete rows (widen the sidebar by dragging its edge).")
    df = st.data_editor(
        base, num_rows="dynamic", key="sb_editor", hide_index=True, height=260,
        column_config={
            "class": st.column_config.SelectboxColumn("class", options=["harmful", "harmless"], required=True, width="small"),
            "split": st.column_config.SelectboxColumn("split", options=["train", "validation", "test"], required=True,
                                                      width="small"),
            "prompt": st.column_config.TextColumn("prompt", required=True, width="large"),
        },
    )
    df = df.dropna()
    df = df[df["prompt"].astype(str).str.strip() != ""]
    groups = {(c, s): df[(df["class"] == c) & (df["split"] == s)]["prompt"].astype(str).str.strip().tolist()
              for c in ("harmful", "harmless") for s in ("train", "validation", "test")}
    need = {"train": 2, "validation": MIN_VALIDATION, "test": 1}
    short = [f"{c} {s}" for (c, s), items in groups.items() if len(items) < need[s]]
    if short:
        st.error(f"Too few prompts in: {', '.join(short)}. Each class needs at least 2 train, {MIN_VALIDATION} validation "
                 "and 1 test prompt. The previous prompts stay in use.", icon=":material/error:")
        return None
    from core.errors import SplitError
    from core.prompts import check_disjoint

    try:
        check_disjoint({"test": groups["harmful", "test"] + groups["harmless", "test"]},
                       {s: groups["harmful", s] + groups["harmless", s] for s in ("train", "validation")})
    except SplitError as exc:
        st.error(f"{exc} The previous prompts stay in use.", icon=":material/error:")
        return None
    return state.PromptSets(groups["harmful", "train"], groups["harmless", "train"], groups["harmful", "test"],
                            groups["harmless", "test"], description="edited table",
                            harmful_val=groups["harmful", "validation"], harmless_val=groups["harmless", "validation"])


def prompts_section() -> None:
    mode = st.segmented_control("Prompt sets", ["Built-in", "Upload", "Edit"], default="Built-in",
                                key="sb_prompt_mode", required=True)
    sets: state.PromptSets | None = None
    if mode == "Built-in":
        c1, c2 = st.columns(2)
        n_train = c1.number_input("train / class", 4, 115, DEFAULT_N_TRAIN, step=8, key="sb_n_train",
                                  help="Prompts per class used to fit the direction. A quarter of the built-in train "
                                       "split is set aside as validation (it chooses the position and layer).")
        n_test = c2.number_input("test / class", 2, 66, DEFAULT_N_TEST, step=8, key="sb_n_test",
                                 help="Held-out prompts per class: they only produce reported figures.")
        sets = _builtin_sets(int(n_train), int(n_test))
    elif mode == "Upload":
        sets = _uploaded_sets()
    else:
        sets = _edited_sets()
    if mode != "Edit":
        st.session_state.pop("_edit_base", None)
    if sets is not None:
        st.session_state["prompt_sets"] = sets
    current = state.prompt_sets()
    if current is None:  # an upload failed before any prompts existed
        current = _builtin_sets(DEFAULT_N_TRAIN, DEFAULT_N_TEST)
        st.session_state["prompt_sets"] = current
    st.caption(f"In use: {current.source} — {current.summary()}.")


# -- formatting ------------------------------------------------------------------------------
def preamble_section() -> None:
    names = [*PRESETS, "custom"]
    lm = state.current_model()
    # the organism refuses on its own; Gemma-3-270M base runs as the seed ran base models, without one
    default = "none" if lm is not None and lm.source in ("embedded-refusal", "gemma-3-270m") else "prompted-refusal"
    choice = st.selectbox("Preamble", names, index=names.index(default), key="sb_preamble",
                          help="Text placed before every prompt. 'prompted-refusal' = a system prompt plus "
                               "demonstrations that make the small chat model refuse harmful requests.")
    if choice == "custom":
        base = PRESETS["prompted-refusal"]
        system = st.text_area("System prompt", value=base.system, key="sb_system", height=120)
        demos = st.data_editor(
            pd.DataFrame(list(base.demonstrations), columns=["user", "assistant"]), num_rows="dynamic",
            key="sb_demos", hide_index=True,
        ).dropna()
        preamble = Preamble("custom", system.strip() or None,
                            tuple((str(u), str(a)) for u, a in demos.itertuples(index=False) if str(u).strip()))
    else:
        preamble = get_preamble(choice)
        if choice == "prompted-refusal":
            st.caption(f"System prompt + {len(preamble.demonstrations)} demonstrations (half refusals).")
        elif lm is not None and lm.source == "embedded" and choice == "none":
            st.caption("Without a preamble the 135M chat model rarely refuses: there is little to find.")
    if lm is not None and lm.source == "embedded-refusal" and choice != "none":
        st.caption(":material/info: The organism refuses without a preamble; choose **none** to study its "
                   "trained-in refusal.")
    st.session_state["preamble_value"] = preamble.to_dict()


def position_section() -> None:
    lm = state.current_model()
    options: list[Any] = ["last", "mean"]
    labels = {"last": "last token", "mean": "mean over the instruction"}
    if lm is not None:
        with guard("Reading the template's positions"):
            fmt = state.formatter(lm)
            enc = fmt.encode(["x"])
            ids = enc.input_ids[0].tolist()
            for offset in fmt.post_instruction_positions("x")[:6]:
                token = lm.tokenizer.decode([ids[offset]])
                options.append(offset)
                labels[offset] = f"{offset}  ({token!r})"
    current = state.position()
    choice = st.selectbox("Position", options, index=options.index(current) if current in options else 0,
                          format_func=lambda o: labels.get(o, str(o)), key="sb_position",
                          help="Which token's residual stream the directions are read from. Negative numbers "
                               "count back from the end of the prompt template.")
    st.session_state["position_value"] = choice


def status_line() -> None:
    lm = state.current_model()
    cache = default_cache()
    if lm is None:
        st.caption(":material/error: no model loaded")
        return
    dtype = str(lm.dtype).replace("torch.", "")
    st.caption(
        f":material/memory: **{lm.name}** · {lm.n_layers} layers · d={lm.d_model} · {dtype} · {lm.device}  \n"
        f":material/cached: activation cache: {cache.hits} hits, {cache.misses} misses"
        + (" (in memory)" if cache.in_memory else "")
    )
    for note in lm.notes:
        st.caption(f":material/info: {note}")
    if cache.warning:
        st.warning(cache.warning, icon=":material/warning:")


def render() -> None:
    """Draw the whole sidebar (called by app.py before the page runs)."""
    with st.sidebar:
        with st.expander("Model", expanded=state.current_model() is None, icon=":material/neurology:"):
            model_section()
        with st.expander("Prompts", expanded=False, icon=":material/list:"):
            prompts_section()
        with st.expander("Preamble & position", expanded=False, icon=":material/tune:"):
            preamble_section()
            position_section()
        with st.expander("Judge", expanded=False, icon=":material/gavel:"):
            from ui.judge import judge_section

            judge_section()
        status_line()
