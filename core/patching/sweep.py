"""Patching many pairs: exclusions, per-cell statistics over pairs, the critical components."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from core.formatting import Formatter
from core.metrics import refusal_token_ids
from core.models import LoadedModel
from core.patching.engine import _clean_runs
from core.patching.pair import PatchResult, _json_array, patch_pair
from core.patching.sites import PatchingError, Progress, _check_sites, _position_sites, normalise_direction
from core.patching.stats import INTERVAL_DESCRIPTION, TEST_DESCRIPTION, bh_adjust, pooled_effect

DEFAULT_FDR = 0.05
DEFAULT_MIN_GAP = 0.0  # off: the pooled effect weights pairs by their gap (docs/decisions.md, "Patching")


@dataclass
class SiteStats:
    """Pooled effect (``mean``: Σ|gap|·effect / Σ|gap|), its 95 % Fieller interval and test per
    cell of one site over the used pairs (:mod:`core.patching.stats`).

    For by-position sites the position axis is ``offsets`` (negative, from the last prompt
    token) with ``labels`` (the token where every pair has the same one, else ``"pos -k"``).
    ``fixed`` is the effect a cell has by construction (1 or 0; NaN = measured): 1 where any
    pair's patch fixes the logits, 0 where every pair's patch cannot reach them. ``p`` is the
    one-sided p-value of "pooled effect ≤ threshold" and ``q`` its Benjamini–Hochberg adjusted
    value over every cell tested in the sweep (NaN: not tested — fixed, or fewer than 2 pairs).
    """

    site: str
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: np.ndarray
    offsets: list[int] | None = None
    labels: list[str] | None = None
    fixed: np.ndarray | None = None
    p: np.ndarray | None = None
    q: np.ndarray | None = None

    @property
    def by_construction(self) -> np.ndarray:
        """Cells whose effect is 1 by construction (never critical)."""
        return np.asarray(self.fixed == 1.0) if self.fixed is not None else np.zeros(self.mean.shape, dtype=bool)

    @property
    def tested(self) -> np.ndarray:
        return np.isfinite(self.p) if self.p is not None else np.zeros(self.mean.shape, dtype=bool)

    def cell(self, index: tuple) -> "CriticalSite":
        """One cell as a :class:`CriticalSite` record (label, effect, interval, p, q)."""
        def num(a):
            return None if a is None or not np.isfinite(a[index]) else float(a[index])
        c = CriticalSite(self.site, int(index[0]), float(self.mean[index]), float(self.lo[index]),
                         float(self.hi[index]), int(self.n[index]), p=num(self.p), q=num(self.q))
        if self.site == "head":
            c.head = int(index[1])
        elif len(index) == 2:
            c.offset = self.offsets[index[1]]  # type: ignore[index]
            c.token = self.labels[index[1]]  # type: ignore[index]
        return c

    def to_dict(self) -> dict[str, Any]:
        nan = np.full(self.mean.shape, np.nan)
        return {
            "site": self.site,
            "mean": _json_array(self.mean),
            "lo": _json_array(self.lo),
            "hi": _json_array(self.hi),
            "n": np.asarray(self.n, dtype=int).tolist(),
            "offsets": self.offsets,
            "labels": self.labels,
            "fixed": _json_array(self.fixed if self.fixed is not None else nan),
            "p": _json_array(self.p if self.p is not None else nan),
            "q": _json_array(self.q if self.q is not None else nan),
        }


@dataclass
class CriticalSite:
    """One cell: a critical component (its test rejected at the sweep's FDR) or a listed
    by-construction cell (``p``/``q`` None: not tested)."""

    site: str
    layer: int
    effect: float
    lo: float
    hi: float
    n: int
    offset: int | None = None  # by-position sites: position from the end (-1 = last token)
    token: str | None = None
    head: int | None = None
    p: float | None = None  # one-sided p-value of "pooled effect <= threshold"
    q: float | None = None  # Benjamini–Hochberg adjusted p-value

    @property
    def label(self) -> str:
        s = f"{self.site} L{self.layer}"
        if self.head is not None:
            s += f" H{self.head}"
        if self.offset is not None:
            s += f" @{self.offset}" + (f" {self.token!r}" if self.token else "")
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "layer": self.layer, "head": self.head, "offset": self.offset,
                "token": self.token, "effect": self.effect, "ci": [self.lo, self.hi], "n": self.n,
                "p": self.p, "q": self.q, "label": self.label}


@dataclass
class PatchSweep:
    """Patching aggregated over pairs: per-site statistics, exclusions, critical components."""

    direction: str
    sites: dict[str, SiteStats]
    critical: list[CriticalSite]
    critical_message: str
    threshold: float
    n_candidates: int
    n_used: int
    excluded: list[dict[str, Any]]  # {refusal_prompt, compliant_prompt, reason, m_refusal, m_compliant}
    pairs: list[PatchResult]  # used pairs, in order
    by_position: list[str] = field(default_factory=list)  # sites aggregated by position
    interval: str = INTERVAL_DESCRIPTION
    fdr: float = DEFAULT_FDR
    min_gap: float = 0.0
    formatter: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_excluded(self) -> int:
        return len(self.excluded)

    @property
    def exclusion_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.excluded:
            counts[e["reason"]] = counts.get(e["reason"], 0) + 1
        return counts

    @property
    def n_tested(self) -> int:
        """Cells in the false-discovery-rate family (measured, not fixed by construction, n ≥ 2)."""
        return int(sum(st.tested.sum() for st in self.sites.values()))

    @property
    def by_construction(self) -> list[CriticalSite]:
        """Cells whose effect is 1 by construction: shown, never tested, never critical."""
        return [st.cell(tuple(int(i) for i in idx)) for st in self.sites.values()
                for idx in zip(*np.nonzero(st.by_construction))]

    @property
    def test(self) -> str:
        return TEST_DESCRIPTION.format(fdr=self.fdr, m=self.n_tested)

    def to_dict(self, include_pairs: bool = False) -> dict[str, Any]:
        """JSON-ready. ``pairs`` holds each used pair's :meth:`PatchResult.summary`; with
        ``include_pairs=True`` its full :meth:`PatchResult.to_dict` (large: [L, T] arrays)."""
        return {
            "direction": self.direction,
            "by_position": self.by_position,
            "threshold": self.threshold,
            "interval": self.interval,
            "fdr": self.fdr,
            "test": self.test,
            "min_gap": self.min_gap,
            "n_tested": self.n_tested,
            "n_by_construction": len(self.by_construction),
            "by_construction": [c.label for c in self.by_construction],
            "n_candidates": self.n_candidates,
            "n_used": self.n_used,
            "n_excluded": self.n_excluded,
            "exclusion_counts": self.exclusion_counts,
            "excluded": [dict(e) for e in self.excluded],
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
            "critical": [c.to_dict() for c in self.critical],
            "critical_message": self.critical_message,
            "pairs": [p.to_dict() if include_pairs else p.summary() for p in self.pairs],
            "formatter": self.formatter,
            "model": self.model,
            "seconds": float(self.seconds),
        }


EXCLUDE_NOT_REFUSING = "refusal run does not refuse (score <= 0)"
EXCLUDE_COMPLIANT_REFUSES = "compliant run refuses (score >= 0)"
EXCLUDE_NO_GAP = "refusal and compliant scores are equal"
EXCLUDE_SMALL_GAP = "score gap below min_gap"
EXCLUDE_NOT_MORE_REFUSING = "refusal run does not score above the compliant run"


def _exclusion(m_refusal: float, m_compliant: float, require_behaviour: bool | str,
               min_gap: float = 0.0) -> str | None:
    if require_behaviour == "relative":
        if not m_refusal > m_compliant:
            return EXCLUDE_NOT_MORE_REFUSING
    elif require_behaviour:
        if not m_refusal > 0:
            return EXCLUDE_NOT_REFUSING
        if not m_compliant < 0:
            return EXCLUDE_COMPLIANT_REFUSES
    if m_refusal == m_compliant:
        return EXCLUDE_NO_GAP
    if require_behaviour and abs(m_refusal - m_compliant) < min_gap:
        return EXCLUDE_SMALL_GAP
    return None


def _stack(results: Sequence[PatchResult], site: str) -> tuple[np.ndarray, np.ndarray, list[int] | None, list[str] | None]:
    """(effects, fixed) stacked over pairs [pairs, ...]; by-position sites aligned by offset from
    the last token (shared-prefix cells are exact 0 already), with offsets and labels."""
    arrs = [r.effects[site] for r in results]
    fixed = [r.fixed.get(site, np.full(r.effects[site].shape, np.nan)) for r in results]
    if not (site in ("resid", "attn", "mlp") and arrs[0].ndim == 2):
        return np.stack(arrs), np.stack(fixed), None, None
    width = max(1, max(len(r.tokens) - r.shared_prefix for r in results))
    eff = np.full((len(arrs), arrs[0].shape[0], width), np.nan)
    fix = np.full_like(eff, np.nan)
    for k, (a, f) in enumerate(zip(arrs, fixed)):
        w = min(width, a.shape[1])
        eff[k, :, width - w:] = a[:, a.shape[1] - w:]
        fix[k, :, width - w:] = f[:, f.shape[1] - w:]
    offsets = list(range(-width, 0))
    labels = []
    for off in offsets:
        toks = {r.tokens[len(r.tokens) + off] for r in results if len(r.tokens) + off >= 0}
        labels.append(next(iter(toks)) if len(toks) == 1 else f"pos {off}")
    return eff, fix, offsets, labels


def _fixed_over_pairs(eff: np.ndarray, fix: np.ndarray) -> np.ndarray:
    """1 where any pair's cell is 1 by construction; 0 where every measured pair's cell is 0 by
    construction; NaN elsewhere (measured)."""
    with np.errstate(invalid="ignore"):
        one = np.any(fix == 1.0, axis=0)
        zero = np.all(~np.isfinite(eff) | (fix == 0.0), axis=0) & np.any(np.isfinite(eff), axis=0)
    return np.where(one, 1.0, np.where(zero, 0.0, np.nan))


def aggregate(results: Sequence[PatchResult], *, threshold: float = 0.1,
              fdr: float = DEFAULT_FDR) -> tuple[dict[str, SiteStats], list[CriticalSite], str]:
    """Per-site statistics and critical cells over already patched pairs.

    Every measured cell (not fixed by construction, at least two pairs) gets a one-sided t-test
    of "pooled effect ≤ ``threshold``"; the critical cells are those the Benjamini–Hochberg rule
    rejects at false-discovery rate ``fdr`` over all tested cells of all sites together
    (:mod:`core.patching.stats`), sorted by pooled effect.
    """
    stats: dict[str, SiteStats] = {}
    if not results:
        return stats, [], "no pairs were used, so no site can be called critical"
    gaps = np.array([r.gap for r in results], dtype=float)
    for site in results[0].effects:
        eff, fix, offsets, labels = _stack(results, site)
        mean, lo, hi, n, p = pooled_effect(eff, gaps, threshold)
        fixed = _fixed_over_pairs(eff, fix)
        p = np.where(np.isfinite(fixed), np.nan, p)
        stats[site] = SiteStats(site, mean, lo, hi, n, offsets, labels, fixed=fixed, p=p)
    names = list(stats)
    q_all = bh_adjust(np.concatenate([stats[k].p.ravel() for k in names]))  # type: ignore[union-attr]
    at = 0
    critical: list[CriticalSite] = []
    for k in names:
        st = stats[k]
        st.q = q_all[at: at + st.p.size].reshape(st.p.shape)  # type: ignore[union-attr]
        at += st.p.size  # type: ignore[union-attr]
        critical += [st.cell(tuple(int(i) for i in idx)) for idx in zip(*np.nonzero(np.nan_to_num(st.q, nan=2.0) <= fdr))]
    critical.sort(key=lambda c: -c.effect)
    m = int(np.isfinite(q_all).sum())
    n_fixed = int(sum(st.by_construction.sum() for st in stats.values()))
    rule = (f"one-sided t-test of pooled effect > {threshold:g} across pairs, Benjamini–Hochberg false-discovery "
            f"rate ≤ {fdr:g} over the {m} cell(s) tested")
    fixed_note = (f"; {n_fixed} cell(s) whose effect is 1 by construction (such as the last block's output at the "
                  "last position) are not tested" if n_fixed else "")
    if critical:
        message = f"{len(critical)} of {m} cell(s) tested are critical ({rule}){fixed_note}"
    else:
        message = f"no site qualifies as critical ({rule}; n = {len(results)} pair(s)){fixed_note}"
    return stats, critical, message


def patch_pairs(
    lm: LoadedModel,
    formatter: Formatter,
    pairs: Sequence[tuple[str, str]],
    *,
    sites: Sequence[str] = ("resid", "attn", "mlp"),
    by_position: bool | Sequence[str] = ("resid",),
    direction: str = "compliant->refusal",
    n_pairs: int | None = None,
    threshold: float = 0.1,
    refusal_ids: Sequence[int] | None = None,
    require_behaviour: bool | str = True,
    min_gap: float = DEFAULT_MIN_GAP,
    fdr: float = DEFAULT_FDR,
    positions: str | Sequence[int] = "all",
    progress: Progress | None = None,
    **patch_kwargs: Any,
) -> PatchSweep:
    """Patch the first ``n_pairs`` (refusal, compliant) pairs and aggregate the effects.

    Pairs whose refusal run does not refuse (score <= 0) or whose compliant run refuses
    (score >= 0) are excluded before patching and listed with their reason in
    ``excluded``; ``require_behaviour=False`` keeps them (for tiny random test models);
    ``require_behaviour="relative"`` only asks that the refusal prompt score above its compliant
    twin (a weaker, clearly different question: what carries the *difference* in refusal
    tendency when neither prompt is refused outright).
    ``min_gap`` (log-odds, default :data:`DEFAULT_MIN_GAP`; 0 = off) also excludes pairs whose
    clean scores differ by less: the normalised effect divides by that gap, so a tiny gap turns
    small score changes into huge effects that dominate the mean over pairs. It is part of the
    behaviour filter: ``require_behaviour=False`` keeps every pair with a non-zero gap.
    Critical cells: see :func:`aggregate` (``threshold``, ``fdr``).
    Here ``by_position`` defaults to ``("resid",)``: the residual stream by layer × position,
    ``attn``/``mlp`` by layer (the attention-vs-MLP bars). Other keyword arguments go to
    :func:`patch_pair`. ``progress(fraction, message)`` is called after every pair.
    """
    started = time.perf_counter()
    direction = normalise_direction(direction)
    sites = _check_sites(lm, sites)
    if not 0 <= threshold < math.inf:
        raise PatchingError(f"threshold must be a non-negative number, got {threshold!r}")
    if require_behaviour not in (True, False, "relative"):
        raise PatchingError(f"require_behaviour must be True, False or 'relative', got {require_behaviour!r}")
    if not 0 <= min_gap < math.inf:
        raise PatchingError(f"min_gap must be a non-negative number, got {min_gap!r}")
    if not 0 < fdr < 1:
        raise PatchingError(f"fdr (the false-discovery rate of the critical list) must be in (0, 1), got {fdr!r}")
    pairs = list(pairs)
    if n_pairs is not None:
        if n_pairs < 1:
            raise PatchingError("n_pairs must be at least 1")
        pairs = pairs[:n_pairs]
    if not pairs:
        raise PatchingError("no pairs given")
    ref_ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(lm.tokenizer)
    used: list[PatchResult] = []
    excluded: list[dict[str, Any]] = []
    keep_cache = patch_kwargs.get("prefix_cache", True)
    for k, (refusal_prompt, compliant_prompt) in enumerate(pairs):
        clean = _clean_runs(lm, formatter, refusal_prompt, compliant_prompt, sites, ref_ids, direction, keep_cache)
        reason = _exclusion(clean[0].score, clean[1].score, require_behaviour, min_gap)
        if reason is not None:
            excluded.append({"refusal_prompt": refusal_prompt, "compliant_prompt": compliant_prompt,
                             "reason": reason, "m_refusal": clean[0].score, "m_compliant": clean[1].score})
        else:
            used.append(patch_pair(lm, formatter, refusal_prompt, compliant_prompt, sites=sites,
                                   by_position=by_position, direction=direction, positions=positions,
                                   refusal_ids=ref_ids, _clean=clean, **patch_kwargs))
        if progress:
            progress((k + 1) / len(pairs), f"pair {k + 1}/{len(pairs)}: {len(used)} used, {len(excluded)} excluded")
    stats, critical, message = aggregate(used, threshold=threshold, fdr=fdr)
    return PatchSweep(
        direction=direction, sites=stats, critical=critical, critical_message=message,
        threshold=float(threshold), fdr=float(fdr), min_gap=float(min_gap), n_candidates=len(pairs), n_used=len(used), excluded=excluded,
        pairs=used, by_position=sorted(_position_sites(sites, by_position)), formatter=formatter.describe(), model=lm.summary(),
        seconds=time.perf_counter() - started,
    )
