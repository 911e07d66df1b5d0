"""The report's blocks as Markdown. Every piece of user or model text is escaped with
:func:`core.report.escape.md`; the report's own prose keeps its ``**bold**``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from core.report.blocks import Block, Bullets, Chart, CodeBlock, Facts, Heading, Inline, Paragraph, Table
from core.report.escape import md


def inline(spans: Inline) -> str:
    out = []
    for s in spans:
        if s.style == "strong":
            out.append(f"**{md(s.text)}**")
        elif s.style == "code":
            fence = "``" if "`" in s.text else "`"
            out.append(f"{fence}{s.text.replace(chr(10), ' ')}{fence}")
        elif s.style == "prose":
            out.append(s.text)
        elif s.style == "break":
            out.append("  \n")
        else:  # md() trims; keep the spaces that join this span to its neighbours
            text = s.text
            lead, trail = text[: len(text) - len(text.lstrip(" "))], text[len(text.rstrip(" ")):]
            out.append(lead + md(text) + trail if text.strip() else text)
    return "".join(out)


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(md(x) for x in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(md(x) for x in row) + " |" for row in rows]


def block(b: Block, chart_paths: Mapping[str, Mapping[str, str]]) -> list[str]:
    if isinstance(b, Heading):
        return ["#" * b.level + " " + md(b.text)]
    if isinstance(b, Paragraph):
        text = inline(b.spans)
        return ["> " + text.replace("\n", "\n> ")] if b.style == "callout" else [text]
    if isinstance(b, Bullets):
        return [f"- {inline(item)}" for item in b.items]
    if isinstance(b, Facts):
        return [f"- **{md(k)}:** {md(v)}" for k, v in b.items]
    if isinstance(b, Table):
        return table(b.head, b.rows)
    if isinstance(b, Chart):
        path = (chart_paths.get(b.model) or {}).get(b.name)
        return [f"![{md(b.alt)}]({path})"] if path else []
    if isinstance(b, CodeBlock):
        fenced = ["```" + b.language, b.text.replace("```", "'''"), "```"]
        return [f"**{md(b.summary)}:**", "", *fenced] if b.summary else fenced
    raise TypeError(f"no Markdown for a {type(b).__name__}")


def render_markdown(results: Mapping[str, Any], chart_paths: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The report as Markdown. ``chart_paths[model name][chart]`` are relative SVG paths to link
    (written by :func:`core.report.files.write_reports`); without them the report has no images."""
    from core.report.content import build_report

    lines: list[str] = []
    for b in build_report(results).for_format("markdown"):
        out = block(b, chart_paths or {})
        if out:
            lines += [*out, ""]
    return "\n".join(lines)
