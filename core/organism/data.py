"""The organism's training prompts and the checks that keep held-out prompts out of them.

Why in code, not only promised: the held-out validation and test splits and the matched
patching pairs must never be trained on, copies *and* near-copies (:func:`near_duplicate`), or a
held-out figure would report trained behaviour. :func:`check_no_leak` guards every build and
:func:`check_evaluation_prompts` every evaluation.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.cache import stable_hash
from core.errors import ExplorerError
from core.organism.recipe import DEFAULT_RECIPE, OrganismRecipe
from core.prompts import BUILTIN, DEFAULT_VALIDATION_FRACTION, ThreeWaySplit, builtin_split, load_pairs, three_way

EXTRA_DATA = Path(__file__).resolve().parent.parent / "data" / "organism_extra.jsonl"


class DataLeakError(ExplorerError):
    """Training data would include held-out test prompts or the matched patching pairs."""


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


def held_out_prompts(split_seed: int = 0, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> list[str]:
    """Both validation and test splits and every matched-pair prompt: what the organism must never see."""
    splits = organism_splits(split_seed, validation_fraction)
    out = [p for s in splits.values() for p in s.validation + s.test]
    return out + [p for pair in load_pairs() for p in pair]


@functools.lru_cache(maxsize=4)
def _held_out_words(split_seed: int, validation_fraction: float) -> tuple[frozenset[str], ...]:
    return tuple(content_words(p) for p in held_out_prompts(split_seed, validation_fraction))


def forbidden_prompts(split_seed: int = 0, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> set[str]:
    """Normalised prompts the organism must never train on: validation and test splits, all pairs."""
    return {_norm(p) for p in held_out_prompts(split_seed, validation_fraction)}


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
    words = [content_words(p) for p in trained.harmful + trained.harmless]
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


def content_words(prompt: str) -> frozenset[str]:
    words = "".join(c if c.isalnum() else " " for c in prompt.casefold()).split()
    return frozenset(w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words if w not in _STOP)


def near_duplicate(prompt: str, others: Sequence[frozenset[str]]) -> bool:
    """True when ``prompt`` shares at least two content words, and at least half of the shorter
    prompt's content words, with one of ``others`` (content-word sets, :func:`content_words`).

    Why: a paraphrase of a held-out prompt ("How many of my sleeping pills would it take to not
    wake up?") leaks it as surely as a copy. The rule is deliberately eager: it also drops some
    unrelated prompts that share a topic word pair ("kill time"), which costs training data but
    never inflates a held-out figure."""
    w = content_words(prompt)
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
    held_out = list(_held_out_words(split_seed, validation_fraction)) + [content_words(p) for p in exclude]
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
    held = list(_held_out_words(recipe.split_seed, recipe.validation_fraction)) + [content_words(p) for p in exclude]
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



def prompt_categories(name: str) -> dict[str, str]:
    """prompt -> category for the built-in set ``name`` and the extra prompts of that label."""
    rows = [json.loads(line) for line in BUILTIN[name].read_text().splitlines() if line.strip()]
    if EXTRA_DATA.is_file():
        extra = [json.loads(line) for line in EXTRA_DATA.read_text().splitlines() if line.strip()]
        rows = [r for r in extra if r.get("label") == name] + rows
    return {r["prompt"]: r.get("category", "") for r in rows}

