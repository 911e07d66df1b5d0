"""Opening a finished batch run (``python -m core.batch --out FOLDER``) to look at it again: the
output folder, its ``bundle.zip``, or a ``results.json`` on its own.

Why a module of its own: the app's Runs page only draws; what a run holds, how it is opened
safely and what its table says is decided here, callable from a notebook. Files are read only
through the guarded readers of :mod:`core.bundle` (size limits, no path escapes, nothing
unpickled); a bundle is extracted into a temporary folder that is deleted as soon as its
results and direction files are read into memory. The table reuses :mod:`core.report`'s
formatting, so a run reads the same here as in its ``report.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from core.bundle import MAX_ZIP_BYTES, open_bundle, read_results
from core.direction_files import SavedDirections, load_directions
from core.errors import BundleError, DirectionFileError
from core.report import TABLE_HEAD, chart_builders, controls_text, critical_text, rate_text, table_rows

# A directions file is [L, d] float32 twice: a few MB for the models this tool runs on.
MAX_DIRECTIONS_BYTES = 512 * 1024 * 1024
RUN_HEAD = (*TABLE_HEAD[:2], "Position", *TABLE_HEAD[2:], "Controls (force / ablation)", "Critical components")


@dataclass
class OpenedRun:
    """A run's results and the bytes of each model's directions file (by model name)."""

    label: str
    results: dict[str, Any]
    directions: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self.results.get("models") or [])


def _plain_name(name: Any) -> str | None:
    """A file name from ``results.json`` that stays inside the run's folder, or None."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return None
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ":" in name or any(p in ("..", ".") for p in parts) or len(parts) != 1:
        return None
    return name


def _read_directions(results: Mapping[str, Any], folder: Path, notes: list[str]) -> dict[str, bytes]:
    """Each model's ``files.directions`` read from ``folder`` (names that would leave it are refused)."""
    out: dict[str, bytes] = {}
    for e in results.get("models") or []:
        name = _plain_name((e.get("files") or {}).get("directions"))
        if name is None:
            if (e.get("files") or {}).get("directions") is not None:
                notes.append(f"{e.get('name', '?')}: directions file name {e['files']['directions']!r} refused "
                             "(it names a place outside the run's folder)")
            continue
        path = folder / name
        if not path.is_file() or path.is_symlink():
            notes.append(f"{e.get('name', '?')}: directions file {name} is not in the run's folder")
            continue
        if path.stat().st_size > MAX_DIRECTIONS_BYTES:
            notes.append(f"{e.get('name', '?')}: directions file {name} is over the size limit; not read")
            continue
        out[str(e.get("name", "?"))] = path.read_bytes()
    return out


def open_bundle_run(source: str | Path | bytes, name: str | None = None) -> OpenedRun:
    """A ``bundle.zip`` (path or bytes): results and direction files, temporary folder deleted."""
    with open_bundle(source, name) as bundle:
        label = name or str(source if not isinstance(source, (bytes, bytearray)) else "bundle.zip")
        if bundle.results is None:
            raise BundleError(f"{label}: the bundle holds no results.json, so there is no run to show")
        notes: list[str] = []
        dirs = _read_directions(bundle.results, bundle.folder, notes)
        return OpenedRun(label, bundle.results, dirs, notes)


def open_results_file(source: str | Path | bytes, name: str | None = None) -> OpenedRun:
    """A ``results.json`` on its own; beside a path, the direction files it names are read too."""
    results = read_results(source, name)
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "results.json")
    notes: list[str] = []
    dirs = _read_directions(results, Path(source).parent, notes) if not isinstance(source, (bytes, bytearray)) else {}
    if isinstance(source, (bytes, bytearray)) and any((e.get("files") or {}).get("directions") for e in results["models"]):
        notes.append("A results.json on its own carries no direction vectors: open the run's folder or its bundle.zip "
                     "to load a direction into Steering.")
    return OpenedRun(label, results, dirs, notes)


def open_run(path: str | Path) -> OpenedRun:
    """A batch output folder (its ``results.json``, else its ``bundle.zip``), or one of those files."""
    text = str(path).strip()
    if not text:
        raise BundleError("run folder: no path given; type the batch runner's --out folder (e.g. results/)")
    p = Path(text).expanduser()
    if p.is_dir():
        if (p / "results.json").is_file():
            return open_results_file(p / "results.json")
        if (p / "bundle.zip").is_file():
            return open_bundle_run(p / "bundle.zip")
        raise BundleError(f"{p}: holds neither results.json nor bundle.zip; is it the folder given to "
                          "python -m core.batch --out?")
    if not p.exists():
        raise BundleError(f"{p}: no such folder or file")
    return open_upload(p, p.name)


def run_direction(run: OpenedRun, model_name: str, model: Any = None) -> SavedDirections:
    """The directions file a run saved for ``model_name``, checked against ``model`` (a
    :class:`core.models.LoadedModel`): a direction only applies to the model it was measured on."""
    data = run.directions.get(model_name)
    if data is None:
        raise DirectionFileError(f"{run.label}: no directions file for model {model_name!r} "
                                 "(a results.json on its own has none; open the run's folder or bundle.zip)")
    entry = next((e for e in run.models if str(e.get("name")) == model_name), {})
    return load_directions(data, model=model, name=str((entry.get("files") or {}).get("directions") or model_name))


def open_upload(source: str | Path | bytes, name: str) -> OpenedRun:
    """An uploaded (or named) file: ``.zip`` is a bundle, ``.json`` a results file."""
    suffix = Path(name).suffix.lower()
    if suffix == ".zip":
        return open_bundle_run(source, name)
    if suffix == ".json":
        return open_results_file(source, name)
    raise BundleError(f"{name}: expected a results.json or a bundle .zip (at most {MAX_ZIP_BYTES // 2**20} MB)")


# ---------------------------------------------------------------------------------------
# what the page shows
# ---------------------------------------------------------------------------------------
def run_rows(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """The seed-shaped table across models (one row per model, columns :data:`RUN_HEAD`):
    the report's table plus the position, the control verdicts and the critical components."""
    rows = []
    for e, row in zip(results.get("models") or [], table_rows(results)):
        cells = [*row[:2], str(e.get("position", "–")), *row[2:], controls_text(e), critical_text(e)]
        rows.append(dict(zip(RUN_HEAD, cells)))
    return rows


def run_facts(run: OpenedRun) -> list[tuple[str, str]]:
    """What the run is: when, how, how long, complete or not."""
    r = run.results
    pending = r.get("models_pending") or []
    return [
        ("Opened", run.label),
        ("Date", str(r.get("date", "?"))),
        ("Command", str(r.get("command", "?"))),
        ("Models", f"{len(run.models)}" + (f" (still pending: {', '.join(map(str, pending))})" if pending else "")),
        ("Complete", "yes" if r.get("complete", True) and not pending else "no: the run was interrupted or is still going"),
    ]


def baseline_text(e: Mapping[str, Any]) -> str:
    base = e.get("baseline") or {}
    return (f"baseline refusal: harmful {rate_text(base.get('harmful_refusal'))}, "
            f"harmless {rate_text(base.get('harmless_refusal'))}") if base else "validation not run"


CHART_TITLES = {
    "layers": "Separation and probe accuracy per layer",
    "scan": "Ablation screen per layer",
    "grid": "Selection grid (position × layer, validation prompts)",
    "steering": "Force / suppress sweeps with random controls",
    "patching": "Patching: residual stream, layer × position",
    "components": "Patching: attention vs MLP outputs",
    "heads": "Patching: attention heads",
}


def entry_charts(e: Mapping[str, Any]) -> list[tuple[str, Any, str | None]]:
    """(title, Altair chart or None, error text or None) for each chart the entry has data for."""
    out = []
    for name, build in chart_builders(e):
        if name == "steering" and not (e.get("force_sweep") or e.get("suppress_sweep")):
            continue  # validation was not run: nothing to draw
        try:
            chart = build()
        except Exception as exc:  # one malformed section must not hide the other charts
            out.append((CHART_TITLES.get(name, name), None, f"{type(exc).__name__}: {exc}"))
            continue
        if chart is not None:
            out.append((CHART_TITLES.get(name, name), chart, None))
    return out
