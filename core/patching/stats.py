"""Statistics over pairs for patching: the pooled effect per cell, its interval, one-sided
tests and the Benjamini–Hochberg false-discovery-rate rule that picks the critical cells.

Pooling. A pair's normalised effect is δ / gap (score change over the pair's score gap), so a
pair whose two prompts score almost alike turns a small score change into a huge effect and a
plain mean over pairs is dominated by it. The pooled effect is the ratio of sums
Σ|gap|·effect / Σ|gap| (= Σδ / Σgap when the gaps share a sign): each pair counts in
proportion to how much behaviour there is to explain. Its 95 % interval is Fieller's (the
exact interval of a ratio of means under the t model; unbounded, hence NaN, when the gaps'
mean is not clearly non-zero).

Testing. A sweep tests hundreds of cells (layers × positions, components, heads) on a few
dozen pairs, so "interval above the threshold" alone would list many cells by chance. Each
cell gets a one-sided Student-t test of H0 "pooled effect ≤ threshold", i.e. of the mean of
the per-pair differences |gap|·(effect − threshold) ≤ 0, which involves no division; the
cells whose Benjamini–Hochberg adjusted p-value is at most ``fdr`` are called critical: among
them, the expected share of false discoveries is at most ``fdr`` (valid for independent or
positively dependent tests, which neighbouring cells of one sweep are). Pure numpy/scipy.
"""

from __future__ import annotations

import warnings

import numpy as np

TEST_DESCRIPTION = ("one-sided Student-t test across pairs of H0: pooled effect ≤ threshold; "
                    "Benjamini–Hochberg false-discovery rate ≤ {fdr:g} over the {m} cell(s) tested")
INTERVAL_DESCRIPTION = ("pooled effect = Σ|gap|·effect / Σ|gap| over pairs (a ratio of sums: pairs count by their "
                        "score gap); two-sided 95% Fieller interval of that ratio")


def t_test_greater(x: np.ndarray, threshold: float) -> np.ndarray:
    """One-sided p-values over axis 0 of H0 "mean ≤ threshold" (Student t, NaN ignored).

    NaN where fewer than two finite values. With zero spread the answer is exact: 0 when every
    value exceeds the threshold, 1 otherwise.
    """
    from scipy import stats

    n = np.sum(np.isfinite(x), axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=0)
        sd = np.nanstd(x, axis=0, ddof=1)
        t = (mean - threshold) / (sd / np.sqrt(np.maximum(n, 1)))
        p = stats.t.sf(t, np.maximum(n - 1, 1))
    p = np.where(sd > 0, p, np.where(mean > threshold, 0.0, 1.0))
    return np.where(n > 1, p, np.nan)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), same shape; NaN entries are not in the
    family and stay NaN. Rejecting ``q ≤ fdr`` is the BH step-up rule at level ``fdr``."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    flat = p.ravel()
    idx = np.flatnonzero(np.isfinite(flat))
    m = idx.size
    if m == 0:
        return q
    order = idx[np.argsort(flat[idx], kind="stable")]
    ranked = flat[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]  # q_(i) = min over j ≥ i
    out = q.ravel()
    out[order] = np.minimum(ranked, 1.0)
    return out.reshape(p.shape)


def benjamini_hochberg(p: np.ndarray, fdr: float) -> np.ndarray:
    """Boolean mask of the p-values rejected by the BH step-up rule at level ``fdr`` (NaN: not tested)."""
    q = bh_adjust(p)
    return np.isfinite(q) & (q <= fdr)


def pooled_effect(effects: np.ndarray, gaps: np.ndarray, threshold: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pooled, lower, upper, n, p) over axis 0 of ``effects`` [pairs, ...] with per-pair
    ``gaps`` [pairs] (see module doc). NaN effects leave that pair out of that cell; the
    interval is NaN for n < 2 or when unbounded; ``p`` tests "pooled ≤ threshold"."""
    from scipy import stats

    e = np.asarray(effects, dtype=float)
    w = np.abs(np.asarray(gaps, dtype=float)).reshape((-1,) + (1,) * (e.ndim - 1)) * np.ones_like(e)
    ok = np.isfinite(e) & np.isfinite(w)
    x = np.where(ok, e * w, np.nan)
    w = np.where(ok, w, np.nan)
    n = ok.sum(axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled = np.nansum(x, axis=0) / np.nansum(w, axis=0)
        pooled = np.where(n > 0, pooled, np.nan)
        xm, wm = np.nanmean(x, axis=0), np.nanmean(w, axis=0)
        dof = np.maximum(n - 1, 1)
        sxx = np.nansum((x - xm) ** 2, axis=0) / dof
        sww = np.nansum((w - wm) ** 2, axis=0) / dof
        sxw = np.nansum((x - xm) * (w - wm), axis=0) / dof
        c = stats.t.ppf(0.975, dof) ** 2 / np.maximum(n, 1)
        a = wm ** 2 - c * sww
        b = xm * wm - c * sxw
        disc = np.maximum(b ** 2 - a * (xm ** 2 - c * sxx), 0.0)
        bounded = (n > 1) & (a > 0)
        lo = np.where(bounded, (b - np.sqrt(disc)) / a, np.nan)
        hi = np.where(bounded, (b + np.sqrt(disc)) / a, np.nan)
    p = t_test_greater(x - threshold * w, 0.0)
    return pooled, lo, hi, n, p
