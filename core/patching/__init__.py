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
pair falls back to full forward passes if it disagrees). Blocks below a patch's layer are the
base run's too, so on Llama-style and Gemma 3 decoders each row joins the pass at its own block
(:mod:`core.patching.staggered`; about half the arithmetic). Clean runs happen once per pair.

Unequal token lengths (user pairs; the built-in pairs are equal). Positions are aligned on the
shared prefix (identical, effect 0) and on the longest shared token *suffix* (the template after
the instruction), counted from the end. Instruction positions without a counterpart are not
patched (effect NaN), layer-wise patches cover only the aligned positions, and the result's
``notes`` say so. A pair with no shared suffix at all is refused with :class:`PatchingError`.

Aggregation (:func:`patch_pairs`): pairs whose refusal run does not refuse (score <= 0) or whose
compliant run refuses (score >= 0) are excluded and counted by reason (``require_behaviour``:
False keeps all, ``"relative"`` only asks refusal score > compliant score; ``min_gap``, off by
default, also drops pairs whose scores differ by less). Per cell, the *pooled effect* over used
pairs is the ratio of sums Σ|gap|·effect / Σ|gap|: the effect divides by the pair's score gap,
so a plain mean would be dominated by pairs whose prompts score almost alike; pooled, each pair
counts by its gap. It gets a two-sided 95 % Fieller interval (NaN for n < 2).
By-position effects are aligned across pairs by offset from the last token (-1 = the last
prompt token); offsets inside a pair's shared prefix count as their exact 0.

Cells fixed by construction (:func:`fixed_effect`) are marked and never tested: effect 1 for the
last block's output at the last position (only the final norm and unembedding follow it) and
for a whole layer's residual stream (equal lengths), effect 0 for the last block's outputs at
earlier positions (nothing reads them). *Critical components* are the other cells whose
one-sided t-test of "pooled effect ≤ ``threshold``" (default 0.1) is rejected by the
Benjamini–Hochberg rule at false-discovery rate ``fdr`` (default 0.05) over every cell tested in
the sweep, sorted by pooled effect; when none qualify the list is empty and ``critical_message``
says so.

Modules: :mod:`~core.patching.sites` (sites, directions, alignment, fixed cells),
:mod:`~core.patching.engine` (clean and batched patched runs), :mod:`~core.patching.pair` (one
pair), :mod:`~core.patching.sweep` (many pairs, exclusions, critical list),
:mod:`~core.patching.stats` (t-intervals, tests, Benjamini–Hochberg).
"""

from core.patching.engine import CACHE_BUDGET_MB
from core.patching.pair import Patch, PatchResult, patch_pair, run_patches
from core.patching.sites import DIRECTIONS, SITES, PatchingError, fixed_effect, normalise_direction
from core.patching.stats import benjamini_hochberg, bh_adjust, pooled_effect, t_test_greater
from core.patching.sweep import (
    EXCLUDE_COMPLIANT_REFUSES,
    EXCLUDE_NO_GAP,
    EXCLUDE_NOT_MORE_REFUSING,
    EXCLUDE_NOT_REFUSING,
    EXCLUDE_SMALL_GAP,
    DEFAULT_FDR,
    DEFAULT_MIN_GAP,
    CriticalSite,
    PatchSweep,
    SiteStats,
    aggregate,
    patch_pairs,
)

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
    "fixed_effect",
    "benjamini_hochberg",
    "bh_adjust",
    "t_test_greater",
    "pooled_effect",
    "DEFAULT_FDR",
    "DEFAULT_MIN_GAP",
]
