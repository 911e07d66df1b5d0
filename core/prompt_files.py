"""Prompt tables (CSV / JSONL) in the field's standard layouts, read by their own columns.

People arrive with AdvBench, JailbreakBench, HarmBench, StrongREJECT or XSTest files; none of
them calls its prompt column ``prompt`` except XSTest. :func:`read_table` recognises each
layout by its column names and says which column it used (:attr:`PromptTable.note`); a table
it does not recognise gets an error listing the columns it found and how to choose one.

=================  ===================================  ===================================
layout             recognised by                        prompt column
=================  ===================================  ===================================
XSTest             ``prompt`` + ``type`` / ``label``    ``prompt`` (labels kept: safe/unsafe)
plain              ``prompt``                           ``prompt``
JailbreakBench     ``Goal`` + ``Behavior``              ``Goal`` (``Behavior`` is a short name)
AdvBench           ``goal``                             ``goal``
StrongREJECT       ``forbidden_prompt``                 ``forbidden_prompt``
HarmBench          ``Behavior``                         ``Behavior``
generic (CSV)      ``instruction``/``text``/``query``/  that column
                   ``question``/``request``
=================  ===================================  ===================================

Column names match exactly first, then ignoring case. To choose a column yourself, write the
source as ``file.csv#COLUMN`` (a batch config's ``prompts.harmful``, or :func:`split_column`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import PromptFileError

# (layout, prompt column, columns that must also be present); first match wins.
LAYOUTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("XSTest", "prompt", ("label",)),
    ("XSTest", "prompt", ("type",)),
    ("plain", "prompt", ()),
    ("JailbreakBench", "goal", ("behavior",)),
    ("AdvBench", "goal", ()),
    ("StrongREJECT", "forbidden_prompt", ()),
    ("HarmBench", "behavior", ()),
    ("generic", "instruction", ()),
    ("generic", "text", ()),
    ("generic", "query", ()),
    ("generic", "question", ()),
    ("generic", "request", ()),
)
SAFE_LABELS = ("safe", "benign", "harmless", "0", "false")
CHOOSE_HINT = ("choose the column by writing the source as 'FILE#COLUMN' (e.g. in a batch config: "
               "harmful: data.csv#my_column), or rename the prompt column to 'prompt'")


class PromptLayoutNote(UserWarning):
    """Which layout and column a prompt table was read with (informational)."""


@dataclass
class PromptTable:
    """Prompts read from a table, with the column used and the XSTest-style labels if any."""

    prompts: list[str]
    column: str
    layout: str
    labels: list[str | None] = field(default_factory=list)  # per prompt; empty if no label column
    types: list[str | None] = field(default_factory=list)

    @property
    def note(self) -> str:
        if self.layout == "chosen":
            return f"prompts from column '{self.column}' (as chosen)"
        return f"{self.layout} layout: prompts from column '{self.column}'"

    def safe(self) -> list[str]:
        """Prompts labelled safe (the over-refusal set of an XSTest-style file)."""
        if not self.labels:
            raise PromptFileError(f"{self.note}: the file has no 'label' column, so no prompt is marked safe")
        return [p for p, lab in zip(self.prompts, self.labels) if lab is not None and lab.strip().lower() in SAFE_LABELS]


def split_column(source: str) -> tuple[str, str | None]:
    """``'data.csv#Goal'`` → ``('data.csv', 'Goal')``; a path that exists as written, or has
    no ``#``, is returned unchanged with no column."""
    if "#" not in source or Path(source).expanduser().exists():
        return source, None
    path, _, column = source.rpartition("#")
    return path, (column.strip() or None)


def _find(columns: list[str], wanted: str) -> str | None:
    if wanted in columns:
        return wanted
    folded = [c for c in columns if c.strip().casefold() == wanted.casefold()]
    return folded[0] if folded else None


def choose_column(columns: list[str], filename: str, column: str | None = None, *, generic: bool = True) -> tuple[str, str]:
    """(layout, column) for a table with these column names (see the module docstring).
    ``generic=False`` skips the generic names (JSONL files have always needed a named field)."""
    if column is not None:
        found = _find(columns, column)
        if found is None:
            raise PromptFileError(f"{filename}: no column {column!r}; columns found: {_list(columns)}")
        return "chosen", found
    for layout, col, also in LAYOUTS:
        if layout == "generic" and not generic:
            continue
        found = _find(columns, col)
        if found is not None and all(_find(columns, a) is not None for a in also):
            return layout, found
    raise PromptFileError(f"{filename}: no usable column: no known prompt column (columns found: {_list(columns)}). "
                          f"Known layouts: AdvBench 'goal', JailbreakBench 'Goal', HarmBench 'Behavior', "
                          f"StrongREJECT 'forbidden_prompt', XSTest 'prompt'; {CHOOSE_HINT}.")


def _list(columns: list[str]) -> str:
    shown = ", ".join(repr(c) for c in columns[:20])
    return (shown + (f" and {len(columns) - 20} more" if len(columns) > 20 else "")) or "none"


def _cell(value: object, filename: str, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PromptFileError(f"{filename}, {where}: column {column!r} holds {type(value).__name__}, expected text")
    return value.strip()


def _table(rows: list[dict], columns: list[str], filename: str, column: str | None, where, generic: bool = True) -> PromptTable:
    layout, col = choose_column(columns, filename if generic else f"{filename}, {where(0)}", column, generic=generic)
    label_col, type_col = _find(columns, "label"), _find(columns, "type")
    prompts, labels, types = [], [], []
    for i, row in enumerate(rows):
        prompts.append(_cell(row.get(col), filename, where(i), col))
        if label_col is not None:
            lab = row.get(label_col)
            labels.append(None if lab is None else str(lab))
        if type_col is not None:
            typ = row.get(type_col)
            types.append(None if typ is None else str(typ))
    return PromptTable(prompts, col, layout, labels, types)


def read_csv(text: str, filename: str, column: str | None = None) -> PromptTable:
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in r)]
    except csv.Error as exc:
        raise PromptFileError(f"{filename}: not a readable CSV file ({exc}); save it as comma-separated UTF-8") from None
    if not rows:
        return PromptTable([], column or "prompt", "plain")
    header = [c.strip() for c in rows[0]]
    records = [dict(zip(header, r)) for r in rows[1:]]
    return _table(records, header, filename, column, lambda i: f"row {i + 2}")


def read_jsonl(text: str, filename: str, column: str | None = None) -> PromptTable:
    records: list[dict] = []
    linenos: list[int] = []
    columns: list[str] = []
    strings = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = getattr(exc, "msg", "nested too deeply")
            raise PromptFileError(f"{filename}, line {lineno}: malformed JSON ({msg}).") from None
        if isinstance(obj, str):
            obj, strings = {"prompt": obj}, strings + 1
        if not isinstance(obj, dict):
            raise PromptFileError(f"{filename}, line {lineno}: expected a JSON object (or a string), got {type(obj).__name__}.")
        for key in obj:
            if key not in columns:
                columns.append(str(key))
        records.append(obj)
        linenos.append(lineno)
    if not records:
        return PromptTable([], column or "prompt", "plain")
    table = _table(records, columns, filename, column, lambda i: f"line {linenos[i]}", generic=False)
    for i, row in enumerate(records):
        if table.column not in row:
            raise PromptFileError(f"{filename}, line {linenos[i]}: no field {table.column!r} (the column the other lines use).")
    return table


def read_table(text: str, filename: str, column: str | None = None) -> PromptTable:
    """A CSV or JSONL table's prompts by the file's suffix (see the module docstring)."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".csv":
        return read_csv(text, filename, column)
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(text, filename, column)
    raise PromptFileError(f"{filename}: unsupported file type {suffix or '(none)'} for a table; use .csv or .jsonl.")


def read_text_file(path: Path, max_bytes: int, what: str = "prompt file", label: str | None = None) -> str:
    """A UTF-8 text file of at most ``max_bytes``, or a :class:`PromptFileError` naming it: the
    one guarded read behind every prompt and pair file."""
    label = label or str(path)
    if not path.is_file():
        raise PromptFileError(f"{what} not found: {path}")
    if path.stat().st_size > max_bytes:
        raise PromptFileError(f"{label}: over the {max_bytes / 1e6:.0f} MB limit for a {what}.")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{label}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8 and try again.") from None


def load_table(source: str | Path, *, max_bytes: int = 10 * 1024 * 1024) -> PromptTable:
    """:func:`read_table` on a file; ``source`` may carry ``#COLUMN``."""
    path_text, column = split_column(str(source))
    path = Path(path_text).expanduser()
    return read_table(read_text_file(path, max_bytes), str(path), column)
