"""The report as data: a flat list of typed blocks that both renderers walk.

Why: the Markdown and the HTML report must say the same things in the same order. The content
is built once (:mod:`core.report.content`) as these blocks; :mod:`core.report.markdown` and
:mod:`core.report.html` only decide how each block looks, and escape every piece of text that
is not the report's own prose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union


@dataclass(frozen=True)
class Span:
    """A piece of inline text. ``style``: ``plain`` (escaped as given), ``strong``, ``code``,
    ``prose`` (the report's own sentences, whose ``**bold**`` and ``*italic*`` are kept; never
    user or model text) or ``break`` (a line break; ``text`` is ignored)."""

    text: str
    style: str = "plain"


Inline = Sequence[Span]


def plain(text: object) -> Span:
    return Span(str(text))


def strong(text: object) -> Span:
    return Span(str(text), "strong")


def code(text: object) -> Span:
    return Span(str(text), "code")


def prose(text: str) -> Span:
    return Span(text, "prose")


BREAK = Span("", "break")


@dataclass(frozen=True)
class Heading:
    level: int  # 1 = the title, 2 = a section, 3 = a subsection
    text: str
    anchor: str | None = None
    only: str | None = None  # "markdown" or "html": a block that one format leaves out


@dataclass(frozen=True)
class Paragraph:
    spans: Inline
    style: str = ""  # "" | "note" (a caption) | "callout" (e.g. a partial run)
    only: str | None = None


@dataclass(frozen=True)
class Bullets:
    items: Sequence[Inline]
    only: str | None = None


@dataclass(frozen=True)
class Facts:
    """Label → value pairs (a model's facts, an organism's card)."""

    items: Sequence[tuple[str, str]]
    only: str | None = None


@dataclass(frozen=True)
class Table:
    head: Sequence[str]
    rows: Sequence[Sequence[str]]
    wide_cols: Sequence[int] = ()  # columns of free text (prompts, generations): wrapped in HTML
    summary: str | None = None  # HTML folds the table under this title
    only: str | None = None


@dataclass(frozen=True)
class Chart:
    """A chart of one model, by name (see :func:`core.report.files.chart_builders`); each
    renderer looks its file or SVG up. ``required``: say so when it could not be rendered."""

    model: str
    name: str
    alt: str
    required: bool = False
    only: str | None = None


@dataclass(frozen=True)
class CodeBlock:
    text: str
    language: str = ""
    summary: str | None = None  # HTML folds the block under this title; Markdown labels it
    only: str | None = None


Block = Union[Heading, Paragraph, Bullets, Facts, Table, Chart, CodeBlock]


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block | None) -> None:
        self.blocks.extend(b for b in blocks if b is not None)

    def for_format(self, fmt: str) -> list[Block]:
        """The blocks one format shows (``fmt``: ``markdown`` or ``html``)."""
        return [b for b in self.blocks if b.only in (None, fmt)]
