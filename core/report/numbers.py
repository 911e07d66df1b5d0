"""Numbers as the report and the app print them: a rate with its Wilson interval and k/n, a
separation with its bootstrap interval, a coefficient, a duration.

Why one module: the Report, Runs and Validation pages import these so that a number reads the
same on a page as in ``report.md``; a value that is missing or not finite prints as ``–``.
"""

from __future__ import annotations

from typing import Any, Mapping

from core.metrics import finite


def pct(x: Any, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%" if finite(x) else "–"


def sigma(x: Any) -> str:
    return f"{x:.2f}σ" if finite(x) else "–"


def _interval(ci: Any) -> bool:
    return bool(ci) and len(ci) == 2 and all(finite(c) for c in ci)


def sigma_ci(x: Any, ci: Any) -> str:
    """A separation with its bootstrap 95 % interval, e.g. ``2.83σ [2.41–3.30]``."""
    if not finite(x):
        return "–"
    if not _interval(ci):
        return sigma(x)
    return f"{x:.2f}σ [{ci[0]:.2f}–{ci[1]:.2f}]"


def probe_text(acc: Any, std: Any, ci: Any) -> str:
    """Probe accuracy ± fold std, with its Wilson 95 % interval when known."""
    if not finite(acc):
        return "–"
    text = f"{100 * acc:.1f}% ± {100 * (std or 0):.1f}"
    if _interval(ci):
        text += f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]"
    return text


def rate_text(r: Mapping[str, Any] | None, *, with_n: bool = True) -> str:
    """``92% [81–97%] (37/40)``: rate, Wilson 95 % interval, count."""
    if not r or not finite(r.get("rate")):
        return "–"
    lo, hi = (r.get("ci") or [None, None])[:2]
    text = pct(r["rate"])
    if finite(lo) and finite(hi):
        text += f" [{100 * lo:.0f}–{100 * hi:.0f}%]"
    if with_n and r.get("n") is not None:
        text += f" ({r.get('k', '?')}/{r['n']})" if r.get("k") is not None else f" (n={r['n']})"
    return text


def coef_text(c: Any) -> str:
    if c in ("ablate", "ablation"):
        return "ablation"
    return f"α={c:g}" if finite(c) else str(c)


def nats(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f} nats" if finite(x) else "–"


def seconds(x: Any) -> str:
    if not finite(x):
        return "–"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"
