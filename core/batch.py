"""Headless runs: ``python -m core.batch --config experiments/config.yaml --out results/``.

For every model in the config: load it, collect residual activations for the train and test
prompts, fit per-layer refusal directions, choose the layer, validate by steering against
random controls, optionally patch activations on matched pairs, and (for the refusal organism)
attach its card. Writes ``results.json``, ``report.md`` (+ ``charts/``) and ``report.html``.
Progress goes to stderr; an :class:`~core.errors.ExplorerError` ends the run with a non-zero
exit status and a one-line reason (``--traceback`` shows the full trace).

The results dict
----------------
``build_results(config, entries, ...)`` returns the top level: ``title``, ``date``, ``command``
(the exact command that reproduces the run), ``config`` (``Config.to_dict()``), ``prompts``,
``versions``, ``machine``, ``total_seconds``, ``models``. Each element of ``models`` comes from
:func:`model_entry`, which the app's Report page calls too, with the objects it holds in its
session state, so that the app and the batch runner render through the same
:mod:`core.report` functions::

    entry = model_entry(name="mine", lm=lm, preamble="prompted-refusal", dirs=dirs,
                        choice=choice, validation=validation, patching=sweep)
    results = build_results(config, [entry])
    html = core.report.render_html(results)

``validation`` (a :class:`core.validation.ValidationResult`), ``patching`` (a
:class:`core.patching.PatchSweep`), ``scan`` and ``organism`` are optional; each may be given as
the object or as its ``to_dict()``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from core.config import Config, ModelSpec, PromptData, load_config, resolve_prompts
from core.errors import ConfigError, ExplorerError
from core.prompts import DuplicatePromptsWarning

Progress = Callable[[float, str], None]
SCHEMA_VERSION = 1
TITLE = "Refusal Circuit Analysis"


# ---------------------------------------------------------------------------------------
# the results dict
# ---------------------------------------------------------------------------------------
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
    ``choice``: :class:`core.directions.LayerChoice` (or an int layer); ``validation``:
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


# ---------------------------------------------------------------------------------------
# running one model
# ---------------------------------------------------------------------------------------
class StderrProgress:
    """``progress(fraction, message)`` printing ``[model] stage 42% message`` to stderr, at most
    about once a second per stage (plus the end of every stage)."""

    def __init__(self, model: str, stream=None, interval: float = 1.0) -> None:
        self.model, self.stream, self.interval = model, stream or sys.stderr, interval
        self._last = 0.0

    def stage(self, name: str) -> Progress:
        def report(fraction: float, message: str) -> None:
            now = time.monotonic()
            if fraction >= 1.0 or now - self._last >= self.interval:
                self._last = now
                print(f"[{self.model}] {name} {100 * max(0.0, min(1.0, fraction)):3.0f}% {message}", file=self.stream, flush=True)
        return report

    def say(self, message: str) -> None:
        print(f"[{self.model}] {message}", file=self.stream, flush=True)


class Stopwatch:
    """Wall-clock and process CPU seconds per stage. CPU time matters on shared machines: wall
    time there measures the neighbours as much as the analysis."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t0 = (time.perf_counter(), time.process_time())

    def stage(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            w, c = time.perf_counter(), time.process_time()
            try:
                yield
            finally:
                self.wall[name] = time.perf_counter() - w
                self.cpu[name] = time.process_time() - c
        return timed()

    def finish(self) -> None:
        self.wall["total"] = time.perf_counter() - self._t0[0]
        self.cpu["total"] = time.process_time() - self._t0[1]


def _organism_card(source: str) -> Any:
    from core.organism import CARD_FILE, load_card, organism_folder

    if source == "embedded-refusal":
        return load_card(organism_folder())
    folder = Path(source)
    if folder.is_dir() and (folder / CARD_FILE).is_file():
        return load_card(folder)
    return None


def run_model(spec: ModelSpec, config: Config, prompts: PromptData, log: StderrProgress | None = None,
              out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the whole analysis for one model and return its :func:`model_entry`; with ``out_dir``,
    also write its directions file and control vector there (:mod:`core.exports`)."""
    from core.activations import collect_activations
    from core.directions import candidate_layers, choose_layer, fit_directions
    from core.formatting import Formatter, get_preamble
    from core.models import load_model
    from core.validation import run_validation, scan_layers

    log = log or StderrProgress(spec.name)
    clock = Stopwatch()
    if spec.source == "embedded-refusal":  # never report trained behaviour as held-out behaviour
        from core.organism import check_evaluation_prompts

        check_evaluation_prompts(prompts.harmful_val + prompts.harmless_val + prompts.harmful_test + prompts.harmless_test)

    with clock.stage("load"):
        lm = load_model(spec.source, dtype=spec.dtype, device=spec.device, progress=log.stage("load"))
    log.say(f"loaded {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, {lm.dtype} on {lm.device}")
    formatter = Formatter(lm.tokenizer, get_preamble(spec.preamble))

    bs = config.generation.batch_size
    # Train fits, validation chooses (position, layer, force coefficient), test only reports.
    from core.directions import LayerChoice
    from core.selection import check_validation, choose_coefficient, select

    sel, position, grid = config.selection, config.position, None
    fixed_layer = isinstance(config.steering.layer, int)
    if fixed_layer and not -lm.n_layers <= config.steering.layer < lm.n_layers:
        raise ConfigError(f"steering.layer: {config.steering.layer} is out of range for {spec.name}, which has {lm.n_layers} "
                          f"layers (0–{lm.n_layers - 1}); use auto or a layer in range")
    if not fixed_layer:
        check_validation(prompts.harmful_val, prompts.harmless_val)
    if not fixed_layer and sel.enabled:
        with clock.stage("selection"):
            grid = select(lm, formatter, prompts.harmful_train, prompts.harmless_train, prompts.harmful_val,
                          prompts.harmless_val, positions=sel.positions, layer_stride=sel.layer_stride,
                          n_prompts=sel.n_prompts, max_kl=sel.max_kl, skip_last_fraction=sel.skip_last_fraction,
                          batch_size=bs, prune=sel.prune, progress=log.stage("selection grid"))
        position = grid.position
        log.say(f"grid ({grid.seconds:.0f} s): position {grid.position}, layer {grid.layer} (block input): {grid.winner.reason}")

    sets = (("harmful train", prompts.harmful_train), ("harmless train", prompts.harmless_train),
            ("harmful test", prompts.harmful_test), ("harmless test", prompts.harmless_test),
            ("harmful validation", prompts.harmful_val), ("harmless validation", prompts.harmless_val))
    with clock.stage("activations"):
        acts = [collect_activations(lm, ps, position=position, formatter=formatter, batch_size=bs,
                                    progress=log.stage(f"activations ({label})")) if ps else None for label, ps in sets]

    with clock.stage("directions"):
        dirs = fit_directions(*acts[:4], harmful_val=acts[4], harmless_val=acts[5], method=config.steering.method,
                              position=position, probe_folds=config.probe.folds, seed=config.prompts.seed)

    scan = None
    if fixed_layer:
        choice = choose_layer(dirs, layer=config.steering.layer)
    elif grid is not None:
        choice = LayerChoice(grid.output_layer, "grid", f"block output {grid.output_layer} = input of block {grid.layer}; "
                             f"{grid.winner.reason}", "validation")
    elif config.steering.scan_prompts > 0:
        n = config.steering.scan_prompts
        with clock.stage("layer_screen"):
            # the screen uses validation prompts: the direction was fitted on train, test stays untouched
            layers = candidate_layers(dirs.n_layers)
            stride = config.steering.scan_stride
            layers = layers[::-1][::stride][::-1]  # every stride-th candidate, always including the last one
            scan = scan_layers(lm, formatter, dirs, prompts.harmful_val[:n], prompts.harmless_val[:n],
                               layers=layers, batch_size=bs, progress=log.stage("layer screen"))
        choice = choose_layer(dirs, ablation_effect=scan.ablation_effect, kl=scan.kl, split="validation")
    else:
        choice = choose_layer(dirs)
    log.say(f"layer {choice.layer} ({choice.rule}, on {choice.split} prompts): {choice.reason}")

    with clock.stage("coefficient"):
        if len(set(config.steering.coefficients)) > 1:
            check_validation(prompts.harmful_val, prompts.harmless_val)
        coef = choose_coefficient(lm, formatter, dirs, choice.layer, prompts.harmless_val[:sel.n_prompts],
                                  config.steering.coefficients, normalised=config.steering.normalised,
                                  max_new_tokens=config.generation.max_new_tokens, batch_size=bs,
                                  progress=log.stage("force coefficient (validation)"))
    log.say(f"force coefficient {coef.coefficient:g} ({coef.split}): {coef.rule}")

    with clock.stage("validation"):
        from core.controls import shuffled_direction
        from core.llm_judge import make_judge

        validation = run_validation(
            lm, formatter, dirs, choice.layer, prompts.harmful_test, prompts.harmless_test,
            # only the coefficient chosen on validation: test prompts report, they do not choose
            coefficients=(coef.coefficient,), subtract_coefficients=config.steering.subtract_coefficients,
            normalised=config.steering.normalised, max_new_tokens=config.generation.max_new_tokens,
            seed=config.prompts.seed, n_samples=config.generation.n_samples, batch_size=bs,
            progress=log.stage("validation"),
            # the label-shuffled control: train activations at the chosen layer, classes permuted
            shuffled=shuffled_direction(acts[0][:, choice.layer], acts[1][:, choice.layer], config.prompts.seed),
            judge=make_judge(config.judge, device=spec.device), judge_name=config.judge,
        )

    sweep = None
    if config.patching is not None:
        from core.patching import patch_pairs
        from core.prompts import load_pairs

        with clock.stage("patching"):
            sweep = patch_pairs(lm, formatter, load_pairs(config.patching.pairs), sites=config.patching.sites,
                                n_pairs=config.patching.n_pairs, threshold=config.patching.threshold,
                                require_behaviour=config.patching.require_behaviour, min_gap=config.patching.min_gap,
                                fdr=config.patching.fdr,
                                progress=log.stage("patching"))

    from core.over_refusal import measure_over_refusal

    with clock.stage("over_refusal"):  # refusal on safe test prompts that look unsafe (a reported figure)
        # validation already made the unsteered answers to the harmless test prompts: reuse them
        made = {g["prompt"]: g["generation"] for g in (validation.generations if validation is not None else [])
                if g["condition"] == "baseline" and g["prompts"] == "harmless"}
        over = measure_over_refusal(lm, formatter, prompts.harmless_test, config.prompts.harmless,
                                    max_new_tokens=config.generation.max_new_tokens, batch_size=bs, answers=made)
    card = _organism_card(spec.source)
    clock.finish()
    entry = model_entry(name=spec.name, lm=lm, preamble=spec.preamble, dirs=dirs, choice=choice, validation=validation,
                        patching=sweep, scan=scan, organism=card, source=spec.source, timings=clock.wall,
                        grid=grid, coefficient_choice=coef)
    entry["cpu_timings"] = {k: round(v, 2) for k, v in clock.cpu.items()}
    entry["over_refusal"] = over.to_dict() if over is not None else None
    if out_dir is not None:
        from core.exports import write_direction_exports

        entry["files"] = write_direction_exports(out_dir, spec.name, lm, dirs, choice, prompts=prompts,
                                                 split={**config.prompts.to_dict(), "description": prompts.description})
    if entry["patching"] is not None:
        entry["patching"]["requested_sites"] = list(config.patching.sites)
        entry["patching"]["pairs_source"] = config.patching.pairs
    log.say(f"done in {clock.wall['total']:.1f} s ({clock.cpu['total']:.0f} CPU-seconds)")
    return entry


def run(config: Config, *, command: str | None = None, stream=None,
        on_model: Callable[[dict[str, Any]], None] | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run every model of ``config``; returns the results dict (nothing written).

    ``on_model(partial_results)`` is called after each model with the results so far
    (``complete`` False until the last one), so a long run can save as it goes."""
    started = _dt.datetime.now(_dt.timezone.utc)
    t0, c0 = time.perf_counter(), time.process_time()
    from core.prompt_files import PromptLayoutNote  # which column of a standard prompt table was used

    with warnings.catch_warnings(record=True) as caught:  # duplicates dropped: a note, not a raw warning
        warnings.simplefilter("always", DuplicatePromptsWarning)
        warnings.simplefilter("always", PromptLayoutNote)
        prompts = resolve_prompts(config.prompts)
    prompt_notes = [str(w.message) for w in caught if issubclass(w.category, (DuplicatePromptsWarning, PromptLayoutNote))]
    for note in prompt_notes:
        print(f"note: {note}", file=stream or sys.stderr)
    entries: list[dict[str, Any]] = []

    def snapshot() -> dict[str, Any]:
        results = build_results(config, entries, command=command, total_seconds=time.perf_counter() - t0,
                                prompts=prompts, started=started)
        results["total_cpu_seconds"] = round(time.process_time() - c0, 2)
        results["complete"] = len(entries) == len(config.models)
        results["models_pending"] = [m.name for m in config.models[len(entries):]]
        results["prompt_notes"] = prompt_notes
        return results

    for spec in config.models:
        entries.append(run_model(spec, config, prompts, StderrProgress(spec.name, stream), out_dir=out_dir))
        if on_model is not None and len(entries) < len(config.models):
            on_model(snapshot())
    return snapshot()


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def set_threads(spec: str | int) -> int | None:
    """Apply ``--threads``: a number fixes torch's CPU thread count (returned); ``auto`` (the
    default) returns None and leaves the count to :class:`core.threads.AdaptiveThreads`, which
    times each candidate count on the run's own generation batches and keeps the fastest.

    Why not a load reading: OpenMP threads spin-wait on a busy machine (one thread measured ~6x
    faster there), but a one-time load-average reading pins a whole run to one thread because of
    a passing moment, and it counts the run's own threads as load. ``REFUSAL_THREADS`` sets the
    same choice from the environment."""
    import torch

    from core.threads import requested_threads

    try:
        n = requested_threads(spec, name="--threads")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if n is not None:
        torch.set_num_threads(n)
    return n


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see core/config.py and experiments/config.yaml)")
    parser.add_argument("--out", default="results/", help="output folder (default: results/)")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads: a number, or auto (each candidate count timed on the run's own "
                             "batches, the fastest kept and re-checked; REFUSAL_THREADS sets it too)")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    command = f"python -m core.batch --config {shlex.quote(args.config)} --out {shlex.quote(args.out)}"
    try:
        config = load_config(args.config)
        threads = set_threads(args.threads)
        print(f"torch CPU threads: {threads or 'measured per batch (auto)'}", file=sys.stderr)
        from core import threads as thread_policy
        from core.report import write_reports

        # after each model the reports so far are written, so a long run loses nothing if stopped
        with thread_policy.using(None if threads else thread_policy.AdaptiveThreads()):
            results = run(config, command=command, on_model=lambda partial: write_reports(partial, args.out),
                          out_dir=args.out)
        paths = write_reports(results, args.out)
        from core.bundle import write_bundle

        paths["bundle"] = write_bundle(args.out, config.to_yaml())  # config, results, reports, direction files, versions
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ExplorerError, ValueError, OSError) as exc:
        if args.traceback:
            traceback.print_exc()
        kind = "" if isinstance(exc, ExplorerError) else f"{type(exc).__name__}: "
        print(f"error: {kind}{_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {results['total_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
