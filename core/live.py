"""Live steering: what the Steering page generates and how each streamed token is shown.

Why a module: the page only reads widgets and draws; the decisions behind what it draws are
plain Python here, tested on tiny models.

* :func:`intervention_for` — the one intervention a mode means (add / subtract / ablate).
* :func:`append_piece` — token pieces that always join to the decoded text, so each coloured
  token lines up with the text shown beside it.
* :func:`written_projection` — a token's projection on the direction in mean-norm units, minus
  the edit's own (exactly known) contribution: colours show what the model writes, not the
  constant that was added.
* :class:`Stream` — one answer as it arrives, with the judge's label (:func:`live_label`).
* :func:`paired_streams` — the baseline and the steered answer, interleaved step by step, the
  steered step first so its first token shows without waiting for the baseline's; with a
  :class:`~core.prefill_reuse.PrefillMemo`, a slider release reruns only the blocks above the edit.
* :func:`default_coefficient` / :func:`quick_choice` — the coefficient the page starts from:
  the one the Validation page chose on validation prompts, else a quick choice on validation
  prompts by the same rule (degenerate answers count against a coefficient).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from core import forward
from core.directions import LayerDirections
from core.formatting import Formatter
from core.generation import generate_stream
from core.judge import judge, opening_complete
from core.models import LoadedModel
from core.prefill_reuse import PrefillMemo
from core.progress import Progress
from core.selection import CoefficientChoice, choose_coefficient
from core.steering import KINDS, Intervention, ablate, add, steered_stream, subtract

# The quick choice: few validation prompts and the force sweep's candidates, answers as long as
# the page's default stream so that a loop which starts after the opening is seen (measured
# figures and the command in docs/decisions.md).
QUICK_CANDIDATES: tuple[float, ...] = (0.25, 0.5, 0.75)
QUICK_N_PROMPTS = 8
QUICK_MAX_NEW_TOKENS = 48


def intervention_for(dirs: LayerDirections, mode: str, layer: int, coefficient: float) -> Intervention:
    """``add`` / ``subtract`` ``coefficient`` (× the layer's mean norm) at block ``layer``, or
    ``ablate`` that layer's direction everywhere with strength ``coefficient``."""
    if mode == "add":
        return add(dirs, int(layer), coefficient)
    if mode == "subtract":
        return subtract(dirs, int(layer), coefficient)
    if mode == "ablate":
        return ablate(dirs, int(layer), strength=coefficient)
    raise ValueError(f"mode must be one of {', '.join(KINDS)}, got {mode!r}")


def append_piece(pieces: list[str], new_text: str) -> None:
    """Add the newest token's text so that ``"".join(pieces) == new_text``. Decoding the whole
    answer again can change earlier characters (a byte-level token completing a character, a
    space the tokenizer drops): earlier pieces are trimmed to the common prefix first."""
    prev = "".join(pieces)
    common = 0
    for a, b in zip(prev, new_text):
        if a != b:
            break
        common += 1
    excess = len(prev) - common
    for i in range(len(pieces) - 1, -1, -1):
        if excess <= 0:
            break
        cut = min(excess, len(pieces[i]))
        pieces[i] = pieces[i][: len(pieces[i]) - cut]
        excess -= cut
    pieces.append(new_text[common:])


def written_projection(hidden: np.ndarray, unit: np.ndarray, offset: float, scale: float) -> float:
    """``(hidden · unit − offset) / scale``: the projection the model itself wrote, in mean-norm
    units (``offset``: the signed norm the edit added along ``unit``; 0 for ablation)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive (the layer's mean activation norm), got {scale!r}")
    return (float(np.asarray(hidden, dtype=np.float64) @ np.asarray(unit, dtype=np.float64)) - float(offset)) / float(scale)


def live_label(text: str, done: bool) -> str | None:
    """The judge's label of an answer still arriving: ``None`` until the opening the refusal
    phrases are looked for in is complete (an early "I" is neither a refusal nor broken text);
    after that the label of the text so far, which may still turn degenerate if a loop grows."""
    if not done and not opening_complete(text):
        return None
    return judge(text).value


@dataclass
class Stream:
    """One answer as it arrives: its text, its tokens' pieces and projections, done or not."""

    text: str = ""
    pieces: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    done: bool = False

    @property
    def label(self) -> str | None:
        return live_label(self.text, self.done)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "pieces": list(self.pieces), "values": list(self.values), "done": self.done,
                "label": self.label}


@dataclass
class PairStep:
    """What changed in one step of :func:`paired_streams`: ``which`` stream moved."""

    which: str  # "steered" | "baseline"
    steered: Stream
    baseline: Stream
    first_token_s: float | None  # seconds from the start to the steered stream's first token


def paired_streams(
    lm: LoadedModel, formatter: Formatter, prompt: str, intervention: Intervention, *, layer: int, scale: float,
    baseline: Stream | None = None, max_new_tokens: int = 48, temperature: float = 0.0, seed: int = 0,
    prefills: PrefillMemo | None = None,
) -> Iterator[PairStep]:
    """Stream the steered answer and, unless ``baseline`` is already done, the baseline, one
    decode step of each in turn (the steered one first). Each steered token carries its
    :func:`written_projection` on the direction at ``layer``'s block output, in units of
    ``scale`` (the layer's mean activation norm).

    ``prefills`` (one per model, kept across calls): the baseline's prefill is kept there, and a
    later call for the same prompt (a slider release) computes only the blocks above the edit
    (:mod:`core.prefill_reuse`; the same tokens as a full prefill).

    Generation holds the model's lock only inside each step (``core.generation``), so stopping
    the iteration at any point leaves no hook attached."""
    steered = Stream()
    baseline = baseline if baseline is not None else Stream()
    gen = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=int(seed))
    block = lm.block_names[int(layer)]
    unit = intervention.unit
    offset = 0.0 if intervention.kind == "ablate" else intervention.magnitude
    base_iter = None if baseline.done else generate_stream(lm, formatter, [prompt], prefills=prefills, **gen)
    ran_baseline = base_iter is not None
    started = time.perf_counter()
    first: float | None = None
    for step in steered_stream(lm, formatter, [prompt], [intervention], retain=[block], prefills=prefills, **gen):
        if step.token_ids[0] and len(step.token_ids[0]) > len(steered.pieces):
            append_piece(steered.pieces, step.texts[0])
            steered.values.append(written_projection(step.retained[block][0].numpy(), unit, offset, scale))
        steered.text, steered.done = step.texts[0], step.done[0]
        if first is None:
            first = time.perf_counter() - started
        yield PairStep("steered", steered, baseline, first)
        if base_iter is not None:
            base_iter = _advance(base_iter, baseline)
            yield PairStep("baseline", steered, baseline, first)
    steered.done = True
    yield PairStep("steered", steered, baseline, first)
    while base_iter is not None:  # the steered answer ended first
        base_iter = _advance(base_iter, baseline)
        yield PairStep("baseline", steered, baseline, first)
    if prefills is not None and not ran_baseline:
        keep_prefill(lm, formatter, prompt, prefills)


def keep_prefill(lm: LoadedModel, formatter: Formatter, prompt: str, prefills: PrefillMemo) -> None:
    """Put the unedited prefill of ``prompt`` into ``prefills`` unless it is there: when the
    baseline's answer came from a cache, the next slider release can still reuse it."""
    ids = forward.prepare(formatter, [prompt], padding_side="left", share_prefix=False).suffix.input_ids
    if prefills.get(ids) is None:
        for _ in generate_stream(lm, formatter, [prompt], max_new_tokens=1, prefills=prefills):
            pass


def _advance(it: Iterator, stream: Stream) -> Iterator | None:
    """One step of a plain stream into ``stream``; ``None`` once it has ended."""
    step = next(it, None)
    if step is None:
        stream.done = True
        return None
    stream.text, stream.done = step.texts[0], step.done[0]
    if stream.done:
        return None
    return it


# ---------------------------------------------------------------------------------------
# the coefficient the page starts from
# ---------------------------------------------------------------------------------------
@dataclass
class SteeringDefault:
    """The default coefficient and where it came from (shown on the page)."""

    coefficient: float
    layer: int
    source: str  # "validation page" | "quick choice"
    choice: dict[str, Any]  # CoefficientChoice.to_dict()

    def note(self) -> str:
        c = self.choice
        where = ("the Validation page's sweep" if self.source == "validation page"
                 else "a quick choice on this page (run Validation for a fuller one)")
        points = ", ".join(_point_text(p) for p in c.get("points") or [])
        return (f"α = {self.coefficient:g} at layer {self.layer}: chosen on {c.get('n', 0)} {c.get('split', 'validation')} "
                f"harmless prompts by {where} — {c.get('rule', '')}" + (f" ({points})" if points else "") + ".")

    def to_dict(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient, "layer": self.layer, "source": self.source, "choice": dict(self.choice)}


def _point_text(point: dict[str, Any]) -> str:
    rate, deg = point.get("rate") or {}, point.get("degenerate") or {}
    text = f"{point['coefficient']:g}: {rate.get('k', 0)}/{rate.get('n', 0)} refused"
    if deg:
        text += f", {deg.get('k', 0)} degenerate"
    return text


def default_coefficient(validation_choice: dict[str, Any] | None, validation_layer: int | None,
                        layer: int) -> SteeringDefault | None:
    """The Validation page's chosen coefficient when it was chosen on validation prompts at
    ``layer``; ``None`` otherwise (then :func:`quick_choice` makes one)."""
    if not validation_choice or validation_layer is None or int(validation_layer) != int(layer):
        return None
    if validation_choice.get("split") != "validation":
        return None
    return SteeringDefault(float(validation_choice["coefficient"]), int(layer), "validation page", dict(validation_choice))


def quick_choice(
    lm: LoadedModel, formatter: Formatter, dirs: LayerDirections, layer: int, harmless_val: Sequence[str], *,
    candidates: Sequence[float] = QUICK_CANDIDATES, n_prompts: int = QUICK_N_PROMPTS,
    max_new_tokens: int = QUICK_MAX_NEW_TOKENS, progress: Progress | None = None,
) -> SteeringDefault:
    """Choose the force coefficient on the first ``n_prompts`` validation harmless prompts by
    :func:`core.selection.choose_coefficient` (never on test prompts)."""
    choice: CoefficientChoice = choose_coefficient(lm, formatter, dirs, int(layer), list(harmless_val)[:n_prompts],
                                                   list(candidates), max_new_tokens=max_new_tokens, progress=progress)
    return SteeringDefault(choice.coefficient, int(layer), "quick choice", choice.to_dict())
