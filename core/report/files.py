"""Writing a run's files: ``results.json`` (strict JSON), ``report.md`` with the ``charts/*.svg``
it links, and ``report.html`` with the same charts embedded.

Each file is written through :func:`core.atomic.atomic_write_text`: the batch runner rewrites
them after every model while the app may be reading them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from core.atomic import atomic_write_text
from core.report.content import slug

Entry = Mapping[str, Any]


def to_json(results: Mapping[str, Any]) -> str:
    """Strict JSON (NaN/inf become null), keys in insertion order."""
    return json.dumps(clean(results), indent=2, ensure_ascii=False, allow_nan=False)


def clean(x: Any) -> Any:
    """``x`` as strict-JSON data: non-finite floats become None, numpy scalars Python numbers,
    and keys starting with ``_`` (in-memory notes such as chart errors) are left out."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalar
        return clean(x.item())
    return x


def chart_builders(e: Entry) -> list[tuple[str, Callable[[], Any]]]:
    """(name, build) for every chart of an entry (build may return None: nothing to draw); the
    report renders them to SVG, the app's Runs page draws them live."""
    from core import charts

    builders: list[tuple[str, Callable[[], Any]]] = [
        ("layers", lambda: charts.layer_chart(e)),
        ("scan", lambda: charts.ablation_scan_chart(e)),
        ("grid", lambda: charts.selection_grid_chart(e)),
        ("steering", lambda: charts.steering_chart(e)),
    ]
    if e.get("patching"):
        builders += [("patching", lambda: charts.patching_heatmap(e["patching"])),
                     ("components", lambda: charts.component_bars(e["patching"])),
                     ("heads", lambda: charts.head_heatmap(e["patching"]))]
    return builders


def chart_svgs(e: Entry) -> dict[str, str]:
    """name -> SVG text for the entry's charts; charts that fail to render are left out."""
    from core import charts

    out: dict[str, str] = {}
    for name, build in chart_builders(e):
        try:
            chart = build()
            if chart is not None:
                out[name] = charts.to_svg(chart)
        except Exception as exc:  # a missing chart must not lose the report; say so in it
            out[name] = ""
            e.setdefault("_chart_errors", {})[name] = f"{type(exc).__name__}: {exc}" if isinstance(e, dict) else ""
    return out


def write_charts(svgs: Mapping[str, Mapping[str, str]], out: Path) -> dict[str, dict[str, str]]:
    """Write each rendered chart to ``out/charts/<model>-<chart>.svg``; returns the relative paths."""
    chart_dir = out / "charts"
    paths: dict[str, dict[str, str]] = {}
    for name, charts_for in svgs.items():
        for chart, svg in charts_for.items():
            if not svg:
                continue
            chart_dir.mkdir(exist_ok=True)
            fname = f"{slug(name)}-{chart}.svg"
            atomic_write_text(chart_dir / fname, svg)
            paths.setdefault(name, {})[chart] = f"charts/{fname}"
    return paths


def write_reports(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` (+ ``charts/*.svg`` it links) and ``report.html``."""
    from core.report.html import render_html
    from core.report.markdown import render_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = clean(results)
    svgs = {e.get("name", "?"): chart_svgs(e) for e in data.get("models", [])}
    chart_paths = write_charts(svgs, out)
    paths = {"json": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["json"], to_json(data))
    atomic_write_text(paths["markdown"], render_markdown(data, chart_paths))
    atomic_write_text(paths["html"], render_html(data, svgs))
    return paths
