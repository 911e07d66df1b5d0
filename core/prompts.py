"""Prompt sets: built-in data, user files, deterministic splits, matched pairs.

Sources are ``"builtin:harmful"``, ``"builtin:harmless"`` (and ``"builtin:pairs"`` for
:func:`load_pairs`) or a path to ``.txt`` (one prompt per line), ``.csv`` or ``.jsonl`` (a table in a standard
layout — plain ``prompt``, AdvBench, JailbreakBench, HarmBench, StrongREJECT, XSTest — read by
:mod:`core.prompt_files`; ``file.csv#COLUMN`` chooses the column). Uploads go through
:func:`parse_prompt_bytes`. Every unusable input raises :class:`PromptFileError` naming the
file (and line); duplicates are dropped with a :class:`DuplicatePromptsWarning`.

The built-in sets have one canonical train/test split per seed (:func:`builtin_split`), so the
model organism, the batch runner and the app agree on which prompts are held out.

Three splits (:func:`three_way`): *train* fits directions, *validation* chooses everything that
is chosen (position, layer, coefficients), *test* only produces reported figures. Validation is
carved out of train (:func:`carve_validation`), never out of test, so the built-in test split is
the same prompts with or without it; a user's test file stays test.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import PromptFileError, SplitError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = {
    "harmful": DATA_DIR / "harmful.jsonl",
    "harmless": DATA_DIR / "harmless.jsonl",
}
BUILTIN_PAIRS = DATA_DIR / "pairs.jsonl"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # 10 MB: a prompt set, not a corpus
BUILTIN_TEST_FRACTION = 0.3
DEFAULT_VALIDATION_FRACTION = 0.25  # of the train pool
# Fewer than this many validation prompts per class cannot support a choice: a mean refusal
# score over one prompt is that prompt's quirk, not the direction's effect.
MIN_VALIDATION = 2


class DuplicatePromptsWarning(UserWarning):
    """Some prompts appeared more than once and were dropped."""


def _dedupe(prompts: list[str], label: str) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for p in prompts:
        key = " ".join(p.split()).casefold()
        if key not in seen:
            seen.add(key)
            out.append(p)
    dropped = len(prompts) - len(out)
    if dropped:
        warnings.warn(f"{label}: dropped {dropped} duplicate prompt(s); {len(out)} remain.", DuplicatePromptsWarning, stacklevel=3)
    return out


def parse_prompt_bytes(data: bytes, filename: str, *, max_bytes: int = MAX_UPLOAD_BYTES, column: str | None = None) -> list[str]:
    """Prompts from the bytes of a ``.txt``, ``.csv`` or ``.jsonl`` file (an upload). Tables are
    read by their layout (AdvBench, JailbreakBench, HarmBench, StrongREJECT, XSTest; see
    :mod:`core.prompt_files`) or by ``column``; a layout other than plain ``prompt`` is named in
    a :class:`core.prompt_files.PromptLayoutNote` warning."""
    if len(data) > max_bytes:
        raise PromptFileError(
            f"{filename}: {len(data) / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit for a prompt file."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"{filename}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8 and try again."
        ) from None
    suffix = Path(filename).suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif suffix in (".csv", ".jsonl", ".ndjson"):
        from core.prompt_files import PromptLayoutNote, read_table

        table = read_table(text, filename, column)
        if table.layout != "plain":
            warnings.warn(f"{filename}: {table.note}", PromptLayoutNote, stacklevel=2)
        prompts = table.prompts
    else:
        raise PromptFileError(f"{filename}: unsupported file type {suffix or '(none)'}; use .txt, .csv or .jsonl.")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptFileError(f"{filename}: no prompts found (the file is empty or has only blank lines).")
    return _dedupe(prompts, filename)


def load_prompt_set(source: str | Path) -> list[str]:
    """Prompts from ``builtin:NAME`` or a file path (see the module docstring)."""
    src = str(source)
    if src.startswith("builtin:"):
        name = src.split(":", 1)[1]
        if name not in BUILTIN:
            raise PromptFileError(f"unknown built-in set {src!r}; choose builtin:harmful or builtin:harmless")
        return [json.loads(line)["prompt"] for line in BUILTIN[name].read_text().splitlines() if line.strip()]
    from core.prompt_files import split_column

    path_text, column = split_column(src)  # "data.csv#Goal" chooses a table's column
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise PromptFileError(f"{path}: {path.stat().st_size / 1e6:.1f} MB is over the {MAX_UPLOAD_BYTES / 1e6:.0f} MB limit for a prompt file.")
    return parse_prompt_bytes(path.read_bytes(), str(path), column=column)


def load_pairs(source: str | Path = "builtin:pairs") -> list[tuple[str, str]]:
    """Matched (harmful, harmless) pairs; a file has ``{"harmful": ..., "harmless": ...}`` lines."""
    from core.prompt_files import read_text_file

    path = BUILTIN_PAIRS if str(source) == "builtin:pairs" else Path(source).expanduser()
    text = read_text_file(path, MAX_UPLOAD_BYTES, "pair file", label=path.name)
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            pairs.append((str(obj["harmful"]).strip(), str(obj["harmless"]).strip()))
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            raise PromptFileError(
                f"{path.name}, line {lineno}: expected JSON with 'harmful' and 'harmless' fields."
            ) from None
    if not pairs:
        raise PromptFileError(f"{path.name}: no pairs found.")
    return pairs


@dataclass(frozen=True)
class Split:
    train: list[str]
    test: list[str]


def split_prompts(prompts: Sequence[str], test_fraction: float = BUILTIN_TEST_FRACTION, seed: int = 0) -> Split:
    """A deterministic shuffle-and-cut: the same prompts and seed always give the same split."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_test = max(1, int(round(len(prompts) * test_fraction)))
    items = [prompts[i] for i in order]
    return Split(train=items[n_test:], test=items[:n_test])


def builtin_split(name: str, seed: int = 0) -> Split:
    """The canonical split of a built-in set. The organism trains on ``train`` only."""
    return split_prompts(load_prompt_set(f"builtin:{name}"), BUILTIN_TEST_FRACTION, seed)


def take(prompts: Sequence[str], n: int | None) -> list[str]:
    """The first ``n`` prompts (all if ``n`` is None), with a clear error if there are fewer."""
    if n is None:
        return list(prompts)
    if n > len(prompts):
        raise ValueError(f"asked for {n} prompts but only {len(prompts)} are available")
    return list(prompts[:n])


# ---------------------------------------------------------------------------------------
# three splits: train / validation / test
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreeWaySplit:
    """Train (fit), validation (choose) and test (report only) prompts of one class."""

    train: list[str]
    validation: list[str]
    test: list[str]


def prompt_key(prompt: str) -> str:
    """What counts as "the same prompt": case and whitespace do not matter."""
    return " ".join(prompt.split()).casefold()


def carve_validation(
    train: Sequence[str], fraction: float = DEFAULT_VALIDATION_FRACTION, seed: int = 0, *,
    setting: str = "validation_fraction", label: str = "train",
) -> tuple[list[str], list[str]]:
    """(train, validation): a seeded ``ceil(n × fraction)`` of ``train`` becomes validation.

    Both keep the input order, so "the first n train prompts" stays stable. Raises
    :class:`SplitError` naming ``setting`` when the result leaves fewer than
    :data:`MIN_VALIDATION` validation or two train prompts."""
    items = list(train)
    if not 0 < fraction < 1:
        raise SplitError(f"{setting}: must be between 0 and 1 (a fraction of the {label} prompts), got {fraction!r}")
    k = int(np.ceil(len(items) * fraction - 1e-9))
    if k < MIN_VALIDATION or len(items) - k < 2:
        raise SplitError(
            f"{setting}: {fraction:g} of {len(items)} {label} prompts leaves {k} for validation and {len(items) - k} "
            f"for train; validation needs at least {MIN_VALIDATION} and train at least 2 per class. "
            f"Add prompts or change {setting}."
        )
    # a seed offset keeps this draw independent of the train/test shuffle made with ``seed``
    chosen = set(np.random.default_rng(seed + 7919).permutation(len(items))[:k].tolist())
    return ([p for i, p in enumerate(items) if i not in chosen], [p for i, p in enumerate(items) if i in chosen])


def three_way(split: Split, fraction: float = DEFAULT_VALIDATION_FRACTION, seed: int = 0, *,
              setting: str = "validation_fraction", label: str = "train") -> ThreeWaySplit:
    """A train/test :class:`Split` with validation carved out of its train part (test untouched)."""
    train, validation = carve_validation(split.train, fraction, seed, setting=setting, label=label)
    return ThreeWaySplit(train, validation, list(split.test))


def builtin_three_way(name: str, fraction: float = DEFAULT_VALIDATION_FRACTION, seed: int = 0) -> ThreeWaySplit:
    """The canonical built-in split with validation taken from train: ``test`` is exactly
    ``builtin_split(name, seed).test``."""
    return three_way(builtin_split(name, seed), fraction, seed, label=f"built-in {name} train")


def check_disjoint(test: dict[str, Sequence[str]], others: dict[str, Sequence[str]], *, limit: int = 5) -> None:
    """Refuse test prompts that also appear in train or validation, naming them.

    ``test`` and ``others`` map a label (e.g. a file name) to its prompts."""
    seen: dict[str, str] = {}
    for label, prompts in others.items():
        for p in prompts:
            seen.setdefault(prompt_key(p), label)
    clashes = [(p, t_label, seen[prompt_key(p)]) for t_label, prompts in test.items() for p in prompts if prompt_key(p) in seen]
    if clashes:
        shown = "; ".join(f"{p!r} (in {t} and {o})" for p, t, o in clashes[:limit])
        more = f"; and {len(clashes) - limit} more" if len(clashes) > limit else ""
        raise SplitError(
            f"{len(clashes)} test prompt(s) also appear in train or validation: {shown}{more}. "
            "Held-out numbers need disjoint sets: remove them from one of the files."
        )
