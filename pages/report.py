"""Report: export everything computed in this session — Markdown, a self-contained HTML file,
JSON of all numbers, and a config that reruns the same analysis with ``python -m core.batch``.

The files are written by ``core.report.write_reports`` from ``core.results.build_results`` — the
batch runner's own functions — so the app's report and the CLI's cannot drift apart.
"""

from __future__ import annotations

import io
import tempfile
import time
import zipfile
from pathlib import Path

import streamlit as st

from core.bundle import bundle_bytes, folder_files
from core.cache import stable_hash
from core.report import to_json, write_reports
from ui import entries, page, state
from ui.errors import guard
from ui.exports import write_session_direction_files

page.title("Report", "Everything computed in this session, in files you can keep: Markdown, offline HTML "
                     "(charts embedded, no CDN), JSON of every number, and a config for the batch runner.")
lm = page.require_model()

have = {
    "Directions": state.get_result("directions") is not None,
    "Validation": state.get_result("validation") is not None,
    "Patching": state.get_result("patching") is not None,
    "Steering runs": bool(st.session_state.get("steer_runs")),
}
cols = st.columns(len(have))
for col, (name, ok) in zip(cols, have.items()):
    extra = f" ({len(st.session_state.get('steer_runs') or [])})" if name == "Steering runs" and ok else ""
    col.markdown(f":material/{'check_circle' if ok else 'radio_button_unchecked'}: **{name}**{extra}"
                 + ("" if ok else " — not run yet"))

if not have["Directions"]:
    st.info("The report needs at least the directions. Compute them on the **Directions** page.", icon=":material/explore:")
    st.page_link("pages/directions.py", label="Go to Directions", icon=":material/arrow_forward:")
    st.stop()

results = None
with guard("Assembling the results"):
    results = entries.session_results()
if results is None:
    st.stop()

cfg_yaml = entries.session_config().to_yaml()
prompt_files = entries.prompt_files()
digest = stable_hash("report", to_json({k: v for k, v in results.items() if k not in ("date", "machine")}))
built = st.session_state.get("report_files")
if built is None or built.get("digest") != digest:
    built = None
    with guard("Writing the report"), st.spinner("Rendering the report and its charts (offline)…"):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_reports(results, tmp)
            files = {kind: Path(path).read_bytes() for kind, path in paths.items()}
            exported = write_session_direction_files(tmp)  # directions .safetensors + control vector .gguf
            files.update({kind: (name, (Path(tmp) / name).read_bytes()) for kind, name in exported.items()
                          if kind in ("directions", "control_vector")})
            # the reproducible bundle: the batch runner's format (core.bundle), plus the prompt files the config uses
            bundle = bundle_bytes({**folder_files(tmp), "config.yaml": cfg_yaml, **prompt_files})
        built = {"digest": digest, "files": files, "zip": bundle, "seconds": time.perf_counter() - started}
        st.session_state["report_files"] = built
if built is None:
    st.stop()

files = built["files"]
st.subheader("Download")
d1, d2, d3, d4, d5 = st.columns(5)
d1.download_button("HTML report", files["html"], "report.html", "text/html", icon=":material/html:", key="dl_html",
                   on_click="ignore", type="primary", width="stretch")
d2.download_button("Markdown", files["markdown"], "report.md", "text/markdown", icon=":material/article:", key="dl_md",
                   on_click="ignore", width="stretch")
d3.download_button("JSON (all numbers)", files["json"], "results.json", "application/json", icon=":material/data_object:",
                   key="dl_json", on_click="ignore", width="stretch")
if prompt_files:
    cfg_zip = io.BytesIO()
    with zipfile.ZipFile(cfg_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.yaml", cfg_yaml)
        for name, text in prompt_files.items():
            zf.writestr(name, text)
    d4.download_button("Config + prompts", cfg_zip.getvalue(), "config.zip", "application/zip", icon=":material/settings:",
                       key="dl_config", on_click="ignore", width="stretch")
else:
    d4.download_button("Batch config", cfg_yaml, "config.yaml", "application/x-yaml", icon=":material/settings:",
                       key="dl_config", on_click="ignore", width="stretch")
d5.download_button("Everything (.zip)", built["zip"], "refusal-report.zip", "application/zip", icon=":material/folder_zip:",
                   key="dl_zip", on_click="ignore", width="stretch")
st.caption(f"Rendered in {built['seconds']:.1f} s. Rerun the same analysis headless with "
           "`python -m core.batch --config config.yaml --out results/`"
           + (" (unzip first: the config refers to the prompt files beside it)." if prompt_files else "."))

e1, e2 = st.columns(2)
if "directions" in files:
    e1.download_button("Directions (.safetensors)", files["directions"][1], files["directions"][0], "application/octet-stream",
                       icon=":material/download:", key="dl_directions", on_click="ignore", width="stretch",
                       help="Every layer's direction and the chosen layer, with the model's fingerprint; the Steering "
                            "page (and core.direction_files.load_directions) loads it back.")
if "control_vector" in files:
    e2.download_button("llama.cpp control vector (.gguf)", files["control_vector"][1], files["control_vector"][0],
                       "application/octet-stream", icon=":material/download:", key="dl_cvec", on_click="ignore",
                       width="stretch", help="The chosen layer's direction × its mean norm: "
                                             "llama-cli --control-vector-scaled FILE 0.5 adds this tool's α = 0.5 there.")

with st.expander("Batch config (YAML)", icon=":material/settings:"):
    st.code(cfg_yaml, language="yaml")
with st.expander("Preview (Markdown)", icon=":material/visibility:"):
    text = files["markdown"].decode("utf-8")
    st.markdown("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("![")))
