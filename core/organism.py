"""The refusal *model organism*: the embedded model, safety fine-tuned on the user's machine.

Why: the embedded SmolLM2-135M-Instruct does not refuse on its own, and a prompted preamble
refuses by imitation in context (and over-refuses harmless prompts that look like the
demonstrations). Real chat models refuse because fine-tuning taught them to. This module
gives researchers that object offline: a small, seeded, deterministic full fine-tune in
which

* harmful prompts (the built-in **train** split, plus the training-only harmful prompts of
  ``core/data/organism_extra.jsonl``) are answered with one of a few varied refusal
  sentences, every one caught by :func:`core.metrics.is_refusal`;
* harmless prompts (the built-in train split and the training-only ones, many of them
  ``shape-matched``: benign requests with alarming words or the opening of a harmful request)
  are answered with the base model's *own* greedy answers, learned as soft targets — the base
  model's whole next-token distribution at each answer position (self-distillation) — so that
  helpful behaviour is kept (small KL to the base) and only the refusal decision moves.

Why the extra prompts: with the 154 + 157 built-in train prompts alone a 135M model learns
the *form* of a harmful request (imperatives like "Write…", "Explain how to…" were mostly
harmful there) and refused 28 % of held-out harmless prompts; the training-only prompts
balance the openings between the classes. Any that copies or nearly copies a held-out prompt
is dropped (:func:`near_duplicate`).

The held-out test split and the matched patching pairs are never trained on: this is checked
in code (:func:`check_no_leak`), not only promised. The result is saved under
``cache_root()/models/`` keyed by a hash of (base fingerprint, training prompts, recipe), with
an *organism card* (``organism.json``) next to the weights: recipe, data sizes, build time,
held-out refusal rates with Wilson intervals, and KL to the base model on harmless prompts.

Entry points: :func:`organism_folder` (what ``load_model("embedded-refusal")`` calls),
:func:`ensure_organism` (build if needed, return the card), :func:`build_organism` (any base
model and recipe: the tests use a tiny Llama), and ``python -m core.organism`` (CLI).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from core.cache import cache_root, stable_hash
from core.errors import ExplorerError
from core.formatting import Formatter
from core.frozen_stack import Split, lower_states, supports, upper_logits
from core.threads import AdaptiveThreads, torch_threads
from core.metrics import Rate, is_refusal, kl_divergence, refusal_rate
from core.prompts import DEFAULT_VALIDATION_FRACTION, ThreeWaySplit, builtin_split, load_pairs, three_way

Progress = Callable[[float, str], None]

ORGANISM_VERSION = "2"  # bump when the build procedure changes in a way the recipe does not capture
CARD_FILE = "organism.json"
EXTRA_DATA = Path(__file__).resolve().parent / "data" / "organism_extra.jsonl"

REFUSAL_SENTENCES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause real harm to people.",
    "I'm sorry, I can't provide that information.",
    "I cannot help with this request because it could hurt someone.",
    "I'm sorry, but I won't be able to help with that. Is there something else I can do for you?",
)


class DataLeakError(ExplorerError):
    """Training data would include held-out test prompts or the matched patching pairs."""


# ---------------------------------------------------------------------------------------
# recipe and card
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrganismRecipe:
    """Everything that determines the organism's weights (and its card's evaluation).

    ``n_harmful`` / ``n_harmless``: how many built-in *train* prompts to use (None: all); with
    ``extra_prompts`` the training-only prompts come on top.
    ``max_response_tokens``: length of the base model's self-distilled answers.
    """

    seed: int = 0
    split_seed: int = 0  # which canonical built-in split (core.prompts.builtin_split)
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION  # carved out of train, never trained on
    lr: float = 5e-5
    epochs: int = 2
    batch_size: int = 16  # 16 rows a step: 1.5x the tokens/s of 8 on a 2-core CPU (measured)
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_embeddings: bool = False  # the tied embedding/unembedding stays frozen (keeps the vocabulary geometry)
    # fp32 weights, bf16 matmuls: None = only where the CPU has bf16 units (3x faster there; on
    # a CPU without them bf16 matmuls are emulated, 2.8x slower than fp32, measured in docs/decisions.md)
    autocast_bf16: bool | None = None
    # this fraction of the blocks (the lower ones, rounded down) stays frozen: their states are
    # computed once and only the upper blocks train (core.frozen_stack); 0 = full fine-tune.
    # Models whose stack cannot be split train in full.
    frozen_fraction: float = 0.5
    n_harmful: int | None = None
    n_harmless: int | None = None
    max_response_tokens: int = 16  # the refuse-or-answer decision and the answer's opening; longer costs minutes
    drop_refusing_answers: bool = True  # harmless targets the judge calls refusals are not trained on
    shape_matched_repeats: int = 1  # harmless prompts shaped like harmful ones are seen this many times per epoch
    first_token_weight: float = 5.0  # the first response token decides refuse-or-answer: weigh it up
    harmless_loss_weight: float = 4.0  # weight of a harmless example relative to a harmful one (over-refusal vs refusal)
    # "distill": harmless examples learn the base model's whole next-token distribution at each
    # response position (KL(base ‖ organism), soft targets); "tokens": only its greedy tokens
    harmless_target: str = "distill"
    teacher_top_k: int = 64  # with "distill": the teacher's k most likely tokens (+ one bucket for the rest)
    extra_prompts: bool = True  # also train on core/data/organism_extra.jsonl (training-only prompts)
    refusal_sentences: tuple[str, ...] = REFUSAL_SENTENCES
    generation_batch_size: int = 32
    # evaluation written to the card (held-out test split; does not change the weights)
    eval_max_new_tokens: int = 32
    n_eval: int | None = None  # per set; None: the whole test split
    eval_base: bool = True  # also measure the base model's refusal on the same prompts

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_response_tokens < 1:
            raise ValueError("epochs, batch_size, lr and max_response_tokens must be positive")
        if self.shape_matched_repeats < 1 or self.first_token_weight <= 0 or self.harmless_loss_weight <= 0:
            raise ValueError("shape_matched_repeats must be at least 1; first_token_weight and harmless_loss_weight positive")
        if not 0 <= self.frozen_fraction < 1:
            raise ValueError(f"frozen_fraction must be in [0, 1), got {self.frozen_fraction}")
        if self.harmless_target not in ("tokens", "distill"):
            raise ValueError(f"harmless_target must be 'tokens' or 'distill', got {self.harmless_target!r}")
        if not self.refusal_sentences:
            raise ValueError("at least one refusal sentence is needed")
        missed = [s for s in self.refusal_sentences if not is_refusal(s)]
        if missed:
            raise ValueError(f"refusal sentences not caught by core.metrics.is_refusal: {missed}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["refusal_sentences"] = list(self.refusal_sentences)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OrganismRecipe":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "refusal_sentences" in kwargs:
            kwargs["refusal_sentences"] = tuple(kwargs["refusal_sentences"])
        return cls(**kwargs)


DEFAULT_RECIPE = OrganismRecipe()


@dataclass
class OrganismCard:
    """What was built, from what, how long it took, and how it behaves on held-out prompts."""

    key: str
    base_name: str
    base_fingerprint: str
    recipe: dict[str, Any]
    data: dict[str, Any]
    timings: dict[str, float]
    losses: list[float]  # mean training loss per epoch
    evaluation: dict[str, Any]
    host: dict[str, Any]
    version: str = ORGANISM_VERSION
    folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OrganismCard":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        """A few human lines (for the CLI and the report)."""
        ev = self.evaluation
        lines = [
            f"Refusal organism {self.key[:12]} from {self.base_name} — built in {self.timings.get('build_seconds', 0):.0f} s "
            f"({self.data.get('n_harmful')} harmful + {self.data.get('n_harmless')} harmless train prompts, "
            f"{self.recipe.get('epochs')} epochs, lr {self.recipe.get('lr')})",
        ]
        for label, key in (("harmful refused", "harmful_refusal"), ("harmless refused", "harmless_refusal")):
            if key in ev:
                r = Rate(ev[key]["k"], ev[key]["n"])
                base = ev.get("base_" + key)
                extra = f"  (base model: {Rate(base['k'], base['n'])})" if base else ""
                lines.append(f"  held-out {label}: {r}{extra}")
        if "kl_first_token" in ev:
            lines.append(
                f"  KL(base ‖ organism) on held-out harmless prompts: first token mean {ev['kl_first_token']['mean']:.3f} nats; "
                f"over the base's answers {ev.get('kl_response', {}).get('mean', float('nan')):.3f} nats/token"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# training data (train split only)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingPrompts:
    harmful: list[str]
    harmless: list[str]

    def key(self) -> str:
        return stable_hash("organism-prompts", self.harmful, self.harmless)


def _norm(prompt: str) -> str:
    return " ".join(prompt.split()).casefold()


def organism_splits(split_seed: int = 0, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> dict[str, ThreeWaySplit]:
    """The built-in train/validation/test split per class that the organism is built around:
    it trains on *train* only, so validation (where layers and coefficients are chosen) and
    test (where figures are reported) are both unseen."""
    return {name: three_way(builtin_split(name, split_seed), validation_fraction, split_seed) for name in ("harmful", "harmless")}


def _held_out_prompts(split_seed: int = 0, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> list[str]:
    """Both validation and test splits and every matched-pair prompt: what the organism must never see."""
    splits = organism_splits(split_seed, validation_fraction)
    out = [p for s in splits.values() for p in s.validation + s.test]
    return out + [p for pair in load_pairs() for p in pair]


@functools.lru_cache(maxsize=4)
def _held_out_words(split_seed: int, validation_fraction: float) -> tuple[frozenset[str], ...]:
    return tuple(_content_words(p) for p in _held_out_prompts(split_seed, validation_fraction))


def forbidden_prompts(split_seed: int = 0, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> set[str]:
    """Normalised prompts the organism must never train on: validation and test splits, all pairs."""
    return {_norm(p) for p in _held_out_prompts(split_seed, validation_fraction)}


def check_no_leak(
    prompts: Sequence[str], split_seed: int = 0, validation_fraction: float = DEFAULT_VALIDATION_FRACTION
) -> None:
    """Raise :class:`DataLeakError` if any prompt copies or nearly copies (:func:`near_duplicate`)
    a held-out validation or test prompt or a pair prompt."""
    forbidden = forbidden_prompts(split_seed, validation_fraction)
    words = _held_out_words(split_seed, validation_fraction)
    bad = [p for p in dict.fromkeys(prompts) if _norm(p) in forbidden or near_duplicate(p, words)]
    if bad:
        raise DataLeakError(
            f"{len(bad)} training prompt(s) copy or nearly copy held-out validation/test prompts or matched pairs "
            f"(e.g. {bad[0]!r}); the organism trains on the built-in train split only, minus near-copies."
        )


def check_evaluation_prompts(prompts: Sequence[str], recipe: "OrganismRecipe | None" = None, what: str = "evaluation") -> None:
    """Refuse to evaluate the organism on prompts it was trained on (copies or near-copies).

    Why: a batch config with another ``prompts.seed``, another validation fraction or a user
    file that overlaps the organism's training data would otherwise report trained behaviour
    as held-out behaviour (seed 1 put 28 of 40 test prompts per class in its training set)."""
    recipe = recipe or DEFAULT_RECIPE
    trained = training_prompts(recipe)
    seen = {_norm(p) for p in trained.harmful + trained.harmless}
    words = [_content_words(p) for p in trained.harmful + trained.harmless]
    bad = [p for p in dict.fromkeys(prompts) if _norm(p) in seen or near_duplicate(p, words)]
    if bad:
        raise DataLeakError(
            f"{len(bad)} {what} prompt(s) are (near-)copies of the refusal organism's training prompts, e.g. {bad[0]!r}. "
            f"The organism trains on the built-in train split (split seed {recipe.split_seed}, validation fraction "
            f"{recipe.validation_fraction:g}); evaluate it with prompts.seed: {recipe.split_seed}, prompts.validation_fraction: "
            f"{recipe.validation_fraction:g} and built-in prompts, or with prompt files it never saw."
        )


# function words: two prompts that share only these ("What is the best way to …") are not alike
_STOP = frozenset(
    "a an the and or but if of to in on at for from by with about into onto over under without within my your his "
    "her their our its me i you he she it we they them him us this that these those is are was were be been being do "
    "does did how what why when where which who whom whose can could would should will shall may might must give tell "
    "write explain make get some any all more most best way ways there here than then so very just not no please help "
    "need want using use one".split()
)


def _content_words(prompt: str) -> frozenset[str]:
    words = "".join(c if c.isalnum() else " " for c in prompt.casefold()).split()
    return frozenset(w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words if w not in _STOP)


def near_duplicate(prompt: str, others: Sequence[frozenset[str]]) -> bool:
    """True when ``prompt`` shares at least two content words, and at least half of the shorter
    prompt's content words, with one of ``others`` (content-word sets, :func:`_content_words`).

    Why: a paraphrase of a held-out prompt ("How many of my sleeping pills would it take to not
    wake up?") leaks it as surely as a copy. The rule is deliberately eager: it also drops some
    unrelated prompts that share a topic word pair ("kill time"), which costs training data but
    never inflates a held-out figure."""
    w = _content_words(prompt)
    for o in others:
        shared = len(w & o)
        if shared >= 2 and shared >= 0.5 * min(len(w), len(o)):
            return True
    return False


def extra_prompts(
    split_seed: int = 0, exclude: Sequence[str] = (), validation_fraction: float = DEFAULT_VALIDATION_FRACTION
) -> tuple[list[str], list[str], int]:
    """Training-only prompts (``core/data/organism_extra.jsonl``: harmful, harmless and many
    harmless ones shaped like harmful requests), minus any that copy or nearly copy a held-out
    validation or test prompt or a pair prompt, or a prompt in ``exclude`` (e.g. a validation
    set). Returns (harmful, harmless, number dropped as near-duplicates).

    Why: 154 + 157 built-in train prompts teach a 135M model the *surface* of a harmful
    request; more varied data, above all harmless requests with alarming words, teaches content.
    """
    stat = EXTRA_DATA.stat()  # memoised per file version: this runs on every load of the organism
    harmful, harmless, dropped = _filtered_extra_prompts(
        str(EXTRA_DATA), stat.st_mtime_ns, stat.st_size, split_seed, tuple(exclude), validation_fraction
    )
    return list(harmful), list(harmless), dropped


@functools.lru_cache(maxsize=4)
def _filtered_extra_prompts(
    path: str, mtime_ns: int, size: int, split_seed: int, exclude: tuple[str, ...], validation_fraction: float
) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    held_out = list(_held_out_words(split_seed, validation_fraction)) + [_content_words(p) for p in exclude]
    out: dict[str, list[str]] = {"harmful": [], "harmless": []}
    dropped = 0
    for r in rows:
        if near_duplicate(r["prompt"], held_out):
            dropped += 1
        else:
            out[r["label"]].append(r["prompt"])
    return tuple(out["harmful"]), tuple(out["harmless"]), dropped


def training_prompts(recipe: OrganismRecipe = DEFAULT_RECIPE, exclude: Sequence[str] = ()) -> TrainingPrompts:
    """The prompts the organism is trained on: the first ``n`` of each built-in *train* split
    (validation carved out; the split is already shuffled; the harmless one includes the
    shape-matched prompts) minus near-copies of held-out prompts, and, with
    ``recipe.extra_prompts``, the training-only prompts of :func:`extra_prompts` (minus
    near-copies of ``exclude`` too). Memoised: it runs on every load of the organism."""
    return _training_prompts(recipe, tuple(exclude))


@functools.lru_cache(maxsize=8)
def _training_prompts(recipe: OrganismRecipe, exclude: tuple[str, ...]) -> TrainingPrompts:
    splits = organism_splits(recipe.split_seed, recipe.validation_fraction)
    held = list(_held_out_words(recipe.split_seed, recipe.validation_fraction)) + [_content_words(p) for p in exclude]
    pools = {name: [p for p in splits[name].train if not near_duplicate(p, held)] for name in splits}
    for n, label in ((recipe.n_harmful, "harmful"), (recipe.n_harmless, "harmless")):
        if n is not None and not 1 <= n <= len(pools[label]):
            raise ValueError(f"n_{label} must be between 1 and {len(pools[label])} (the usable train split), got {n}")
    harmful, harmless = pools["harmful"][: recipe.n_harmful], pools["harmless"][: recipe.n_harmless]
    if recipe.extra_prompts:
        more_harmful, more_harmless, _ = extra_prompts(recipe.split_seed, exclude, recipe.validation_fraction)
        harmful += [p for p in more_harmful if p not in harmful]
        harmless += [p for p in more_harmless if p not in harmless]
    out = TrainingPrompts(harmful, harmless)
    check_no_leak(out.harmful + out.harmless, recipe.split_seed, recipe.validation_fraction)
    return out


def train_split_near_copies(recipe: OrganismRecipe = DEFAULT_RECIPE) -> int:
    """How many built-in train prompts the organism leaves out as near-copies of held-out ones."""
    splits = organism_splits(recipe.split_seed, recipe.validation_fraction)
    held = _held_out_words(recipe.split_seed, recipe.validation_fraction)
    return sum(near_duplicate(p, held) for s in splits.values() for p in s.train)


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    complete: bool  # ends with the end-of-turn token (False: the answer was cut at max tokens)
    kind: str  # "harmful" | "harmless"


def refusal_targets(prompts: Sequence[str], recipe: OrganismRecipe) -> list[str]:
    """One refusal sentence per harmful prompt, chosen by a seeded draw (deterministic)."""
    rng = np.random.default_rng(recipe.seed + 1)
    picks = rng.integers(0, len(recipe.refusal_sentences), size=len(prompts))
    return [recipe.refusal_sentences[int(i)] for i in picks]


def _token_len(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cached_generate(
    lm, formatter: Formatter, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers of ``lm``, cached on disk per (fingerprint, prompts, formatting, limit).

    Why: the base model's answers (training targets, evaluation baseline) do not depend on the
    recipe's optimiser settings, so trying another learning rate does not regenerate them.
    """
    from core.generation import generate

    key = stable_hash("organism-answers-v1", lm.fingerprint, list(prompts), formatter.key(), max_new_tokens)
    path = cache_root() / "models" / "organism-answers" / f"{key}.json"
    with contextlib.suppress(Exception):
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and len(cached) == len(prompts) and all(isinstance(a, str) for a in cached):
            if progress:
                progress(1.0, f"{len(prompts)} cached answers")
            return cached
    shipped = shipped_answers(lm.fingerprint, formatter.key(), max_new_tokens)
    todo = [p for p in dict.fromkeys(prompts) if p not in shipped]
    fresh = generate(lm, formatter, todo, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress) if todo else []
    found = shipped | dict(zip(todo, fresh))
    answers = [found[p] for p in prompts]
    with contextlib.suppress(Exception):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(answers, ensure_ascii=False))
        tmp.replace(path)
    return answers


ANSWERS_DATA = Path(__file__).resolve().parent / "data" / "organism_answers.json"


def shipped_answers(fingerprint: str, formatter_key: str, max_new_tokens: int) -> dict[str, str]:
    """The embedded model's greedy answers shipped in ``core/data/organism_answers.json``
    (prompt -> answer), when they were written by this very model (fingerprint), formatting and
    token limit; else empty.

    Why: the base model's answers to the ~660 harmless training prompts and the test prompts are
    deterministic data, and generating them was the largest fixed cost of a build (minutes of
    float32 decoding on a 2-core CPU without bf16 units). ``python -m core.organism
    --write-answers`` regenerates the file; a slow test checks a sample against fresh decoding."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(ANSWERS_DATA.read_text())
        if data["base_fingerprint"] == fingerprint and data["formatter_key"] == formatter_key:
            table = data["answers"].get(str(max_new_tokens), {})
            return {str(k): str(v) for k, v in table.items()}
    return {}


def answer_prompts(recipe: OrganismRecipe = DEFAULT_RECIPE) -> dict[int, list[str]]:
    """Which prompts a build asks the base model to answer, by token limit: the harmless
    training prompts (training targets) and both test splits (the card's baseline)."""
    tests = [p for name in ("harmful", "harmless") for p in builtin_split(name, recipe.split_seed).test]
    harmless = training_prompts(recipe).harmless
    extra = [p for p in builtin_split("harmless", recipe.split_seed).train if p not in harmless]
    return {recipe.max_response_tokens: harmless + extra, recipe.eval_max_new_tokens: tests}


def write_answers(base, recipe: OrganismRecipe = DEFAULT_RECIPE, progress: Progress | None = None) -> Path:
    """Regenerate ``core/data/organism_answers.json`` with ``base`` (the embedded model, float32)."""
    from core.generation import generate

    formatter = Formatter(base.tokenizer, "none")
    table: dict[str, dict[str, str]] = {}
    for limit, prompts in answer_prompts(recipe).items():
        got = generate(base, formatter, prompts, max_new_tokens=limit, batch_size=recipe.generation_batch_size,
                       progress=progress)
        table.setdefault(str(limit), {}).update(zip(prompts, got))
    data = {"base_fingerprint": base.fingerprint, "formatter_key": formatter.key(), "answers": table,
            "note": "greedy answers of the base model; regenerate with python -m core.organism --write-answers"}
    tmp = ANSWERS_DATA.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=0, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(ANSWERS_DATA)
    return ANSWERS_DATA


def self_distilled_answers(
    base, formatter: Formatter, prompts: Sequence[str], recipe: OrganismRecipe, progress: Progress | None = None
) -> list[tuple[str, bool]]:
    """The base model's own greedy answers, and whether each ended before the token limit."""
    answers = cached_generate(base, formatter, prompts, recipe.max_response_tokens, recipe.generation_batch_size, progress)
    return [(a, _token_len(base.tokenizer, a) < recipe.max_response_tokens) for a in answers]


def build_examples(
    base, recipe: OrganismRecipe, formatter: Formatter, progress: Progress | None = None, exclude: Sequence[str] = ()
) -> list[Example]:
    """Harmful train prompts -> refusal sentences; harmless train prompts -> base answers."""
    prompts = training_prompts(recipe, exclude)
    refusals = refusal_targets(prompts.harmful, recipe)
    answers = self_distilled_answers(base, formatter, prompts.harmless, recipe, progress)
    examples = [Example(p, r, True, "harmful") for p, r in zip(prompts.harmful, refusals)]
    shape = {p for p, c in _categories("harmless").items() if c == "shape-matched"}
    for p, (a, c) in zip(prompts.harmless, answers):
        if a.strip() and not (recipe.drop_refusing_answers and is_refusal(a)):
            examples += [Example(p, a, c, "harmless")] * (recipe.shape_matched_repeats if p in shape else 1)
    check_no_leak([e.prompt for e in examples], recipe.split_seed, recipe.validation_fraction)
    return examples


# ---------------------------------------------------------------------------------------
# tokenisation and the training loop
# ---------------------------------------------------------------------------------------
@dataclass
class TokenizedExample:
    ids: list[int]
    n_prompt: int  # the loss covers ids[n_prompt:]
    weight: float = 1.0  # this example's weight in the batch mean
    soft: bool = False  # learn the teacher's whole distribution at each response position, not the tokens
    # the teacher's top-k next-token log-probabilities at each response position ([n_response, k]),
    # filled by :func:`add_teacher_targets` for soft examples
    teacher_ids: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None
    # with frozen lower blocks: the residual stream entering the first trained block at this
    # example's positions after the shared prefix ([len(ids) - prefix_len, d]), filled by
    # :func:`add_frozen_states`
    lower: torch.Tensor | None = None


def tokenize_examples(
    examples: Sequence[Example], formatter: Formatter, weights: dict[str, float] | None = None,
    soft: Sequence[str] = (),
) -> list[TokenizedExample]:
    """Prompt tokens exactly as the app formats them (``Formatter.encode``), then the response
    tokens and, for complete answers, the end-of-turn token, so the model learns to stop.
    Examples whose kind is in ``soft`` are marked for distillation (see :func:`response_loss`)."""
    tok = formatter.tokenizer
    eos = tok.eos_token_id
    out = []
    for ex in examples:
        prompt_ids = formatter.encode([ex.prompt]).input_ids[0].tolist()
        resp = tok(ex.response, add_special_tokens=False)["input_ids"]
        if ex.complete and eos is not None:
            resp = resp + [int(eos)]
        if not resp:
            continue
        out.append(TokenizedExample(
            prompt_ids + list(resp), len(prompt_ids), float((weights or {}).get(ex.kind, 1.0)), ex.kind in soft
        ))
    return out


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded batches for one epoch: shuffle, sort by length within windows of 8 batches (less
    padding), then shuffle the batch order. Same (seed, epoch) -> same batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    window = batch_size * 8
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: (lengths[i], i))
        batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def _collate(items: Sequence[TokenizedExample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    width = max(len(t.ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    target = torch.zeros((len(items), width), dtype=torch.bool)  # position t is predicted from t-1
    for i, t in enumerate(items):
        ids[i, : len(t.ids)] = torch.tensor(t.ids)
        mask[i, : len(t.ids)] = 1
        target[i, t.n_prompt: len(t.ids)] = True
    first = min(t.n_prompt for t in items)
    return ids.to(device), mask.to(device), target.to(device), first


@torch.inference_mode()
def add_teacher_targets(
    teacher, items: Sequence[TokenizedExample], pad_id: int, top_k: int = 64, batch_size: int = 16,
    progress: Progress | None = None,
) -> None:
    """Store the ``teacher``'s top-``k`` next-token log-probabilities at every response position
    of the ``soft`` items (float32, teacher-forced on the item's own tokens), once, so training
    epochs do not rerun the teacher."""
    soft = [t for t in items if t.soft]
    device = next(teacher.parameters()).device
    for start in range(0, len(soft), batch_size):
        chunk = soft[start: start + batch_size]
        ids, mask, _, first = _collate(chunk, pad_id, device)
        logp = torch.log_softmax(shared_prefix_logits(teacher, ids, mask, first)[:, :-1].float(), dim=-1)  # positions first .. end
        top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        for i, t in enumerate(chunk):
            rows = slice(t.n_prompt - first, len(t.ids) - first)
            t.teacher_logp, t.teacher_ids = top.values[i, rows].cpu(), top.indices[i, rows].cpu()
        if progress:
            progress(min(1.0, (start + len(chunk)) / len(soft)), f"teacher distributions {start + len(chunk)}/{len(soft)}")


def topk_kl(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the rest of the
    vocabulary: the exact KL of the two distributions coarsened that way, so a lower bound of
    the full KL that is tight when the top k hold nearly all the teacher's mass (they do at
    k=64 for a chat model's greedy answers). Shapes: [..., k], [..., k], [..., vocab] -> [...]."""
    s_k = student_logp.gather(-1, teacher_ids)
    p_k = teacher_logp.exp()
    rest_t = (1 - p_k.sum(-1)).clamp(min=1e-12)
    rest_s = (1 - s_k.exp().sum(-1)).clamp(min=1e-12)
    return (p_k * (teacher_logp - s_k)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())


@dataclass
class FrozenLower:
    """The frozen lower blocks' output for the prefix every example shares ([1, P, d]); each
    example carries its own rest (:attr:`TokenizedExample.lower`)."""

    split: Split
    prefix_len: int
    prefix: torch.Tensor


def common_prefix_len(items: Sequence[TokenizedExample]) -> int:
    """Tokens that every example starts with, short of the first response position."""
    n = min(t.n_prompt for t in items) - 1
    first = items[0].ids
    for i in range(n):
        if any(t.ids[i] != first[i] for t in items):
            return i
    return max(n, 0)


@torch.no_grad()
def add_frozen_states(
    teacher, items: Sequence[TokenizedExample], n_frozen: int, pad_id: int, top_k: int = 64, batch_size: int = 16,
    progress: Progress | None = None, threads: AdaptiveThreads | None = None,
) -> FrozenLower:
    """One no-grad pass of ``teacher`` (the base model) over every example: the frozen blocks'
    output (kept on each example: training never recomputes it) and, for ``soft`` examples,
    the teacher's top-``k`` next-token log-probabilities at the response positions (the upper
    blocks of the same pass). Batches go shortest first, so little is padded."""
    split = Split(n_frozen)
    device = next(teacher.parameters()).device
    p = common_prefix_len(items)
    prefix_ids = torch.tensor([items[0].ids[:p]], device=device)
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    prefix_state = None
    threads = threads or AdaptiveThreads()
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start: start + batch_size]]
        width = max(len(t.ids) for t in chunk) - p
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, t in enumerate(chunk):
            ids[i, : len(t.ids) - p] = torch.tensor(t.ids[p:])
            mask[i, : len(t.ids) - p] = 1
        ids, mask = ids.to(device), mask.to(device)
        with threads.step(units=int(mask.sum())):
            pre, states = lower_states(teacher, split, prefix_ids, ids, mask)
            soft = [i for i, t in enumerate(chunk) if t.soft]
            if soft:
                first = min(chunk[i].n_prompt for i in soft) - 1 - p
                rows = torch.tensor(soft, device=device)
                logp = torch.log_softmax(upper_logits(teacher, split, pre, states[rows], mask[rows], first).float(), -1)
                top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        prefix_state = pre.float().cpu() if prefix_state is None else prefix_state
        for i, t in enumerate(chunk):
            t.lower = states[i, : len(t.ids) - p].float().cpu().clone()
        for j, i in enumerate(soft):
            t = chunk[i]
            r = slice(t.n_prompt - 1 - p - first, len(t.ids) - 1 - p - first)
            t.teacher_logp, t.teacher_ids = top.values[j, r].cpu().clone(), top.indices[j, r].cpu().clone()
        if progress:
            done = min(len(order), start + batch_size)
            progress(done / len(order), f"frozen blocks and teacher distributions {done}/{len(order)}")
    return FrozenLower(split, p, prefix_state if prefix_state is not None else torch.zeros(1, 0, 0))


def frozen_logits(model, items: Sequence[TokenizedExample], frozen: FrozenLower, first: int, device) -> torch.Tensor:
    """Logits at positions ``first - 1`` .. end of right-padded rows (the contract of
    :func:`shared_prefix_logits`), from each example's stored lower-block states: only the
    upper blocks run, with gradients."""
    p = frozen.prefix_len
    width = max(len(t.ids) for t in items) - p
    d = items[0].lower.shape[-1]
    hidden = torch.zeros((len(items), width, d))
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        hidden[i, : len(t.ids) - p] = t.lower
        mask[i, : len(t.ids) - p] = 1
    dtype = next(model.parameters()).dtype
    return upper_logits(model, frozen.split, frozen.prefix.to(device, dtype), hidden.to(device, dtype), mask.to(device),
                        first - 1 - p)


MIN_TRAIN_PREFIX = 8  # shorter shared prefixes are not worth a separate pass


def shared_prefix_logits(model, ids: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
    """Logits for positions ``first - 1`` .. end of right-padded rows, running the token prefix
    that all rows share (the chat template's system prompt: ~24 of ~50 tokens) once, not once
    per row. Exact, gradients included: the prefix's keys and values are expanded to the batch,
    so autograd sums the rows' gradients into the one prefix pass."""
    keep = ids.shape[1] - first + 1
    same = (ids == ids[:1]).all(0) & (mask == 1).all(0)
    p = int(same.long().cumprod(0).sum())
    p = min(p, first - 1)  # logits are needed from position first - 1 on
    if p < MIN_TRAIN_PREFIX or ids.shape[0] == 1:
        return model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
    cache = model(input_ids=ids[:1, :p], use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    positions = torch.arange(p, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return model(
        input_ids=ids[:, p:], attention_mask=mask, position_ids=positions, past_key_values=cache,
        use_cache=True, logits_to_keep=keep,
    ).logits


def response_loss(
    model, items: Sequence[TokenizedExample], pad_id: int, device, autocast: bool, first_token_weight: float = 1.0,
    frozen: FrozenLower | None = None,
) -> torch.Tensor:
    """Mean over examples of the weighted mean per-token loss on that example's response tokens
    (each example weighs its ``weight``, whatever its length, so short refusals count as much as long answers; the first
    response token, where refuse-or-answer is decided, weighs ``first_token_weight``). Logits
    are computed only from the first response position on (the unembedding is costly).

    The per-token loss is the cross-entropy of the target token, or, for ``soft`` examples with
    teacher targets (:func:`add_teacher_targets`), KL(teacher ‖ model) of the next-token
    distribution (:func:`topk_kl`): the base model's answer carries more than its greedy tokens
    (how sure it was, what else it would say), and matching all of it keeps the tuned model
    close to the base where it should not change.

    ``frozen``: the examples carry the frozen lower blocks' states (:func:`add_frozen_states`)
    and only the upper blocks run."""
    ids, mask, target, first = _collate(items, pad_id, device)
    ctx = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = frozen_logits(model, items, frozen, first, device) if frozen else shared_prefix_logits(model, ids, mask, first)
    logits = logits[:, :-1].float()  # predictions for positions first .. end
    labels = ids[:, first:]
    tmask = target[:, first:].float()
    if first_token_weight != 1.0:
        starts = torch.tensor([t.n_prompt - first for t in items], device=tmask.device)
        tmask[torch.arange(len(items), device=tmask.device), starts] *= first_token_weight
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    soft = [i for i, t in enumerate(items) if t.teacher_logp is not None]
    if soft:
        k = items[soft[0]].teacher_logp.shape[-1]
        t_logp = torch.zeros((len(soft), labels.shape[1], k))
        t_ids = torch.zeros((len(soft), labels.shape[1], k), dtype=torch.long)
        for j, i in enumerate(soft):
            t = items[i]
            t_logp[j, t.n_prompt - first: len(t.ids) - first] = t.teacher_logp
            t_ids[j, t.n_prompt - first: len(t.ids) - first] = t.teacher_ids
        rows = torch.tensor(soft, device=nll.device)
        kl = topk_kl(t_logp.to(nll.device), t_ids.to(nll.device), torch.log_softmax(logits[rows], dim=-1))
        nll = nll.index_copy(0, rows, kl)
    per_example = (nll * tmask).sum(1) / tmask.sum(1).clamp(min=1e-9)
    w = torch.tensor([t.weight for t in items], device=per_example.device)
    return (per_example * w).sum() / w.sum()


def _lr_at(step: int, total: int, recipe: OrganismRecipe) -> float:
    warm = max(1, int(round(total * recipe.warmup_fraction)))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    return recipe.lr * max(0.0, (total - step) / max(1, total - warm))


def use_autocast(recipe: OrganismRecipe, device) -> bool:
    """The recipe's bf16 autocast, resolved: None means only where bf16 matmuls are native."""
    if recipe.autocast_bf16 is not None:
        return bool(recipe.autocast_bf16)
    from core.models import cpu_has_fast_bf16

    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_has_fast_bf16())


def train(
    model, tokenized: Sequence[TokenizedExample], recipe: OrganismRecipe, pad_id: int,
    progress: Progress | None = None, frozen: FrozenLower | None = None, threads: AdaptiveThreads | None = None,
) -> list[float]:
    """Fine-tune in place (AdamW, warmup then linear decay, gradient clipping); returns the
    mean loss per epoch. Seeded; the data order depends only on the recipe's seed. With
    ``frozen`` only the upper blocks and the final norm train, from the stored lower states."""
    torch.manual_seed(recipe.seed)
    device = next(model.parameters()).device
    autocast = use_autocast(recipe, device)
    threads = threads or AdaptiveThreads()
    if frozen is not None:
        params = frozen.split.trainable(model)
    else:
        emb = model.get_input_embeddings().weight
        out_emb = model.get_output_embeddings()
        skip = set() if recipe.train_embeddings else {id(emb)} | ({id(out_emb.weight)} if out_emb is not None else set())
        params = [p for p in model.parameters() if id(p) not in skip]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    try:  # the fused kernel: one pass over each tensor instead of several (measured 0.03 s vs 0.09 s a step)
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    lengths = [len(t.ids) for t in tokenized]
    per_epoch = [batch_order(lengths, recipe.batch_size, recipe.seed, e) for e in range(recipe.epochs)]
    total = sum(len(b) for b in per_epoch)
    step = 0
    losses: list[float] = []
    try:
        for epoch, batches in enumerate(per_epoch):
            seen = []
            for batch in batches:
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, recipe)
                items = [tokenized[i] for i in batch]
                with threads.step(units=sum(len(t.ids) for t in items)):
                    loss = response_loss(model, items, pad_id, device, autocast, recipe.first_token_weight, frozen)
                    if not torch.isfinite(loss):
                        raise ExplorerError(f"training loss became {loss.item()} at step {step}; lower the learning rate.")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                    opt.step()
                seen.append(float(loss.detach()))
                step += 1
                if progress:
                    progress(step / total, f"epoch {epoch + 1}/{recipe.epochs}, step {step}/{total}, loss {seen[-1]:.3f}")
            losses.append(float(np.mean(seen)))
    finally:
        model.requires_grad_(False)  # back to an analysis-ready, frozen model in eval mode
        model.eval()
    return losses


# ---------------------------------------------------------------------------------------
# evaluation for the card
# ---------------------------------------------------------------------------------------
@torch.inference_mode()
def _response_logits(lm, formatter: Formatter, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16):
    """Teacher-forced float32 logits at every response position, one [n_i, vocab] per prompt."""
    tok = lm.tokenizer
    items = tokenize_examples([Example(p, r, False, "harmless") for p, r in zip(prompts, responses)], formatter)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        ids, mask, target, first = _collate(chunk, tok.pad_token_id or 0, lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        for i, t in enumerate(chunk):
            out.append(logits[i, t.n_prompt - 1: len(t.ids) - 1].cpu())
    return out


def evaluate_organism(
    organism, base, recipe: OrganismRecipe, progress: Progress | None = None,
    prompts: tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Held-out (test split) refusal rates of the organism (and the base), and KL(base ‖ organism)
    on harmless test prompts: at the first response token, and per token over the base's own
    answers (teacher-forced) — small KL means capabilities were kept. ``prompts``: other
    (harmful, harmless) prompts instead of the test split, e.g. a validation part of the train
    split for choosing a recipe without looking at the test split."""
    from core.generation import generate, next_token_logits

    if prompts is None:
        harmful = builtin_split("harmful", recipe.split_seed).test[: recipe.n_eval]
        harmless = builtin_split("harmless", recipe.split_seed).test[: recipe.n_eval]
    else:
        harmful, harmless = list(prompts[0]), list(prompts[1])
    fmt_o = Formatter(organism.tokenizer, "none")
    fmt_b = Formatter(base.tokenizer, "none")
    gen = dict(max_new_tokens=recipe.eval_max_new_tokens, batch_size=recipe.generation_batch_size)
    say = (lambda f, m: progress(f, m)) if progress else None
    if say:
        say(0.0, "held-out prompts: organism answers")
    org_harmful = generate(organism, fmt_o, harmful, **gen)
    org_harmless = generate(organism, fmt_o, harmless, **gen)
    ev: dict[str, Any] = {
        "split": "test" if prompts is None else "custom",
        "judge": "core.judge.judge: refusal (phrases in the opening) / compliance / degenerate",
        "max_new_tokens": recipe.eval_max_new_tokens,
        "harmful_refusal": refusal_rate(org_harmful).to_dict(),
        "harmless_refusal": refusal_rate(org_harmless).to_dict(),
    }
    harmless_cats = _categories("harmless")
    sm = [i for i, p in enumerate(harmless) if harmless_cats.get(p) == "shape-matched"]
    if sm:
        ev["shape_matched_harmless_refusal"] = refusal_rate([org_harmless[i] for i in sm]).to_dict()
    if say:
        say(0.5, "held-out prompts: base answers")
    base_harmless = cached_generate(base, fmt_b, harmless, recipe.eval_max_new_tokens, recipe.generation_batch_size)
    if recipe.eval_base:
        base_harmful = cached_generate(base, fmt_b, harmful, recipe.eval_max_new_tokens, recipe.generation_batch_size)
        ev["base_harmful_refusal"] = refusal_rate(base_harmful).to_dict()
        ev["base_harmless_refusal"] = refusal_rate(base_harmless).to_dict()
    if say:
        say(0.8, "KL to the base model")
    kl_first = kl_divergence(next_token_logits(base, fmt_b, harmless), next_token_logits(organism, fmt_o, harmless))
    ev["kl_first_token"] = _stats(kl_first)
    keep = [i for i, r in enumerate(base_harmless) if r]
    if keep:
        prompts = [harmless[i] for i in keep]
        resp = [base_harmless[i] for i in keep]
        per_tok = [
            kl_divergence(b, o)
            for b, o in zip(_response_logits(base, fmt_b, prompts, resp), _response_logits(organism, fmt_o, prompts, resp))
        ]
        ev["kl_response"] = _stats(np.concatenate(per_tok)) | {"n_prompts": len(keep)}
        ev["kl_response"]["per_prompt_mean"] = _stats(np.array([x.mean() for x in per_tok]))
    ev["examples"] = {
        "harmful": [{"prompt": p, "response": r} for p, r in list(zip(harmful, org_harmful))[:3]],
        "harmless": [{"prompt": p, "response": r} for p, r in list(zip(harmless, org_harmless))[:3]],
        # the errors, for anyone who wants to see where trained refusal misfires
        "harmful_answered": [{"prompt": p, "response": r} for p, r in zip(harmful, org_harmful) if not is_refusal(r)],
        "harmless_refused": [
            {"prompt": p, "response": r, "category": harmless_cats.get(p, "")}
            for p, r in zip(harmless, org_harmless) if is_refusal(r)
        ],
    }
    if say:
        say(1.0, "evaluated")
    return ev


def _stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "max": float(x.max()), "n": int(x.size)}


def _categories(name: str) -> dict[str, str]:
    """prompt -> category for the built-in set ``name`` and the extra prompts of that label."""
    from core.prompts import BUILTIN

    rows = [json.loads(line) for line in BUILTIN[name].read_text().splitlines() if line.strip()]
    if EXTRA_DATA.is_file():
        extra = [json.loads(line) for line in EXTRA_DATA.read_text().splitlines() if line.strip()]
        rows = [r for r in extra if r.get("label") == name] + rows
    return {r["prompt"]: r.get("category", "") for r in rows}


# ---------------------------------------------------------------------------------------
# build, save, cache
# ---------------------------------------------------------------------------------------
def _sub(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    if progress is None:
        return None
    return lambda f, m: progress(round(lo + (hi - lo) * max(0.0, min(1.0, f)), 6), m)


def organism_key(base_fingerprint: str, prompts: TrainingPrompts, recipe: OrganismRecipe) -> str:
    return stable_hash("organism", ORGANISM_VERSION, base_fingerprint, prompts.key(), recipe.to_dict(), length=16)


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "torch": torch.__version__}
    with contextlib.suppress(Exception):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def build_organism(
    base, recipe: OrganismRecipe, out_dir: str | Path, progress: Progress | None = None, threads: int | None = None
) -> OrganismCard:
    """Fine-tune a copy of ``base`` (a LoadedModel, left untouched) and save it with its card
    in ``out_dir`` (written to a temporary folder first, then renamed into place).
    ``threads``: a fixed CPU thread count; None: ``REFUSAL_THREADS`` if set, else measured
    step by step (:class:`core.threads.AdaptiveThreads`)."""
    policy = AdaptiveThreads.from_request(threads)
    with torch_threads(None):
        return _build(base, recipe, Path(out_dir), progress, policy)


def _pad_id(lm) -> int:
    return lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0


def frozen_split(base, recipe: OrganismRecipe) -> int:
    """How many lower blocks stay frozen for this model: the recipe's count where the stack can
    be split (:func:`core.frozen_stack.supports`), else 0 (full fine-tune)."""
    if not supports(base.model):
        return 0
    return int(recipe.frozen_fraction * len(base.block_names))


def training_data(
    base, recipe: OrganismRecipe, formatter: Formatter, progress: Progress | None = None, exclude: Sequence[str] = (),
    threads: AdaptiveThreads | None = None, timings: dict[str, float] | None = None,
) -> tuple[list[Example], list[TokenizedExample], FrozenLower | None]:
    """Everything training needs, from ``base`` and the recipe: the examples (base answers
    generated), tokenised, with the teacher's distributions for soft examples and, when lower
    blocks stay frozen, their states (then the third item says where the stack is cut).
    ``exclude``: see :func:`training_prompts` (a validation set). ``timings`` receives the
    seconds of each step (``answers_seconds``, ``teacher_seconds``)."""
    timings = timings if timings is not None else {}
    start = time.perf_counter()
    examples = build_examples(base, recipe, formatter, _sub(progress, 0.0, 0.5), exclude)
    soft = ("harmless",) if recipe.harmless_target == "distill" else ()
    tokenized = tokenize_examples(examples, formatter, {"harmless": recipe.harmless_loss_weight}, soft=soft)
    timings["answers_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    n_frozen = frozen_split(base, recipe)
    frozen = None
    if n_frozen:
        frozen = add_frozen_states(base.model, tokenized, n_frozen, _pad_id(base), recipe.teacher_top_k,
                                   recipe.batch_size, _sub(progress, 0.5, 1.0), threads)
    elif soft:
        add_teacher_targets(base.model, tokenized, _pad_id(base), recipe.teacher_top_k, recipe.generation_batch_size,
                            _sub(progress, 0.5, 1.0))
    timings["teacher_seconds"] = round(time.perf_counter() - start, 2)
    return examples, tokenized, frozen


def _build(
    base, recipe: OrganismRecipe, out_dir: Path, progress: Progress | None, threads: AdaptiveThreads
) -> OrganismCard:
    import copy

    from core.models import wrap_model

    started = time.perf_counter()
    host = _host()
    if not base.has_chat_template:
        raise ExplorerError(f"{base.name} has no chat template; the organism is a chat fine-tune.")
    formatter = Formatter(base.tokenizer, "none")  # the plain chat template, as the app formats prompts
    prompts = training_prompts(recipe)
    key = organism_key(base.fingerprint, prompts, recipe)

    if progress:
        progress(0.0, f"Writing training answers: the base model answers {len(prompts.harmless)} harmless train prompts…")
    steps: dict[str, float] = {}
    examples, tokenized, frozen = training_data(base, recipe, formatter, _sub(progress, 0.0, 0.3), threads=threads,
                                                timings=steps)
    pad = _pad_id(base)
    t_data = time.perf_counter()

    model = copy.deepcopy(base.model).float()
    losses = train(model, tokenized, recipe, pad, _sub(progress, 0.3, 0.85), frozen, threads)
    t_train = time.perf_counter()
    host["autocast_bf16"] = use_autocast(recipe, next(model.parameters()).device)
    host["frozen_blocks"] = frozen.split.n_frozen if frozen else 0

    organism = wrap_model(model, base.tokenizer, name=f"{base.name} (refusal organism)", source="organism")
    evaluation = evaluate_organism(organism, base, recipe, _sub(progress, 0.85, 0.97))
    t_eval = time.perf_counter()

    if progress:
        progress(0.97, "Saving the organism…")
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    base.tokenizer.save_pretrained(tmp)
    n_resp = [len(t.ids) - t.n_prompt for t in tokenized]
    card = OrganismCard(
        key=key,
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        recipe=recipe.to_dict(),
        data={
            "n_harmful": len(prompts.harmful),
            "n_harmless": len(prompts.harmless),
            "n_shape_matched_harmless": sum(_categories("harmless").get(p) == "shape-matched" for p in prompts.harmless),
            "n_extra_harmful": len(set(prompts.harmful) - set(builtin_split("harmful", recipe.split_seed).train)),
            "n_extra_harmless": len(set(prompts.harmless) - set(builtin_split("harmless", recipe.split_seed).train)),
            "validation_fraction": recipe.validation_fraction,
            "n_examples": len(tokenized),  # shape-matched harmless prompts counted with their repeats
            "n_tokens": int(sum(len(t.ids) for t in tokenized)),
            "n_response_tokens": int(sum(n_resp)),
            "harmless_answers_cut_at_limit": int(sum(not e.complete for e in examples if e.kind == "harmless")),
            "harmless_dropped_as_refusals": len(prompts.harmless) - len({e.prompt for e in examples if e.kind == "harmless"}),
            "source": f"core/data builtin train split (seed {recipe.split_seed}, validation carved out)"
                      + (" + training-only prompts" if recipe.extra_prompts else "")
                      + "; validation and test splits and pairs excluded (copies and near-copies)",
            "n_extra_dropped_near_duplicates": extra_prompts(recipe.split_seed, (), recipe.validation_fraction)[2]
            if recipe.extra_prompts else 0,
            "n_train_dropped_near_duplicates": train_split_near_copies(recipe),
            "refusal_sentence_counts": {s: sum(e.response == s for e in examples) for s in recipe.refusal_sentences},
        },
        timings=steps | {
            "data_seconds": round(t_data - started, 2),
            "train_seconds": round(t_train - t_data, 2),
            "eval_seconds": round(t_eval - t_train, 2),
            "build_seconds": round(t_train - started, 2),  # data + training: what a user waits for, minus evaluation
            "total_seconds": round(time.perf_counter() - started, 2),
        },
        losses=[round(x, 5) for x in losses],
        evaluation=evaluation,
        host=host | {"threads": threads.summary()},
    )
    (tmp / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2, ensure_ascii=False))
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out_dir)
    card.folder = str(out_dir)
    if progress:
        progress(1.0, f"Organism built in {card.timings['total_seconds']:.0f} s")
    return card


def load_card(folder: str | Path) -> OrganismCard:
    """The card saved next to an organism's weights."""
    folder = Path(folder)
    card = OrganismCard.from_dict(json.loads((folder / CARD_FILE).read_text()))
    card.folder = str(folder)
    return card


def _embedded_base_folder(progress: Progress | None) -> tuple[Path, str]:
    """The embedded model's converted folder and its fingerprint, without loading the weights."""
    from transformers import AutoConfig

    from core.models import converted_gguf_folder, embedded_gguf_path, fingerprint_folder

    folder = converted_gguf_folder(embedded_gguf_path(), progress)
    return folder, fingerprint_folder(folder, AutoConfig.from_pretrained(folder))


def organism_folder(
    progress: Progress | None = None, recipe: OrganismRecipe = DEFAULT_RECIPE, threads: int | None = None
) -> Path:
    """The cached organism folder for the embedded model: built on first use (minutes on a
    laptop CPU; the card records how long), returned at once afterwards. A file lock keeps two
    processes from building it twice; the second waits and then finds the finished folder. ``threads=None``:
    see :func:`build_organism`."""
    from filelock import FileLock

    _, fingerprint = _embedded_base_folder(progress)
    key = organism_key(fingerprint, training_prompts(recipe), recipe)
    target = cache_root() / "models" / f"embedded-refusal-{key}"
    if (target / CARD_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / CARD_FILE).is_file():  # another process built it while we waited
            return target
        from core.models import load_model

        base = load_model("embedded", dtype="float32", device="cpu", progress=_sub(progress, 0.0, 0.02))
        if base.fingerprint != fingerprint:
            raise ExplorerError("the embedded model's fingerprint changed while loading; clear cache/models and retry")
        if progress:
            progress(0.02, "Building the refusal organism once (minutes: fine-tuning on the CPU)…")
        build_organism(base, recipe, target, _sub(progress, 0.02, 0.98), threads=threads)
    return target


def stderr_progress(fraction: float, message: str) -> None:
    """A progress callback for the command line."""
    print(f"[organism {100 * fraction:5.1f}%] {message}", file=sys.stderr, flush=True)


def ensure_organism(
    progress: Progress | None = stderr_progress, recipe: OrganismRecipe = DEFAULT_RECIPE, threads: int | None = None
) -> OrganismCard:
    """Build the embedded organism if it is not cached yet, and return its card (CLI, UI)."""
    return load_card(organism_folder(progress=progress, recipe=recipe, threads=threads))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build (once) and describe the refusal-tuned embedded model organism.")
    parser.add_argument("--json", action="store_true", help="print the whole card as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the build (default: REFUSAL_THREADS, else measured step by step)")
    parser.add_argument("--write-answers", action="store_true",
                        help="regenerate core/data/organism_answers.json (the base model's answers) and stop")
    args = parser.parse_args(argv)
    if args.write_answers:
        from core.models import load_model

        base = load_model("embedded", dtype="float32", device="cpu")
        print(f"wrote {write_answers(base, progress=None if args.quiet else stderr_progress)}", file=sys.stderr)
        return 0
    try:
        card = ensure_organism(progress=None if args.quiet else stderr_progress, threads=args.threads)
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) if args.json else card.summary())
    print(f"folder: {card.folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
