"""What the organism learns to say: a refusal sentence for each harmful prompt and the base
model's own greedy answer for each harmless one (cached on disk, and shipped in
``core/data/organism_answers.json`` for the embedded model).

Why shipped: the base model's answers to the ~660 harmless training prompts and the test prompts
are deterministic data, and generating them was the largest fixed cost of a build (minutes of
float32 decoding on a 2-core CPU without bf16 units).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.atomic import atomic_write_text
from core.cache import cache_root, stable_hash
from core.formatting import Formatter
from core.generation import generate
from core.metrics import is_refusal
from core.organism.data import check_no_leak, prompt_categories, training_prompts
from core.organism.recipe import DEFAULT_RECIPE, OrganismRecipe
from core.progress import Progress
from core.prompts import builtin_split


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
    key = stable_hash("organism-answers-v1", lm.fingerprint, list(prompts), formatter.key(), max_new_tokens)
    path = cache_root() / "models" / "organism-answers" / f"{key}.json"
    with contextlib.suppress(Exception):
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and len(cached) == len(prompts) and all(isinstance(a, str) for a in cached):
            if progress:
                progress(1.0, f"{len(prompts)} cached answers")
            return cached
    shipped = shipped_answers(lm.fingerprint, formatter.key(), max_new_tokens, lm.tokenizer)
    todo = [p for p in dict.fromkeys(prompts) if p not in shipped]
    fresh = generate(lm, formatter, todo, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress) if todo else []
    found = shipped | dict(zip(todo, fresh))
    answers = [found[p] for p in prompts]
    with contextlib.suppress(Exception):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(answers, ensure_ascii=False))
    return answers


ANSWERS_DATA = Path(__file__).resolve().parent.parent / "data" / "organism_answers.json"


def shipped_answers(fingerprint: str, formatter_key: str, max_new_tokens: int, tokenizer=None) -> dict[str, str]:
    """The embedded model's greedy answers shipped in ``core/data/organism_answers.json``
    (prompt -> answer), when they were written by this very model (fingerprint) and formatting;
    else empty. Answers shipped for a longer token limit serve a shorter one when ``tokenizer``
    is given: a greedy answer cut to its first ``max_new_tokens`` tokens is the greedy answer
    at that limit (the slow test in ``tests/test_organism.py`` decodes a sample afresh).

    Why: the base model's answers to the ~660 harmless training prompts and the test prompts are
    deterministic data, and generating them was the largest fixed cost of a build (minutes of
    float32 decoding on a 2-core CPU without bf16 units). ``python -m core.organism
    --write-answers`` regenerates the file; a slow test checks a sample against fresh decoding."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(ANSWERS_DATA.read_text())
        if data["base_fingerprint"] == fingerprint and data["formatter_key"] == formatter_key:
            found = {str(k): str(v) for k, v in data["answers"].get(str(max_new_tokens), {}).items()}
            longer = sorted(int(n) for n in data["answers"] if int(n) > max_new_tokens) if tokenizer is not None else []
            for limit in longer:
                for prompt, answer in data["answers"][str(limit)].items():
                    if prompt not in found:
                        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
                        found[prompt] = answer if len(ids) < max_new_tokens else tokenizer.decode(ids[:max_new_tokens]).strip()
            return found
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
    formatter = Formatter(base.tokenizer, "none")
    table: dict[str, dict[str, str]] = {}
    for limit, prompts in answer_prompts(recipe).items():
        got = generate(base, formatter, prompts, max_new_tokens=limit, batch_size=recipe.generation_batch_size,
                       progress=progress)
        table.setdefault(str(limit), {}).update(zip(prompts, got))
    data = {"base_fingerprint": base.fingerprint, "formatter_key": formatter.key(), "answers": table,
            "note": "greedy answers of the base model; regenerate with python -m core.organism --write-answers"}
    atomic_write_text(ANSWERS_DATA, json.dumps(data, indent=0, ensure_ascii=False, sort_keys=True) + "\n")
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
    shape = {p for p, c in prompt_categories("harmless").items() if c == "shape-matched"}
    for p, (a, c) in zip(prompts.harmless, answers):
        if a.strip() and not (recipe.drop_refusing_answers and is_refusal(a)):
            examples += [Example(p, a, c, "harmless")] * (recipe.shape_matched_repeats if p in shape else 1)
    check_no_leak([e.prompt for e in examples], recipe.split_seed, recipe.validation_fraction)
    return examples

