"""The analysis pipeline, once: ``analyse(model, prompts, settings) -> Analysis``.

The batch runner (every stage, per model), the Directions page (``stages=("directions",)``) and
a notebook call this one function, so the three cannot drift apart. The stages, in order:

* ``directions`` — the position × layer grid on validation prompts (``settings.selection``),
  activations of the six prompt sets, per-layer directions fitted on train, and the layer: the
  grid's winner, a fixed ``steering.layer``, the ablation screen on validation prompts
  (``steering.scan_prompts``) or the best validation separation;
* ``coefficient`` — the force coefficient, chosen on validation harmless prompts;
* ``validation`` — steering on test prompts against random and label-shuffled controls, with
  only the chosen coefficient (test prompts report, they never choose);
* ``patching`` — activation patching on matched pairs (only when ``settings.patching`` is set);
* ``over_refusal`` — refusal on the safe-but-unsafe-looking test prompts, reusing validation's
  unsteered answers.

``directions`` always runs (every later stage needs the direction); ``validation`` needs
``coefficient``. :meth:`core.results.Analysis.to_dict` is the model's entry of ``results.json``.
The README's notebook section shows a run; ``core.analyse(lm, prompts)`` alone is a batch run.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence

from core.config import (Config, GenerationConfig, ModelSpec, PatchingConfig, ProbeConfig, PromptData, PromptsConfig,
                         SelectionConfig, SteeringConfig)
from core.errors import ConfigError
from core.progress import Progress
from core.results import Analysis

if TYPE_CHECKING:
    from core.formatting import Preamble
    from core.models import LoadedModel
    from core.organism import OrganismCard

STAGES = ("directions", "coefficient", "validation", "patching", "over_refusal")
# relative cost of each step, for a single progress bar (a plain ``progress(fraction, message)``)
_WEIGHTS = {"load": 1.0, "selection": 6.0, "activations": 3.0, "directions": 1.0, "layer_screen": 2.0,
            "coefficient": 2.0, "validation": 6.0, "patching": 3.0, "over_refusal": 1.0}


# ---------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything an analysis depends on besides the model and the prompts, in the batch
    config's own sections (:mod:`core.config`), so the defaults are the batch runner's.

    ``name`` labels the model in results (default: the model's name); ``preamble`` is a preset
    name, a ``{system, demonstrations}`` dict or a :class:`core.formatting.Preamble`; ``dtype``
    and ``device`` apply when ``analyse`` loads the model from a source string; ``prompts``
    gives the seed (probe folds, controls, splits), the harmless source (over-refusal's
    lookalike prompts) and, when ``analyse`` gets no prompts, where to read them."""

    name: str | None = None
    preamble: str | dict | Preamble = "prompted-refusal"
    dtype: str = "auto"
    device: str = "auto"
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    position: str | int = "last"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    patching: PatchingConfig | None = None
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    judge: str = "substring"

    @classmethod
    def from_config(cls, config: Config, spec: ModelSpec | None = None) -> Settings:
        """The settings of one model of a batch config (its first model if ``spec`` is None)."""
        spec = spec or config.models[0]
        return cls(name=spec.name, preamble=spec.preamble, dtype=spec.dtype, device=spec.device, prompts=config.prompts,
                   position=config.position, generation=config.generation, steering=config.steering,
                   patching=config.patching, probe=config.probe, selection=config.selection, judge=config.judge)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------
# progress and timing
# ---------------------------------------------------------------------------------------
class StageProgress(Protocol):
    """A progress sink that reports each step under its own name (the batch runner's stderr)."""

    def stage(self, name: str) -> Progress: ...

    def say(self, message: str) -> None: ...


class _Reporter:
    """One interface over the two kinds of ``progress``: a :class:`StageProgress` gets each
    step's own 0–1 fraction under its label; a plain ``progress(fraction, message)`` gets one
    0–1 bar across the planned steps (each its share by :data:`_WEIGHTS`)."""

    def __init__(self, progress: StageProgress | Progress | None, plan: Sequence[str]) -> None:
        self.target = progress
        self.staged = progress is not None and hasattr(progress, "stage") and hasattr(progress, "say")
        total = sum(_WEIGHTS[s] for s in plan) or 1.0
        self.spans: dict[str, tuple[float, float]] = {}
        at = 0.0
        for s in plan:
            self.spans[s] = (at, at + _WEIGHTS[s] / total)
            at += _WEIGHTS[s] / total
        self.at = 0.0

    def step(self, stage: str, label: str, part: int = 0, parts: int = 1) -> Progress | None:
        """The callback for ``part`` of ``parts`` of ``stage``, shown as ``label``."""
        if self.target is None:
            return None
        if self.staged:
            return self.target.stage(label)  # type: ignore[union-attr]
        lo, hi = self.spans.get(stage, (self.at, self.at))
        width = (hi - lo) / parts
        start = lo + width * part

        def report(fraction: float, message: str = "") -> None:
            self.at = start + width * max(0.0, min(1.0, float(fraction)))
            self.target(self.at, f"{label}: {message}" if message else label)  # type: ignore[misc]

        return report

    def begin(self, stage: str, message: str) -> None:
        """Tell a single bar that a step without its own progress has started."""
        if self.target is not None and not self.staged:
            self.at = self.spans.get(stage, (self.at, self.at))[0]
            self.target(self.at, message)  # type: ignore[misc]

    def say(self, message: str) -> None:
        if self.staged:
            self.target.say(message)  # type: ignore[union-attr]
        elif self.target is not None:
            self.target(self.at, message)  # type: ignore[misc]


class Stopwatch:
    """Wall-clock and process CPU seconds per step."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t0 = (time.perf_counter(), time.process_time())

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - w
            self.cpu[name] = time.process_time() - c

    def finish(self) -> None:
        self.wall["total"] = time.perf_counter() - self._t0[0]
        self.cpu["total"] = time.process_time() - self._t0[1]


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
_SPLITS = ("harmful_train", "harmless_train", "harmful_test", "harmless_test")


def as_prompt_data(prompts: Any, settings: Settings) -> PromptData:
    """``prompts`` as :class:`PromptData`: None reads ``settings.prompts``
    (:func:`core.config.resolve_prompts`); a mapping ``{"harmful": [...], "harmless": [...]}``
    is split as the config splits a prompt file (70/30 by ``settings.prompts.seed``, validation
    carved from train, first ``n_train``/``n_test`` taken); anything with the six split lists
    (``harmful_train`` … ``harmless_val``, e.g. the app's prompt sets) is used as it is."""
    from core.config import resolve_prompts

    if prompts is None:
        return resolve_prompts(settings.prompts)
    if isinstance(prompts, PromptData):
        return prompts
    if isinstance(prompts, Mapping) and {"harmful", "harmless"} <= set(prompts):
        return _split_lists(prompts["harmful"], prompts["harmless"], settings.prompts)
    get = prompts.get if isinstance(prompts, Mapping) else (lambda k, d=None: getattr(prompts, k, d))
    if any(get(k) is None for k in _SPLITS):
        raise ValueError("prompts: give a PromptData, a mapping with 'harmful' and 'harmless' lists, or an object "
                         f"with the lists {', '.join(_SPLITS)}, harmful_val and harmless_val")
    return PromptData(*(list(get(k)) for k in _SPLITS),
                      description=str(get("description") or get("source") or "prompts given to analyse"),
                      harmful_val=list(get("harmful_val") or []), harmless_val=list(get("harmless_val") or []))


def _split_lists(harmful: Sequence[str], harmless: Sequence[str], cfg: PromptsConfig) -> PromptData:
    from core.errors import SplitError
    from core.prompts import check_disjoint, split_prompts, take, three_way

    try:
        h, b = (three_way(split_prompts(list(ps), seed=cfg.seed), cfg.validation_fraction, cfg.seed,
                          setting="settings.prompts.validation_fraction", label=f"{label} train")
                for label, ps in (("harmful", harmful), ("harmless", harmless)))
        check_disjoint({"harmful test": h.test, "harmless test": b.test},
                       {"harmful train": h.train, "harmless train": b.train,
                        "harmful validation": h.validation, "harmless validation": b.validation})
        n = {"train": cfg.n_train, "test": cfg.n_test}
        lists = [take(h.train, n["train"]), take(b.train, n["train"]), take(h.test, n["test"]), take(b.test, n["test"])]
    except (SplitError, ValueError) as exc:
        raise ValueError(f"prompts: {exc} (settings.prompts sets n_train, n_test, seed and validation_fraction)") from None
    return PromptData(*lists, description=f"given lists; 70/30 split, seed {cfg.seed}; validation = "
                                          f"{cfg.validation_fraction:g} of train (seeded)",
                      harmful_val=h.validation, harmless_val=b.validation)


def _check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stages, str):
        stages = (stages,)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    if "validation" in stages and "coefficient" not in stages:
        raise ValueError("stages: 'validation' reports the force coefficient chosen by 'coefficient'; add 'coefficient'")
    return tuple(s for s in STAGES if s == "directions" or s in stages)


def _organism_card(source: str) -> OrganismCard | None:
    from pathlib import Path

    from core.organism import CARD_FILE, load_card, organism_folder

    if source == "embedded-refusal":
        return load_card(organism_folder())
    folder = Path(source)
    if folder.is_dir() and (folder / CARD_FILE).is_file():
        return load_card(folder)
    return None


# ---------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------
def analyse(
    model: LoadedModel | str | os.PathLike,
    prompts: PromptData | Mapping[str, Sequence[str]] | Any | None,
    settings: Settings | None = None,
    *,
    progress: StageProgress | Progress | None = None,
    stages: Sequence[str] = STAGES,
) -> Analysis:
    """Run the stages (module docstring) on ``model`` (a :class:`core.models.LoadedModel`, or
    a source string loaded with ``settings.dtype``/``settings.device``) and ``prompts`` (see
    :func:`as_prompt_data`). Train fits, validation chooses (position, layer, coefficient), test
    only reports. ``progress`` is a ``progress(fraction, message)`` callback (one bar) or a
    :class:`StageProgress` (one line per step)."""
    from core.activations import collect_activations
    from core.directions import fit_directions
    from core.layer_choice import LayerChoice, candidate_layers, choose_layer
    from core.formatting import Formatter, get_preamble
    from core.models import load_model
    from core.selection import check_validation, choose_coefficient, select
    from core.validation import run_validation, scan_layers

    settings = settings or Settings()
    stages = _check_stages(stages)
    if isinstance(model, os.PathLike):
        model = str(model)
    data = as_prompt_data(prompts, settings)
    source = model if isinstance(model, str) else model.source
    steer_cfg, sel, gen = settings.steering, settings.selection, settings.generation
    fixed_layer = isinstance(steer_cfg.layer, int)
    use_grid = not fixed_layer and sel.enabled
    plan = [*(["load"] if isinstance(model, str) else []), *(["selection"] if use_grid else []), "activations",
            "directions", *(["layer_screen"] if not fixed_layer and not use_grid and steer_cfg.scan_prompts > 0 else []),
            *(s for s in stages[1:] if s != "patching" or settings.patching is not None)]
    report = _Reporter(progress, plan)
    clock = Stopwatch()
    evaluates = len(stages) > 1  # behaviour measured beyond the directions themselves
    if source == "embedded-refusal" and evaluates:  # never report trained behaviour as held-out behaviour
        from core.organism import check_evaluation_prompts

        check_evaluation_prompts(data.harmful_val + data.harmless_val + data.harmful_test + data.harmless_test)

    if isinstance(model, str):
        with clock.stage("load"):
            lm = load_model(model, dtype=settings.dtype, device=settings.device, progress=report.step("load", "load"))
        report.say(f"loaded {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, {lm.dtype} on {lm.device}")
    else:
        lm = model
    name = settings.name or lm.name
    formatter = Formatter(lm.tokenizer, get_preamble(settings.preamble))
    bs = gen.batch_size

    position, grid = settings.position, None
    if fixed_layer and not -lm.n_layers <= steer_cfg.layer < lm.n_layers:
        raise ConfigError(f"steering.layer: {steer_cfg.layer} is out of range for {name}, which has {lm.n_layers} "
                          f"layers (0–{lm.n_layers - 1}); use auto or a layer in range")
    if not fixed_layer:
        check_validation(data.harmful_val, data.harmless_val)
    if use_grid:
        with clock.stage("selection"):
            grid = select(lm, formatter, data.harmful_train, data.harmless_train, data.harmful_val, data.harmless_val,
                          positions=sel.positions, layer_stride=sel.layer_stride, n_prompts=sel.n_prompts,
                          max_kl=sel.max_kl, skip_last_fraction=sel.skip_last_fraction, batch_size=bs,
                          prune=sel.prune, progress=report.step("selection", "selection grid"))
        position = grid.position
        report.say(f"grid ({grid.seconds:.0f} s): position {grid.position}, layer {grid.layer} (block input): "
                   f"{grid.winner.reason}")

    sets = (("harmful train", data.harmful_train), ("harmless train", data.harmless_train),
            ("harmful test", data.harmful_test), ("harmless test", data.harmless_test),
            ("harmful validation", data.harmful_val), ("harmless validation", data.harmless_val))
    with clock.stage("activations"):
        acts = [collect_activations(lm, ps, position=position, formatter=formatter, batch_size=bs,
                                    progress=report.step("activations", f"activations ({label})", i, len(sets)))
                if ps else None for i, (label, ps) in enumerate(sets)]

    with clock.stage("directions"):
        report.begin("directions", "fitting directions and cross-validating probes")
        dirs = fit_directions(*acts[:4], harmful_val=acts[4], harmless_val=acts[5], method=steer_cfg.method,
                              position=position, probe_folds=settings.probe.folds, seed=settings.prompts.seed)

    scan = None
    if fixed_layer:
        choice = choose_layer(dirs, layer=steer_cfg.layer)
    elif grid is not None:
        choice = LayerChoice(grid.output_layer, "grid", f"block output {grid.output_layer} = input of block {grid.layer}; "
                             f"{grid.winner.reason}", "validation")
    elif steer_cfg.scan_prompts > 0:
        n = steer_cfg.scan_prompts
        with clock.stage("layer_screen"):
            # the screen uses validation prompts: the direction was fitted on train, test stays untouched
            layers = candidate_layers(dirs.n_layers)
            layers = layers[::-1][::steer_cfg.scan_stride][::-1]  # every stride-th candidate, always the last one
            scan = scan_layers(lm, formatter, dirs, data.harmful_val[:n], data.harmless_val[:n], layers=layers,
                               batch_size=bs, progress=report.step("layer_screen", "layer screen"))
        choice = choose_layer(dirs, ablation_effect=scan.ablation_effect, kl=scan.kl, split="validation")
    else:
        choice = choose_layer(dirs)
    report.say(f"layer {choice.layer} ({choice.rule}, on {choice.split} prompts): {choice.reason}")

    found = Analysis(name=name, lm=lm, formatter=formatter, settings=settings, prompts=data, stages=stages, dirs=dirs,
                     choice=choice, grid=grid, scan=scan,
                     test_activations={"harmful": acts[2], "harmless": acts[3]})
    if "coefficient" in stages:
        with clock.stage("coefficient"):
            if len(set(steer_cfg.coefficients)) > 1:
                check_validation(data.harmful_val, data.harmless_val)
            found.coefficient = coef = choose_coefficient(
                lm, formatter, dirs, choice.layer, data.harmless_val[:sel.n_prompts], steer_cfg.coefficients,
                normalised=steer_cfg.normalised, max_new_tokens=gen.max_new_tokens, batch_size=bs,
                progress=report.step("coefficient", "force coefficient (validation)"))
        report.say(f"force coefficient {coef.coefficient:g} ({coef.split}): {coef.rule}")

    if "validation" in stages:
        with clock.stage("validation"):
            from core.controls import shuffled_direction
            from core.llm_judge import make_judge

            found.validation = run_validation(
                lm, formatter, dirs, choice.layer, data.harmful_test, data.harmless_test,
                # only the coefficient chosen on validation: test prompts report, they do not choose
                coefficients=(coef.coefficient,), subtract_coefficients=steer_cfg.subtract_coefficients,
                normalised=steer_cfg.normalised, max_new_tokens=gen.max_new_tokens, seed=settings.prompts.seed,
                n_samples=gen.n_samples, batch_size=bs, progress=report.step("validation", "validation"),
                # the label-shuffled control: train activations at the chosen layer, classes permuted
                shuffled=shuffled_direction(acts[0][:, choice.layer], acts[1][:, choice.layer], settings.prompts.seed),
                judge=make_judge(settings.judge, device=settings.device), judge_name=settings.judge,
            )

    if "patching" in stages and settings.patching is not None:
        from core.patching import patch_pairs
        from core.prompts import load_pairs

        p = settings.patching
        with clock.stage("patching"):
            found.patching = patch_pairs(lm, formatter, load_pairs(p.pairs), sites=p.sites, n_pairs=p.n_pairs,
                                         threshold=p.threshold, require_behaviour=p.require_behaviour,
                                         min_gap=p.min_gap, fdr=p.fdr, progress=report.step("patching", "patching"))

    if "over_refusal" in stages:
        from core.over_refusal import measure_over_refusal

        with clock.stage("over_refusal"):  # refusal on safe test prompts that look unsafe (a reported figure)
            report.begin("over_refusal", "over-refusal on lookalike test prompts")
            # validation already made the unsteered answers to the harmless test prompts: reuse them
            made = {g["prompt"]: g["generation"] for g in (found.validation.generations if found.validation else [])
                    if g["condition"] == "baseline" and g["prompts"] == "harmless"}
            found.over_refusal = measure_over_refusal(lm, formatter, data.harmless_test, settings.prompts.harmless,
                                                      max_new_tokens=gen.max_new_tokens, batch_size=bs, answers=made)
    if evaluates:
        found.organism = _organism_card(source)
    clock.finish()
    found.timings, found.cpu_timings = dict(clock.wall), dict(clock.cpu)
    return found
