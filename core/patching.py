"""Activation patching: which layers, positions, components and heads carry refusal.

Setup (TransformerLens vocabulary in brackets). A *pair* is a refusal prompt (harmful; the
model refuses) and a compliant prompt (harmless, same shape; the model answers), both formatted
by the same :class:`~core.formatting.Formatter` (template + preamble). The metric is the
refusal score (:func:`core.metrics.refusal_score`: log-odds of the refusal tokens) at the
first response position, i.e. the logits of the last prompt token.

* ``direction="compliant->refusal"`` (default; alias ``"denoise"``): run the refusal prompt
  [the *base* run] with one site replaced by its activation from the compliant prompt
  [the *source* run]. Effect 1 = that site alone turns refusal into compliance.
* ``direction="refusal->compliant"`` (alias ``"noise"``): the reverse; effect 1 = that site
  alone makes the compliant prompt refuse.

The normalised effect is ``(m_patched - m_base) / (m_source - m_base)``; for the default
direction that is the issue's ``(m_patched - m_refusal) / (m_compliant - m_refusal)``:
0 = no change, 1 = fully flipped to the source prompt's behaviour.

Sites (``lm`` names from :mod:`core.models`; every hook goes through :mod:`core.hooks`):

========  ==========================================  ==================  ==============
site      activation                                  hook                effects shape
========  ==========================================  ==================  ==============
resid     block output (residual stream)              ``edit_output``     [L, T]
attn      attention module output                     ``edit_output``     [L, T] or [L]
mlp       MLP output                                  ``edit_output``     [L, T] or [L]
head      one head's slice of the input of the        ``edit_input`` on   [L, H]
          attention output projection (``o_proj``,    ``attn_out_names``
          ``c_proj``, ``dense``): its ``head_dim``
          columns
========  ==========================================  ==================  ==============

``by_position`` (True, False, or the names of the sites to do by position) chooses per site
between one (layer, position) at a time [L, T] and a layer's component at every position at
once [L]. Patching a whole layer of the residual stream makes everything after it the source
run (effect 1 by construction), so ``resid`` is useful by position; heads are always by layer.
:func:`patch_pairs` defaults to ``by_position=("resid",)``: the layer × position heatmap for the
residual stream and attention-vs-MLP per layer. :func:`run_patches` runs custom patches (several
heads together, chosen positions).

Exactness and speed. Positions where the two prompts share every token so far (the template,
the preamble) have *identical* activations in both runs (causal attention), so patching them
changes nothing: their effect is exactly 0 and they are not run (``computed`` is False there;
``skip_shared_prefix=False`` runs them anyway). Patched runs of one pair differ only in the
patched site, so they are stacked as rows of one batch, each row with its own patch. A patch at
position ``p`` leaves positions before ``p`` untouched, so those rows start from the base run's
key/value cache cropped to ``p`` and only compute positions ``p..T-1`` (``prefix_cache=True``;
a control row without a patch checks this path against the plain run once per pair, and the
pair falls back to full forward passes if it disagrees). Clean runs happen once per pair.

Unequal token lengths (user pairs; the built-in pairs are equal). Positions are aligned on the
shared prefix (identical, effect 0) and on the longest shared token *suffix* (the template after
the instruction), counted from the end. Instruction positions without a counterpart are not
patched (effect NaN), layer-wise patches cover only the aligned positions, and the result's
``notes`` say so. A pair with no shared suffix at all is refused with :class:`PatchingError`.

Aggregation (:func:`patch_pairs`): pairs whose refusal run does not refuse (score <= 0) or whose
compliant run refuses (score >= 0) are excluded and counted by reason (``require_behaviour``:
False keeps all, ``"relative"`` only asks refusal score > compliant score; ``min_gap`` drops
pairs whose scores differ by less). Per site, the mean effect
over used pairs gets a two-sided 95 % Student-t interval (mean ± t(0.975, n-1)·sd/√n; NaN for
n < 2). By-position effects are aligned across pairs by offset from the last token (-1 = the
last prompt token); offsets inside a pair's shared prefix count as their exact 0. *Critical
components* are cells whose interval's lower bound exceeds ``threshold`` (default 0.1), sorted
by mean effect; when none qualify the list is empty and ``critical_message`` says so.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from core.errors import ExplorerError
from core.formatting import Formatter
from core.hooks import TraceDict
from core.metrics import refusal_score, refusal_token_ids
from core.models import LoadedModel

__all__ = [
    "SITES",
    "PatchingError",
    "PatchResult",
    "SiteStats",
    "CriticalSite",
    "PatchSweep",
    "Patch",
    "patch_pair",
    "run_patches",
    "patch_pairs",
    "aggregate",
    "normalise_direction",
]

SITES = ("resid", "attn", "mlp", "head")
CACHE_BUDGET_MB = 256.0  # key/value cache copied per forward pass (rows × prompt length)
DIRECTIONS = {
    "compliant->refusal": "compliant->refusal",
    "denoise": "compliant->refusal",
    "refusal->compliant": "refusal->compliant",
    "noise": "refusal->compliant",
}
Progress = Callable[[float, str], None]

# One patched run: which module, which batch row, base positions, source positions, columns.
# The runs of one forward pass all start at the same position ``start``.


class PatchingError(ExplorerError, ValueError):
    """A pair or option cannot be patched (no aligned positions, unknown site, ...)."""


def normalise_direction(direction: str) -> str:
    """``"compliant->refusal"`` or ``"refusal->compliant"`` (aliases: denoise, noise)."""
    try:
        return DIRECTIONS[direction]
    except KeyError:
        raise PatchingError(
            f"unknown direction {direction!r}; use 'compliant->refusal' (alias 'denoise': patch compliant "
            "activations into the refusal run) or 'refusal->compliant' (alias 'noise')"
        ) from None


def _check_sites(lm: LoadedModel, sites: Iterable[str]) -> tuple[str, ...]:
    sites = tuple(dict.fromkeys([sites] if isinstance(sites, str) else sites))
    if not sites:
        raise PatchingError("no sites given; choose from " + ", ".join(SITES))
    for s in sites:
        if s not in SITES:
            raise PatchingError(f"unknown site {s!r}; choose from {', '.join(SITES)}")
    names = {"attn": lm.attn_names, "mlp": lm.mlp_names, "head": lm.attn_out_names}
    for s, lst in names.items():
        if s in sites and any(n is None for n in lst):
            raise PatchingError(
                f"{lm.name}: site {s!r} is unavailable — no {s} module was found in every block "
                f"({type(lm.model).__name__}); patch 'resid' instead"
            )
    return sites


def _module_name(lm: LoadedModel, site: str, layer: int) -> str:
    if site == "resid":
        return lm.block_names[layer]
    if site == "attn":
        return lm.attn_names[layer]  # type: ignore[return-value]
    if site == "mlp":
        return lm.mlp_names[layer]  # type: ignore[return-value]
    return lm.attn_out_names[layer]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------
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
    not selected).
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
    by_position: list[str] = field(default_factory=list)  # sites done by position
    shared_prefix: int = 0  # tokens identical at the start of both prompts
    alignment: str = "equal-length"  # or "suffix" (unequal lengths)
    notes: list[str] = field(default_factory=list)
    n_forward: int = 0  # forward passes (clean + patched)
    n_patched: int = 0  # patched runs (batch rows)
    n_tokens: int = 0  # token positions the patched forward passes computed (the cost measure)
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
            "shared_prefix": int(self.shared_prefix),
            "alignment": self.alignment,
            "notes": list(self.notes),
            "n_forward": int(self.n_forward),
            "n_patched": int(self.n_patched),
            "n_tokens": int(self.n_tokens),
            "seconds": float(self.seconds),
            "used_prefix_cache": bool(self.used_prefix_cache),
        }


# ---------------------------------------------------------------------------------------
# one pair
# ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One clean run: token ids, score, retained activations ([T, d] per module name)."""

    ids: torch.Tensor  # [1, T]
    score: float
    acts: dict[str, torch.Tensor]
    cache: Any = None


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


@dataclass
class _Patch:
    """A resolved patch: one batch row. ``cell`` indexes the effects array it fills."""

    site: str
    layer: int
    cell: tuple
    base_pos: list[int]
    src_pos: list[int]
    heads: tuple[int, ...] | None = None


def _tokens(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in ids[0].tolist()]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _common_suffix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@dataclass
class _Alignment:
    aligned: dict[int, int]  # base position -> source position
    shared_prefix: int
    kind: str  # "equal-length" | "suffix"
    notes: list[str]


def _align(base: _Run, source: _Run) -> _Alignment:
    a, b = base.ids[0].tolist(), source.ids[0].tolist()
    T, Ts = len(a), len(b)
    cp = _common_prefix(a, b)
    if T == Ts:
        return _Alignment({i: i for i in range(T)}, cp, "equal-length", [])
    cs = _common_suffix(a, b, min(T, Ts) - cp)
    if cs == 0:
        raise PatchingError(
            f"the prompts have different token lengths ({T} vs {Ts}) and no shared template suffix "
            "to align on; use prompts of equal token length (rephrase one of them)"
        )
    aligned = {i: i for i in range(cp)}
    aligned.update({T - k: Ts - k for k in range(1, cs + 1)})
    note = (
        f"unequal token lengths ({T} vs {Ts}): positions aligned on the shared prefix ({cp} tokens, "
        f"identical) and the shared template suffix ({cs} tokens, counted from the end); the other "
        f"{T - cp - cs} instruction position(s) of the base prompt are not patched (NaN) and "
        "layer-wise patches cover only the aligned positions"
    )
    return _Alignment(aligned, cp, "suffix", [note])


@torch.inference_mode()
def _clean_run(lm: LoadedModel, ids: torch.Tensor, ref_ids: Sequence[int], retain_out: list[str],
               retain_in: list[str], keep_cache: bool) -> _Run:
    with TraceDict(lm.model, retain_out, retain_output=True) as out_tr, \
            TraceDict(lm.model, retain_in, retain_output=False, retain_input=True) as in_tr:
        res = lm.model(input_ids=ids, use_cache=keep_cache, logits_to_keep=1)
    acts = {n: out_tr[n].output[0].clone() for n in retain_out}
    acts.update({n: in_tr[n].input[0].clone() for n in retain_in})
    score = float(refusal_score(res.logits[:, -1, :], ref_ids)[0])
    return _Run(ids, score, acts, res.past_key_values if keep_cache else None)


def _clean_runs(lm: LoadedModel, formatter: Formatter, refusal_prompt: str, compliant_prompt: str,
                sites: Sequence[str], ref_ids: Sequence[int], direction: str, keep_cache: bool) -> tuple[_Run, _Run]:
    """(refusal run, compliant run): the source run retains every site, the base run its cache."""
    retain_out = [_module_name(lm, s, i) for s in sites if s != "head" for i in range(lm.n_layers)]
    retain_in = [lm.attn_out_names[i] for i in range(lm.n_layers)] if "head" in sites else []
    runs = []
    for prompt, source_when in ((refusal_prompt, "refusal->compliant"), (compliant_prompt, "compliant->refusal")):
        ids = formatter.encode([prompt], device=lm.device, context=lm.max_positions).input_ids
        is_source = source_when == direction
        runs.append(_clean_run(lm, ids, ref_ids, retain_out if is_source else [],
                               retain_in if is_source else [], keep_cache=keep_cache and not is_source))
    return runs[0], runs[1]


def _make_edits(lm: LoadedModel, rows: list[_Patch], start: int, source: _Run) -> tuple[dict, dict]:
    """Edit functions that write each row's source activation into that row's site only."""
    per_module: dict[tuple[str, bool], list] = {}
    hd = lm.head_dim
    for r, p in enumerate(rows):
        name = _module_name(lm, p.site, p.layer)
        src = source.acts[name][p.src_pos]
        pos = torch.tensor([q - start for q in p.base_pos], dtype=torch.long, device=src.device)
        if p.site == "head" and p.heads is not None:
            cols = torch.cat([torch.arange(h * hd, (h + 1) * hd, device=src.device) for h in p.heads])
            index: tuple = (r, pos.unsqueeze(1), cols.unsqueeze(0))
            src = src[:, cols]
        else:
            index = (r, pos)
        per_module.setdefault((name, p.site == "head"), []).append((index, src))

    def make(patches):
        def edit(hidden: torch.Tensor, _name: str) -> torch.Tensor:
            hidden = hidden.clone()  # never write into a tensor the model may still read
            for index, src in patches:
                hidden[index] = src.to(hidden.dtype)
            return hidden
        return edit

    out_edits = {n: make(v) for (n, is_in), v in per_module.items() if not is_in}
    in_edits = {n: make(v) for (n, is_in), v in per_module.items() if is_in}
    return out_edits, in_edits


@torch.inference_mode()
def _patched_scores(lm: LoadedModel, base: _Run, source: _Run, rows: list[_Patch], start: int,
                    ref_ids: Sequence[int], control: bool = False) -> np.ndarray:
    """Refusal scores of the base run with each row's patch, in one forward pass.

    ``start > 0`` starts from the base run's key/value cache cropped to ``start`` (every patch in
    ``rows`` leaves the positions before ``start`` untouched). ``control`` appends an unpatched row.
    """
    n = len(rows) + (1 if control else 0)
    T = base.ids.shape[1]
    kwargs: dict[str, Any] = {}
    if start > 0:
        cache = copy.deepcopy(base.cache)
        cache.crop(start - T)  # negative = tokens to remove (the one spelling old and new transformers share)
        if n > 1:
            cache.batch_repeat_interleave(n)
        kwargs["past_key_values"] = cache
    ids = base.ids[:, start:].expand(n, -1)
    pos_ids = torch.arange(start, T, device=ids.device).unsqueeze(0).expand(n, -1)
    out_edits, in_edits = _make_edits(lm, rows, start, source)
    with TraceDict(lm.model, list(out_edits), retain_output=False, edit_output=out_edits), \
            TraceDict(lm.model, list(in_edits), retain_output=False, edit_input=in_edits):
        logits = lm.model(input_ids=ids, position_ids=pos_ids, use_cache=start > 0,
                          logits_to_keep=1, **kwargs).logits[:, -1, :]
    return refusal_score(logits, ref_ids)


@dataclass
class _Execution:
    scores: np.ndarray
    n_forward: int
    used_cache: bool
    notes: list[str]
    n_tokens: int = 0  # token positions computed by the patched forward passes (rows × width)


def _kv_bytes_per_token(cache: Any, T: int) -> float:
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / max(T, 1)


def _execute(lm: LoadedModel, base: _Run, source: _Run, rows: list[_Patch], ref_ids: Sequence[int], *,
             prefix_cache: bool, token_budget: int, max_rows: int, progress: Progress | None,
             cache_budget_mb: float = CACHE_BUDGET_MB) -> _Execution:
    """Run every patch as a batch row. Rows are grouped by the first position they change; each
    group starts from the cached prefix before it and is split into chunks of at most
    ``token_budget`` tokens (rows × computed positions), ``max_rows`` rows and
    ``cache_budget_mb`` of copied key/value cache."""
    if token_budget < 1 or max_rows < 1:
        raise PatchingError("token_budget and max_rows must be at least 1")
    use_cache = prefix_cache and base.cache is not None
    T = base.ids.shape[1]
    kv_token = _kv_bytes_per_token(base.cache, T) if use_cache else 0.0
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(rows):
        groups.setdefault(min(p.base_pos) if use_cache else 0, []).append(i)
    scores = np.full(len(rows), np.nan)
    notes: list[str] = []
    n_forward, n_tokens, done, checked = 0, 0, 0, not use_cache
    for start in sorted(groups):
        idx = groups[start]
        size = max(1, min(max_rows, token_budget // max(1, T - start)))
        if use_cache and start > 0 and kv_token > 0:
            size = max(1, min(size, int(cache_budget_mb * 2**20 // (kv_token * T))))
        for c in range(0, len(idx), size):
            chunk_idx = idx[c: c + size]
            chunk = [rows[i] for i in chunk_idx]
            s = start if use_cache else 0
            control = not checked and s > 0
            out = _patched_scores(lm, base, source, chunk, s, ref_ids, control)
            n_forward += 1
            n_tokens += (len(chunk) + control) * (T - s)
            if control:
                checked = True
                ctrl = float(out[-1])
                out = out[:-1]
                if abs(ctrl - base.score) > 1e-3 + 1e-3 * abs(base.score):
                    notes.append(
                        f"the key/value-cache shortcut disagreed with the plain run (score {ctrl:.4f} vs "
                        f"{base.score:.4f}); this pair was patched with full forward passes instead"
                    )
                    use_cache = False
                    out = _patched_scores(lm, base, source, chunk, 0, ref_ids)
                    n_forward += 1
                    n_tokens += len(chunk) * T
            scores[chunk_idx] = out
            done += len(chunk)
            if progress:
                progress(done / len(rows), f"patched {done}/{len(rows)} runs")
    return _Execution(scores, n_forward, use_cache, notes, n_tokens)


def _resolve_positions(positions: str | Sequence[int], T: int, alignment: _Alignment, post: list[int],
                       differ: set[int]) -> list[int]:
    if isinstance(positions, str):
        if positions == "all":
            chosen = list(range(T))
        elif positions == "diff+suffix":
            chosen = sorted(differ | {T + k for k in post if T + k >= 0})
        else:
            raise PatchingError(f"unknown positions {positions!r}; use 'all', 'diff+suffix' or a list of ints")
    else:
        chosen = []
        for p in positions:
            q = int(p) + T if int(p) < 0 else int(p)
            if not 0 <= q < T:
                raise PatchingError(f"position {p} is outside the prompt ({T} tokens)")
            chosen.append(q)
        chosen = sorted(set(chosen))
    return [p for p in chosen if p in alignment.aligned]


def _position_sites(sites: Sequence[str], by_position: bool | Sequence[str]) -> set[str]:
    if isinstance(by_position, bool):
        return {s for s in sites if s != "head"} if by_position else set()
    chosen = {by_position} if isinstance(by_position, str) else set(by_position)
    if "head" in chosen:
        raise PatchingError("heads are patched by layer only (every position at once)")
    return chosen & set(sites)


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
        prefix_cache: start patched runs from the base run's key/value cache (exact up to float
            rounding; a control row checks it once per pair); False runs every row from token 0.
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
        if site in pos_sites:
            for p in pos_sel:
                if p < skip_below:  # identical activations in both runs: patching is a no-op
                    result.scores[site][:, p] = base.score
                else:
                    rows += [_Patch(site, layer, (layer, p), [p], [al.aligned[p]]) for layer in range(L)]
        elif not layer_pos:  # identical prompts
            result.scores[site][...] = base.score
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
    gap = result.gap
    for site in sites:
        result.effects[site] = (result.scores[site] - base.score) / gap if gap != 0 else np.full_like(result.scores[site], np.nan)
    if gap == 0:
        result.notes.append("the two prompts have the same refusal score: effects are undefined (NaN)")
    result.notes += ex.notes
    result.n_forward = 2 + ex.n_forward
    result.n_patched = len(rows)
    result.n_tokens = ex.n_tokens
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

    Returns ``{"scores": [n] raw refusal scores, "effects": [n] normalised effects, "m_refusal",
    "m_compliant", "notes"}``.
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
    return {
        "scores": ex.scores,
        "effects": (ex.scores - base.score) / gap if gap else np.full(len(rows), np.nan),
        "m_refusal": ref_run.score,
        "m_compliant": comp_run.score,
        "notes": al.notes + ex.notes,
    }


# ---------------------------------------------------------------------------------------
# many pairs
# ---------------------------------------------------------------------------------------
def _t_interval(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean, lower, upper, n) over axis 0: a two-sided 95 % Student-t interval, ignoring NaN."""
    import warnings

    from scipy import stats

    n = np.sum(np.isfinite(x), axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=0)
        sd = np.nanstd(x, axis=0, ddof=1)
    half = np.where(n > 1, stats.t.ppf(0.975, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, mean - half, mean + half, n


@dataclass
class SiteStats:
    """Mean effect and 95 % t-interval per cell of one site over the used pairs.

    For by-position sites the position axis is ``offsets`` (negative, from the last prompt
    token) with ``labels`` (the token where every pair has the same one, else ``"pos -k"``).
    """

    site: str
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: np.ndarray
    offsets: list[int] | None = None
    labels: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "mean": _json_array(self.mean),
            "lo": _json_array(self.lo),
            "hi": _json_array(self.hi),
            "n": np.asarray(self.n, dtype=int).tolist(),
            "offsets": self.offsets,
            "labels": self.labels,
        }


@dataclass
class CriticalSite:
    """One cell whose 95 % interval lies above the threshold."""

    site: str
    layer: int
    effect: float
    lo: float
    hi: float
    n: int
    offset: int | None = None  # by-position sites: position from the end (-1 = last token)
    token: str | None = None
    head: int | None = None

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
                "label": self.label}


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
    interval: str = "two-sided 95% Student-t interval of the mean over pairs (mean ± t(0.975, n-1)·sd/√n)"
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

    def to_dict(self, include_pairs: bool = False) -> dict[str, Any]:
        """JSON-ready. ``pairs`` holds each used pair's :meth:`PatchResult.summary`; with
        ``include_pairs=True`` its full :meth:`PatchResult.to_dict` (large: [L, T] arrays)."""
        return {
            "direction": self.direction,
            "by_position": self.by_position,
            "threshold": self.threshold,
            "interval": self.interval,
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
    if abs(m_refusal - m_compliant) < min_gap:
        return EXCLUDE_SMALL_GAP
    return None


def aggregate(results: Sequence[PatchResult], *, threshold: float = 0.1) -> tuple[dict[str, SiteStats], list[CriticalSite], str]:
    """Per-site statistics and critical cells over already patched pairs (see module doc)."""
    stats: dict[str, SiteStats] = {}
    critical: list[CriticalSite] = []
    if not results:
        return stats, critical, "no pairs were used, so no site can be called critical"
    for site in results[0].effects:
        arrs = [r.effects[site] for r in results]
        if site in ("resid", "attn", "mlp") and arrs[0].ndim == 2:
            # align by offset from the last token; shared-prefix cells are exact 0 already
            width = max(len(r.tokens) - r.shared_prefix for r in results)
            width = max(width, 1)
            stacked = np.full((len(arrs), arrs[0].shape[0], width), np.nan)
            for k, a in enumerate(arrs):
                w = min(width, a.shape[1])
                stacked[k, :, width - w:] = a[:, a.shape[1] - w:]
            offsets = list(range(-width, 0))
            labels = []
            for off in offsets:
                toks = {r.tokens[len(r.tokens) + off] for r in results if len(r.tokens) + off >= 0}
                labels.append(next(iter(toks)) if len(toks) == 1 else f"pos {off}")
            mean, lo, hi, n = _t_interval(stacked)
            stats[site] = SiteStats(site, mean, lo, hi, n, offsets, labels)
        else:
            mean, lo, hi, n = _t_interval(np.stack(arrs))
            stats[site] = SiteStats(site, mean, lo, hi, n)
        st = stats[site]
        for cell in zip(*np.nonzero(np.nan_to_num(st.lo, nan=-np.inf) > threshold)):
            c = CriticalSite(site, int(cell[0]), float(st.mean[cell]), float(st.lo[cell]), float(st.hi[cell]), int(st.n[cell]))
            if site == "head":
                c.head = int(cell[1])
            elif len(cell) == 2:
                c.offset = st.offsets[cell[1]]  # type: ignore[index]
                c.token = st.labels[cell[1]]  # type: ignore[index]
            critical.append(c)
    critical.sort(key=lambda c: -c.effect)
    if critical:
        message = f"{len(critical)} site(s) have a 95% interval whose lower bound exceeds {threshold:g}"
    else:
        message = (f"no site qualifies as critical: no 95% interval's lower bound exceeds {threshold:g} "
                   f"(n = {len(results)} pair(s))")
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
    min_gap: float = 0.0,
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
    ``min_gap`` (log-odds, default 0 = off) also excludes pairs whose clean scores differ by
    less: the normalised effect divides by that gap, so a tiny gap makes it noisy.
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
    stats, critical, message = aggregate(used, threshold=threshold)
    return PatchSweep(
        direction=direction, sites=stats, critical=critical, critical_message=message,
        threshold=float(threshold), n_candidates=len(pairs), n_used=len(used), excluded=excluded,
        pairs=used, by_position=sorted(_position_sites(sites, by_position)), formatter=formatter.describe(), model=lm.summary(),
        seconds=time.perf_counter() - started,
    )
