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

The package, one idea a module: :mod:`~core.organism.recipe` (recipe and card),
:mod:`~core.organism.data` (training prompts, splits, leak checks),
:mod:`~core.organism.answers` (refusal targets and the base model's answers, shipped and
cached), :mod:`~core.organism.training` (tokenised examples, teacher targets, loss, loop),
:mod:`~core.organism.evaluation` (held-out figures for the card), :mod:`~core.organism.build`
(build, save, lock, cached folder) and :mod:`~core.organism.cli` (the command line). The names
below are re-exported so ``from core.organism import …`` keeps working.
"""

from __future__ import annotations

from core.organism.answers import (
    ANSWERS_DATA,
    Example,
    answer_prompts,
    build_examples,
    cached_generate,
    refusal_targets,
    self_distilled_answers,
    shipped_answers,
    write_answers,
)
from core.organism.build import (
    build_organism,
    built_organism_folder,
    ensure_organism,
    load_card,
    load_embedded_base,
    organism_folder,
    organism_key,
    stderr_progress,
    trained_weights,
    training_data,
)
from core.organism.cli import main
from core.organism.data import (
    EXTRA_DATA,
    DataLeakError,
    TrainingPrompts,
    check_evaluation_prompts,
    check_no_leak,
    content_words,
    extra_prompts,
    forbidden_prompts,
    held_out_prompts,
    near_duplicate,
    organism_splits,
    prompt_categories,
    train_split_near_copies,
    training_prompts,
)
from core.organism.evaluation import evaluate_organism, kl_over_answers, shared_lower_blocks
from core.organism.recipe import (
    CARD_FILE,
    DEFAULT_RECIPE,
    ORGANISM_VERSION,
    REFUSAL_SENTENCES,
    OrganismCard,
    OrganismRecipe,
)
from core.organism.training import (
    MIN_TRAIN_PREFIX,
    FrozenLower,
    TokenizedExample,
    add_frozen_states,
    add_teacher_targets,
    batch_order,
    collate,
    common_prefix_len,
    frozen_logits,
    frozen_split,
    response_loss,
    shared_prefix_logits,
    tokenize_examples,
    topk_kl,
    train,
    use_autocast,
)

__all__ = [
    "ANSWERS_DATA",
    "CARD_FILE",
    "DEFAULT_RECIPE",
    "DataLeakError",
    "EXTRA_DATA",
    "Example",
    "FrozenLower",
    "MIN_TRAIN_PREFIX",
    "ORGANISM_VERSION",
    "OrganismCard",
    "OrganismRecipe",
    "REFUSAL_SENTENCES",
    "TokenizedExample",
    "TrainingPrompts",
    "add_frozen_states",
    "add_teacher_targets",
    "answer_prompts",
    "batch_order",
    "build_examples",
    "build_organism",
    "built_organism_folder",
    "cached_generate",
    "check_evaluation_prompts",
    "check_no_leak",
    "collate",
    "common_prefix_len",
    "content_words",
    "ensure_organism",
    "evaluate_organism",
    "extra_prompts",
    "forbidden_prompts",
    "frozen_logits",
    "frozen_split",
    "held_out_prompts",
    "kl_over_answers",
    "load_card",
    "load_embedded_base",
    "main",
    "near_duplicate",
    "organism_folder",
    "organism_key",
    "organism_splits",
    "prompt_categories",
    "refusal_targets",
    "response_loss",
    "self_distilled_answers",
    "shared_lower_blocks",
    "shared_prefix_logits",
    "shipped_answers",
    "stderr_progress",
    "tokenize_examples",
    "topk_kl",
    "train",
    "train_split_near_copies",
    "trained_weights",
    "training_data",
    "training_prompts",
    "use_autocast",
    "write_answers",
]
