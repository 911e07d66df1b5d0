"""The Streamlit app, page by page, through ``streamlit.testing.v1.AppTest`` on a tiny real model
loaded through the sidebar's local-folder source (no mocks): every page renders without an
exception, the main actions produce their charts and tables, bad input shows ``st.error``."""

from __future__ import annotations

import json
import zipfile
import io

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.hooks import remaining_hooks

APP = str(REPO / "app.py")
TIMEOUT = 240


def _no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _walk(node):
    children = getattr(node, "children", None)
    if isinstance(children, dict):
        for child in children.values():
            yield child
            yield from _walk(child)


def _charts(at: AppTest) -> int:
    """Altair charts drawn in the main area."""
    return sum(1 for el in _walk(at.main) if getattr(el, "type", "") in ("vega_lite_chart", "arrow_vega_lite_chart"))


def run_main(at: AppTest) -> AppTest:
    """Rerun through app.py (sidebar + navigation). AppTest reruns a multipage app's *page file*
    directly after the first run, which skips the sidebar drawn in app.py; clearing the page
    hash makes it run the entry script again, as the browser does on every rerun."""
    at._page_hash = ""
    at._finished_page_script_hash = ""
    return at.run()


def new_app(tiny_dirs, arch: str = "llama", n_train: int = 8, n_test: int = 6) -> AppTest:
    """The app on a tiny model loaded through the sidebar's local-folder source."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_spec"] = {"kind": "folder", "path": str(tiny_dirs[arch]), "dtype": "float32",
                                      "device": "cpu", "trust_remote_code": False}
    at.session_state["sb_n_train"] = n_train
    at.session_state["sb_n_test"] = n_test
    at.run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    return at


def compute_directions(at: AppTest) -> AppTest:
    at.switch_page("pages/directions.py").run()
    _no_exceptions(at)
    at.button(key="dir_compute").click().run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    return at


@pytest.fixture(scope="module")
def app_with_directions(tiny_dirs):
    return compute_directions(new_app(tiny_dirs))


def test_home_renders_and_loads_the_model_from_the_sidebar(tiny_dirs):
    at = new_app(tiny_dirs)
    assert at.title[0].value == "Refusal Circuit Explorer"
    assert at.session_state["_lm"].n_layers == 3
    assert any("8+8 train, 39+40 validation, 6+6 test" in m.value for m in at.markdown)
    caption = " ".join(c.value for c in at.sidebar.caption)
    assert "3 layers" in caption and "activation cache" in caption


@pytest.mark.parametrize("page", ["directions", "patching", "steering", "validation", "report", "runs"])
def test_every_page_renders_before_any_work(tiny_dirs, page):
    at = new_app(tiny_dirs)
    at.switch_page(f"pages/{page}.py").run()
    _no_exceptions(at)
    assert not at.error
    assert at.title  # each page has its title and a next step (button or info)
    assert at.button or at.info


def test_directions_page_draws_its_charts_and_table(app_with_directions):
    at = app_with_directions
    assert _charts(at) >= 3  # layer chart, histogram, cosine heatmap
    assert len(at.dataframe) >= 1
    entry = at.session_state["results"]["directions"]
    dirs = entry["value"]["dirs"]
    assert dirs.n_layers == 3 and dirs.n_train == (8, 8) and dirs.n_test == (6, 6)
    assert [m.label for m in at.metric][0].startswith("Chosen layer")
    # the selected layer drives the histogram and the metrics
    at.slider(key="dir_layer").set_value(0).run()
    _no_exceptions(at)
    assert at.session_state["active_layer"] == 0
    assert "@ 0" in at.metric[1].label


def test_directions_choose_on_validation_with_the_grid(app_with_directions):
    at = app_with_directions
    value = at.session_state["results"]["directions"]["value"]
    grid, dirs = value["grid"], value["dirs"]
    assert grid is not None and grid.n_harmful == 32  # the grid's default: 32 validation prompts per class
    assert value["choice"].rule == "grid" and value["choice"].split == "validation"
    assert dirs.position == grid.position and value["layer"] == grid.output_layer
    assert dirs.n_validation == (39, 40) and dirs.separation_ci is not None
    assert _charts(at) >= 4  # layer chart, histogram, cosine heatmap, grid


def test_directions_by_validation_separation(tiny_dirs):
    at = new_app(tiny_dirs)
    at.switch_page("pages/directions.py").run()
    at.selectbox(key="dir_rule").set_value("validation separation (fast)").run()
    at.button(key="dir_compute").click().run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    value = at.session_state["results"]["directions"]["value"]
    assert value["grid"] is None and value["choice"].rule == "separation" and value["choice"].split == "validation"


def test_steering_streams_baseline_and_steered_text(app_with_directions):
    at = app_with_directions
    at.switch_page("pages/steering.py").run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    last = at.session_state["steer_last"]
    steered = last["steered"]
    assert steered.done and last["baseline"].done and last["mode"] == "add" and steered.pieces
    assert len(steered.pieces) == len(steered.values)
    assert "".join(steered.pieces) == steered.text
    html = " ".join(m.value for m in at.markdown)
    assert "Baseline" in html and "Steered" in html and "tok-box" in html
    assert html.count("gen-label") == 2 and steered.label in ("refusal", "compliance", "degenerate")
    # the default coefficient was chosen on validation prompts, and the page says so
    default = next(iter(at.session_state["steer_defaults"].values()))
    assert default.choice["split"] == "validation" and last["coefficient"] == default.coefficient
    assert any("validation harmless prompts" in c.value for c in at.caption)
    n_runs = len(at.session_state["steer_runs"])
    # moving the slider regenerates the steered answer (the baseline comes from the session cache)
    at.slider(key="steer_coef_slider").set_value(2.0).run()
    _no_exceptions(at)
    assert at.session_state["steer_coef"] == 2.0
    assert at.session_state["steer_coef_box"] == 2.0  # slider and number box stay in sync
    assert len(at.session_state["steer_runs"]) == n_runs + 1
    assert at.session_state["steer_runs"][-1]["coefficient"] == 2.0
    assert "baseline from this session's cache" in " ".join(c.value for c in at.caption)
    # ... and only the blocks above the edit ran: the rest came from the baseline's kept prefill
    assert "reused from the baseline's prefill" in " ".join(c.value for c in at.caption)
    # ablation mode, then reset
    at.button_group(key="steer_mode").set_value("ablate").run()  # the mode's segmented control
    _no_exceptions(at)
    assert at.session_state["steer_mode"] == "ablate"
    at.button(key="steer_reset").click().run()
    _no_exceptions(at)
    assert at.session_state["steer_coef"] == default.coefficient and at.session_state["steer_mode"] == "add"


def test_steering_with_a_typed_prompt(app_with_directions):
    at = app_with_directions
    at.switch_page("pages/steering.py").run()
    at.button_group(key="steer_src").set_value("type my own").run()
    at.text_area(key="steer_text").input("Write a poem about the sea.").run()
    _no_exceptions(at)
    assert at.session_state["steer_last"]["prompt"] == "Write a poem about the sea."


def test_validation_produces_rates_chart_and_samples(app_with_directions):
    at = app_with_directions
    at.switch_page("pages/validation.py").run()
    at.slider(key="val_n").set_value(3)
    at.slider(key="val_tokens").set_value(8)
    at.multiselect(key="val_force").set_value([0.5, 1.0])
    at.button(key="val_run").click().run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    result = at.session_state["results"]["validation"]["value"]
    # the force coefficient is chosen on validation prompts; the test run reports only that one
    chosen = at.session_state["results"]["validation"]["coefficient_choice"]
    assert chosen["split"] == "validation" and chosen["coefficient"] in (0.5, 1.0)
    assert result.n_harmful == 3 and [p.coefficient for p in result.force] == [chosen["coefficient"]]
    assert _charts(at) >= 2  # sweep with random control, KL
    assert len(at.dataframe) >= 4  # rates, controls, capability cost, every generation
    assert any(m.label.startswith("Suppress refusal") for m in at.metric)
    # every generation is listed with its label, and the table filters by condition and label
    def generations_table():
        return next(d.value for d in at.dataframe if "generation" in d.value.columns)

    table = generations_table()
    assert len(table) == len(result.generations) and set(table["label"]) <= {"refusal", "compliance", "degenerate"}
    at.multiselect(key="val_filter_condition").set_value(["baseline"]).run()
    _no_exceptions(at)
    table = generations_table()
    assert len(table) == 6 and set(table["condition"]) == {"baseline"}
    label = table["label"].iloc[0]
    at.multiselect(key="val_filter_label").set_value([label]).run()
    assert set(generations_table()["label"]) == {label}


def test_patching_produces_heatmap_bars_and_critical_table(app_with_directions):
    at = app_with_directions
    at.switch_page("pages/patching.py").run()
    at.number_input(key="patch_n").set_value(2)
    at.selectbox(key="patch_filter").set_value("all")  # random tiny models neither refuse nor comply
    at.button(key="patch_run").click().run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    sweep = at.session_state["results"]["patching"]["value"]
    assert sweep.n_used == 2
    assert _charts(at) >= 2  # layer × token heatmap, attention vs MLP
    assert any(m.label == "Critical sites" for m in at.metric)


def test_report_exports_markdown_html_json_and_config(app_with_directions):
    at = app_with_directions
    at.switch_page("pages/report.py").run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    files = at.session_state["report_files"]["files"]
    results = json.loads(files["json"])
    model = results["models"][0]
    assert model["n_layers"] == 3 and len(model["layers"]) == 3
    html = files["html"].decode()
    assert "data:image/svg+xml;base64," in html and "<script src" not in html  # charts embedded offline
    assert files["markdown"].decode().startswith("#")
    names = zipfile.ZipFile(io.BytesIO(at.session_state["report_files"]["zip"])).namelist()
    assert {"report.html", "report.md", "results.json", "config.yaml"} <= set(names)
    labels = {b.label for b in at.get("download_button")}
    assert {"HTML report", "Markdown", "JSON (all numbers)", "Batch config", "Everything (.zip)"} <= labels
    # the exported config is valid for the batch runner
    from core.config import config_from_dict
    import yaml

    cfg_text = zipfile.ZipFile(io.BytesIO(at.session_state["report_files"]["zip"])).read("config.yaml").decode()
    cfg = config_from_dict(yaml.safe_load(cfg_text))
    assert cfg.prompts.n_train == 8 and cfg.models[0].source == str(at.session_state["_lm"].source)


@pytest.mark.parametrize("name,data,needle", [
    ("bad.csv", b"foo,bar\n1,2\n", "no usable column"),
    ("bad.jsonl", b'{"prompt": "ok"}\n{not json}\n', "line 2"),
    ("empty.txt", b"\n\n  \n", "no prompts found"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "UTF-8"),
])
def test_bad_upload_shows_an_error_and_keeps_the_prompts(tiny_dirs, name, data, needle):
    at = new_app(tiny_dirs)
    before = at.session_state["prompt_sets"]
    at.button_group(key="sb_prompt_mode").set_value("Upload")
    run_main(at)
    at.file_uploader(key="sb_up_harmful").upload(name, data, "text/plain")
    run_main(at)
    _no_exceptions(at)
    errors = " ".join(e.value for e in at.error)
    assert needle in errors and "upload it again" in errors
    assert at.session_state["prompt_sets"].to_dict() == before.to_dict()


def test_good_upload_replaces_the_harmful_set(tiny_dirs):
    at = new_app(tiny_dirs)
    at.button_group(key="sb_prompt_mode").set_value("Upload")
    run_main(at)
    prompts = "\n".join(f"Tell me how to do bad thing number {i}" for i in range(10)).encode()
    at.file_uploader(key="sb_up_harmful").upload("mine.txt", prompts, "text/plain")
    run_main(at)
    _no_exceptions(at)
    assert not at.error
    sets = at.session_state["prompt_sets"]
    assert len(sets.harmful_train) + len(sets.harmful_val) + len(sets.harmful_test) == 10 and len(sets.harmful_val) == 2
    assert "mine.txt" in sets.source


def test_a_folder_that_is_not_a_model_shows_an_error_and_keeps_the_model(tiny_dirs, tmp_path):
    at = new_app(tiny_dirs)
    loaded = at.session_state["_lm"]
    at.text_input(key="sb_folder").input(str(tmp_path))
    at.button(key="sb_load").click()
    run_main(at)
    _no_exceptions(at)
    errors = " ".join(e.value for e in at.error)
    assert "config.json" in errors and "still in use" in errors
    assert at.session_state["_lm"] is loaded


def test_results_survive_a_sidebar_change_and_are_marked_stale(tiny_dirs):
    at = compute_directions(new_app(tiny_dirs))
    run_main(at)
    at.selectbox(key="sb_preamble").set_value("none")
    run_main(at)
    at.switch_page("pages/directions.py").run()
    _no_exceptions(at)
    assert at.session_state["results"]["directions"] is not None
    assert any("other settings" in w.value for w in at.warning)


def test_extreme_coefficient_warns_and_still_generates(app_with_directions):
    at = app_with_directions
    at.switch_page("pages/steering.py").run()
    at.number_input(key="steer_coef_box").set_value(5000.0).run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    assert any("mean activation norm" in w.value for w in at.warning)
    assert at.session_state["steer_last"]["coefficient"] == 5000.0 and at.session_state["steer_last"]["steered"].done
    assert at.session_state["steer_coef_slider"] == 3.0  # the slider shows its maximum, the box the value


def test_steering_leaves_no_hook_on_the_shared_model(app_with_directions):
    at = app_with_directions
    at.switch_page("pages/steering.py").run()
    at.button_group(key="steer_mode").set_value("ablate").run()
    _no_exceptions(at)
    assert at.session_state["steer_last"]["mode"] == "ablate"
    model = at.session_state["_lm"].model
    assert not remaining_hooks(model)


def test_edit_mode_shows_the_table_of_current_prompts(tiny_dirs):
    at = new_app(tiny_dirs)
    before = at.session_state["prompt_sets"]
    at.button_group(key="sb_prompt_mode").set_value("Edit")
    run_main(at)
    _no_exceptions(at)
    assert not at.error
    table = at.session_state["_edit_base"]
    n_val = len(before.harmful_val) + len(before.harmless_val)
    assert n_val > 0 and len(table) == 8 + 8 + n_val + 6 + 6 and set(table["class"]) == {"harmful", "harmless"}
    assert set(table["split"]) == {"train", "validation", "test"}
    sets = at.session_state["prompt_sets"]
    assert sets.source == "edited table" and sorted(sets.harmful_train) == sorted(before.harmful_train)


def test_validation_with_the_llm_judge_from_the_sidebar(app_with_directions, tiny_dirs):
    at = app_with_directions
    at.session_state["sb_judge"] = "llm"
    at.session_state["sb_judge_model"] = str(tiny_dirs["neox"])
    run_main(at)  # the sidebar (drawn by app.py) turns the widgets into the judge spec
    assert at.session_state["judge_value"] == f"llm:{tiny_dirs['neox']}"
    at.switch_page("pages/validation.py").run()
    at.slider(key="val_n").set_value(2)
    at.slider(key="val_tokens").set_value(8)
    at.multiselect(key="val_force").set_value([0.5])
    at.slider(key="val_nctrl").set_value(1)
    at.button(key="val_run").click().run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    result = at.session_state["results"]["validation"]["value"]
    assert result.judge == f"llm:{tiny_dirs['neox']}"
    assert "judge_vs_substring" in result.agreement
    assert all("substring_label" in g for g in result.generations)
    at.session_state["sb_judge"] = "substring"  # leave the shared app as it was
    run_main(at)


@pytest.mark.slow
def test_gemma_by_name_in_the_sidebar_computes_directions_and_steers_live(tmp_path, monkeypatch):
    """A user picks the offline Gemma-3-270M in the sidebar's model list, loads it, computes
    directions and steers it: the real network, through the app's own controls."""
    from core.packaged_models import packaged_folder

    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(REPO / "cache"))
    packaged_folder("gemma-3-270m")  # assembled and converted once into the repo's cache (as the Gemma tests do)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(REPO / "cache" / "models")  # the converted model; activations stay here
    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(cache))
    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["model_spec"] = {"kind": "folder", "path": str(REPO / "missing"), "dtype": "float32",
                                      "device": "cpu", "trust_remote_code": False}
    at.session_state["_autoload_tried"] = True  # start with nothing loaded, as after a failed load
    at.session_state["sb_n_train"] = 8
    at.session_state["sb_n_test"] = 4
    at.run()
    at.sidebar.selectbox(key="sb_kind").set_value("gemma-3-270m")
    run_main(at)
    at.sidebar.button(key="sb_load").click()
    run_main(at)
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    lm = at.session_state["_lm"]
    assert lm.source == "gemma-3-270m" and lm.n_layers == 18 and lm.d_model == 640
    compute_directions(at)
    at.session_state["steer_max_tokens"] = 8  # short answers: this test is about the path, not the text
    at.switch_page("pages/steering.py").run()
    _no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    last = at.session_state["steer_last"]
    assert last["max_new_tokens"] == 8
    assert last["steered"].done and last["baseline"].done and last["steered"].pieces
    at.slider(key="steer_coef_slider").set_value(1.0).run()  # a slider move regenerates the steered answer
    _no_exceptions(at)
    assert at.session_state["steer_runs"][-1]["coefficient"] == 1.0
    assert not remaining_hooks(lm.model)
