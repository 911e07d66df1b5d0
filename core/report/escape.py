"""Escaping for the two output formats. All text that comes from users or models (prompts,
generations, model names, token labels) goes through one of these, so a prompt
``<script>alert(1)</script>`` is shown as text in both files."""

from __future__ import annotations

import html
import re
from typing import Any


def md(text: Any) -> str:
    """Text safe inside a Markdown table cell or paragraph: no raw HTML, no links or emphasis
    from user text, no table breaks, one line."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = re.sub(r"([\\`*\[|~])", r"\\\1", s)
    s = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", s)
    s = re.sub(r"^(\s*)([#>+-])", r"\1\\\2", s)
    lines = [part.strip() for part in s.splitlines()]
    return " ⏎ ".join(lines) if len(lines) > 1 else (lines[0] if lines else "")


def h(text: Any) -> str:
    """HTML-escape (quotes included)."""
    return html.escape(str(text), quote=True)
