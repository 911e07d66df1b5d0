"""Headless runs: ``python -m core.batch --config experiments/config.yaml --out results/``.

For every model in the config, every stage of :func:`core.analysis.analyse`: load it, choose
position and layer on validation prompts, fit per-layer refusal directions on train prompts,
choose the force coefficient on validation prompts, validate by steering on test prompts against
random controls, optionally patch activations on matched pairs, measure over-refusal, and (for
the refusal organism) attach its card. Writes ``results.json`` (its layout:
:mod:`core.results`), ``report.md`` (+ ``charts/``), ``report.html``, the direction files and
``bundle.zip``. Progress goes to stderr; an :class:`~core.errors.ExplorerError` ends the run with
a non-zero exit status and a one-line reason (``--traceback`` shows the full trace).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from core.config import Config, ModelSpec, PromptData, load_config, resolve_prompts
from core.errors import ConfigError, ExplorerError
from core.prompts import DuplicatePromptsWarning
from core.progress import Progress
from core.results import build_results, peak_rss_mb


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


def run_model(spec: ModelSpec, config: Config, prompts: PromptData, log: StderrProgress | None = None,
              out_dir: str | Path | None = None) -> dict[str, Any]:
    """Every stage of :func:`core.analysis.analyse` for one model; returns its entry of
    ``results.json``. With ``out_dir``, also writes its directions file and control vector there
    (:mod:`core.exports`)."""
    from core.analysis import Settings, analyse

    log = log or StderrProgress(spec.name)
    analysis = analyse(spec.source, prompts, Settings.from_config(config, spec), progress=log)
    entry = analysis.to_dict()
    if out_dir is not None:
        from core.exports import write_direction_exports

        entry["files"] = write_direction_exports(out_dir, spec.name, analysis.lm, analysis.dirs, analysis.choice,
                                                 prompts=prompts,
                                                 split={**config.prompts.to_dict(), "description": prompts.description})
    log.say(f"done in {analysis.timings['total']:.1f} s ({analysis.cpu_timings['total']:.0f} CPU-seconds)")
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
        results["peak_rss_mb"] = peak_rss_mb()
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
    parser.add_argument("--config", required=True, help="YAML config (see core/config/schema.py and experiments/config.yaml)")
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
    rss = results.get("peak_rss_mb")
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {results['total_seconds']:.0f} s"
          + (f", peak RSS {rss:.0f} MiB" if rss is not None else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
