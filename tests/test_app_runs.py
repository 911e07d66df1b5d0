"""The Runs page through AppTest, on a run the batch runner made on a tiny model: opening the
folder draws the table and the charts, a bad path shows st.error, and a row's direction goes to
the Steering page (checked against the loaded model)."""

from __future__ import annotations

import pytest

from test_app import _charts, _no_exceptions, new_app
from test_runs import make_run


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("apprun"), str(tiny_dirs["llama"]))


def open_page(at, folder):
    at.switch_page("pages/runs.py").run()
    _no_exceptions(at)
    at.text_input(key="runs_folder").set_value(str(folder))
    at.button(key="runs_open").click().run()
    _no_exceptions(at)
    return at


def test_runs_page_opens_a_folder_and_loads_a_direction_into_steering(tiny_dirs, run_dir):
    at = open_page(new_app(tiny_dirs), run_dir)
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert list(table["Model"]) == ["tiny"] and "Critical components" in table.columns
    assert _charts(at) >= 3  # layers, selection grid, sweeps, patching
    at.button(key="runs_load_0").click().run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    loaded = at.session_state["results"]["loaded_directions"]["value"]
    assert loaded["layer"] == at.session_state["runs_opened"].models[0]["layer"]
    at.switch_page("pages/steering.py").run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    assert int(at.slider(key="steer_layer").value) == loaded["layer"]
    assert any("tiny" in c.value and "chosen layer" in c.value for c in at.caption)  # the Steering page shows the file


def test_runs_page_without_a_model_shows_the_table_and_disables_loading(run_dir):
    from streamlit.testing.v1 import AppTest

    from test_app import APP, TIMEOUT

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_spec"] = {"kind": "folder", "path": str(run_dir / "no-model"), "dtype": "float32",
                                      "device": "cpu", "trust_remote_code": False}
    at.run()
    open_page(at, run_dir)
    assert len(at.dataframe[0].value) == 1
    assert at.button(key="runs_load_0").disabled


def test_a_bad_folder_shows_an_error_not_a_traceback(tiny_dirs, tmp_path):
    at = open_page(new_app(tiny_dirs), tmp_path / "missing")
    assert at.error and "no such folder" in at.error[0].value
    at.text_input(key="runs_folder").set_value(str(tmp_path)).run()
    at.button(key="runs_open").click().run()
    _no_exceptions(at)
    assert "neither results.json nor bundle.zip" in at.error[0].value
