"""What an analysis produced: the typed :class:`Analysis` (what :func:`core.analysis.analyse`
returns) and its dict form, the results dict that ``results.json`` holds and every report renders.

``build_results(config, entries, ...)`` returns the top level: ``schema_version``, ``title``,
``date``, ``command`` (the exact command that reproduces the run), ``config``
(``Config.to_dict()``), ``prompts``, ``versions``, ``machine``, ``total_seconds``, ``models``. The
batch runner adds ``total_cpu_seconds``, ``peak_rss_mb``, ``complete``, ``models_pending`` and
``prompt_notes``. Each element of ``models`` comes from :func:`model_entry` (through
:meth:`core.analysis.Analysis.to_dict` in a batch run), which the app's Report page calls too,
with the objects it holds in its session state, so that the app and the batch runner render
through the same :mod:`core.report` functions::

    entry = model_entry(name="mine", lm=lm, preamble="prompted-refusal", dirs=dirs,
                        choice=choice, validation=validation, patching=sweep)
    results = build_results(config, [entry])
    html = core.report.render_html(results)

``validation`` (a :class:`core.validation.ValidationResult`), ``patching`` (a
:class:`core.patching.PatchSweep`), ``scan`` and ``organism`` are optional; each may be given as
the object or as its ``to_dict()``.

Schema versions (``schema_version`` at the top level): 1 — the layout above; 2 — adds
``peak_rss_mb`` (the batch process's peak resident memory). Every change so far only added keys,
so a reader of version 1 reads version 2.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from core.config import Config, PromptData

if TYPE_CHECKING:
    import numpy as np

    from core.analysis import Settings
    from core.directions import LayerDirections
    from core.layer_choice import LayerChoice
    from core.formatting import Formatter
    from core.layer_scan import LayerScan
    from core.models import LoadedModel
    from core.organism import OrganismCard
    from core.over_refusal import OverRefusal
    from core.patching import PatchSweep
    from core.selection import CoefficientChoice, GridResult
    from core.validation import ValidationResult

SCHEMA_VERSION = 2
TITLE = "Refusal Circuit Analysis"


def _dict(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _at(values: Sequence[Any] | None, i: int) -> Any:
    return values[i] if values is not None and 0 <= i < len(values) else None


def model_type(source: str, has_chat_template: bool, preamble: str | Mapping | None, organism: bool = False) -> str:
    """A short description for the table's "Type" column."""
    name = preamble if isinstance(preamble, str) or preamble is None else (preamble.get("name") or "custom")
    prompted = name not in (None, "none")
    if organism or source == "embedded-refusal":
        kind = "chat, refusal-tuned organism"
        return kind + (f" + preamble {name}" if prompted else "")
    kind = "chat" if has_chat_template else "base"
    return f"{kind}, in-context refusal ({name} preamble)" if prompted else kind


def preamble_name(preamble: Any) -> str:
    """The preamble's name for the table: a preset name, ``Preamble.name``, a dict's ``name`` or "custom"."""
    if preamble is None:
        return "none"
    if isinstance(preamble, str):
        return preamble
    if hasattr(preamble, "name"):
        return str(preamble.name)
    return str(preamble.get("name") or "custom")


def model_entry(
    *,
    name: str,
    lm: Any,
    preamble: Any,
    dirs: Any,
    choice: Any,
    validation: Any = None,
    patching: Any = None,
    scan: Any = None,
    organism: Any = None,
    source: str | None = None,
    timings: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
    grid: Any = None,
    coefficient_choice: Any = None,
) -> dict[str, Any]:
    """One model's entry of ``results["models"]`` from the science objects.

    ``lm``: :class:`core.models.LoadedModel`; ``dirs``: :class:`core.directions.LayerDirections`;
    ``choice``: :class:`core.layer_choice.LayerChoice` (or an int layer); ``validation``:
    :class:`core.validation.ValidationResult`; ``patching``: :class:`core.patching.PatchSweep`;
    ``scan``: :class:`core.validation.LayerScan`; ``organism``: :class:`core.organism.OrganismCard`.
    Dict forms (their ``to_dict()``) are accepted for the last four.
    """
    layer = int(choice) if isinstance(choice, int) else int(choice.layer)
    d = dirs.to_dict()
    src = source or getattr(lm, "source", "?")
    card = _dict(organism)
    entry: dict[str, Any] = {
        "name": name,
        "source": src,
        "type": model_type(src, bool(getattr(lm, "has_chat_template", False)), preamble_name(preamble), organism=card is not None),
        "preamble": preamble_name(preamble),
        "model": lm.summary(),
        "n_layers": int(lm.n_layers),
        "d_model": int(lm.d_model),
        "fingerprint": lm.fingerprint,
        "position": d["position"],
        "method": d["method"],
        "n_train": {"harmful": d["n_train"][0], "harmless": d["n_train"][1]},
        "n_test": {"harmful": d["n_test"][0], "harmless": d["n_test"][1]},
        "n_validation": {"harmful": (d.get("n_validation") or [0, 0])[0], "harmless": (d.get("n_validation") or [0, 0])[1]},
        "probe_folds": d.get("probe_folds"),
        "layer": layer,
        "layer_rule": "user" if isinstance(choice, int) else choice.rule,
        "layer_reason": f"layer {layer} given" if isinstance(choice, int) else choice.reason,
        "layer_split": "user" if isinstance(choice, int) else getattr(choice, "split", "?"),
        "layers": [
            {"layer": i, "separation_sigma": _at(d["separation_sigma"], i), "separation_in_sample": _at(d["separation_in_sample"], i),
             "probe_accuracy": _at(d["probe_accuracy"], i), "probe_accuracy_std": _at(d["probe_accuracy_std"], i),
             "mean_norm": _at(d.get("mean_norm"), i), "direction_norm": _at(d.get("direction_norm"), i),
             "separation_ci": _at(d.get("separation_ci"), i), "probe_accuracy_ci": _at(d.get("probe_accuracy_ci"), i),
             "separation_validation": _at(d.get("separation_validation"), i)}
            for i in range(d["n_layers"])
        ],
        "separation_sigma": _at(d["separation_sigma"], layer),
        "separation_in_sample": _at(d["separation_in_sample"], layer),
        "probe_accuracy": _at(d["probe_accuracy"], layer),
        "probe_accuracy_std": _at(d["probe_accuracy_std"], layer),
        "separation_ci": _at(d.get("separation_ci"), layer),
        "separation_ci_method": d.get("separation_ci_method"),
        "probe_accuracy_ci": _at(d.get("probe_accuracy_ci"), layer),
        "cosine_to_chosen": _at(d.get("cosine"), layer),
        "notes": [*getattr(lm, "notes", []), *notes],
    }
    if scan is not None:
        entry["layer_scan"] = _dict(scan)
    entry["selection_grid"] = _dict(grid)
    entry["coefficient_choice"] = _dict(coefficient_choice)
    v = _dict(validation)
    if v is not None:
        force_points = v.get("force") or []
        fp = next((p for p in force_points if p["coefficient"] == (v.get("force_refusal") or {}).get("coefficient")), None)
        force = dict(v.get("force_refusal") or {})
        if fp is not None:
            force["random_control"] = fp["random_rate"]
        supp = dict(v.get("suppress_refusal") or {})
        supp["random_control"] = (v.get("suppress_ablation") or {}).get("random_rate")
        entry.update({
            "normalised": v.get("coefficients_normalised", True),
            "coefficient_scale": v.get("scale"),
            "max_new_tokens": v.get("max_new_tokens"),
            "control_seed": v.get("seed"),
            "baseline": v.get("baseline"),
            "force_refusal": force,
            "suppress_refusal": supp,
            "kl_harmless": v.get("kl_harmless"),
            "force_rule": v.get("force_rule"),
            "force_sweep": force_points,
            "suppress_sweep": v.get("suppress_subtract") or [],
            "suppress_ablation": v.get("suppress_ablation"),
            "samples": v.get("samples") or [],
            "judge": v.get("judge"),
            "controls": v.get("controls") or {},
            "capability": v.get("capability") or {},
            "generations": v.get("generations") or [],
            "agreement": v.get("agreement") or {},
        })
    else:
        entry.update({"baseline": None, "force_refusal": None, "suppress_refusal": None, "kl_harmless": None, "samples": []})
    from core.conclusions import conclusions

    entry["conclusions"] = conclusions(entry)
    p = _dict(patching)  # PatchSweep.to_dict(): per-pair digests, not the per-pair [L, T] arrays
    if p is not None:
        p["pairs"] = [{k: v for k, v in pair.items() if k not in ("effects", "scores", "computed")}
                      for pair in p.get("pairs") or []]
        p.pop("model", None)
    entry["patching"] = p
    entry["organism"] = card
    from core.provenance import provenance

    entry["provenance"] = provenance(position=d["position"], choice=choice, grid=entry["selection_grid"],
                                     coefficient=entry["coefficient_choice"],
                                     force_coefficient=(entry.get("force_refusal") or {}).get("coefficient"),
                                     force_rule=entry.get("force_rule"))
    entry["timings"] = {k: round(float(t), 2) for k, t in (timings or {}).items()}
    return entry


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "numpy", "scikit-learn", "altair", "vl-convert-python"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["explorer commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine_info(device: str | None = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(terse=True), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "device": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def build_results(
    config: Config | Mapping[str, Any],
    entries: Sequence[Mapping[str, Any]],
    *,
    command: str | None = None,
    total_seconds: float | None = None,
    prompts: PromptData | None = None,
    started: _dt.datetime | None = None,
) -> dict[str, Any]:
    """The top-level results dict (see the module docstring)."""
    cfg = config.to_dict() if isinstance(config, Config) else dict(config)
    devices = sorted({str((e.get("model") or {}).get("device", "cpu")) for e in entries}) or ["cpu"]
    return {
        "schema_version": SCHEMA_VERSION,
        "title": TITLE,
        "date": (started or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command or "python -m core.batch --config config.yaml --out results/",
        "config": cfg,
        "prompts": {"description": prompts.description, "counts": prompts.counts()} if prompts else {},
        "versions": package_versions(),
        "machine": machine_info(", ".join(devices)),
        "total_seconds": round(float(total_seconds), 2) if total_seconds is not None else None,
        "models": list(entries),
    }


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the platform has no
    ``resource`` module). Linux reports ``ru_maxrss`` in KiB, macOS in bytes."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


@dataclass
class Analysis:
    """What :func:`core.analysis.analyse` found: the science objects, not their dict forms. Stages that did
    not run leave their field None. ``timings``/``cpu_timings``: wall and process CPU seconds per
    step (CPU time matters on shared machines, where wall time measures the neighbours too)."""

    name: str
    lm: LoadedModel
    formatter: Formatter
    settings: Settings
    prompts: PromptData
    stages: tuple[str, ...]
    dirs: LayerDirections
    choice: LayerChoice
    grid: GridResult | None = None
    scan: LayerScan | None = None
    coefficient: CoefficientChoice | None = None
    validation: ValidationResult | None = None
    patching: PatchSweep | None = None
    over_refusal: OverRefusal | None = None
    organism: OrganismCard | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)
    test_activations: dict[str, np.ndarray | None] | None = None  # {"harmful", "harmless"}: [n, layers, d]

    @property
    def layer(self) -> int:
        """The chosen layer (block output index)."""
        return int(self.choice.layer)

    def to_dict(self) -> dict[str, Any]:
        """This model's entry of ``results.json``: :func:`model_entry` plus the batch runner's
        CPU timings, over-refusal and the patching request (sites and pairs asked for)."""
        entry = model_entry(name=self.name, lm=self.lm, preamble=self.settings.preamble, dirs=self.dirs,
                            choice=self.choice, validation=self.validation, patching=self.patching, scan=self.scan,
                            organism=self.organism, source=self.lm.source, timings=self.timings, grid=self.grid,
                            coefficient_choice=self.coefficient)
        entry["cpu_timings"] = {k: round(float(v), 2) for k, v in self.cpu_timings.items()}
        entry["over_refusal"] = self.over_refusal.to_dict() if self.over_refusal is not None else None
        if entry["patching"] is not None and self.settings.patching is not None:
            entry["patching"]["requested_sites"] = list(self.settings.patching.sites)
            entry["patching"]["pairs_source"] = self.settings.patching.pairs
        return entry
