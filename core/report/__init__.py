"""Render a results dict (see :mod:`core.results`) as Markdown, one offline HTML file, and JSON.

Why one renderer for the batch runner and the app: the numbers a user sees on the Report page
and in ``results/report.html`` must be the same numbers, described the same way. Every rate is
shown with its Wilson 95 % interval and n, every separation says it is held-out, and every
steering effect stands next to its controls.

The package, by idea:

* :mod:`~core.report.numbers` — how a number prints (pages import it too);
* :mod:`~core.report.escape` — escaping user and model text for each format;
* :mod:`~core.report.tables`, :mod:`~core.report.facts` — rows and fact lists as plain text;
* :mod:`~core.report.prose`, :mod:`~core.report.seed` — methodology, limitations, summary, and
  the comparison with the seed report, generated from the data by rules;
* :mod:`~core.report.blocks`, :mod:`~core.report.content` — the report built once as typed blocks;
* :mod:`~core.report.markdown`, :mod:`~core.report.html` — the two renderers of those blocks;
* :mod:`~core.report.files` — strict JSON, charts and writing the files.
"""

from core.report.blocks import Document
from core.report.content import build_report, runtime_text, slug
from core.report.escape import h, md
from core.report.facts import (entry_facts, grid_text, layer_choice_text, organism_rows, patching_summary,
                               training_data_text)
from core.report.files import chart_builders, chart_svgs, to_json, write_reports
from core.report.html import render_html
from core.report.markdown import render_markdown
from core.report.numbers import coef_text, nats, pct, probe_text, rate_text, seconds, sigma, sigma_ci
from core.report.prose import limitations, methodology, summary_items
from core.report.seed import SEED_CLAIM, SEED_ROWS, seed_comparison
from core.report.tables import (CONTROL_HEAD, CRITICAL_HEADER, CRITICAL_RULE, GENERATION_HEAD, SEED_HEAD, TABLE_HEAD,
                                control_rows, controls_text, critical_rows, critical_text, generation_groups,
                                generation_rows, layer_rows, model_kind, sample_rows, seed_rows, sweep_rows, table_rows)

__all__ = [
    "CONTROL_HEAD", "CRITICAL_HEADER", "CRITICAL_RULE", "Document", "GENERATION_HEAD", "SEED_CLAIM", "SEED_HEAD", "SEED_ROWS",
    "TABLE_HEAD", "build_report", "chart_builders", "chart_svgs", "coef_text", "control_rows", "controls_text",
    "critical_rows", "critical_text", "entry_facts", "generation_groups", "generation_rows", "grid_text", "h",
    "layer_choice_text", "layer_rows", "limitations", "md", "methodology", "model_kind", "nats", "organism_rows",
    "patching_summary", "pct", "probe_text", "rate_text", "render_html", "render_markdown", "runtime_text",
    "sample_rows", "seconds", "seed_comparison", "seed_rows", "sigma", "sigma_ci", "slug", "summary_items", "sweep_rows",
    "table_rows", "to_json", "training_data_text", "write_reports",
]
