"""Patching one pair: every requested site of one (refusal, compliant) pair, or custom patches."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from core.formatting import Formatter
from core.metrics import refusal_token_ids
from core.models import LoadedModel
from core.patching.engine import _Patch, _Run, _clean_runs, _execute
from core.patching.sites import (
    PatchingError,
    Progress,
    _align,
    _check_sites,
    _position_sites,
    fixed_effect,
    _resolve_positions,
    _tokens,
    normalise_direction,
)


def _json_array(a: np.ndarray) -> list:
    """Nested lists with NaN as None (JSON has no NaN)."""
    arr = np.asarray(a, dtype=float)
    flat = [None if not math.isfinite(x) else float(x) for x in arr.ravel().tolist()]
    return np.array(flat, dtype=object).reshape(arr.shape).tolist() if arr.ndim else flat[0]


@dataclass
class PatchResult:
    """Patching results for one pair, all sites.

    ``effects[site]`` is the normalised effect (see module doc): [L, T] for ``resid`` and for
    ``attn``/``mlp`` when ``by_position``; [L] for layer-wise ``attn``/``mlp``; [L, H] for
    ``head``. T indexes the *base* run's tokens (``tokens``: the refusal prompt for the default
    direction). ``scores[site]`` holds the raw patched refusal scores, ``computed[site]`` is True
    where a patched run was made (False: exact 0 in the shared prefix, or NaN = not aligned /
    not selected). ``fixed[site]`` is the effect a cell has by construction, whatever the model
    (:func:`~core.patching.sites.fixed_effect`: 1 for the last block's output at the last
    position, 0 for positions nothing downstream reads), NaN where it has to be measured.
    """

    refusal_prompt: str
    compliant_prompt: str
    direction: str
    tokens: list[str]  # base run tokens (decoded one by one)
    source_tokens: list[str]
    m_refusal: float
    m_compliant: float
    effects: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    computed: dict[str, np.ndarray] = field(default_factory=dict)
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # effect by construction, NaN = measured
    by_position: list[str] = field(default_factory=list)  # sites done by position
    shared_prefix: int = 0  # tokens identical at the start of both prompts
    alignment: str = "equal-length"  # or "suffix" (unequal lengths)
    notes: list[str] = field(default_factory=list)
    n_forward: int = 0  # forward passes (clean + patched)
    n_patched: int = 0  # patched runs (batch rows)
    n_tokens: int = 0  # token positions the patched forward passes computed (the cost measure)
    n_block_tokens: int = 0  # token positions × blocks computed (below n_tokens × L when blocks are skipped)
    seconds: float = 0.0
    used_prefix_cache: bool = True

    @property
    def m_base(self) -> float:
        return self.m_refusal if self.direction == "compliant->refusal" else self.m_compliant

    @property
    def m_source(self) -> float:
        return self.m_compliant if self.direction == "compliant->refusal" else self.m_refusal

    @property
    def gap(self) -> float:
        """m_source − m_base: the denominator of every normalised effect."""
        return self.m_source - self.m_base

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.effects)

    def top(self, site: str, k: int = 5) -> list[dict[str, Any]]:
        """The ``k`` cells of ``site`` with the largest effect, as dicts (layer, position/head)."""
        eff = self.effects[site]
        flat = np.where(np.isfinite(eff), eff, -np.inf).ravel()
        out = []
        for idx in np.argsort(-flat)[:k]:
            if not np.isfinite(flat[idx]):
                break
            cell = np.unravel_index(idx, eff.shape)
            d: dict[str, Any] = {"site": site, "layer": int(cell[0]), "effect": float(eff[cell])}
            if eff.ndim == 2 and site == "head":
                d["head"] = int(cell[1])
            elif eff.ndim == 2:
                d["position"] = int(cell[1])
                d["token"] = self.tokens[int(cell[1])]
            out.append(d)
        return out

    def summary(self, k: int = 5) -> dict[str, Any]:
        """Small JSON-ready digest: prompts, clean scores, the top ``k`` cells per site."""
        return {
            "refusal_prompt": self.refusal_prompt,
            "compliant_prompt": self.compliant_prompt,
            "m_refusal": float(self.m_refusal),
            "m_compliant": float(self.m_compliant),
            "prompt_tokens": len(self.tokens),
            "shared_prefix": int(self.shared_prefix),
            "alignment": self.alignment,
            "notes": list(self.notes),
            "seconds": float(self.seconds),
            "top": {site: self.top(site, k) for site in self.effects},
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, arrays as nested lists (NaN -> None)."""
        return {
            "refusal_prompt": self.refusal_prompt,
            "compliant_prompt": self.compliant_prompt,
            "direction": self.direction,
            "tokens": list(self.tokens),
            "source_tokens": list(self.source_tokens),
            "m_refusal": float(self.m_refusal),
            "m_compliant": float(self.m_compliant),
            "by_position": self.by_position,
            "effects": {k: _json_array(v) for k, v in self.effects.items()},
            "scores": {k: _json_array(v) for k, v in self.scores.items()},
            "computed": {k: np.asarray(v, dtype=bool).tolist() for k, v in self.computed.items()},
            "fixed": {k: _json_array(v) for k, v in self.fixed.items()},
            "shared_prefix": int(self.shared_prefix),
            "alignment": self.alignment,
            "notes": list(self.notes),
            "n_forward": int(self.n_forward),
            "n_patched": int(self.n_patched),
            "n_tokens": int(self.n_tokens),
            "n_block_tokens": int(self.n_block_tokens),
            "seconds": float(self.seconds),
            "used_prefix_cache": bool(self.used_prefix_cache),
        }



@dataclass(frozen=True)
class Patch:
    """One custom patched run for :func:`run_patches`.

    ``site`` as in :data:`SITES`; ``positions`` are base-run token indices (negative = from the
    end; None = every aligned position); ``heads`` (site ``"head"`` only) the heads patched
    together (None = all heads of the layer, which equals patching the whole input of the
    attention output projection).
    """

    site: str
    layer: int
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None



def _prepare(lm, formatter, refusal_prompt, compliant_prompt, sites, refusal_ids, direction, prefix_cache, _clean):
    direction = normalise_direction(direction)
    sites = _check_sites(lm, sites)
    ref_ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(lm.tokenizer)
    if _clean is None:
        _clean = _clean_runs(lm, formatter, refusal_prompt, compliant_prompt, sites, ref_ids, direction,
                             keep_cache=prefix_cache)
    ref_run, comp_run = _clean
    base, source = (ref_run, comp_run) if direction == "compliant->refusal" else (comp_run, ref_run)
    return direction, sites, ref_ids, ref_run, comp_run, base, source


def patch_pair(
    lm: LoadedModel,
    formatter: Formatter,
    refusal_prompt: str,
    compliant_prompt: str,
    *,
    sites: str | Sequence[str] = ("resid",),
    by_position: bool | Sequence[str] = True,
    direction: str = "compliant->refusal",
    positions: str | Sequence[int] = "all",
    refusal_ids: Sequence[int] | None = None,
    token_budget: int = 4096,
    max_rows: int = 256,
    prefix_cache: bool = True,
    skip_shared_prefix: bool = True,
    progress: Progress | None = None,
    _clean: tuple[_Run, _Run] | None = None,
) -> PatchResult:
    """Patch every requested site of one pair; definitions in the module docstring.

    Args:
        refusal_prompt / compliant_prompt: bare instructions (``formatter`` adds the template
            and preamble to both).
        sites: any of ``"resid"``, ``"attn"``, ``"mlp"``, ``"head"``.
        by_position: True = ``resid``/``attn``/``mlp`` per (layer, position) [L, T]; False = per
            layer [L] (every position at once; for ``resid`` that is 1 by construction, a sanity
            check); or the names of the sites to do by position, e.g. ``("resid",)``. Heads are
            always per layer [L, H].
        direction: ``"compliant->refusal"`` (default, alias ``"denoise"``) or
            ``"refusal->compliant"`` (alias ``"noise"``).
        positions: positions of the by-position sites: ``"all"`` (default), ``"diff+suffix"`` (the
            tokens that differ between the prompts plus the post-instruction template tokens), or
            a list of indices (negative = from the end). Unselected cells are NaN.
        refusal_ids: token ids for :func:`~core.metrics.refusal_score` (default:
            :func:`~core.metrics.refusal_token_ids` of the tokenizer).
        token_budget / max_rows: at most this many tokens (rows × computed positions) and patched
            runs per forward pass.
        prefix_cache: start patched runs from the base run's key/value cache and, on Llama-style
            and Gemma 3 decoders, at their patched block from the base run's residual stream
            (:mod:`core.patching.staggered`; exact up to float rounding, a control row checks it
            once per pair); False runs every row from token 0 through every block.
        skip_shared_prefix: do not run positions inside the shared token prefix (effect exactly 0,
            ``computed`` False there); False runs them too.
        progress: ``progress(fraction, message)`` after every forward pass.
    """
    started = time.perf_counter()
    direction, sites, ref_ids, ref_run, comp_run, base, source = _prepare(
        lm, formatter, refusal_prompt, compliant_prompt, sites, refusal_ids, direction, prefix_cache, _clean)
    al = _align(base, source)
    a, b = base.ids[0].tolist(), source.ids[0].tolist()
    T, L = len(a), lm.n_layers
    skip_below = al.shared_prefix if skip_shared_prefix else 0
    differ = {i for i, j in al.aligned.items() if a[i] != b[j]}
    pos_sel = _resolve_positions(positions, T, al, formatter.post_instruction_positions(), differ)
    layer_pos = [p for p in sorted(al.aligned) if p >= skip_below]
    pos_sites = _position_sites(sites, by_position)

    result = PatchResult(
        refusal_prompt=refusal_prompt, compliant_prompt=compliant_prompt, direction=direction,
        tokens=_tokens(lm.tokenizer, base.ids), source_tokens=_tokens(lm.tokenizer, source.ids),
        m_refusal=ref_run.score, m_compliant=comp_run.score, by_position=sorted(pos_sites),
        shared_prefix=al.shared_prefix, alignment=al.kind, notes=list(al.notes),
    )
    rows: list[_Patch] = []
    for site in sites:
        if site == "head":
            shape: tuple = (L, lm.n_heads)
        elif site in pos_sites:
            shape = (L, T)
        else:
            shape = (L,)
        result.scores[site] = np.full(shape, np.nan)
        result.computed[site] = np.zeros(shape, dtype=bool)
        result.fixed[site] = np.full(shape, np.nan)
        if site in pos_sites:
            for p in pos_sel:
                if p < skip_below:  # identical activations in both runs: patching is a no-op
                    result.scores[site][:, p] = base.score
                    result.fixed[site][:, p] = 0.0
                else:
                    rows += [_Patch(site, layer, (layer, p), [p], [al.aligned[p]]) for layer in range(L)]
        elif not layer_pos:  # identical prompts
            result.scores[site][...] = base.score
            result.fixed[site][...] = 0.0
        else:
            src_pos = [al.aligned[p] for p in layer_pos]
            if site == "head":
                rows += [_Patch(site, layer, (layer, h), layer_pos, src_pos, heads=(h,))
                         for layer in range(L) for h in range(lm.n_heads)]
            else:
                rows += [_Patch(site, layer, (layer,), layer_pos, src_pos) for layer in range(L)]

    ex = _execute(lm, base, source, rows, ref_ids, prefix_cache=prefix_cache, token_budget=token_budget,
                  max_rows=max_rows, progress=progress)
    for p, sc in zip(rows, ex.scores):
        result.scores[p.site][p.cell] = sc
        result.computed[p.site][p.cell] = True
        fixed = fixed_effect(p.site, p.layer, p.base_pos, n_layers=L, T=T, shared_prefix=al.shared_prefix,
                             equal_length=al.kind == "equal-length")
        if fixed is not None:
            result.fixed[p.site][p.cell] = fixed
    gap = result.gap
    for site in sites:
        result.effects[site] = (result.scores[site] - base.score) / gap if gap != 0 else np.full_like(result.scores[site], np.nan)
    if gap == 0:
        result.notes.append("the two prompts have the same refusal score: effects are undefined (NaN)")
    result.notes += ex.notes
    result.n_forward = 2 + ex.n_forward
    result.n_patched = len(rows)
    result.n_tokens = ex.n_tokens
    result.n_block_tokens = ex.n_block_tokens
    result.used_prefix_cache = ex.used_cache
    result.seconds = time.perf_counter() - started
    return result


def run_patches(
    lm: LoadedModel,
    formatter: Formatter,
    refusal_prompt: str,
    compliant_prompt: str,
    patches: Sequence[Patch],
    *,
    direction: str = "compliant->refusal",
    refusal_ids: Sequence[int] | None = None,
    prefix_cache: bool = True,
    token_budget: int = 4096,
    max_rows: int = 256,
) -> dict[str, Any]:
    """Custom patched runs (e.g. several heads together), batched like :func:`patch_pair`.

    Returns ``{"scores": [n] raw refusal scores, "effects": [n] normalised effects, "fixed": [n]
    effects by construction (NaN = measured; see :func:`~core.patching.sites.fixed_effect`),
    "m_refusal", "m_compliant", "notes"}``.
    """
    sites = tuple(dict.fromkeys(p.site for p in patches)) or ("resid",)
    direction, sites, ref_ids, ref_run, comp_run, base, source = _prepare(
        lm, formatter, refusal_prompt, compliant_prompt, sites, refusal_ids, direction, prefix_cache, None)
    al = _align(base, source)
    T = base.ids.shape[1]
    rows = []
    for k, p in enumerate(patches):
        lm.check_layer(p.layer)
        if p.positions is None:
            pos = sorted(al.aligned)
        else:
            pos = sorted({q + T if q < 0 else q for q in p.positions})
            missing = [q for q in pos if q not in al.aligned]
            if missing:
                raise PatchingError(f"position(s) {missing} have no counterpart in the other prompt (see notes of patch_pair)")
        heads = None
        if p.site == "head":
            heads = tuple(range(lm.n_heads)) if p.heads is None else tuple(p.heads)
            if any(not 0 <= h < lm.n_heads for h in heads):
                raise PatchingError(f"head index out of range: {lm.name} has {lm.n_heads} heads per layer")
        elif p.heads is not None:
            raise PatchingError("heads can only be given for site 'head'")
        rows.append(_Patch(p.site, lm.check_layer(p.layer), (k,), pos, [al.aligned[q] for q in pos], heads))
    ex = _execute(lm, base, source, rows, ref_ids, prefix_cache=prefix_cache, token_budget=token_budget,
                  max_rows=max_rows, progress=None)
    gap = source.score - base.score
    fixed = [fixed_effect(r.site, r.layer, r.base_pos, n_layers=lm.n_layers, T=T, shared_prefix=al.shared_prefix,
                          equal_length=al.kind == "equal-length") for r in rows]
    return {
        "scores": ex.scores,
        "effects": (ex.scores - base.score) / gap if gap else np.full(len(rows), np.nan),
        "fixed": np.array([np.nan if f is None else f for f in fixed]),
        "m_refusal": ref_run.score,
        "m_compliant": comp_run.score,
        "notes": al.notes + ex.notes,
    }
