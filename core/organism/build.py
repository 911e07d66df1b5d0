"""Build, save and find the organism: a fine-tuned copy of a base model, written atomically
with its card, cached under ``cache_root()/models/`` by a key that hashes the base model's
fingerprint, the training prompts and the recipe; a file lock keeps two processes from building
the same organism twice."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from filelock import FileLock

from core.architecture import wrap_model
from core.atomic import temp_sibling
from core.cache import cache_root, stable_hash
from core.errors import ExplorerError
from core.fingerprints import fingerprint_folder
from core.formatting import Formatter
from core.loader import load_folder
from core.packed_linear import exact_linear
from core.organism.answers import Example, build_examples
from core.organism.data import TrainingPrompts, extra_prompts, prompt_categories, train_split_near_copies, training_prompts
from core.organism.evaluation import evaluate_organism
from core.organism.recipe import CARD_FILE, DEFAULT_RECIPE, ORGANISM_VERSION, OrganismCard, OrganismRecipe
from core.organism.training import (
    FrozenLower,
    TokenizedExample,
    add_frozen_states,
    add_teacher_targets,
    frozen_split,
    tokenize_examples,
    train,
    use_autocast,
)
from core.packaged_models import EMBEDDED, EMBEDDED_NAME, embedded_folder
from core.progress import Progress
from core.prompts import builtin_split
from core.threads import AdaptiveThreads, torch_threads


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


def trained_weights(
    base, recipe: OrganismRecipe, formatter: Formatter, progress: Progress | None = None,
    threads: AdaptiveThreads | None = None, timings: dict[str, float] | None = None, exclude: Sequence[str] = (),
) -> tuple[list[Example], list[TokenizedExample], torch.nn.Module, list[float], FrozenLower | None]:
    """The organism's weights from ``base`` and the recipe: :func:`training_data`, then a float32
    copy of the base trained on it. Returns the examples, their tokenised form, the trained
    model, the losses and the frozen split. Runs on the library's own linear kernels
    (:func:`~core.packed_linear.exact_linear`): the cached organism is keyed by its recipe, so
    its weights must come out exactly as the recipe has always made them."""
    timings = timings if timings is not None else {}
    with exact_linear():
        examples, tokenized, frozen = training_data(base, recipe, formatter, _sub(progress, 0.0, 0.3), exclude,
                                                    threads, timings)
        start = time.perf_counter()
        model = copy.deepcopy(base.model).float()
        losses = train(model, tokenized, recipe, _pad_id(base), _sub(progress, 0.3, 0.85), frozen, threads)
        timings["train_seconds"] = round(time.perf_counter() - start, 2)
    return examples, tokenized, model, losses, frozen


def _build(
    base, recipe: OrganismRecipe, out_dir: Path, progress: Progress | None, threads: AdaptiveThreads
) -> OrganismCard:
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
    examples, tokenized, model, losses, frozen = trained_weights(base, recipe, formatter, progress, threads, steps)
    t_train = time.perf_counter()
    t_data = t_train - steps["train_seconds"]
    host["autocast_bf16"] = use_autocast(recipe, next(model.parameters()).device)
    host["frozen_blocks"] = frozen.split.n_frozen if frozen else 0

    organism = wrap_model(model, base.tokenizer, name=f"{base.name} (refusal organism)", source="organism")
    evaluation = evaluate_organism(organism, base, recipe, _sub(progress, 0.85, 0.97))
    t_eval = time.perf_counter()

    if progress:
        progress(0.97, "Saving the organism…")
    tmp = temp_sibling(out_dir)
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
            "n_shape_matched_harmless": sum(prompt_categories("harmless").get(p) == "shape-matched" for p in prompts.harmless),
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
    from transformers import AutoConfig  # heavy: only when an organism is asked for

    folder = embedded_folder(progress)
    return folder, fingerprint_folder(folder, AutoConfig.from_pretrained(folder))


def load_embedded_base(progress: Progress | None = None):
    """The embedded model in float32 on the CPU, as ``load_model("embedded", dtype="float32",
    device="cpu")`` returns it: the base every embedded organism is built from."""
    return load_folder(embedded_folder(progress), source=EMBEDDED, display=EMBEDDED_NAME, dtype=torch.float32,
                       device=torch.device("cpu"), progress=progress)


def _embedded_organism_target(progress: Progress | None, recipe: OrganismRecipe) -> tuple[Path, str]:
    """Where the embedded organism of ``recipe`` is cached, and the base fingerprint in its key."""
    _, fingerprint = _embedded_base_folder(progress)
    key = organism_key(fingerprint, training_prompts(recipe), recipe)
    return cache_root() / "models" / f"embedded-refusal-{key}", fingerprint


def built_organism_folder(recipe: OrganismRecipe = DEFAULT_RECIPE) -> Path | None:
    """The embedded organism's cached folder if it is built, else None; never builds (the app
    asks this to choose the model it starts on)."""
    target, _ = _embedded_organism_target(None, recipe)
    return target if (target / CARD_FILE).is_file() else None


def organism_folder(
    progress: Progress | None = None, recipe: OrganismRecipe = DEFAULT_RECIPE, threads: int | None = None
) -> Path:
    """The cached organism folder for the embedded model: built on first use (minutes on a
    laptop CPU; the card records how long), returned at once afterwards. A file lock keeps two
    processes from building it twice; the second waits and then finds the finished folder. ``threads=None``:
    see :func:`build_organism`."""
    target, fingerprint = _embedded_organism_target(progress, recipe)
    if (target / CARD_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / CARD_FILE).is_file():  # another process built it while we waited
            return target
        base = load_embedded_base(progress=_sub(progress, 0.0, 0.02))
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

