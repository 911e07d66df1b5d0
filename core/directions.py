"""Refusal directions per layer, with honest (held-out) measures of how well they separate.

Input: activations from :func:`core.activations.collect_activations`, float32 ``[n, L, d]``,
for harmful/harmless × train/validation/test. Everything that *fits* something (the direction,
the probe's folds, the mean norm) uses the train split only; anything *chosen* from these
numbers (:func:`choose_layer`) uses the validation split (or train, if none is given), never
test; the headline separation projects the untouched test split onto the train direction and
carries a seeded bootstrap 95 % interval over test prompts. The in-sample number is kept beside
it because it is what earlier work reported, and it is inflated.

Methods (``method=``):

* ``"diff-in-means"`` — mean(harmful) − mean(harmless): the Arditi et al. refusal direction.
* ``"pca"`` — first principal direction of the harmful−harmless differences. With unpaired
  sets we use all pairs at once: E[(h−b)(h−b)ᵀ] = Σ_h + Σ_b + δδᵀ (δ the mean difference),
  whose top eigenvector we get from an SVD of a stacked matrix; sign-aligned with δ.
* ``"probe"`` — the weight vector of a logistic-regression probe (features standardised; the
  weight is mapped back to activation space by dividing by the feature scale).

``raw`` always has the diff-in-means norm (so a raw coefficient of 1 means "one class-mean
difference" whatever the method); ``unit`` is the unit vector.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import DirectionError, LayerRangeError

METHODS = ("diff-in-means", "pca", "probe")
BOOTSTRAP_SAMPLES = 1000
DEFAULT_PROBE_FOLDS = 5
# A direction whose norm is below this fraction of the layer's mean activation norm is treated
# as zero (identical class means): numerically it has no defined orientation.
ZERO_NORM_FRACTION = 1e-7


@dataclass
class LayerDirections:
    """Per-layer directions and the statistics that say how much to trust them."""

    method: str
    position: str | int
    raw: np.ndarray  # [L, d]
    unit: np.ndarray  # [L, d]
    mean_norm: np.ndarray  # [L]
    separation_sigma: np.ndarray  # [L] held-out
    separation_in_sample: np.ndarray  # [L]
    probe_accuracy: np.ndarray  # [L]
    probe_accuracy_std: np.ndarray  # [L]
    cosine: np.ndarray  # [L, L]
    n_train: tuple[int, int]
    n_test: tuple[int, int]
    probe_folds: int = DEFAULT_PROBE_FOLDS
    seed: int = 0
    separation_validation: np.ndarray | None = None  # [L] on validation prompts (what choices may use)
    separation_ci: np.ndarray | None = None  # [L, 2] bootstrap 95 % interval of the held-out separation
    probe_accuracy_ci: np.ndarray | None = None  # [L, 2] Wilson 95 % interval of the pooled CV accuracy
    n_validation: tuple[int, int] = (0, 0)

    @property
    def n_layers(self) -> int:
        return int(self.raw.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.raw.shape[1])

    def check_layer(self, layer: int) -> int:
        """``layer`` as a non-negative index, or a clear ValueError."""
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise ValueError(f"layer must be an integer, got {layer!r}")
        index = int(layer) + self.n_layers if layer < 0 else int(layer)
        if not 0 <= index < self.n_layers:
            raise LayerRangeError(f"layer {layer} is out of range: these directions have {self.n_layers} layers (0–{self.n_layers - 1})")
        return index

    def direction(self, layer: int, unit: bool = True) -> np.ndarray:
        """The layer's direction ``[d]`` (unit vector by default; a copy)."""
        i = self.check_layer(layer)
        if not np.any(self.unit[i]):
            raise DirectionError(
                f"layer {i} has no direction: the harmful and harmless mean activations are identical there. "
                "Pick another layer or check that the two prompt sets differ."
            )
        return (self.unit[i] if unit else self.raw[i]).copy()

    def to_dict(self) -> dict[str, Any]:
        """Per-layer numbers (not the vectors), JSON-serialisable; non-finite values become None."""
        return {
            "method": self.method,
            "position": self.position,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_train": list(self.n_train),
            "n_test": list(self.n_test),
            "probe_folds": self.probe_folds,
            "seed": self.seed,
            "separation_sigma": _floats(self.separation_sigma),
            "separation_in_sample": _floats(self.separation_in_sample),
            "probe_accuracy": _floats(self.probe_accuracy),
            "probe_accuracy_std": _floats(self.probe_accuracy_std),
            "mean_norm": _floats(self.mean_norm),
            "direction_norm": _floats(np.linalg.norm(self.raw, axis=-1)),
            "cosine": [_floats(row) for row in self.cosine],
            "n_validation": list(self.n_validation),
            "separation_validation": _floats(_or_nan(self.separation_validation, self.n_layers)),
            "separation_ci": [_floats(row) for row in _or_nan(self.separation_ci, (self.n_layers, 2))],
            "probe_accuracy_ci": [_floats(row) for row in _or_nan(self.probe_accuracy_ci, (self.n_layers, 2))],
            "separation_ci_method": f"percentile bootstrap over test prompts, {BOOTSTRAP_SAMPLES} resamples, seed {self.seed}",
            "probe_accuracy_ci_method": "Wilson 95 % interval of the pooled cross-validated predictions (folds are not independent: approximate)",
        }


def _or_nan(values: np.ndarray | None, shape: int | tuple[int, ...]) -> np.ndarray:
    return np.full(shape, np.nan) if values is None else np.asarray(values)


def _floats(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).ravel()]


# ---------------------------------------------------------------------------------------
# small pure functions
# ---------------------------------------------------------------------------------------
def _check_acts(name: str, acts: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    a = np.asarray(acts, dtype=np.float32)
    if a.ndim != 3:
        raise DirectionError(f"{name}: expected activations of shape [n, layers, d], got {a.shape}. "
                             "Pass one position at a time (index the positions axis first).")
    if shape is not None and a.shape[1:] != shape:
        raise DirectionError(f"{name}: shape {a.shape} does not match the train activations' [n, {shape[0]}, {shape[1]}]")
    if a.shape[0] and not np.isfinite(a).all():
        raise DirectionError(f"{name}: activations contain NaN or inf; collect them in float32.")
    return a


def separation(proj_harmful: np.ndarray, proj_harmless: np.ndarray) -> float:
    """(mean_h − mean_b) / pooled standard deviation of 1-D projections (Cohen's d)."""
    h = np.asarray(proj_harmful, dtype=np.float64)
    b = np.asarray(proj_harmless, dtype=np.float64)
    if len(h) == 0 or len(b) == 0:
        return float("nan")
    dof = len(h) + len(b) - 2
    if dof <= 0:
        return float("nan")
    pooled = np.sqrt(((len(h) - 1) * h.var(ddof=1 if len(h) > 1 else 0) + (len(b) - 1) * b.var(ddof=1 if len(b) > 1 else 0)) / dof)
    diff = h.mean() - b.mean()
    if pooled == 0:
        return float("nan") if diff == 0 else float(np.sign(diff) * np.inf)
    return float(diff / pooled)


def bootstrap_separation(proj_harmful: np.ndarray, proj_harmless: np.ndarray, *, n_boot: int = BOOTSTRAP_SAMPLES,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`separation`, resampling each class's prompts
    with replacement (seeded, so reruns give the same interval). NaN with fewer than 2 a class."""
    h = np.asarray(proj_harmful, dtype=np.float64)
    b = np.asarray(proj_harmless, dtype=np.float64)
    if len(h) < 2 or len(b) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    hs = h[rng.integers(0, len(h), (n_boot, len(h)))]
    bs = b[rng.integers(0, len(b), (n_boot, len(b)))]
    dof = len(h) + len(b) - 2
    pooled = np.sqrt(((len(h) - 1) * hs.var(1, ddof=1) + (len(b) - 1) * bs.var(1, ddof=1)) / dof)
    diff = hs.mean(1) - bs.mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), np.sign(diff) * np.inf)
    d = d[~np.isnan(d)]
    if not len(d):
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(d, [alpha, 1 - alpha], method="inverted_cdf")  # no interpolation, so ±inf samples give no NaN
    return (float(lo), float(hi))


def _pca_direction(h: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Top eigenvector of Σ_h + Σ_b + δδᵀ (the second moment of all pairwise differences)."""
    delta = h.mean(0) - b.mean(0)
    stacked = np.concatenate([(h - h.mean(0)) / np.sqrt(len(h)), (b - b.mean(0)) / np.sqrt(len(b)), delta[None]], 0)
    _, _, vt = np.linalg.svd(stacked.astype(np.float64), full_matrices=False)
    v = vt[0]
    return v if v @ delta >= 0 else -v


def _probe_pipeline(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def _probe_direction(h: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    x = np.concatenate([h, b]).astype(np.float64)
    y = np.r_[np.ones(len(h)), np.zeros(len(b))]
    pipe = _probe_pipeline(seed).fit(x, y)
    scaler, clf = pipe[0], pipe[1]
    return clf.coef_[0] / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)


def _check_fold_sizes(n_harmful: int, n_harmless: int, folds: int, kind: str) -> None:
    if min(n_harmful, n_harmless) < folds:
        raise DirectionError(
            f"{folds}-fold probe cross-validation needs at least {folds} {kind}prompts per class, "
            f"got {n_harmful} harmful and {n_harmless} harmless; add prompts or lower probe_folds"
        )


def probe_cv_accuracy(harmful: np.ndarray, harmless: np.ndarray, folds: int = DEFAULT_PROBE_FOLDS, seed: int = 0) -> tuple[float, float]:
    """Stratified k-fold accuracy (mean, std) of a standardised logistic-regression probe on
    ``[n, d]`` features of the two classes."""
    mean, std, _, _ = probe_cv_counts(harmful, harmless, folds, seed)
    return mean, std


def probe_cv_counts(harmful: np.ndarray, harmless: np.ndarray, folds: int = DEFAULT_PROBE_FOLDS,
                    seed: int = 0) -> tuple[float, float, int, int]:
    """(mean, std over folds, correct, total) of the cross-validated probe: the counts feed a
    Wilson interval (:func:`core.metrics.wilson_interval`)."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise DirectionError(f"probe_folds must be at least 2, got {folds}")
    if len(harmful) == 0 or len(harmless) == 0:
        raise DirectionError("the probe needs prompts of both classes; one of harmful/harmless is empty")
    _check_fold_sizes(len(harmful), len(harmless), folds, "")
    x = np.concatenate([harmful, harmless]).astype(np.float64)
    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores, correct = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny/degenerate data
        for train_idx, test_idx in cv.split(x, y):
            hits = _probe_pipeline(seed).fit(x[train_idx], y[train_idx]).predict(x[test_idx]) == y[test_idx]
            scores.append(float(hits.mean()))
            correct += int(hits.sum())
    return float(np.mean(scores)), float(np.std(scores)), correct, len(y)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """[L, L] cosine similarity between rows (zero rows give 0)."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    u = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    return (u @ u.T).astype(np.float32)


# ---------------------------------------------------------------------------------------
# the main entry point
# ---------------------------------------------------------------------------------------
def fit_directions(
    harmful_train: np.ndarray,
    harmless_train: np.ndarray,
    harmful_test: np.ndarray | None = None,
    harmless_test: np.ndarray | None = None,
    *,
    method: str = "diff-in-means",
    position: str | int = "last",
    probe_folds: int = DEFAULT_PROBE_FOLDS,
    seed: int = 0,
    harmful_val: np.ndarray | None = None,
    harmless_val: np.ndarray | None = None,
) -> LayerDirections:
    """Fit one direction per layer on the train arrays and measure it (see module docstring).

    Held-out separation (and its bootstrap interval) is NaN where no test arrays are given;
    validation separation, where no validation arrays are given. Raises :class:`DirectionError`
    for unusable inputs: a missing class, fewer prompts than probe folds, or identical class
    means at every layer.
    """
    if method not in METHODS:
        raise DirectionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    h_tr = _check_acts("harmful_train", harmful_train)
    shape = h_tr.shape[1:]
    b_tr = _check_acts("harmless_train", harmless_train, shape)
    if len(h_tr) == 0 or len(b_tr) == 0:
        raise DirectionError("a direction needs both harmful and harmless train prompts; one set is empty")
    _check_fold_sizes(len(h_tr), len(b_tr), probe_folds, "train ")
    empty = np.zeros((0, *shape), dtype=np.float32)
    h_te = _check_acts("harmful_test", empty if harmful_test is None else harmful_test, shape)
    b_te = _check_acts("harmless_test", empty if harmless_test is None else harmless_test, shape)
    h_va = _check_acts("harmful_val", empty if harmful_val is None else harmful_val, shape)
    b_va = _check_acts("harmless_val", empty if harmless_val is None else harmless_val, shape)

    n_layers, d = shape
    mean_norm = np.linalg.norm(np.concatenate([h_tr, b_tr]), axis=-1).mean(0).astype(np.float32)
    diff = (h_tr.astype(np.float64).mean(0) - b_tr.astype(np.float64).mean(0))  # [L, d]
    diff_norm = np.linalg.norm(diff, axis=-1)
    zero = diff_norm <= ZERO_NORM_FRACTION * np.maximum(mean_norm, np.finfo(np.float32).tiny)
    if zero.all():
        raise DirectionError(
            "the harmful and harmless mean activations are identical at every layer, so there is no direction; "
            "check that the two prompt sets differ (and were formatted the same way)"
        )

    raw = np.zeros((n_layers, d), dtype=np.float64)
    for layer in range(n_layers):
        if zero[layer]:
            continue
        if method == "diff-in-means":
            v = diff[layer]
        elif method == "pca":
            v = _pca_direction(h_tr[:, layer].astype(np.float64), b_tr[:, layer].astype(np.float64))
        else:
            v = _probe_direction(h_tr[:, layer], b_tr[:, layer], seed)
        norm = np.linalg.norm(v)
        raw[layer] = v / norm * diff_norm[layer] if norm > 0 else 0.0
    norms = np.linalg.norm(raw, axis=-1, keepdims=True)
    unit = np.divide(raw, norms, out=np.zeros_like(raw), where=norms > 0)

    sep_test = np.full(n_layers, np.nan)
    sep_train = np.full(n_layers, np.nan)
    sep_val = np.full(n_layers, np.nan)
    sep_ci = np.full((n_layers, 2), np.nan)
    acc = np.full(n_layers, np.nan)
    acc_std = np.full(n_layers, np.nan)
    acc_ci = np.full((n_layers, 2), np.nan)
    from core.metrics import wilson_interval

    for layer in range(n_layers):
        u = unit[layer]
        if not zero[layer]:
            sep_train[layer] = separation(h_tr[:, layer] @ u, b_tr[:, layer] @ u)
            if len(h_te) and len(b_te):
                sep_test[layer] = separation(h_te[:, layer] @ u, b_te[:, layer] @ u)
                sep_ci[layer] = bootstrap_separation(h_te[:, layer] @ u, b_te[:, layer] @ u, seed=seed)
            if len(h_va) and len(b_va):
                sep_val[layer] = separation(h_va[:, layer] @ u, b_va[:, layer] @ u)
        acc[layer], acc_std[layer], k, n = probe_cv_counts(h_tr[:, layer], b_tr[:, layer], probe_folds, seed)
        acc_ci[layer] = wilson_interval(k, n)

    return LayerDirections(
        method=method,
        position=position,
        raw=raw.astype(np.float32),
        unit=unit.astype(np.float32),
        mean_norm=mean_norm,
        separation_sigma=sep_test.astype(np.float32),
        separation_in_sample=sep_train.astype(np.float32),
        probe_accuracy=acc.astype(np.float32),
        probe_accuracy_std=acc_std.astype(np.float32),
        cosine=cosine_matrix(raw),
        n_train=(len(h_tr), len(b_tr)),
        n_test=(len(h_te), len(b_te)),
        probe_folds=probe_folds,
        seed=seed,
        separation_validation=sep_val.astype(np.float32),
        separation_ci=sep_ci.astype(np.float32),
        probe_accuracy_ci=acc_ci.astype(np.float32),
        n_validation=(len(h_va), len(b_va)),
    )


def projections(acts: np.ndarray, dirs: LayerDirections, layer: int) -> np.ndarray:
    """Scalar projection ``[n]`` of ``acts[:, layer]`` (``[n, L, d]``) on the layer's unit direction."""
    a = np.asarray(acts, dtype=np.float32)
    if a.ndim != 3 or a.shape[1:] != (dirs.n_layers, dirs.d_model):
        raise DirectionError(f"expected activations [n, {dirs.n_layers}, {dirs.d_model}], got {a.shape}")
    return a[:, dirs.check_layer(layer)] @ dirs.direction(layer)
