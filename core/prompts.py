"""Prompt sets: built-in data, user files, deterministic splits, matched pairs.

Sources are ``"builtin:harmful"``, ``"builtin:harmless"`` (and ``"builtin:pairs"`` for
:func:`load_pairs`) or a path to ``.txt`` (one prompt per line), ``.csv`` (column ``prompt``,
else the first column) or ``.jsonl`` (``{"prompt": ...}`` per line). Uploads go through
:func:`parse_prompt_bytes`. Every unusable input raises :class:`PromptFileError` naming the
file (and line); duplicates are dropped with a :class:`DuplicatePromptsWarning`.

The built-in sets have one canonical train/test split per seed (:func:`builtin_split`), so the
model organism, the batch runner and the app agree on which prompts are held out.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import PromptFileError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = {
    "harmful": DATA_DIR / "harmful.jsonl",
    "harmless": DATA_DIR / "harmless.jsonl",
}
BUILTIN_PAIRS = DATA_DIR / "pairs.jsonl"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # 10 MB: a prompt set, not a corpus
BUILTIN_TEST_FRACTION = 0.3


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


def parse_prompt_bytes(data: bytes, filename: str, *, max_bytes: int = MAX_UPLOAD_BYTES) -> list[str]:
    """Prompts from the bytes of a ``.txt``, ``.csv`` or ``.jsonl`` file (an upload)."""
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
    elif suffix == ".csv":
        prompts = _parse_csv(text, filename)
    elif suffix in (".jsonl", ".ndjson"):
        prompts = _parse_jsonl(text, filename)
    else:
        raise PromptFileError(f"{filename}: unsupported file type {suffix or '(none)'}; use .txt, .csv or .jsonl.")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptFileError(f"{filename}: no prompts found (the file is empty or has only blank lines).")
    return _dedupe(prompts, filename)


def _parse_csv(text: str, filename: str) -> list[str]:
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if "prompt" in header:
        col = header.index("prompt")
    elif len(header) >= 1 and header[0] in ("instruction", "text", "goal", "query", "question"):
        col = 0
    else:
        raise PromptFileError(
            f"{filename}: no usable column — name the prompt column 'prompt' (found: {', '.join(header) or 'nothing'})."
        )
    return [r[col].strip() if col < len(r) else "" for r in rows[1:]]


def _parse_jsonl(text: str, filename: str) -> list[str]:
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{filename}, line {lineno}: malformed JSON ({exc.msg}).") from None
        if isinstance(obj, str):
            prompts.append(obj.strip())
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"].strip())
        else:
            raise PromptFileError(f"{filename}, line {lineno}: expected an object with a string field 'prompt'.")
    return prompts


def load_prompt_set(source: str | Path) -> list[str]:
    """Prompts from ``builtin:NAME`` or a file path (see the module docstring)."""
    src = str(source)
    if src.startswith("builtin:"):
        name = src.split(":", 1)[1]
        if name not in BUILTIN:
            raise PromptFileError(f"unknown built-in set {src!r}; choose builtin:harmful or builtin:harmless")
        return [json.loads(line)["prompt"] for line in BUILTIN[name].read_text().splitlines() if line.strip()]
    path = Path(src).expanduser()
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    return parse_prompt_bytes(path.read_bytes(), str(path))


def load_pairs(source: str | Path = "builtin:pairs") -> list[tuple[str, str]]:
    """Matched (harmful, harmless) pairs; a file has ``{"harmful": ..., "harmless": ...}`` lines."""
    path = BUILTIN_PAIRS if str(source) == "builtin:pairs" else Path(source).expanduser()
    if not path.is_file():
        raise PromptFileError(f"pair file not found: {path}")
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            pairs.append((str(obj["harmful"]).strip(), str(obj["harmless"]).strip()))
        except (json.JSONDecodeError, KeyError, TypeError):
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
