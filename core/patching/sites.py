"""Patching sites, directions and position alignment: which activation a site names, how the
positions of two prompts of a pair correspond, which positions a sweep patches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from core.errors import ExplorerError
from core.models import LoadedModel
from core.progress import Progress

if TYPE_CHECKING:
    from core.patching.engine import _Run

SITES = ("resid", "attn", "mlp", "head")
DIRECTIONS = {
    "compliant->refusal": "compliant->refusal",
    "denoise": "compliant->refusal",
    "refusal->compliant": "refusal->compliant",
    "noise": "refusal->compliant",
}


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


def fixed_effect(site: str, layer: int, base_pos: Sequence[int], *, n_layers: int, T: int,
                 shared_prefix: int, equal_length: bool) -> float | None:
    """The normalised effect a patch has whatever the weights, or None when it must be measured.

    1: the patch writes the source run's residual stream into every position the logits can
    still depend on — the last block's output at the last position (only the final norm and the
    unembedding follow it), or a whole layer's residual stream at every position where the
    prompts differ (equal token lengths; the shared prefix is identical anyway). 0: the last
    block's outputs (or its attention / MLP / head outputs) at earlier positions, which nothing reads,
    and positions inside the shared prefix. Such cells say nothing about the model, so they are
    marked and never tested or listed as critical.
    """
    pos = set(base_pos)
    if not pos or max(pos) < shared_prefix:
        return 0.0
    if site == "resid" and layer == n_layers - 1 and T - 1 in pos:
        return 1.0
    if site == "resid" and equal_length and pos >= set(range(shared_prefix, T)):
        return 1.0
    if layer == n_layers - 1 and T - 1 not in pos:
        return 0.0
    return None
