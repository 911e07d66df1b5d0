"""The app's interop: the Report page offers the directions file and the control vector (also
inside Everything (.zip)), and what it offers loads back for the same model."""

from __future__ import annotations

import io
import zipfile

from test_app import _no_exceptions, compute_directions, new_app


def test_report_offers_directions_and_control_vector(tiny_dirs):
    from core.control_vectors import read_control_vector
    from core.direction_files import load_directions

    at = compute_directions(new_app(tiny_dirs))
    at.switch_page("pages/report.py").run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    built = at.session_state["report_files"]
    labels = {b.label for b in at.get("download_button")}
    assert "Directions (.safetensors)" in labels
    name, data = built["files"]["directions"]
    lm = at.session_state["_lm"]
    saved = load_directions(data, model=lm, name=name)
    assert saved.layer is not None and saved.meta["prompts"]["harmful_train"]["n"] == 8
    names = zipfile.ZipFile(io.BytesIO(built["zip"])).namelist()
    assert name in names
    if saved.layer >= 1:
        assert "llama.cpp control vector (.gguf)" in labels and built["files"]["control_vector"][0] in names
    at.switch_page("pages/steering.py").run()  # the uploader renders beside computed directions
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
