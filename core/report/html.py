"""The report's blocks as one self-contained HTML file.

Safety: every piece of text is HTML-escaped (the report's own prose too, before its ``**bold**``
becomes ``<strong>``), charts are offline SVG embedded as ``data:`` images (an image cannot run
script), the CSS is inline, and a Content-Security-Policy forbids fetching or running anything.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Mapping, Sequence

from core.report.blocks import Block, Bullets, Chart, CodeBlock, Facts, Heading, Inline, Paragraph, Table
from core.report.escape import h

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
th,td{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3}
td.gen{max-width:26em;white-space:pre-wrap;word-break:break-word}
code,pre{background:#f6f6f6;padding:.1em .3em;border-radius:3px}
pre{padding:.6em;overflow:auto}
.chart{margin:.5em 0 1em;max-width:100%}
.note{color:#555;font-size:.9em}
.callout{border-left:4px solid #c0392b;padding-left:.6em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;font-size:.92em}
dt{font-weight:600}
"""


def prose_html(text: str) -> str:
    """Our own prose: escape, then turn **x** / *x* into <strong>/<em>."""
    s = h(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"\*(.+?)\*", r"<em>\1</em>", s)


def inline(spans: Inline) -> str:
    out = []
    for s in spans:
        if s.style == "strong":
            out.append(f"<strong>{h(s.text)}</strong>")
        elif s.style == "code":
            out.append(f"<code>{h(s.text)}</code>")
        elif s.style == "prose":
            out.append(prose_html(s.text))
        elif s.style == "break":
            out.append("<br>")
        else:
            out.append(h(s.text))
    return "".join(out)


def table(head: Sequence[str], rows: Sequence[Sequence[str]], wide_cols: Sequence[int] = ()) -> str:
    out = ["<table><thead><tr>", *(f"<th>{h(x)}</th>" for x in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = (f'<td class="gen">{h(x)}</td>' if i in wide_cols else f"<td>{h(x)}</td>" for i, x in enumerate(row))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def image(svg: str, alt: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<div class="chart"><img alt="{h(alt)}" src="data:image/svg+xml;base64,{data}"></div>'


def block(b: Block, svgs: Mapping[str, Mapping[str, str]]) -> str:
    if isinstance(b, Heading):
        anchor = f' id="{h(b.anchor)}"' if b.anchor else ""
        return f"<h{b.level}{anchor}>{h(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        cls = f' class="{b.style}"' if b.style else ""
        return f"<p{cls}>{inline(b.spans)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{inline(item)}</li>" for item in b.items) + "</ul>"
    if isinstance(b, Facts):
        return "<dl>" + "".join(f"<dt>{h(k)}</dt><dd>{h(v)}</dd>" for k, v in b.items) + "</dl>"
    if isinstance(b, Table):
        t = table(b.head, b.rows, b.wide_cols)
        return f"<details><summary>{h(b.summary)}</summary>{t}</details>" if b.summary else t
    if isinstance(b, Chart):
        svg = (svgs.get(b.model) or {}).get(b.name)
        if svg:
            return image(svg, b.alt)
        return f'<p class="note">(chart "{h(b.alt)}" could not be rendered)</p>' if b.required else ""
    if isinstance(b, CodeBlock):
        pre = f"<pre>{h(b.text)}</pre>"
        return f"<details><summary>{h(b.summary)}</summary>{pre}</details>" if b.summary else pre
    raise TypeError(f"no HTML for a {type(b).__name__}")


def render_html(results: Mapping[str, Any], svgs: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The report as one self-contained HTML file (charts embedded as offline SVG images)."""
    from core.report.content import build_report
    from core.report.files import chart_svgs

    if svgs is None:
        svgs = {e.get("name", "?"): chart_svgs(e) for e in results.get("models", [])}
    doc = build_report(results)
    head = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # no script may run, nothing may be fetched: the report is data, not an app
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{h(doc.title)}</title><style>{CSS}</style></head><body>",
    ]
    body = [out for b in doc.for_format("html") if (out := block(b, svgs))]
    return "\n".join([*head, *body, "</body></html>"])
