"""Opening a finished batch run (core.runs) on a run the batch runner made on a tiny model: the
folder, its bundle and a results.json alone give the same table; the table holds the run's own
numbers; a row's direction loads for its model only; hostile files are refused."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from core import batch, runs
from core.errors import BundleError, DirectionFileError
from core.report import rate_text, sigma_ci
from test_batch import write_config, write_prompts


def make_run(folder: Path, source: str) -> Path:
    """``python -m core.batch`` on a tiny model into ``folder/results`` (results, directions, bundle)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_prompts(folder)
    config = write_config(folder, source)
    out = folder / "results"
    assert batch.main(["--config", str(config), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), str(tiny_dirs["llama"]))


def test_folder_table_holds_the_runs_own_numbers(run_dir):
    run = runs.open_run(run_dir)
    (e,) = json.loads((run_dir / "results.json").read_text())["models"]
    (row,) = runs.run_rows(run.results)
    assert list(row) == list(runs.RUN_HEAD)
    assert row["Model"] == "tiny" and row["Layer"] == str(e["layer"]) and row["Position"] == str(e["position"])
    assert row["Separation (held-out)"].startswith(sigma_ci(e["separation_sigma"], e["separation_ci"]))
    assert row["Baseline refusal: harmful"] == rate_text(e["baseline"]["harmful_refusal"])
    assert row["Critical components"].endswith(f"({e['patching']['n_used']} pairs)")
    assert "force:" in row["Controls (force / ablation)"] or row["Controls (force / ablation)"] == "–"
    assert set(run.directions) == {"tiny"} and not run.notes


def test_bundle_and_folder_give_the_same_run_and_leave_no_folder(run_dir, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder_run = runs.open_run(run_dir)
    bundle_run = runs.open_upload((run_dir / "bundle.zip").read_bytes(), "bundle.zip")
    assert runs.run_rows(bundle_run.results) == runs.run_rows(folder_run.results)
    assert bundle_run.directions == folder_run.directions
    assert list(tmp_path.iterdir()) == []  # the extracted copy was deleted once read


def test_results_json_alone_has_the_table_but_no_direction(run_dir, tiny_models):
    run = runs.open_upload((run_dir / "results.json").read_bytes(), "results.json")
    assert len(runs.run_rows(run.results)) == 1 and run.directions == {}
    assert any("bundle.zip" in n for n in run.notes)
    with pytest.raises(DirectionFileError, match="no directions file"):
        runs.run_direction(run, "tiny", tiny_models["llama"])


def test_direction_loads_for_its_model_only(run_dir, tiny_models):
    run = runs.open_run(run_dir)
    saved = runs.run_direction(run, "tiny", tiny_models["llama"])
    assert saved.layer == run.models[0]["layer"] and saved.dirs.n_layers == 3
    with pytest.raises(DirectionFileError):
        runs.run_direction(run, "tiny", tiny_models["gpt2"])  # another model's direction is refused


def test_every_chart_of_the_entry_builds(run_dir):
    (e,) = runs.open_run(run_dir).models
    charts = runs.entry_charts(e)
    titles = [t for t, chart, err in charts if chart is not None and err is None]
    assert [err for _, _, err in charts if err] == []
    for expected in ("layers", "grid", "steering", "patching"):
        assert runs.CHART_TITLES[expected] in titles


def test_a_directions_name_that_leaves_the_folder_is_not_read(run_dir, tmp_path):
    results = json.loads((run_dir / "results.json").read_text())
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    results["models"][0]["files"]["directions"] = "../secret.safetensors"
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    run = runs.open_run(folder)
    assert run.directions == {} and any("refused" in n for n in run.notes)


@pytest.mark.parametrize("name, data, needle", [
    ("notes.txt", b"hello", "expected a results.json or a bundle"),
    ("results.json", b"{not json", "not valid JSON"),
    ("results.json", b'{"models": 3}', "'models' list"),
    ("bundle.zip", b"PK\x03\x04 broken", "not a readable zip"),
])
def test_bad_files_are_refused_with_the_reason(name, data, needle):
    with pytest.raises(BundleError, match=needle):
        runs.open_upload(data, name)


def test_a_zip_that_escapes_its_folder_is_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.json", "{}")
    with pytest.raises(BundleError, match="outside"):
        runs.open_upload(buf.getvalue(), "bundle.zip")


def test_a_bundle_without_results_is_refused():
    from core.bundle import bundle_bytes

    with pytest.raises(BundleError, match="no results.json"):
        runs.open_upload(bundle_bytes({"config.yaml": "models: []\n"}), "bundle.zip")


def test_folders_without_a_run_are_refused(tmp_path):
    with pytest.raises(BundleError, match="neither results.json nor bundle.zip"):
        runs.open_run(tmp_path)
    with pytest.raises(BundleError, match="no such folder"):
        runs.open_run(tmp_path / "missing")
    with pytest.raises(BundleError, match="no path given"):
        runs.open_run("  ")


def test_critical_and_controls_text_on_given_entries():
    crit = [{"site": "resid", "layer": 2, "offset": -1, "effect": 0.8}, {"site": "mlp", "layer": 1, "effect": 0.5},
            {"site": "attn", "layer": 0, "effect": 0.4}, {"site": "resid", "layer": 1, "offset": -2, "effect": 0.3}]
    text = runs.critical_text({"patching": {"critical": crit, "n_used": 17}})
    assert text == "4: resid L2 pos -1 (0.80), mlp L1 (0.50), attn L0 (0.40), +1 more (17 pairs)"
    assert runs.critical_text({"patching": {"critical": [], "n_used": 5}}) == "none (5 pairs)"
    assert runs.critical_text({}) == "patching not run"
    ctl = {"force": {"specific": True, "controls": [{}, {}]}, "ablation": {"specific": False, "controls": [{}]}}
    assert runs.controls_text({"controls": ctl}) == "force: specific (2 controls); ablation: not specific (1 controls)"
